"""Two-tower image-text model (Florence, CLIP, EVA-CLIP): an image encoder and
a text encoder, each followed by a linear projection into a shared space, and
a learnable temperature."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from florax.models import coswin, layers, text, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


IMAGE_ARCHS = ("coswin", "vit")


def image_arch(model_cfg) -> str:
  arch = model_cfg.image.get("arch", "coswin")
  if arch not in IMAGE_ARCHS:
    raise ValueError(f"model.image.arch={arch!r} is not one of {IMAGE_ARCHS}")
  return arch


def image_config(model_cfg):
  """`config.model.image` as the config dataclass of its `arch` (CoSwin by
  default; config lists become tuples)."""
  cls = {"coswin": coswin.CoSwinConfig, "vit": vit.ViTConfig}[
      image_arch(model_cfg)]
  return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                for k, v in model_cfg.image.items() if k != "arch"})


def validate_image(model_cfg, image_size: int):
  """Checks `config.model.image` against the data's image size."""
  cfg = image_config(model_cfg)
  (vit.validate if isinstance(cfg, vit.ViTConfig) else coswin.validate)(
      cfg, image_size)


def image_encoder(model_cfg, dtype) -> nn.Module:
  cfg = image_config(model_cfg)
  if isinstance(cfg, vit.ViTConfig):
    return vit.ViT(cfg, dtype=dtype)
  return coswin.CoSwin(cfg, dtype=dtype)


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
