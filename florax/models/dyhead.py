"""Dynamic Head (Dai et al. 2021, "Dynamic Head: Unifying Object Detection
Heads with Attentions"): the attention blocks Florence's object-level
adapter stacks (6 of them) on a feature pyramid.

The paper's block (eq. 2) is W(F) = pi_C(pi_S(pi_L(F) . F) . F) . F over the
pyramid F of L levels resized to a common size: scale-aware pi_L, then
spatial-aware pi_S, then task-aware pi_C. This module follows the authors'
released implementation of it for multi-resolution levels, which keeps
every level at its own resolution and, for output level l, aggregates only
the neighbouring levels l-1, l, l+1:

spatial-aware (eq. 4, DCNv2 sparse sampling): a 3x3 conv on F_l predicts 27
  channels: offsets [dy_0, dx_0, dy_1, dx_1, ..., dy_8, dx_8] (kernel point
  k = 3 * ky + kx, row-major), then 9 mask logits m_k; mask = sigmoid(m_k).
  The offset conv is zero-initialised, so a fresh block samples the plain
  3x3 grid with mask 1/2. Three modulated deformable 3x3 convs (own weights,
  each followed by GroupNorm, shared by all levels) give, on level l's grid:
    S_same   = GN(DCN_same(F_l; offsets_l, mask_l, stride 1))
    S_fine   = GN(DCN_fine(F_{l-1}; offsets_l, mask_l, stride 2))    (l > 0)
    S_coarse = Up(GN(DCN_coarse(F_{l+1}; offsets_l[::2, ::2],
                                mask_l[::2, ::2], stride 1)))       (l < L-1)
  `deformable_conv`: output pixel (i, j), kernel point (ky, kx) samples the
  input at (i * stride - 1 + ky + dy_k, j * stride - 1 + kx + dx_k) by
  bilinear interpolation (zero outside the map), scales by mask_k, and the
  samples meet the kernel in one matmul over (kernel points x C_in) (+ bias).
  Offsets are in the sampled map's own pixels at every level (as released:
  level l's prediction is used unscaled on l-1 and l+1).
  Fine path: level l pixel i centres on level l-1 pixel 2 i (the alignment
  of a stride-2 3x3 pad-1 conv, how the levels are made), so level l's
  offsets index the stride-2 output directly.
  Coarse path: the conv runs on level l+1's own grid (cheaper than
  upsampling first), with level l's offsets/mask taken at the level-l
  pixel each level-(l+1) pixel centres on, index min(2 i, H_l - 1); its
  output is bilinearly upsampled to level l's size with align_corners=True
  (source = dest * (n_in - 1) / (n_out - 1): torch's upsample_bilinear, as
  released). The released code instead passes level l's full-size
  offsets/mask to the coarser conv, whose kernel reads each sample's
  (27, H_l, W_l) buffer as if it were (27, H_{l+1}, W_{l+1}), i.e. only its
  first quarter, scrambled (microsoft/DynamicHead issue #25): not a
  geometric rule, so not reproduced.

scale-aware (eq. 3): for each of the (up to 3) maps S on level l's grid,
  pi_L = hard_sigmoid(ReLU(w . mean_{h,w} S + b)), a scalar per sample and
  map (w: C -> 1, shared by all levels and paths), hard_sigmoid(x) =
  relu6(x + 3) / 6; the level's feature is the mean over its maps of
  pi_L * S (the 1/L of eq. 4). Because the deformable convs are linear and
  pi_L a per-level scalar, weighting their outputs realises the paper's
  pi_S(pi_L(F) . F) nesting, with the weight read from the sampled map (as
  released; a weight read before the GroupNorm would be cancelled by it).

task-aware (eq. 5, dynamic ReLU DyReLU-A style, per channel): from the
  level's feature X, y = hard_sigmoid(FC_2(ReLU(FC_1(mean_{h,w} X)))) with
  FC_1: C -> max(C // 4, 1), FC_2: -> 4C, split in four contiguous C-chunks
  (y1, y2, y3, y4);
    a1 = 2 (y1 - 0.5) + 1,  b1 = y2 - 0.5,  a2 = 2 (y3 - 0.5),  b2 = y4 - 0.5
  (DyReLU's lambda_a = 1 doubled, init_a = (1, 0), init_b = (0, 0)), and
  out = max(a1 X + b1, a2 X + b2): an identity-ish ReLU at init (a1 ~ 1,
  a2, b1, b2 ~ 0).

Initialisation as released: deformable-conv weights N(0, 0.01^2), scale
attention N(0, 0.01^2), zero biases; the offset conv zero (DCNv2).

Blocks are applied in sequence without residuals (as released). NHWC
throughout; computations in `dtype`, params float32, norms, pooled
statistics and sampling coordinates in float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax.models import layers, pyramid

GN_GROUPS = 16


def hard_sigmoid(x):
  """relu6(x + 3) / 6 (DyHead's h_sigmoid)."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def deformable_conv(x, offsets, mask, kernel, stride: int = 1, bias=None):
  """Modulated deformable convolution (DCNv2), one deformable group.

  Args:
    x: (B, H, W, C_in) input.
    offsets: (B, Ho, Wo, 2K), K = kh * kw, interleaved (dy_k, dx_k) for
      kernel point k = kw * ky + kx; (Ho, Wo) is the output grid.
    mask: (B, Ho, Wo, K) modulation (already through a sigmoid).
    kernel: (kh, kw, C_in, C_out).
    stride: output pixel (i, j) centres on input (i * stride, j * stride).
    bias: optional (C_out,).

  Point k of output (i, j) samples x at (i * stride - (kh - 1) // 2 + ky +
  dy_k, j * stride - (kw - 1) // 2 + kx + dx_k) bilinearly, the four
  neighbours outside the map counting zero; with zero offsets, mask 1 and
  the natural grid ((H - 1) // stride + 1 for 3x3) it is a conv padded 1
  on every side. Returns (B, Ho, Wo, C_out) in x's dtype.
  """
  b, h, w, cin = x.shape
  kh, kw, kin, cout = kernel.shape
  k = kh * kw
  _, ho, wo, two_k = offsets.shape
  if kin != cin or two_k != 2 * k or mask.shape != (b, ho, wo, k):
    raise ValueError(f"deformable_conv: input {x.shape}, offsets "
                     f"{offsets.shape}, mask {mask.shape}, kernel "
                     f"{kernel.shape} do not fit")
  ky, kx = np.divmod(np.arange(k), kw)
  base_y = (np.arange(ho) * stride - (kh - 1) // 2)[:, None, None] + ky
  base_x = (np.arange(wo) * stride - (kw - 1) // 2)[None, :, None] + kx
  # Coordinates in float32 whatever the compute dtype: bf16 cannot even
  # hold pixel indices above 256 exactly.
  offsets = offsets.astype(jnp.float32)
  py = base_y.astype(np.float32) + offsets[..., 0::2]          # (B,Ho,Wo,K)
  px = base_x.astype(np.float32) + offsets[..., 1::2]
  y0, x0 = jnp.floor(py), jnp.floor(px)
  fy, fx = (py - y0)[..., None], (px - x0)[..., None]
  # The four neighbours on a trailing axis, order (0,0), (0,1), (1,0), (1,1).
  cy, cx = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
  yy = y0.astype(jnp.int32)[..., None] + cy                   # (B,Ho,Wo,K,4)
  xx = x0.astype(jnp.int32)[..., None] + cx
  inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
  weight = (jnp.where(cy == 1, fy, 1.0 - fy)
            * jnp.where(cx == 1, fx, 1.0 - fx))
  # The modulation scalar folds into the corner weights: one multiply less
  # on the (.., C_in) samples; outside neighbours weigh zero (zero padding).
  weight = jnp.where(inside, weight, 0.0) * mask.astype(
      jnp.float32)[..., None]
  # One flat gather over the whole batch (cheaper on CPU than a vmapped
  # one); indices are clipped, their weight already zero where it mattered.
  index = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
           + (jnp.arange(b) * (h * w))[:, None, None, None, None])
  samples = jnp.take(x.reshape(b * h * w, cin), index.reshape(-1), axis=0,
                     mode="clip").reshape(b * ho * wo, k, 4, cin)
  # Multiply-and-sum rather than a (.., 4) x (4, C) batched dot: it fuses
  # and compiles several times faster (the gradient especially).
  cols = jnp.sum(weight.reshape(b * ho * wo, k, 4, 1).astype(x.dtype)
                 * samples, axis=2)
  out = jnp.dot(cols.reshape(b * ho * wo, k * cin),
                kernel.reshape(k * cin, cout).astype(x.dtype))
  if bias is not None:
    out = out + bias.astype(x.dtype)
  return out.reshape(b, ho, wo, cout)


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights, source = d (n_in - 1) /
  (n_out - 1) (align_corners=True; 0 when either side is 1)."""
  src = (np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 and
         n_in > 1 else np.zeros(n_out))
  i0 = np.clip(np.floor(src).astype(int), 0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m.astype(np.float32)


def resize_bilinear_align_corners(x, size: tuple[int, int]):
  """Bilinear resize of (B, H, W, C) to (B, *size, C), align_corners=True,
  as two small static matmuls (separable)."""
  _, h, w, _ = x.shape
  my = jnp.asarray(_align_corners_matrix(size[0], h), x.dtype)
  mx = jnp.asarray(_align_corners_matrix(size[1], w), x.dtype)
  return jnp.einsum("yh,bhwc,xw->byxc", my, x, mx)


class DeformConvNorm(nn.Module):
  """A modulated deformable 3x3 conv (C -> C, bias) + GroupNorm; the
  offsets/mask come from outside (DyHead predicts them once per level)."""
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, offsets, mask):
    c = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, None, "conv_in", "embed")),
                        (3, 3, c, c), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (c,), jnp.float32)
    y = deformable_conv(x.astype(self.dtype), offsets, mask, kernel,
                        self.stride, bias)
    y = pyramid.group_norm(c, GN_GROUPS, name="norm")(y)
    return y.astype(self.dtype)


class ScaleAttention(nn.Module):
  """pi_L over a level's maps: mean_k hard_sigmoid(ReLU(w . GAP(S_k) + b))
  * S_k, one (w, b) for all maps."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence):
    fc = layers.dense(1, ("embed", None), dtype=jnp.float32, name="fc",
                      kernel_init=nn.initializers.normal(0.01))
    out = 0.0
    for s in maps:
      pooled = jnp.mean(s.astype(jnp.float32), axis=(1, 2))     # (B, C)
      attn = hard_sigmoid(nn.relu(fc(pooled)))                  # (B, 1)
      out = out + s * attn[:, None, None, :].astype(s.dtype)
    return (out / len(maps)).astype(self.dtype)


class DyReLU(nn.Module):
  """Task-aware attention: a per-channel dynamic ReLU (see the module
  docstring for the coefficients)."""
  reduction: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))       # (B, C)
    y = layers.dense(max(c // self.reduction, 1), ("embed", "mlp"),
                     dtype=jnp.float32, name="fc1")(pooled)
    y = layers.dense(4 * c, ("mlp", "embed"), dtype=jnp.float32,
                     name="fc2")(nn.relu(y))
    y = hard_sigmoid(y)[:, None, None, :].astype(self.dtype)
    y1, y2, y3, y4 = jnp.split(y, 4, axis=-1)
    a1 = 2.0 * (y1 - 0.5) + 1.0
    b1 = y2 - 0.5
    a2 = 2.0 * (y3 - 0.5)
    b2 = y4 - 0.5
    x = x.astype(self.dtype)
    return jnp.maximum(a1 * x + b1, a2 * x + b2)


class DyHeadBlock(nn.Module):
  """One DyHead block over a pyramid (list of (B, H_l, W_l, C), finest
  first); returns the new pyramid, same shapes."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence) -> list:
    features = [f.astype(self.dtype) for f in features]
    c = features[0].shape[-1]
    offset_conv = pyramid.conv(27, 3, dtype=self.dtype, name="offset",
                               kernel_init=nn.initializers.zeros,
                               axes=(None, None, "conv_in", None))
    conv_same = DeformConvNorm(1, self.dtype, name="conv_same")
    conv_fine = DeformConvNorm(2, self.dtype, name="conv_fine")
    conv_coarse = DeformConvNorm(1, self.dtype, name="conv_coarse")
    scale_attn = ScaleAttention(self.dtype, name="scale_attn")
    dyrelu = DyReLU(dtype=self.dtype, name="dyrelu")
    outs = []
    n = len(features)
    for l, f in enumerate(features):
      if f.shape[-1] != c:
        raise ValueError(f"DyHead levels must share one width; level {l} has "
                         f"{f.shape[-1]} channels, level 0 {c}")
      om = offset_conv(f).astype(jnp.float32)
      offsets, mask = om[..., :18], jax.nn.sigmoid(om[..., 18:])
      maps = [conv_same(f, offsets, mask)]
      if l > 0:
        maps.append(conv_fine(features[l - 1], offsets, mask))
      if l < n - 1:
        coarse = features[l + 1]
        iy = np.minimum(2 * np.arange(coarse.shape[1]), f.shape[1] - 1)
        ix = np.minimum(2 * np.arange(coarse.shape[2]), f.shape[2] - 1)
        s = conv_coarse(coarse, offsets[:, iy][:, :, ix],
                        mask[:, iy][:, :, ix])
        maps.append(resize_bilinear_align_corners(s, f.shape[1:3]))
      outs.append(dyrelu(scale_attn(maps)))
    return outs


class DyHead(nn.Module):
  """`num_blocks` DyHeadBlocks in sequence (blocks named block{i})."""
  num_blocks: int = 6
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, features: Sequence) -> list:
    block_cls = layers.maybe_remat(DyHeadBlock, self.remat)
    features = list(features)
    for i in range(self.num_blocks):
      features = block_cls(self.dtype, name=f"block{i}")(features)
    return features
