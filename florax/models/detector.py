"""Florence's object-level adapter as a detection model: image backbone ->
feature pyramid -> Dynamic Head blocks -> ATSS head outputs.

  backbone "coswin": CoSwin's stage maps (aux["stage_features"], strides
    stem_stride * merge_stride**s) from stage `first_stage` on -> FPN
    (pyramid.FeaturePyramid) with extra stride-2 levels to num_levels.
  backbone "vit": a plain ViT's final (normed) patch tokens aux["tokens"]
    as its stride-`patch_size` map -> ViTDet's simple pyramid
    (pyramid.SimplePyramid, scales `pyramid_scales`, finest first) with
    extra levels to num_levels. ViTDet reads the last block's output
    without a final norm; florax's ViT only exposes the normed tokens
    (or, with pre_norm_tokens, the un-normed ones), so the normed ones are
    used here.
  -> dyhead.DyHead (dyhead_blocks blocks; Florence uses 6) -> atss_head.

Parameter tree: image_encoder/... (the backbone, named as the image tower
of a Florence UniCL checkpoint, so it loads by name), pyramid/...,
dyhead/block{i}/..., head/....

`Detector(config, backbone)(images, deterministic)` returns (cls (B, A, K),
deltas (B, A, 4), centerness (B, A), feature_shapes), A = sum_l H_l W_l,
levels finest first and row-major within a level; feature_shapes is the
static tuple of (H_l, W_l) (returned through jit those ints become arrays;
`feature_shapes(model, images)` reads them as ints without computing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.models import atss_head, dyhead, pyramid

BACKBONES = ("coswin", "vit")


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  num_classes: int
  channels: int = 64
  num_levels: int = 4
  dyhead_blocks: int = 6
  num_convs: int = 0
  backbone: str = "coswin"
  # vit only: SimplePyramid scale factors, finest first.
  pyramid_scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
  # coswin only: the first backbone stage fed to the FPN (1 = ATSS's P3 on a
  # 4-stage Swin, strides 8..32).
  first_stage: int = 0
  prior_prob: float = 0.01
  remat: str = "none"


def validate(config: DetectorConfig):
  if config.backbone not in BACKBONES:
    raise ValueError(f"detector backbone {config.backbone!r} is not one of "
                     f"{BACKBONES}")
  for field in ("num_classes", "channels", "num_levels"):
    if getattr(config, field) < 1:
      raise ValueError(f"detector {field} must be positive, got "
                       f"{getattr(config, field)}")
  if config.dyhead_blocks < 0 or config.num_convs < 0:
    raise ValueError("detector dyhead_blocks and num_convs must be >= 0")


def level_strides(backbone_strides: Sequence[float],
                  num_levels: int) -> list:
  """Strides of the pyramid's levels: the backbone maps' strides (at most
  num_levels of them) then doubling for every extra level."""
  strides = list(backbone_strides)[:num_levels]
  if not strides:
    raise ValueError("level_strides needs at least one backbone stride")
  while len(strides) < num_levels:
    strides.append(strides[-1] * 2)
  return strides


def backbone_strides(config: DetectorConfig, backbone: nn.Module) -> list:
  """Strides of the maps the pyramid is built from (before extra levels)."""
  bcfg = backbone.config
  if config.backbone == "vit":
    return [bcfg.patch_size / s for s in config.pyramid_scales]
  return [bcfg.stem_stride * bcfg.merge_stride ** s
          for s in range(config.first_stage, len(bcfg.depths))]


def feature_shapes(model: nn.Module, images) -> tuple:
  """The static (H_l, W_l) of every level for `images` (an array or a
  jax.ShapeDtypeStruct), by abstract tracing: no parameters, no compute."""
  found = []

  def trace(x):
    out, _ = model.init_with_output(jax.random.key(0), x)
    found.append(out[3])     # python ints while tracing
    return out[0]

  jax.eval_shape(trace, images)
  return found[0]


class Detector(nn.Module):
  config: DetectorConfig
  backbone: nn.Module
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    cfg = self.config
    validate(cfg)
    # Cloned under the UniCL image tower's name: the field would otherwise
    # name the subtree "backbone" and a Florence checkpoint would not load.
    encoder = self.backbone.clone(parent=self, name="image_encoder")
    _, aux = encoder(images, deterministic)
    if cfg.backbone == "vit":
      bcfg = self.backbone.config
      grid = pyramid.vit_feature_map(aux["tokens"], bcfg.grid,
                                     bcfg.num_prefix)
      levels = pyramid.SimplePyramid(cfg.channels, cfg.num_levels,
                                     tuple(cfg.pyramid_scales), self.dtype,
                                     name="pyramid")(grid)
    else:
      maps = list(aux["stage_features"])[cfg.first_stage:]
      levels = pyramid.FeaturePyramid(cfg.channels, cfg.num_levels,
                                      self.dtype, name="pyramid")(maps)
    levels = dyhead.DyHead(cfg.dyhead_blocks, self.dtype, cfg.remat,
                           name="dyhead")(levels)
    cls, deltas, ctr = atss_head.ATSSHead(
        cfg.num_classes, cfg.channels, cfg.num_convs, cfg.prior_prob,
        self.dtype, name="head")(levels)
    return cls, deltas, ctr, atss_head.ATSSHead.feature_shapes(levels)
