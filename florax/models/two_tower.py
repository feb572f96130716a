"""Two-tower image-text model (Florence, CLIP, EVA-CLIP): an image encoder and
a text encoder, each followed by a linear projection into a shared space, and
a learnable temperature."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from florax.models import coswin, layers, text

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def image_config(model_cfg) -> coswin.CoSwinConfig:
  """`config.model.image` as a CoSwinConfig (config lists become tuples)."""
  return coswin.CoSwinConfig(**{
      k: tuple(v) if isinstance(v, (list, tuple)) else v
      for k, v in model_cfg.image.items()})


def from_config(model_cfg) -> "TwoTower":
  """The CoSwin + text-transformer two-tower described by `config.model`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  dtype = DTYPES[model_cfg.dtype]
  return TwoTower(
      image_encoder=coswin.CoSwin(image_config(model_cfg), dtype=dtype),
      text_encoder=text.TextTransformer(text.TextConfig(**dict(model_cfg.text)),
                                        dtype=dtype),
      embed_dim=model_cfg.embed_dim,
      init_temperature=model_cfg.init_temperature)


class TwoTower(nn.Module):
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int
  init_temperature: float = 0.07
  max_logit_scale: float = 100.0

  def setup(self):
    self.image_proj = layers.dense(self.embed_dim, ("embed", "proj"),
                                   use_bias=False, name="image_proj")
    self.text_proj = layers.dense(self.embed_dim, ("embed", "proj"),
                                  use_bias=False, name="text_proj")
    self.log_scale = self.param(
        "logit_scale",
        nn.with_logical_partitioning(
            nn.initializers.constant(np.log(1.0 / self.init_temperature)), ()),
        (), jnp.float32)

  def encode_image(self, images, deterministic: bool = True):
    feat, _ = self.image_encoder(images, deterministic)
    return self.image_proj(feat.astype(jnp.float32))

  def encode_text(self, ids, deterministic: bool = True):
    feat, _ = self.text_encoder(ids, deterministic)
    return self.text_proj(feat.astype(jnp.float32))

  def logit_scale(self):
    """exp(log τ), clamped at 100 as CLIP does, so training cannot blow up
    the logits."""
    return jnp.exp(jnp.minimum(self.log_scale, np.log(self.max_logit_scale)))

  def __call__(self, images, ids, deterministic: bool = True):
    return (self.encode_image(images, deterministic),
            self.encode_text(ids, deterministic), self.logit_scale())
