"""Importing weights trained elsewhere: which module converts which source.

  source       arch names                          module
  timm         vit_* (VisionTransformer)           florax.convert.timm_vit
               swin_* (SwinTransformer)            florax.convert.timm_swin
               eva*, eva02_* (Eva: EVA, EVA-02,    florax.convert.timm_eva
               the EVA-CLIP trunks)
               beit3_* (BEiT-3's vision branch     florax.convert.timm_beit3
               as a VisionTransformer)             (onto the Multiway image
                                                   classifier, vision_only)
  open_clip    ViT-B-16, ViT-L-14-quickgelu, ...   florax.convert.open_clip
               EVA01-g-14, EVA02-B-16, EVA02-L-14  (its EVA-CLIP trunks via
               (EVA-CLIP: timm trunk + CLIP text)   timm_eva's table)
  torchscale   base, large, giant, unilm names     florax.convert.torchscale_beit3
               (beit3_large_patch16_384, ...)      (onto florax.models.multiway;
                                                   launch.import_weights writes
                                                   its own directory, see there)
  hf           full (facebook/flava-full:          florax.convert.hf_flava
               HF FlavaModel or                    (onto florax.models.flava;
               FlavaForPreTraining), test          launch.import_weights
                                                   writes its own directory,
                                                   see there)

Archs a converter knows but florax cannot express (EVA02-E-14: post-norm
blocks) are listed and refused with a ValueError naming the missing feature.

`convert(source, state_dict, arch, ...)` returns an `Imported`: the florax
`config.model`, flat params, the conversion report and the eval-time image
preprocessing, which `python -m launch.import_weights` writes as an export
directory (florax.export.write_export). For 'hf' the model is FLAVA, no
two-tower: `Imported.model` is {'arch': 'flava', 'flava': FlavaConfig
fields, 'dtype'}, and FlavaForPreTraining's heads and image codebook
(hf_flava.PRETRAINING_EXTRAS: not FlavaModel params) are dropped without
being asked for, listed in the report. Modules are imported on demand: the
registry itself needs neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import math
from typing import Any, Iterable, Mapping

import numpy as np

SOURCES = ("timm", "open_clip", "hf", "torchscale")

# timm arch name prefixes -> converter module.
# First match wins: beit3_ leads so that no broader prefix shadows it.
_TIMM_FAMILIES = (("beit3_", "timm_beit3"), ("vit_", "timm_vit"),
                  ("swin_", "timm_swin"), ("eva", "timm_eva"))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class Imported:
  """One converted checkpoint.

  Attributes:
    source: 'timm', 'open_clip' or 'hf'.
    arch: the arch name it was converted as.
    model: florax `config.model` (florax.models.two_tower.from_config; for
      'hf' {'arch': 'flava', 'flava': florax.models.flava.from_dict's
      fields, 'dtype'}).
    image_size: the resolution the model was built for.
    max_len: the text length (None for an image-only model).
    params: {florax flat name: float32 array}.
    report: florax.convert.common.Report.
    preprocess: the eval-time image transform (florax.data.preprocess spec).
  """
  source: str
  arch: str
  model: dict
  image_size: int
  max_len: int | None
  params: dict
  report: Any
  preprocess: dict


def module_for(source: str, arch: str):
  """The converter module of `source` for `arch`."""
  if source == "open_clip":
    return importlib.import_module("florax.convert.open_clip")
  if source == "torchscale":
    return importlib.import_module("florax.convert.torchscale_beit3")
  if source == "hf":  # FLAVA is the one Hugging Face model florax imports
    return importlib.import_module("florax.convert.hf_flava")
  if source == "timm":
    for prefix, name in _TIMM_FAMILIES:
      if arch.startswith(prefix):
        return importlib.import_module(f"florax.convert.{name}")
    raise ValueError(
        f"timm arch {arch!r} is not a ViT (vit_*), Swin (swin_*), EVA "
        "(eva*) or BEiT-3 (beit3_*) model; those are the timm families "
        "florax imports")
  raise ValueError(f"unknown weight source {source!r}; choose one of "
                   f"{SOURCES}")


def known_archs(source: str) -> list[str]:
  if source == "timm":
    return sorted(a for _, m in _TIMM_FAMILIES for a in
                  importlib.import_module(f"florax.convert.{m}").ARCHS)
  return sorted(module_for(source, "").ARCHS)


def eval_preprocess(size: int, crop_fraction: float, mean, std) -> dict:
  """The eval transform of timm / open_clip (resize the shorter side to
  floor(size / crop_fraction) bicubically, centre crop size) as a
  florax.data.preprocess spec."""
  from florax.data import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.resize_center_crop_spec(
      size, math.floor(size / crop_fraction), mean, std)


def _c_order(params: dict) -> dict:
  """C-contiguous copies: a converted torch Linear weight is a transposed,
  Fortran-ordered view, which safetensors.numpy.save_file writes as raw
  memory -- i.e. silently transposed back."""
  return {k: np.asarray(v, order="C") for k, v in params.items()}


def _image_only_model(family: str, image: dict, num_classes) -> dict:
  return {"image": dict(arch=family, **image), "text": None, "embed_dim": 0,
          "num_classes": int(num_classes or 0), "dtype": "float32",
          "init_temperature": 0.07}


def convert(source: str, state_dict: Mapping[str, np.ndarray], arch: str,
            image_size: int | None = None, allow_missing: Iterable[str] = (),
            *, eos_id: int | None = None) -> Imported:
  """Converts a state dict from `source` as `arch`.

  Raises:
    ValueError for an unknown source or arch; common.ConversionError (a
    ValueError) listing every tensor that does not fit.
  """
  module = module_for(source, arch)
  allow_missing = tuple(allow_missing)
  if source == "hf":
    return _convert_flava(module, state_dict, arch, image_size, allow_missing)
  if source == "open_clip":
    kwargs = {} if eos_id is None else {"eos_id": eos_id}
    cfg, params, report = module.convert_state_dict(
        state_dict, arch, image_size, allow_missing, **kwargs)
    return Imported(source, arch, cfg["model"], cfg["image_size"],
                    cfg["max_len"], _c_order(params), report,
                    eval_preprocess(cfg["image_size"], 1.0, module.MEAN,
                                    module.STD))
  cfg, params, report = module.convert_state_dict(
      state_dict, arch, image_size, allow_missing)
  params = _c_order(params)
  size = cfg["image_size"]
  if cfg["family"] in ("vit", "multiway"):  # ViT, EVA, BEiT-3: per arch
    ev = module.eval_transform(arch)
    spec = eval_preprocess(size, ev["crop_pct"], ev["mean"], ev["std"])
  else:  # timm's Swin weights: ImageNet mean/std, crop_pct 0.9 below 384 px
    spec = eval_preprocess(size, 0.9 if size < 384 else 1.0, IMAGENET_MEAN,
                           IMAGENET_STD)
  model = _image_only_model(cfg["family"], cfg["image"], cfg["num_classes"])
  return Imported(source, arch, model, size, None, params, report, spec)


def _convert_flava(module, state_dict, arch: str, image_size, allow_missing
                   ) -> Imported:
  """Hugging Face FLAVA (hf_flava): FlavaForPreTraining's extras dropped
  (a note in the report counts them), HF FlavaImageProcessor's eval
  transform (a shorter-side resize with crop_pct 1.0: the same as HF's
  whole-image resize for square images; see hf_flava.eval_transform)."""
  cfg, params, report = module.convert_state_dict(
      state_dict, arch, image_size, allow_missing + module.PRETRAINING_EXTRAS)
  heads = [n for n in report.dropped if any(
      fnmatch.fnmatchcase(n, p) for p in module.PRETRAINING_EXTRAS)]
  if heads:
    codebook = sum(n.startswith(module.CODEBOOK_PREFIX) for n in heads)
    report.notes.append(
        f"{len(heads)} FlavaForPreTraining tensors are not FlavaModel params "
        f"and were dropped: {len(heads) - codebook} of its pre-training heads "
        "(mim/mlm/itm/mmm_*_head: the FLAVA task brings heads of its own)"
        + (f" and {codebook} of its image codebook (imported on its own: "
           "launch.import_weights --codebook_out)" if codebook else ""))
  size = cfg["image_size"]
  ev = module.eval_transform(arch)
  model = {"arch": "flava", "flava": cfg["flava"], "dtype": "float32"}
  return Imported("hf", arch, model, size, cfg["max_len"], _c_order(params),
                  report, eval_preprocess(size, ev["crop_pct"], ev["mean"],
                                          ev["std"]))
