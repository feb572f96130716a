"""Box-consistent image transforms for detection (numpy, one image at a time).

Conventions:
  image   uint8 (H, W, 3) (any channel count works), rows = y, cols = x.
  boxes   float32 (n, 4) as (x1, y1, x2, y2) in pixel-edge coordinates: a box
          covering pixel columns c0..c1 inclusive has x1 = c0, x2 = c1 + 1,
          so width = x2 - x1 and a pixel's centre sits at c + 0.5.
  labels  int32 (n,) class indices; -1 marks padding (see `pad_objects`).

Every transform moves the pixels and the boxes together, so a box that
bounds an object before a transform bounds it after (up to the half pixel
that a bilinear resize smears).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

# A box must keep at least this fraction of its area to survive a crop:
# a sliver of an object is no longer a recognisable instance of its class.
MIN_KEPT_AREA = 0.5
_CROP_TRIES = 10


def _as_boxes(boxes) -> np.ndarray:
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def box_areas(boxes) -> np.ndarray:
  b = _as_boxes(boxes)
  return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0,
                                                        None)


def resize_keep_aspect(image: np.ndarray, boxes, size: int
                       ) -> tuple[np.ndarray, np.ndarray, float]:
  """Bilinear resize so the longest side is `size`; boxes scale with it.

  Returns (image, boxes, scale) with scale = size / max(H, W). The other side
  is round(side * scale), so it can differ from side * scale by half a pixel;
  boxes use the single `scale`, which keeps `boxes / scale` exactly the input
  boxes (how predictions are mapped back to the original image).
  """
  if size < 1:
    raise ValueError(f"resize size must be >= 1, got {size}")
  h, w = image.shape[:2]
  scale = size / max(h, w)
  new_h = max(1, int(round(h * scale)))
  new_w = max(1, int(round(w * scale)))
  if (new_h, new_w) == (h, w):
    resized = np.array(image, copy=True)
  else:
    squeeze = image.ndim == 3 and image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    if squeeze:
      resized = resized[..., None]
  return resized, _as_boxes(boxes) * np.float32(scale), float(scale)


def hflip(image: np.ndarray, boxes) -> tuple[np.ndarray, np.ndarray]:
  """Mirror left-right: column c -> W - 1 - c, so x -> W - x for box edges."""
  w = image.shape[1]
  b = _as_boxes(boxes)
  flipped = b.copy()
  flipped[:, 0] = w - b[:, 2]
  flipped[:, 2] = w - b[:, 0]
  return np.ascontiguousarray(image[:, ::-1]), flipped


def crop(image: np.ndarray, boxes, labels, window: Sequence[int],
         min_kept_area: float = MIN_KEPT_AREA
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts out `window` = (x0, y0, x1, y1) (integers, x1/y1 exclusive).

  Boxes move into the window's frame and are clipped to it; a box whose
  clipped area is below `min_kept_area` of its own area, or whose clipped
  width or height is not positive, is dropped together with its label.
  """
  x0, y0, x1, y1 = (int(v) for v in window)
  h, w = image.shape[:2]
  if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
    raise ValueError(f"crop window {tuple(window)} is not inside the "
                     f"{w}x{h} image")
  b = _as_boxes(boxes)
  labels = np.asarray(labels, np.int32).reshape(-1)
  shifted = b - np.asarray([x0, y0, x0, y0], np.float32)
  clipped = np.stack([np.clip(shifted[:, 0], 0, x1 - x0),
                      np.clip(shifted[:, 1], 0, y1 - y0),
                      np.clip(shifted[:, 2], 0, x1 - x0),
                      np.clip(shifted[:, 3], 0, y1 - y0)], axis=1)
  before = box_areas(b)
  after = box_areas(clipped)
  keep = ((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
          & (before > 0) & (after >= min_kept_area * before))
  return (np.ascontiguousarray(image[y0:y1, x0:x1]),
          clipped[keep].astype(np.float32), labels[keep])


def random_crop(image: np.ndarray, boxes, labels, rng: np.random.Generator,
                min_fraction: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A random window, each side >= `min_fraction` of the image's (see `crop`).

  Windows that would drop every object of an image that has some are drawn
  again (up to 10 times); if none keeps one, the image is returned uncropped,
  so a crop never turns a labelled image into an empty one.
  """
  if not 0 < min_fraction <= 1:
    raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
  h, w = image.shape[:2]
  b = _as_boxes(boxes)
  labels = np.asarray(labels, np.int32).reshape(-1)
  min_w = max(1, math.ceil(min_fraction * w))
  min_h = max(1, math.ceil(min_fraction * h))
  for _ in range(_CROP_TRIES):
    cw = int(rng.integers(min_w, w + 1))
    ch = int(rng.integers(min_h, h + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    out = crop(image, b, labels, (x0, y0, x0 + cw, y0 + ch))
    if len(out[1]) or not len(b):
      return out
  return np.array(image, copy=True), b.copy(), labels.copy()


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads bottom and right to (size, size); boxes need no change."""
  h, w = image.shape[:2]
  if h > size or w > size:
    raise ValueError(f"cannot pad a {w}x{h} image to {size}x{size}; resize "
                     "it first (resize_keep_aspect)")
  out = np.zeros((size, size) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  return out


def pad_objects(boxes, labels, max_objects: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """Static-shape ground truth: (boxes (G, 4), labels (G,), dropped).

  Rows past the objects are zero boxes with label -1. With more than
  G = max_objects objects, the G largest by area are kept (in their input
  order) and `dropped` says how many were cut: small objects are the ones a
  detector can most afford to miss in a rare overfull image.
  """
  if max_objects < 1:
    raise ValueError(f"max_objects must be >= 1, got {max_objects}")
  b = _as_boxes(boxes)
  labels = np.asarray(labels, np.int32).reshape(-1)
  if len(b) != len(labels):
    raise ValueError(f"{len(b)} boxes but {len(labels)} labels")
  dropped = max(0, len(b) - max_objects)
  if dropped:
    largest = np.argsort(-box_areas(b), kind="stable")[:max_objects]
    keep = np.sort(largest)
    b, labels = b[keep], labels[keep]
  out_boxes = np.zeros((max_objects, 4), np.float32)
  out_labels = np.full((max_objects,), -1, np.int32)
  out_boxes[:len(b)] = b
  out_labels[:len(labels)] = labels
  return out_boxes, out_labels, dropped


def bucket_size(h: int, w: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= the longest side (for shape-bucketed batching)."""
  longest = max(h, w)
  fits = [int(s) for s in buckets if s >= longest]
  if not fits:
    raise ValueError(f"a {w}x{h} image fits no bucket of {sorted(buckets)}; "
                     "resize it to the largest bucket first")
  return min(fits)
