"""Feature pyramids for the detector: FPN over a hierarchical backbone and
ViTDet's simple pyramid over a plain ViT's single map.

`FeaturePyramid` (FPN, Lin et al. 2017, with RetinaNet/ATSS's extra levels):
given backbone maps C_1..C_n (NHWC, strides increasing by 2)

  L_i = Conv1x1(C_i)                                  (lateral, to `channels`)
  M_n = L_n;  M_i = L_i + Up(M_{i+1}, shape(L_i))     (top-down pathway)
  P_i = Conv3x3(M_i)                                  (output convs)
  P_{n+1} = Conv3x3_s2(P_n);  P_{k+1} = Conv3x3_s2(ReLU(P_k))  (extra levels)

until `num_levels` maps. Up is nearest-neighbour resampling to the exact
shape of the finer lateral: destination index d reads source index
floor(d * n_src / n_dst) (torch's F.interpolate(size=..., mode="nearest")),
which is the plain 2x repeat when the sizes halve exactly and still defined
when they do not (odd sizes from a stride-2 conv: 7 -> 4). The extra convs
are torch-style padded (1 pixel each side), so a level of side n gives
ceil(n / 2) (lax's SAME pads (0, 1) at stride 2 on even sides instead).
The first extra level reads P_n itself (ATSS's `use_P5`: the FPN output
already has `channels` channels), the following ones read ReLU(P_k).

`SimplePyramid` (ViTDet, Li et al. 2022, §3 "simple feature pyramid"): from
the single stride-p map of a plain ViT, one branch per scale factor s
(finest first, e.g. (4, 2, 1, 0.5)):

  s = 4:   ConvT2x2_s2 -> LayerNorm -> GELU -> ConvT2x2_s2  (widths D/2, D/4)
  s = 2:   ConvT2x2_s2                                       (width D/2)
  s = 1:   identity                                          (width D)
  s = 0.5: MaxPool2x2_s2                                     (width D)

each followed by Conv1x1 -> LayerNorm -> Conv3x3 -> LayerNorm to `channels`
(convs bias-free, as ViTDet with a norm), then the same extra stride-2 levels
as above. LayerNorm is over channels per pixel (ViTDet's channels-first LN in
NHWC), epsilon 1e-6. The max pool is VALID (an odd side n gives floor(n/2)).

Conventions: everything NHWC; convs compute in `dtype` with float32 params;
norms run in float32. Lists are finest level first.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from florax.models import layers

# detectron2's c2_xavier_fill (kaiming_uniform, a=1): uniform with variance
# 1/fan_in, zero bias.
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

VALID_SCALES = (4.0, 2.0, 1.0, 0.5)


def conv(features: int, kernel: int = 3, stride: int = 1, *, dtype=jnp.float32,
         name=None, use_bias: bool = True,
         kernel_init: Callable = fpn_kernel_init,
         bias_init: Callable = nn.initializers.zeros,
         axes: tuple = (None, None, "conv_in", "embed")) -> nn.Conv:
  """A square conv padded (kernel - 1) // 2 on every side (torch-style, so a
  stride-2 3x3 conv maps side n to ceil(n / 2) whatever n's parity), params
  float32 with logical axis names."""
  pad = (kernel - 1) // 2
  return nn.Conv(
      features, (kernel, kernel), strides=stride,
      padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes[-1:]),
      name=name)


def group_count(channels: int, max_groups: int) -> int:
  """The largest group count <= max_groups that divides `channels` (16 of
  256 as DyHead; fewer on the narrow CPU models)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def group_norm(channels: int, max_groups: int, name=None,
               epsilon: float = 1e-5) -> nn.GroupNorm:
  """GroupNorm in float32 (torch's eps 1e-5), groups from `group_count`."""
  return nn.GroupNorm(
      num_groups=group_count(channels, max_groups), epsilon=epsilon,
      dtype=jnp.float32, param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                              ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             ("embed",)),
      name=name)


def resize_nearest(x, size: tuple[int, int]):
  """Nearest-neighbour resampling of (B, H, W, C) to (B, *size, C): output
  index d reads floor(d * n_in / n_out) (static gathers, any sizes)."""
  _, h, w, _ = x.shape
  iy = (np.arange(size[0]) * h) // size[0]
  ix = (np.arange(size[1]) * w) // size[1]
  return x[:, iy][:, :, ix]


def vit_feature_map(tokens, grid, num_prefix: int | None = None):
  """A plain ViT's patch tokens (B, N, D), N = prefix + gh * gw (class token
  first, row-major patches: vit.ViT's aux["tokens"]), as a (B, gh, gw, D)
  map. `grid` is gh or (gh, gw); num_prefix defaults to N - gh * gw."""
  gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
  b, n, d = tokens.shape
  if num_prefix is None:
    num_prefix = n - gh * gw
  if num_prefix < 0 or n - num_prefix != gh * gw:
    raise ValueError(f"{n} tokens with {num_prefix} prefix tokens do not form "
                     f"a {gh}x{gw} patch grid")
  return tokens[:, num_prefix:].reshape(b, gh, gw, d)


class ExtraLevels(nn.Module):
  """Stride-2 3x3 convs appended to a pyramid until it has `num_levels`
  maps: the first on the last map, the following after a ReLU
  (RetinaNet's P6/P7)."""
  channels: int
  num_levels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: list) -> list:
    maps = list(maps)
    first = len(maps)
    for i in range(first, self.num_levels):
      x = maps[-1] if i == first else nn.relu(maps[-1])
      maps.append(conv(self.channels, 3, 2, dtype=self.dtype,
                       name=f"extra{i}")(x))
    return maps


class FeaturePyramid(nn.Module):
  """FPN over a list of NHWC backbone maps at increasing strides; returns
  `num_levels` maps of `channels` channels, finest first."""
  channels: int
  num_levels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence) -> list:
    n = len(features)
    if not 1 <= n <= self.num_levels:
      raise ValueError(f"FeaturePyramid with num_levels={self.num_levels} got "
                       f"{n} backbone maps (need 1..num_levels)")
    laterals = [conv(self.channels, 1, dtype=self.dtype, name=f"lateral{i}")(
        f.astype(self.dtype)) for i, f in enumerate(features)]
    merged = [None] * n
    merged[-1] = laterals[-1]
    for i in range(n - 2, -1, -1):
      merged[i] = laterals[i] + resize_nearest(merged[i + 1],
                                               laterals[i].shape[1:3])
    outs = [conv(self.channels, 3, dtype=self.dtype, name=f"output{i}")(m)
            for i, m in enumerate(merged)]
    return ExtraLevels(self.channels, self.num_levels, self.dtype,
                       name="extra")(outs)


class SimplePyramid(nn.Module):
  """ViTDet's simple feature pyramid from one (B, h, w, D) map; `scales`
  finest first, a subset of (4, 2, 1, 0.5); returns `num_levels` maps."""
  channels: int
  num_levels: int
  scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x) -> list:
    scales = tuple(float(s) for s in self.scales)
    if any(s not in VALID_SCALES for s in scales) or list(scales) != sorted(
        set(scales), reverse=True):
      raise ValueError(f"SimplePyramid scales {self.scales} must be distinct, "
                       f"decreasing and from {VALID_SCALES}")
    if not 1 <= len(scales) <= self.num_levels:
      raise ValueError(f"SimplePyramid: {len(scales)} scales for "
                       f"num_levels={self.num_levels}")
    x = x.astype(self.dtype)
    dim = x.shape[-1]

    def up(features, name):
      return nn.ConvTranspose(
          features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              layers.default_kernel_init, (None, None, "conv_in", "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ("embed",)),
          name=name)

    def norm(name):
      return layers.layer_norm(name=name, epsilon=1e-6)

    outs = []
    for i, s in enumerate(scales):
      if s == 4.0:
        y = up(dim // 2, f"scale{i}_up0")(x)
        y = nn.gelu(norm(f"scale{i}_up_norm")(y), approximate=False)
        y = up(dim // 4, f"scale{i}_up1")(y.astype(self.dtype))
      elif s == 2.0:
        y = up(dim // 2, f"scale{i}_up0")(x)
      elif s == 1.0:
        y = x
      else:
        y = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      y = conv(self.channels, 1, dtype=self.dtype, use_bias=False,
               name=f"scale{i}_lateral")(y)
      y = norm(f"scale{i}_lateral_norm")(y).astype(self.dtype)
      y = conv(self.channels, 3, dtype=self.dtype, use_bias=False,
               name=f"scale{i}_output")(y)
      outs.append(norm(f"scale{i}_output_norm")(y).astype(self.dtype))
    return ExtraLevels(self.channels, self.num_levels, self.dtype,
                       name="extra")(outs)
