"""Vision Transformer on the shared encoder (florax.models.transformer).

Patch embedding (a conv of kernel = stride = patch), an optional class
token, learned absolute position embeddings (interpolated by init_from and
the weight importers when the resolution changes), an optional pre-norm
(CLIP's ln_pre), the encoder, then class-token or mean pooling (mean with
fc_norm as BEiT/timm 'avg').

Presets are registered by big_vision's short names ("B/16", "L/14", "g/14",
...): `config_for("L/14", image_size=224)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from florax.models import layers, transformer


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  class_token: bool = True
  pre_norm: bool = False
  patch_bias: bool = True
  pool: str = "cls"
  fc_norm: bool = False
  qkv_bias: str = "full"
  layer_scale: Optional[float] = None
  act: str = "gelu"
  norm_eps: float = 1e-6
  sub_ln: bool = False
  rope: bool = False
  # timm's ref_feat_shape: the grid rope positions are scaled to (None: the
  # native grid); see transformer.rope_2d.
  rope_ref_grid: Optional[tuple[int, int]] = None
  rel_pos_bias: str = "none"
  # False: no absolute position embedding (BEiT with relative bias only).
  pos_embed: bool = True
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: str = "none"
  scan: bool = False
  attention_impl: str = "xla"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_prefix(self) -> int:
    return int(self.class_token)

  def encoder(self) -> transformer.EncoderConfig:
    return transformer.EncoderConfig(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias,
        layer_scale=self.layer_scale, act=self.act, sub_ln=self.sub_ln,
        norm_eps=self.norm_eps, rel_pos_bias=self.rel_pos_bias,
        rope=self.rope, rope_ref_grid=None if self.rope_ref_grid is None
        else tuple(self.rope_ref_grid), dropout=self.dropout,
        drop_path_rate=self.drop_path_rate, remat=self.remat, scan=self.scan,
        attention_impl=self.attention_impl)

  def layout(self) -> transformer.TokenLayout:
    return transformer.TokenLayout(self.num_prefix, (self.grid, self.grid))


# big_vision's widths (Zhai et al. 2022, "Scaling Vision Transformers"):
# name: (width, depth, mlp_dim, heads). g is EVA's 40 x 1408 x 6144 x 16
# (1011M at /14, pinned in tests/test_param_counts.py).
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    # CPU tests and demos.
    "tiny": (64, 2, 128, 2),
}


def config_for(name: str, image_size: int = 224, **overrides) -> ViTConfig:
  """ViTConfig of a short name "SIZE/PATCH", e.g. "B/16", "g/14"."""
  try:
    size, patch = name.split("/")
    width, depth, mlp_dim, heads = SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError):
    raise ValueError(f"unknown ViT preset {name!r}: use SIZE/PATCH with SIZE "
                     f"one of {sorted(SIZES)}, e.g. 'B/16'") from None
  return ViTConfig(image_size=image_size, patch_size=patch, width=width,
                   depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                   **overrides)


def validate(cfg: ViTConfig, image_size: int | None = None):
  size = cfg.image_size if image_size is None else image_size
  if size != cfg.image_size:
    raise ValueError(f"ViT image_size {cfg.image_size} differs from the data's "
                     f"image size {size}; set model.image.image_size={size} "
                     "(init_from interpolates the position embedding)")
  if size % cfg.patch_size:
    raise ValueError(f"image_size {size} is not a multiple of the ViT patch "
                     f"size {cfg.patch_size}")
  if cfg.pool not in ("cls", "mean"):
    raise ValueError(f"ViT pool={cfg.pool!r} is not 'cls' or 'mean'")
  if cfg.pool == "cls" and not cfg.class_token:
    raise ValueError("ViT pool='cls' needs class_token=True")
  transformer.validate(cfg.encoder(), cfg.layout(), where="ViT")


class ViT(nn.Module):
  """Returns (pooled (B, width), aux {"tokens": final tokens (B, N, width)})."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True, mask=None,
               pre_norm_tokens: bool = False):
    """Args: images (B, S, S, 3); mask: optional bool (B, grid*grid),
    row-major over the patch grid: masked patches are replaced by a learned
    [MASK] embedding before the position embedding (BEiT, EVA). Calling
    with a mask creates the `mask_token` param. pre_norm_tokens: also
    return the encoder's output before the final norm as
    aux["pre_norm_tokens"] (FLAVA feeds those to its multimodal encoder)."""
    cfg = self.config
    b, height, width, _ = images.shape
    if (height, width) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"ViT built for {cfg.image_size}px images got "
                       f"{height}x{width}")
    x = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
        padding="VALID", use_bias=cfg.patch_bias, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            layers.default_kernel_init, (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("embed",)),
        name="patch_embed")(images.astype(self.dtype))
    x = x.reshape(b, -1, cfg.width)
    if mask is not None:
      if mask.shape != x.shape[:2]:
        raise ValueError(f"ViT mask of shape {mask.shape} does not cover the "
                         f"{x.shape[1]} patches of {b} images")
      token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, cfg.width), jnp.float32)
      x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    if cfg.class_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(1e-6), (None, None, "embed")),
                       (1, 1, cfg.width), jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], 1)
    if cfg.pos_embed:
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "embed")),
                       (x.shape[1], cfg.width), jnp.float32)
      x = x + pos[None].astype(x.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    if cfg.pre_norm:
      x = layers.layer_norm(name="norm_pre", epsilon=cfg.norm_eps)(x).astype(
          self.dtype)
    x = transformer.Encoder(cfg.encoder(), cfg.layout(), self.dtype,
                            name="encoder")(x, None, deterministic)
    extra = {"pre_norm_tokens": x} if pre_norm_tokens else {}
    if cfg.pool == "cls":
      x = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(x)
      return x[:, 0], {"tokens": x, **extra}
    if cfg.fc_norm:
      pooled = jnp.mean(x[:, cfg.num_prefix:].astype(jnp.float32), axis=1)
      pooled = layers.layer_norm(name="fc_norm", epsilon=cfg.norm_eps)(pooled)
      return pooled, {"tokens": x, **extra}
    x = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(x)
    return jnp.mean(x[:, cfg.num_prefix:], axis=1), {"tokens": x, **extra}
