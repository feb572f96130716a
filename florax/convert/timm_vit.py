"""timm's VisionTransformer -> florax ViT (an image-only classifier).

timm (>= 0.9) state dicts, as `timm.create_model(...).state_dict()` or the
Hugging Face hub's model.safetensors give them, become florax's ViT under
'image_encoder/' and timm's `head` as 'head/kernel' (D, classes) and
'head/bias' (pass allow_missing=('head.*',) to drop it, e.g. to fine-tune on
other classes; a checkpoint without a head gives a feature extractor).

The architecture comes from an explicit table of timm model names (ARCHS),
not from guessing at the state dict: a checkpoint of another architecture
then fails with the list of names and shapes that do not fit, instead of
loading into a model that merely has the right number of tensors.

timm's ViT: a class token, a position embedding that covers it (the cls
position first), LayerNorm eps 1e-6 (CLIP towers: 1e-5 and a pre-norm, no
patch bias), a full qkv bias, exact GELU, class-token pooling after the
final norm, or 'avg' pooling of the patch tokens followed by fc_norm.
Importing at another --image_size interpolates the position grid
(bicubic, the cls position kept); at the checkpoint's own size the values
are copied exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common

PREFIX = "image_encoder"

# timm's eval transform of the standard ViT weights: resize the shorter side
# to size / crop_pct (bicubic), centre crop; mean/std are the tag's
# (augreg: 0.5; CLIP towers: OpenAI's).
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The timm defaults every entry starts from (timm's VisionTransformer
# arguments, in florax's names).
_BASE = dict(class_token=True, pre_norm=False, patch_bias=True, pool="cls",
             fc_norm=False, qkv_bias="full", layer_scale=None, act="gelu",
             norm_eps=1e-6)
_CLIP = dict(pre_norm=True, patch_bias=False, norm_eps=1e-5)


def _vit(image_size, patch_size, width, depth, num_heads, mlp_ratio=4.0,
         crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD, **fields):
  return dict(_BASE, image_size=image_size, patch_size=patch_size,
              width=width, depth=depth, num_heads=num_heads,
              mlp_dim=int(width * mlp_ratio), **fields,
              eval=dict(crop_pct=crop_pct, mean=mean, std=std))


# timm model name -> florax ViTConfig fields (+ the eval transform of the
# name's default pretrained tag, e.g. vit_base_patch16_224 ->
# augreg2_in21k_ft_in1k: other tags of a name share its weights' layout but
# may differ in crop and mean/std). The image size is the pretrained
# resolution. tests/test_convert_timm_vit.py
# checks every entry against timm's own model when timm is installed.
ARCHS = {
    "vit_tiny_patch16_224": _vit(224, 16, 192, 12, 3),
    "vit_small_patch16_224": _vit(224, 16, 384, 12, 6),
    "vit_base_patch32_224": _vit(224, 32, 768, 12, 12),
    "vit_base_patch16_224": _vit(224, 16, 768, 12, 12),
    "vit_base_patch16_384": _vit(384, 16, 768, 12, 12, crop_pct=1.0),
    "vit_large_patch16_224": _vit(224, 16, 1024, 24, 16),
    "vit_large_patch16_384": _vit(384, 16, 1024, 24, 16, crop_pct=1.0),
    "vit_base_patch16_clip_224": _vit(224, 16, 768, 12, 12, crop_pct=0.95,
                                      mean=CLIP_MEAN, std=CLIP_STD, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": _vit(
        224, 16, 768, 12, 12, crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD,
        act="quick_gelu", **_CLIP),
    "vit_large_patch14_clip_224": _vit(224, 14, 1024, 24, 16, crop_pct=1.0,
                                       **_CLIP),
    # The small random timm models of tests/fixtures/ref_timm_vit.py: layer
    # scale and an mlp_dim that is not 4 x width, so a transposed or
    # misplaced tensor cannot go unnoticed; the '_avg' one pools like timm's
    # global_pool='avg' (mean of the patch tokens, then fc_norm).
    "vit_test": _vit(32, 8, 64, 2, 2, mlp_ratio=2.0, layer_scale=1e-5),
    "vit_test_avg": _vit(32, 8, 64, 2, 2, mlp_ratio=2.0, pool="mean",
                         fc_norm=True),
}

# timm keeps no buffers in a ViT's state dict; nothing to ignore.
IGNORE = ()
# The tables need no jax: the model code is imported where a model is built,
# so a command line with a wrong arch fails at once.


def arch_fields(arch: str) -> dict:
  """The ARCHS entry of a timm model name (a '.tag' suffix such as
  '.augreg2_in21k_ft_in1k' is ignored)."""
  name = arch.split(".")[0]
  if name not in ARCHS:
    raise ValueError(f"unknown timm ViT arch {arch!r}; known: "
                     f"{', '.join(sorted(ARCHS))}")
  return dict(ARCHS[name])


def arch_config(arch: str, image_size: int | None = None):
  """(ViTConfig, image size) for a timm model name; `image_size` overrides
  the pretrained resolution."""
  from florax.models import vit  # pylint: disable=g-import-not-at-top
  fields = arch_fields(arch)
  fields.pop("eval")
  if image_size is not None:
    fields["image_size"] = int(image_size)
  cfg = vit.ViTConfig(**fields)
  vit.validate(cfg)
  return cfg, cfg.image_size


def eval_transform(arch: str) -> dict:
  """timm's eval-time transform parameters of the arch: crop_pct, mean, std."""
  return dict(arch_fields(arch)["eval"])


def rules(cfg) -> list[common.Rule]:
  """The mapping table from timm names to florax flat names."""
  del cfg  # one table serves every entry; the target shapes decide the rest
  p = PREFIX
  blk = r"blocks\.(\d+)\."
  dst = p + r"/encoder/block\1/"
  return [
      common.Rule(r"patch_embed\.proj\.weight", f"{p}/patch_embed/kernel",
                  common.CONV2D),
      common.Rule(r"patch_embed\.proj\.bias", f"{p}/patch_embed/bias"),
      common.Rule(r"cls_token", f"{p}/cls_token"),
      # (1, 1 + g*g, D) -> (1 + g*g, D), interpolated at another resolution.
      common.Rule(r"pos_embed", f"{p}/pos_embed", common.POS_EMBED),
      common.Rule(r"norm_pre\.weight", f"{p}/norm_pre/scale"),
      common.Rule(r"norm_pre\.bias", f"{p}/norm_pre/bias"),
      common.Rule(blk + r"norm1\.weight", dst + "norm1/scale"),
      common.Rule(blk + r"norm1\.bias", dst + "norm1/bias"),
      # (3D, D) -> (D, 3, heads, head_dim): timm reshapes the fused output
      # as (3, heads, head_dim), florax's kernel axes in the same order.
      common.Rule(blk + r"attn\.qkv\.weight", dst + "attn/qkv/kernel",
                  common.LINEAR),
      common.Rule(blk + r"attn\.qkv\.bias", dst + "attn/qkv/bias",
                  common.FLAT),
      common.Rule(blk + r"attn\.proj\.weight", dst + "attn/proj/kernel",
                  common.linear(2)),
      common.Rule(blk + r"attn\.proj\.bias", dst + "attn/proj/bias"),
      common.Rule(blk + r"ls1\.gamma", dst + "ls1"),
      common.Rule(blk + r"norm2\.weight", dst + "norm2/scale"),
      common.Rule(blk + r"norm2\.bias", dst + "norm2/bias"),
      common.Rule(blk + r"mlp\.fc1\.weight", dst + "mlp/fc1/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc1\.bias", dst + "mlp/fc1/bias"),
      common.Rule(blk + r"mlp\.fc2\.weight", dst + "mlp/fc2/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc2\.bias", dst + "mlp/fc2/bias"),
      common.Rule(blk + r"ls2\.gamma", dst + "ls2"),
      common.Rule(r"norm\.weight", f"{p}/norm/scale"),
      common.Rule(r"norm\.bias", f"{p}/norm/bias"),
      common.Rule(r"fc_norm\.weight", f"{p}/fc_norm/scale"),
      common.Rule(r"fc_norm\.bias", f"{p}/fc_norm/bias"),
      common.Rule(r"head\.weight", "head/kernel", common.LINEAR),
      common.Rule(r"head\.bias", "head/bias"),
  ]


def _c_order(params):
  """C-contiguous arrays: a transposed torch weight is a Fortran-ordered
  view, and safetensors.numpy.save_file writes such an array's raw memory
  (silently transposing it back) -- C order is safe everywhere."""
  return {k: np.asarray(v, order="C") if isinstance(v, np.ndarray) else v
          for k, v in params.items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       shapes_only: bool = False):
  """A timm ViT state dict as florax params.

  Args:
    state_dict: {timm name: array} (`common.read_checkpoint`).
    arch: a timm model name (ARCHS), e.g. 'vit_base_patch16_224'.
    image_size: the resolution to build for (default: the arch's); the
      position embedding is interpolated when it differs.
    allow_missing: fnmatch patterns over timm names to drop (e.g. 'head.*')
      and florax names to leave freshly initialised.
    shapes_only: check names and shapes only (values may be anything with a
      .shape); the returned params are then {name: shape}.

  Returns:
    (model config dict, {florax flat name: float32 array}, common.Report).
    The config dict holds 'family' ('vit'), 'image' (ViTConfig fields),
    'image_size' and 'num_classes' (None without a head).
  Raises:
    common.ConversionError when the state dict does not fit the arch.
  """
  from florax.models import vit  # pylint: disable=g-import-not-at-top
  allow_missing = tuple(allow_missing)
  cfg, size = arch_config(arch, image_size)
  shapes = common.target_shapes(vit.ViT(cfg), size, prefix=PREFIX)
  num_classes = None
  head = state_dict.get("head.weight")
  if (head is not None and len(head.shape) == 2
      and not common._matches_any("head.weight", allow_missing)  # pylint: disable=protected-access
      and not common._matches_any("head/kernel", allow_missing)):  # pylint: disable=protected-access
    # The class count is the fine-tuning dataset's, not the arch's: it is
    # read from the head (the width is checked like any other shape).
    num_classes = int(head.shape[0])
    shapes["head/kernel"] = (cfg.width, num_classes)
    shapes["head/bias"] = (num_classes,)
  params, report = common.convert(
      state_dict, rules(cfg), shapes, allow_missing=allow_missing,
      ignore=IGNORE, source=f"timm {arch}", shapes_only=shapes_only)
  params = _c_order(params)
  config = {"family": "vit", "image": dataclasses.asdict(cfg),
            "image_size": size, "num_classes": num_classes}
  return config, params, report
