"""CoSwin: the Florence image encoder.

A Swin Transformer (4 stages of shifted-window attention with a learned
relative position bias) whose patch embedding and patch merging are replaced
by CvT-style convolutional embeddings: an overlapping strided conv followed by
LayerNorm (Florence §2.3; CvT, Wu et al. 2021). Global average pooling gives
the image feature.

The plain Swin stem and merging (Liu et al. 2021; UniCL's Swin image
encoder, timm's SwinTransformer) are options of the same model, so imported
Swin weights run on this code: `stem="patch"` is a non-overlapping
patch_size x patch_size conv (kernel = stride = `stem_stride`, no padding) +
LayerNorm, and `merge="patch"` is Swin's PatchMerging (each 2x2 neighbourhood
concatenated to 4C, LayerNorm, bias-free Linear 4C -> 2C).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from florax.models import layers, windows
from kernels.window_attention import window_attention


@dataclasses.dataclass(frozen=True)
class CoSwinConfig:
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  stem_kernel: int = 7
  stem_stride: int = 4
  merge_kernel: int = 3
  merge_stride: int = 2
  # "conv": CvT convolutional embeddings (CoSwin, the default); "patch":
  # Swin's non-overlapping patch embedding (kernel = stride = stem_stride;
  # stem_kernel unused) and 2x2 PatchMerging (needs merge_stride 2;
  # merge_kernel unused), for imported Swin weights.
  stem: str = "conv"
  merge: str = "conv"
  drop_path_rate: float = 0.2
  attention_impl: str = "xla"
  remat: str = "none"
  # nn.scan over each stage's (plain, shifted) block pairs: compile time stays
  # flat in depth. Parameters then live under "stage{s}_pairs" with a leading
  # "layers" axis; every stage depth must be even.
  scan: bool = False


# Widths follow Swin (T/S/B/L: Liu et al. 2021). Florence does not publish
# CoSwin-H's widths; C=352 with Swin-H-like heads and a 16-block third stage
# lands on the paper's 637M (pinned in tests/test_param_counts.py).
PRESETS = {
    # CPU quickstart: 32 px -> 8x8 tokens (CvT's 7/4 stem), windows of 4.
    "tiny": dict(embed_dim=64, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 drop_path_rate=0.0),
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
              drop_path_rate=0.3),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
              drop_path_rate=0.5),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
              drop_path_rate=0.5),
    "H": dict(embed_dim=352, depths=(2, 2, 16, 2), num_heads=(11, 22, 44, 88),
              drop_path_rate=0.5),
}


EMBEDDINGS = ("conv", "patch")


def stage_grids(image_size: int, cfg: CoSwinConfig) -> list[int]:
  """Token grid side of every stage, checking the stride schedule."""
  total = cfg.stem_stride * cfg.merge_stride ** (len(cfg.depths) - 1)
  if image_size % total:
    raise ValueError(
        f"image_size {image_size} does not fit the CoSwin stride schedule: it "
        f"must be a multiple of {total} (stem stride {cfg.stem_stride} x merge "
        f"stride {cfg.merge_stride}^{len(cfg.depths) - 1})")
  grid = image_size // cfg.stem_stride
  grids = []
  for i in range(len(cfg.depths)):
    grids.append(grid)
    grid //= cfg.merge_stride
  return grids


def validate(cfg: CoSwinConfig, image_size: int):
  """Checks a config before anything is compiled; raises ValueError."""
  if len(cfg.depths) != len(cfg.num_heads):
    raise ValueError(f"CoSwin depths {tuple(cfg.depths)} and num_heads "
                     f"{tuple(cfg.num_heads)} must have the same length")
  for i, h in enumerate(cfg.num_heads):
    dim = cfg.embed_dim * 2 ** i
    if dim % h:
      raise ValueError(f"CoSwin stage {i}: width {dim} is not divisible by "
                       f"{h} heads")
  for field in ("stem", "merge"):
    if getattr(cfg, field) not in EMBEDDINGS:
      raise ValueError(f"CoSwin {field}={getattr(cfg, field)!r} is not one of "
                       f"{EMBEDDINGS}")
  if cfg.merge == "patch" and cfg.merge_stride != 2:
    raise ValueError(f"CoSwin merge='patch' merges 2x2 neighbourhoods, so "
                     f"merge_stride must be 2, got {cfg.merge_stride}")
  if cfg.window_size < 1:
    raise ValueError(f"window_size must be positive, got {cfg.window_size}")
  layers.maybe_remat(nn.Module, cfg.remat)  # validates the policy name
  if cfg.scan and any(d % 2 for d in cfg.depths):
    raise ValueError(f"CoSwin scan=True scans (plain, shifted) block pairs, so "
                     f"every stage depth must be even; got {tuple(cfg.depths)}")
  stage_grids(image_size, cfg)


class ConvEmbed(nn.Module):
  """CvT convolutional token embedding: overlapping strided conv + LN.

  With `patchify` the conv is Swin's patch embedding instead: kernel =
  stride, no padding, so every patch is embedded on its own.
  """
  features: int
  kernel: int
  stride: int
  dtype: Any = jnp.float32
  patchify: bool = False

  @nn.compact
  def __call__(self, x):
    pad = 0 if self.patchify else (self.kernel - 1) // 2
    x = nn.Conv(
        self.features, (self.kernel, self.kernel), strides=self.stride,
        padding=((pad, pad), (pad, pad)), dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            layers.default_kernel_init, (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("embed",)),
        name="conv")(x)
    return layers.layer_norm(name="norm")(x).astype(self.dtype)


class PatchMerging(nn.Module):
  """Swin's downsampling: each 2x2 neighbourhood concatenated to 4C (in the
  order (0,0), (1,0), (0,1), (1,1) of (row, column) offsets: Swin's x0..x3,
  timm's reshape/permute), LayerNorm over 4C, bias-free Linear to
  `features`. The grid is even (checked by `stage_grids`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    # (B, H/2, dy, W/2, dx, C) -> (B, H/2, W/2, dx, dy, C): the column offset
    # is the slower one in Swin's concatenation.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = layers.layer_norm(name="norm", axis_name="conv_in")(x)
    return layers.dense(self.features, ("conv_in", "embed"), dtype=self.dtype,
                        use_bias=False, name="reduction")(x)


class WindowAttention(nn.Module):
  """Multi-head self-attention within (shifted) windows of a (B,H,W,C) map."""
  num_heads: int
  window_size: int
  shift: int
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    win, shift = windows.effective_window((h, w), self.window_size, self.shift)
    hp, wp = windows.padded_grid((h, w), win)
    qkv = layers.dense((3, self.num_heads, head_dim),
                       ("embed", None, "heads", "kv"), dtype=self.dtype,
                       name="qkv")(x)                     # (B,H,W,3,h,d)
    qkv = jnp.pad(qkv, ((0, 0), (0, hp - h), (0, wp - w), (0, 0), (0, 0),
                        (0, 0)))
    if any(shift):
      qkv = jnp.roll(qkv, (-shift[0], -shift[1]), axis=(1, 2))
    qkv = qkv.reshape(b, hp, wp, -1)
    qkv = windows.partition(qkv, win).reshape(
        -1, win[0] * win[1], 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    w_tab = self.window_size
    table = self.param(
        "relative_position_bias",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                     ("relpos", "heads")),
        ((2 * w_tab - 1) ** 2, self.num_heads), jnp.float32)
    index = windows.relative_position_index(win, w_tab)
    bias = jnp.transpose(table[index], (2, 0, 1))          # (heads, N, N)
    mask = windows.attention_mask((h, w), win, shift)
    out = window_attention(q, k, v, bias,
                           None if mask is None else jnp.asarray(mask),
                           implementation=self.attention_impl)
    out = windows.merge(out.reshape(out.shape[0], out.shape[1], -1), win,
                        (hp, wp))
    out = out.reshape(b, hp, wp, self.num_heads, head_dim)
    if any(shift):
      out = jnp.roll(out, shift, axis=(1, 2))
    out = out[:, :h, :w]
    return layers.dense(c, ("heads", "kv", "embed"), dtype=self.dtype,
                        name="proj", axis=(-2, -1))(out)


class SwinBlock(nn.Module):
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float
  drop_path: float
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.with_logical_constraint(x, ("batch", "height", "width", "embed"))
    y = layers.layer_norm(name="norm1")(x).astype(self.dtype)
    y = WindowAttention(self.num_heads, self.window_size, self.shift,
                        self.attention_impl, self.dtype, name="attn")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = layers.layer_norm(name="norm2")(x).astype(self.dtype)
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
                   name="mlp")(y, deterministic)
    return x + layers.DropPath(self.drop_path)(y, deterministic)


class _ScannedSwinPair(nn.Module):
  """One scan step: a plain then a shifted-window block, (rematerialised)
  with their drop-path rates as the scanned input."""
  config: CoSwinConfig
  num_heads: int
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rates):
    cfg = self.config
    block_cls = layers.maybe_remat(SwinBlock, cfg.remat, static_argnums=(2,))
    for j, (name, shift) in enumerate((("plain", 0),
                                       ("shifted", cfg.window_size // 2))):
      x = block_cls(self.num_heads, cfg.window_size, shift, cfg.mlp_ratio,
                    rates[j], cfg.attention_impl, self.dtype,
                    name=name)(x, self.deterministic)
    return x, None


class CoSwin(nn.Module):
  """Returns (pooled feature (B, C_last), aux: per-stage feature maps and
  the normed final map "tokens" (B, H, W, C_last))."""
  config: CoSwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    cfg = self.config
    rates = layers.drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
    block_cls = layers.maybe_remat(SwinBlock, cfg.remat, static_argnums=(2,))
    patch_stem = cfg.stem == "patch"
    x = ConvEmbed(cfg.embed_dim,
                  cfg.stem_stride if patch_stem else cfg.stem_kernel,
                  cfg.stem_stride, self.dtype, patchify=patch_stem,
                  name="stem")(images.astype(self.dtype))
    features = []
    i_block = 0
    for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      if s > 0 and cfg.merge == "patch":
        x = PatchMerging(cfg.embed_dim * 2 ** s, self.dtype,
                         name=f"merge{s}")(x)
      elif s > 0:
        x = ConvEmbed(cfg.embed_dim * 2 ** s, cfg.merge_kernel,
                      cfg.merge_stride, self.dtype, name=f"merge{s}")(x)
      if cfg.scan:
        stack = nn.scan(
            _ScannedSwinPair, variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True}, in_axes=0,
            length=depth // 2,
            metadata_params={nn.PARTITION_NAME: "layers"})
        stage_rates = jnp.asarray(rates[i_block:i_block + depth],
                                  jnp.float32).reshape(depth // 2, 2)
        x, _ = stack(cfg, heads, deterministic, self.dtype,
                     name=f"stage{s}_pairs")(x, stage_rates)
        i_block += depth
      for d in range(0 if cfg.scan else depth):
        x = block_cls(heads, cfg.window_size,
                      0 if d % 2 == 0 else cfg.window_size // 2,
                      cfg.mlp_ratio, rates[i_block], cfg.attention_impl,
                      self.dtype, name=f"stage{s}_block{d}")(x, deterministic)
        i_block += 1
      features.append(x)
    x = layers.layer_norm(name="norm")(x)
    pooled = jnp.mean(x, axis=(1, 2))
    # tokens: the final map after the norm (a teacher's patch features).
    return pooled, {"stage_features": features, "tokens": x}


def resize_relative_position_bias(table, window_size: int):
  """A ((2w-1)^2, heads) bias table (any leading axes, e.g. scan's layers)
  resized to `window_size` by bicubic interpolation of its (2w-1)x(2w-1)
  offset grid, head by head: how Swin/timm carry a table to a new window
  when fine-tuning at another resolution. The grid's extent maps onto the
  new one (half-pixel centres), so the bias learned for offset d applies at
  d * (2w'-1)/(2w-1): at a higher resolution the same image content spans
  proportionally more tokens.

  The table is indexed row-major by (dy, dx) + w - 1
  (`windows.relative_position_index`), which is why it reshapes to a grid.
  """
  import jax  # pylint: disable=g-import-not-at-top
  *lead, length, heads = table.shape
  side = int(round(length ** 0.5))
  if side * side != length or side % 2 == 0:
    raise ValueError(f"a relative position bias table has (2w-1)^2 rows, got "
                     f"{length}")
  new_side = 2 * window_size - 1
  grid = jnp.asarray(table).reshape(*lead, side, side, heads)
  # Only the two grid axes change size, so jax.image.resize interpolates
  # along them alone: heads (and layers) are never mixed.
  out = jax.image.resize(grid, (*lead, new_side, new_side, heads), "bicubic")
  return out.reshape(*lead, new_side * new_side, heads)
