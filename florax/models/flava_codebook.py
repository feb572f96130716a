"""FLAVA's visual codebook: the DALL-E dVAE encoder (Ramesh et al. 2021)
that FLAVA's MIM / MMM targets come from (FLAVA §3.2, "we use the same dVAE
tokenizer as in BEiT"), as Hugging Face ships it (FlavaImageCodebook).

A frozen image tokenizer: pixels (B, S, S, 3), prepared as FLAVA's
processor does for the codebook (112 px for 224 px images, values in
[0, 1] mapped to 0.1 + 0.8 x), become logits over `vocab_size` visual words
on an (S/8, S/8) grid; `indices` is their argmax (the MIM targets),
`probs` their softmax.

The network, as DALL-E's encoder:

  input    conv 7x7, 3 -> h
  group1   blocks h -> h,   max-pool 2
  group2   blocks h -> 2h,  max-pool 2
  group3   blocks 2h -> 4h, max-pool 2
  group4   blocks 4h -> 8h
  output   relu, conv 1x1, 8h -> vocab

each group `num_blocks_per_group` residual blocks
  x -> id_path(x) + post_gain * res_path(x),
  res_path = relu, conv3x3 (-> out/4), relu, conv3x3, relu, conv3x3, relu,
             conv1x1 (-> out),
  id_path  = a 1x1 conv when the width changes, else the identity,
  post_gain = 1 / (4 * num_blocks_per_group)^2.

Parameter names (florax.convert.hf_flava maps HF's; numbering 1-based as
DALL-E's and HF's): input, group{g}/block{b}/{id_path, res_path/conv{1..4}},
output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.models import layers

# DALL-E's encoder has four groups; the widths 1, 2, 4, 8 x hidden are its.
NUM_GROUPS = 4


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
  hidden: int = 256
  num_blocks_per_group: int = 2
  vocab_size: int = 8192
  image_size: int = 112

  @property
  def grid(self) -> int:
    return self.image_size // 8

  @property
  def post_gain(self) -> float:
    return 1.0 / (NUM_GROUPS * self.num_blocks_per_group) ** 2


# 'full': HF's FlavaImageCodebookConfig() (facebook/flava-image-codebook),
# 53,786,240 params (tests/test_flava_model.py).
PRESETS = {"full": CodebookConfig}


def validate(cfg: CodebookConfig):
  if cfg.hidden % 4:
    raise ValueError(f"codebook hidden {cfg.hidden} is not divisible by 4 "
                     "(each residual path is out/4 wide)")
  if cfg.num_blocks_per_group < 1 or cfg.vocab_size < 1:
    raise ValueError("codebook num_blocks_per_group and vocab_size must be "
                     "positive")
  if cfg.image_size % 8:
    raise ValueError(f"codebook image_size {cfg.image_size} is not a "
                     "multiple of 8 (three 2x poolings)")


def _conv(features, kernel, name, dtype, out_axis="embed"):
  pad = (kernel - 1) // 2
  return nn.Conv(
      features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
      dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
          layers.default_kernel_init, (None, None, "conv_in", out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             (out_axis,)),
      name=name)


class ResPath(nn.Module):
  """relu, conv3x3 (-> features/4), relu, conv3x3, relu, conv3x3, relu,
  conv1x1 (-> features)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = self.features // 4
    for i, (width, kernel) in enumerate(
        ((hidden, 3), (hidden, 3), (hidden, 3), (self.features, 1)), 1):
      x = _conv(width, kernel, f"conv{i}", self.dtype)(jax.nn.relu(x))
    return x


class CodebookBlock(nn.Module):
  features: int
  post_gain: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != self.features:
      identity = _conv(self.features, 1, "id_path", self.dtype)(x)
    else:
      identity = x
    return identity + self.post_gain * ResPath(self.features, self.dtype,
                                               name="res_path")(x)


class CodebookGroup(nn.Module):
  features: int
  num_blocks: int
  post_gain: float
  pool: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for b in range(1, self.num_blocks + 1):
      x = CodebookBlock(self.features, self.post_gain, self.dtype,
                        name=f"block{b}")(x)
    if self.pool:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class ImageCodebook(nn.Module):
  """pixels (B, S, S, 3) -> logits (B, S/8, S/8, vocab_size), fp32."""
  config: CodebookConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    if tuple(images.shape[1:3]) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"codebook built for {cfg.image_size}px images got "
                       f"{images.shape[1]}x{images.shape[2]}")
    x = _conv(cfg.hidden, 7, "input", self.dtype)(images.astype(self.dtype))
    for g in range(1, NUM_GROUPS + 1):
      x = CodebookGroup(cfg.hidden * 2 ** (g - 1), cfg.num_blocks_per_group,
                        cfg.post_gain, g < NUM_GROUPS, self.dtype,
                        name=f"group{g}")(x)
    x = _conv(cfg.vocab_size, 1, "output", self.dtype, "vocab")(
        jax.nn.relu(x))
    return x.astype(jnp.float32)

  def indices(self, images):
    """The visual word of every 8x8 cell: (B, S/8, S/8) int32."""
    return jnp.argmax(self(images), axis=-1).astype(jnp.int32)

  def probs(self, images):
    return jax.nn.softmax(self(images), axis=-1)
