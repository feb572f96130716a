"""Two-tower image-text model (Florence, CLIP, EVA-CLIP): an image encoder and
a text encoder, each followed by a linear projection into a shared space, and
a learnable temperature.

The image tower is `config.model.image`, by its `arch`: 'coswin' (the
default), 'vit', or 'multiway' (BEiT-3's Multiway backbone run image-only,
pooled as unilm's BEiT3ForImageClassification: `MultiwayImageTower`).
`model.image` holds the arch and the fields of that arch's config
dataclass (CoSwinConfig, ViTConfig, MultiwayConfig), flat; for 'multiway'
that is `ConfigDict({"arch": "multiway", **vars(MultiwayConfig)})`, the
fields configs/beit3.py stores as `model.multiway`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from florax.models import coswin, layers, multiway, text, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


IMAGE_ARCHS = ("coswin", "multiway", "vit")
_IMAGE_CONFIGS = {"coswin": coswin.CoSwinConfig,
                  "multiway": multiway.MultiwayConfig, "vit": vit.ViTConfig}


def image_arch(model_cfg) -> str:
  arch = model_cfg.image.get("arch", "coswin")
  if arch not in IMAGE_ARCHS:
    raise ValueError(f"model.image.arch={arch!r} is not one of {IMAGE_ARCHS}")
  return arch


def image_config(model_cfg):
  """`config.model.image` as the config dataclass of its `arch` (CoSwin by
  default; config lists become tuples)."""
  arch = image_arch(model_cfg)
  cls = _IMAGE_CONFIGS[arch]
  # A ValueError naming the field, rather than the dataclass's TypeError
  # (e.g. a ViT-only `pool` left in a Multiway's model.image).
  unknown = sorted(set(model_cfg.image) - {"arch"}
                   - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"model.image.{unknown[0]} is not a field of "
                     f"{cls.__name__} (model.image.arch={arch!r})")
  return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                for k, v in model_cfg.image.items() if k != "arch"})


def validate_image(model_cfg, image_size: int):
  """Checks `config.model.image` against the data's image size."""
  cfg = image_config(model_cfg)
  if isinstance(cfg, multiway.MultiwayConfig):
    if cfg.image_size != image_size:
      # VisionEmbed would refuse it only when traced.
      raise ValueError(
          f"Multiway image_size {cfg.image_size} differs from the data's "
          f"image size {image_size}; set model.image.image_size="
          f"{image_size} (init_from interpolates the position embedding)")
    multiway.validate(cfg)
    return
  (vit.validate if isinstance(cfg, vit.ViTConfig) else coswin.validate)(
      cfg, image_size)


def image_encoder(model_cfg, dtype) -> nn.Module:
  cfg = image_config(model_cfg)
  if isinstance(cfg, vit.ViTConfig):
    return vit.ViT(cfg, dtype=dtype)
  if isinstance(cfg, multiway.MultiwayConfig):
    return MultiwayImageTower(cfg, dtype=dtype)
  return coswin.CoSwin(cfg, dtype=dtype)


class MultiwayImageTower(nn.Module):
  """BEiT-3's Multiway backbone as an image tower, pooled as unilm's
  BEiT3ForImageClassification: images only (`encode_image`: every token
  runs the vision experts, so the language and VL experts, created at init
  so that a BEiT-3 checkpoint loads whole, get no gradient), then the mean
  of the patch tokens ([cls] excluded) and a fresh LayerNorm `fc_norm`.

  Returns (pooled (B, width) float32, {"tokens": (B, N, width)}), as
  vit.ViT. Params: `multiway/...` (the Multiway's own names: a beit3_mdm
  run's backbone loads with init_from.prefixes
  [["multiway", "image_encoder/multiway"]], and layer decay finds the
  Multiway by its block{i} beside vision_embed) and `fc_norm/...`, which
  layer decay leaves at the full lr, as BEiT-3's head.

  unilm's image classifier sets normalize_output=False (no final norm
  before the fc_norm pooling, as BEiT drops `norm`): configs/finetune.py's
  beit3_base does too; the tiny digits preset keeps norm_v (measured so).
  With `vision_only` (timm's beit3_* imports, florax.convert.timm_beit3)
  the Multiway holds only the vision branch: no language/VL experts.
  """
  config: multiway.MultiwayConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    tokens, _ = multiway.Multiway(self.config, self.dtype,
                                  name="multiway").encode_image(
                                      images, deterministic=deterministic)
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    pooled = layers.layer_norm(name="fc_norm",
                               epsilon=self.config.norm_eps)(pooled)
    return pooled, {"tokens": tokens}


def has_text(model_cfg) -> bool:
  return model_cfg.get("text") is not None


def from_config(model_cfg) -> "TwoTower":
  """The two-tower described by `config.model`: an image tower by
  `model.image.arch`, the text transformer (absent for an image-only model,
  e.g. an imported timm classifier), projections to `embed_dim` (0: none;
  the image one with a bias when `model.image_proj_bias`, as EVA-CLIP's)
  and an optional classifier head of `num_classes`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  dtype = DTYPES[model_cfg.dtype]
  proj_bias = model_cfg.get("image_proj_bias", False)
  if not isinstance(proj_bias, bool):
    raise ValueError(f"model.image_proj_bias must be true or false, got "
                     f"{proj_bias!r}")
  if proj_bias and not model_cfg.embed_dim:
    raise ValueError("model.image_proj_bias is set but model.embed_dim is 0 "
                     "(no image projection to give a bias)")
  return TwoTower(
      image_encoder=image_encoder(model_cfg, dtype),
      text_encoder=(text.TextTransformer(
          text.TextConfig(**dict(model_cfg.text)), dtype=dtype)
                    if has_text(model_cfg) else None),
      embed_dim=model_cfg.embed_dim,
      init_temperature=model_cfg.get("init_temperature", 0.07),
      num_classes=model_cfg.get("num_classes", 0),
      image_proj_bias=proj_bias)


class TwoTower(nn.Module):
  image_encoder: nn.Module
  text_encoder: Optional[nn.Module]
  embed_dim: int
  init_temperature: float = 0.07
  max_logit_scale: float = 100.0
  num_classes: int = 0
  # EVA-CLIP's image projection (its timm trunk's `head`) has a bias;
  # CLIP's and Florence's have none. Off by default, so every model and
  # checkpoint without it keeps exactly its params.
  image_proj_bias: bool = False

  def setup(self):
    if self.embed_dim:
      self.image_proj = layers.dense(self.embed_dim, ("embed", "proj"),
                                     use_bias=self.image_proj_bias,
                                     name="image_proj")
    if self.text_encoder is not None:
      self.text_proj = layers.dense(self.embed_dim, ("embed", "proj"),
                                    use_bias=False, name="text_proj")
      self.log_scale = self.param(
          "logit_scale",
          nn.with_logical_partitioning(
              nn.initializers.constant(np.log(1.0 / self.init_temperature)),
              ()), (), jnp.float32)
    if self.num_classes:
      self.head = layers.dense(self.num_classes, ("embed", "classes"),
                               name="head")

  def image_features(self, images, deterministic: bool = True):
    """The image tower's pooled feature, before any projection."""
    feat, _ = self.image_encoder(images, deterministic)
    return feat.astype(jnp.float32)

  def encode_image(self, images, deterministic: bool = True):
    feat = self.image_features(images, deterministic)
    return self.image_proj(feat) if self.embed_dim else feat

  def classify(self, images, deterministic: bool = True):
    """Logits of the classifier head (an imported timm model's)."""
    return self.head(self.image_features(images, deterministic))

  def encode_text(self, ids, deterministic: bool = True):
    if self.text_encoder is None:
      raise ValueError("this model has no text tower (an image-only model)")
    feat, _ = self.text_encoder(ids, deterministic)
    return self.text_proj(feat.astype(jnp.float32))

  def logit_scale(self):
    """exp(log τ), clamped at 100 as CLIP does, so training cannot blow up
    the logits."""
    return jnp.exp(jnp.minimum(self.log_scale, np.log(self.max_logit_scale)))

  def __call__(self, images, ids=None, deterministic: bool = True):
    if self.text_encoder is None:
      out = self.encode_image(images, deterministic)
      if self.num_classes:  # init creates the head too
        out = (out, self.classify(images, deterministic))
      return out
    return (self.encode_image(images, deterministic),
            self.encode_text(ids, deterministic), self.logit_scale())
