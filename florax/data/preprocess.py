"""The eval-time image preprocessing of a run, as data.

Training-time evaluation and `florax.inference` must see the same pixels,
so the transform is described by a small dict that the export manifest
carries and both sides apply with `apply`:

  {"transform": "center_crop", "size": S, "crop_fraction": f,
   "mean": [...], "std": [...]}    the records pipeline's eval transform
  {"transform": "resize", "size": S, "mean": [.5]*3, "std": [.5]*3}
                                   whole image, bilinear (the digits demo)
  {"transform": "resize_center_crop", "size": S, "resize_size": R,
   "mean": [...], "std": [...]}    shorter side resized to R (bicubic), then
                                   the centred S x S crop: timm's and
                                   open_clip's eval transform (torchvision
                                   Resize(R) + CenterCrop(S) on PIL images),
                                   which imported weights expect
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from florax.data import transforms


def center_crop_spec(size: int, crop_fraction: float, mean, std) -> dict:
  return {"transform": "center_crop", "size": int(size),
          "crop_fraction": float(crop_fraction),
          "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def resize_spec(size: int) -> dict:
  return {"transform": "resize", "size": int(size), "mean": [0.5] * 3,
          "std": [0.5] * 3}


def resize_center_crop_spec(size: int, resize_size: int, mean, std) -> dict:
  return {"transform": "resize_center_crop", "size": int(size),
          "resize_size": int(resize_size),
          "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def data_eval_spec(data_cfg) -> dict:
  """The eval-time transform of a task's `config.data`: the embedded digits
  are resized whole to [-1, 1]; records are centre-cropped and normalised
  like the records pipeline's eval path."""
  if data_cfg.name == "digits":
    return resize_spec(data_cfg.image_size)
  rc = data_cfg.records
  return center_crop_spec(data_cfg.image_size, rc.crop_fraction, rc.mean,
                          rc.std)


def _resize_center_crop(image: Image.Image, resize: int, size: int
                        ) -> np.ndarray:
  """torchvision's Resize(resize) then CenterCrop(size), on PIL: the shorter
  side becomes `resize`, the longer int(resize * long / short)."""
  image = image.convert("RGB")
  w, h = image.size
  if w <= h:
    new = (resize, int(resize * h / w))
  else:
    new = (int(resize * w / h), resize)
  image = image.resize(new, Image.BICUBIC)
  left = int(round((new[0] - size) / 2.0))
  top = int(round((new[1] - size) / 2.0))
  if left < 0 or top < 0:
    raise ValueError(f"resize_size {resize} is smaller than the crop {size}")
  return np.asarray(image.crop((left, top, left + size, top + size)),
                    np.uint8)


def _normalise(pixels: np.ndarray, spec: dict) -> np.ndarray:
  x = pixels.astype(np.float32) * np.float32(1 / 255)
  mean = np.asarray(spec["mean"], np.float32)
  inv_std = 1 / np.asarray(spec["std"], np.float32)
  return np.ascontiguousarray((x - mean) * inv_std, dtype=np.float32)


def apply(image: Any, spec: dict, record_id: str = "image") -> np.ndarray:
  """One image (PIL, uint8 array, or encoded bytes) -> float32 (S, S, 3)."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"{record_id}: image arrays must be uint8, got "
                       f"{image.dtype}")
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    image = transforms.open_image(record_id, image)
  size = spec["size"]
  if spec["transform"] == "center_crop":
    # The very code path of transforms.ImageTransform(train=False).
    box = transforms.center_crop_box(*image.size, spec["crop_fraction"])
    return _normalise(transforms.decode_crop_resize(image, box, size), spec)
  if spec["transform"] == "resize":
    img = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return _normalise(np.asarray(img, np.uint8), spec)
  if spec["transform"] == "resize_center_crop":
    return _normalise(_resize_center_crop(image, spec["resize_size"], size),
                      spec)
  raise ValueError(f"unknown preprocessing transform {spec['transform']!r}")
