"""Digits on a canvas: the embedded detection demo set (no download).

A canvas is a black `size` x `size` image holding 1-4 of the sklearn 8x8
digits (florax/data/digits.py), each resized (PIL bilinear) to a random
side in [min_scale, max_scale] and put at a random integer position fully
inside the canvas; overlapping glyphs compose with max(). A digit whose box
would overlap an already placed one with IoU > max_overlap is moved (up to
`PLACE_TRIES` positions) and skipped if it finds no place, so a canvas can
hold fewer digits than drawn (never none: the first always fits).

Boxes are TIGHT: the bounding rows/cols of the nonzero pixels of the
resized glyph, (x1, y1, x2, y2) in pixel-edge coordinates (ink columns
c0..c1 give x1 = c0, x2 = c1 + 1), so a box fits the visible digit rather
than its 8x8 cell. Labels are the digit classes 0-9 (class index); the
category names are digits.CLASS_WORDS and the COCO category ids 1..10.

Determinism: `canvas_example(spec, split, index, seed)` is a pure function
of its arguments. The held-out canvases (`holdout_set`) use only the
holdout split of the digits, which training never sees; the training
stream (`canvas_dataset`) uses only the train split, and each process only
its own slice of it (`[process_index::process_count]`, the rule of
digits_images.train_shard), so processes never share a digit.

Model inputs follow the detection conventions: images float32 (S, S, 3) in
[-1, 1] (x / 127.5 - 1), boxes float32 (G, 4), labels int32 (G,) with -1
padding to a static G = max_objects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from florax.data import box_transforms
from florax.data import digits

PLACE_TRIES = 20
CATEGORY_IDS = tuple(range(1, len(digits.CLASS_WORDS) + 1))
_SPLIT_CODES = {"train": 0, "holdout": 1}
_STREAM_CODE = 2  # rng stream of the training iterator, apart from the splits
# The training stream zooms (augment=True) into at most this fraction of the
# canvas side, i.e. digits grow by up to 2x.
_MIN_ZOOM_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class CanvasSpec:
  """How canvases look (sizes in pixels)."""
  size: int = 128
  min_digits: int = 1
  max_digits: int = 4
  min_scale: int = 16
  max_scale: int = 40
  max_overlap: float = 0.2

  def validate(self) -> "CanvasSpec":
    """ValueError naming the field at fault; returns self."""
    def pos_int(name, minimum=1):
      v = getattr(self, name)
      if (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
          or v < minimum):
        raise ValueError(f"CanvasSpec.{name} must be an integer >= {minimum}, "
                         f"got {v!r}")
    for name in ("size", "min_digits", "max_digits"):
      pos_int(name)
    pos_int("min_scale", 2)
    pos_int("max_scale", 2)
    if self.min_digits > self.max_digits:
      raise ValueError(f"CanvasSpec.min_digits={self.min_digits} > "
                       f"max_digits={self.max_digits}")
    if self.min_scale > self.max_scale:
      raise ValueError(f"CanvasSpec.min_scale={self.min_scale} > "
                       f"max_scale={self.max_scale}")
    if self.max_scale > self.size:
      raise ValueError(f"CanvasSpec.max_scale={self.max_scale} does not fit "
                       f"the size={self.size} canvas")
    if not 0 <= self.max_overlap <= 1:
      raise ValueError(f"CanvasSpec.max_overlap must be in [0, 1], got "
                       f"{self.max_overlap!r}")
    return self


@dataclasses.dataclass(frozen=True)
class Placement:
  """One digit on a canvas: which glyph, how big, where, and its box."""
  source_index: int  # index into the digits split (or the process's slice)
  label: int
  side: int
  top: int
  left: int
  box: tuple[int, int, int, int]  # tight ink box (x1, y1, x2, y2), canvas px


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
  if split not in _SPLIT_CODES:
    raise ValueError(f"unknown digits split {split!r}; use 'train' or "
                     "'holdout'")
  images, targets = digits.load_split(split)
  images.setflags(write=False)  # shared by every call through the cache
  targets.setflags(write=False)
  return images, targets


def render_glyph(image_u8: np.ndarray, side: int) -> np.ndarray:
  """An 8x8 digit as a (side, side) uint8 glyph (PIL bilinear)."""
  return np.asarray(Image.fromarray(np.asarray(image_u8, np.uint8), mode="L")
                    .resize((side, side), Image.BILINEAR))


def ink_box(glyph: np.ndarray) -> tuple[int, int, int, int] | None:
  """(x1, y1, x2, y2) of the glyph's nonzero pixels, None if it has none."""
  rows = np.flatnonzero(glyph.any(axis=1))
  cols = np.flatnonzero(glyph.any(axis=0))
  if not len(rows):
    return None
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a, b) -> float:
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
           - inter)
  return inter / union


def _layout(spec: CanvasSpec, images: np.ndarray, targets: np.ndarray,
            rng: np.random.Generator) -> list[Placement]:
  n = int(rng.integers(spec.min_digits, spec.max_digits + 1))
  placed: list[Placement] = []
  for _ in range(n):
    src = int(rng.integers(len(images)))
    side = int(rng.integers(spec.min_scale, spec.max_scale + 1))
    local = ink_box(render_glyph(images[src], side))
    if local is None:  # an all-black glyph has nothing to detect
      continue
    for _ in range(PLACE_TRIES):
      top = int(rng.integers(0, spec.size - side + 1))
      left = int(rng.integers(0, spec.size - side + 1))
      box = (left + local[0], top + local[1], left + local[2],
             top + local[3])
      if all(_iou(box, p.box) <= spec.max_overlap for p in placed):
        placed.append(Placement(src, int(targets[src]), side, top, left, box))
        break
  return placed


def _render(spec: CanvasSpec, images: np.ndarray,
            placements: list[Placement]) -> np.ndarray:
  canvas = np.zeros((spec.size, spec.size), np.uint8)
  for p in placements:
    region = canvas[p.top:p.top + p.side, p.left:p.left + p.side]
    np.maximum(region, render_glyph(images[p.source_index], p.side),
               out=region)
  return np.repeat(canvas[:, :, None], 3, axis=2)


def _arrays(placements: list[Placement]) -> tuple[np.ndarray, np.ndarray]:
  boxes = np.asarray([p.box for p in placements], np.float32).reshape(-1, 4)
  labels = np.asarray([p.label for p in placements], np.int32)
  return boxes, labels


def _example_rng(split: str, index: int, seed: int) -> np.random.Generator:
  if split not in _SPLIT_CODES:
    raise ValueError(f"unknown digits split {split!r}; use 'train' or "
                     "'holdout'")
  return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def canvas_layout(spec: CanvasSpec, split: str, index: int,
                  seed: int) -> list[Placement]:
  """The digits of canvas (split, index, seed), as `canvas_example` draws
  them; `source_index` indexes `digits.load_split(split)`."""
  spec.validate()
  images, targets = _split(split)
  return _layout(spec, images, targets, _example_rng(split, index, seed))


def canvas_example(spec: CanvasSpec, split: str, index: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image uint8 (S, S, 3), boxes float32 (n, 4), labels int32 (n,))."""
  placements = canvas_layout(spec, split, index, seed)
  boxes, labels = _arrays(placements)
  return _render(spec, _split(split)[0], placements), boxes, labels


def to_model_image(image_u8: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(image_u8, np.float32) / np.float32(127.5) - np.float32(1)


def categories() -> list[dict[str, Any]]:
  """COCO categories of the canvas set: ids 1..10, names "zero".."nine"."""
  return [{"id": cid, "name": name, "supercategory": "digit"}
          for cid, name in zip(CATEGORY_IDS, digits.CLASS_WORDS)]


def _coco_dict(spec: CanvasSpec, entries) -> dict[str, Any]:
  """COCO instances dict; entries = (image_id, file_name, boxes, labels)."""
  images, annotations = [], []
  for image_id, file_name, boxes, labels in entries:
    images.append({"id": int(image_id), "file_name": file_name,
                   "width": spec.size, "height": spec.size})
    for box, label in zip(boxes, labels):
      x1, y1, x2, y2 = (float(v) for v in box)
      annotations.append({
          "id": len(annotations) + 1, "image_id": int(image_id),
          "category_id": CATEGORY_IDS[int(label)],
          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
          "iscrowd": 0})
  return {"info": {"description": "florax digits canvas"}, "licenses": [],
          "images": images, "annotations": annotations,
          "categories": categories()}


def _file_name(image_id: int) -> str:
  return f"{image_id:06d}.png"


def write_coco(out_dir: str, split: str, num_images: int, spec: CanvasSpec,
               seed: int) -> str:
  """Writes PNGs to out_dir/<split>/ and out_dir/instances_<split>.json.

  Image i (0-based) is canvas_example(spec, split, i, seed) with COCO image
  id i + 1 and file_name "<id:06d>.png" (relative to out_dir/<split>, the
  image root to give a COCO reader). Returns the json's path.
  """
  spec.validate()
  image_dir = os.path.join(out_dir, split)
  os.makedirs(image_dir, exist_ok=True)
  entries = []
  for i in range(num_images):
    image, boxes, labels = canvas_example(spec, split, i, seed)
    name = _file_name(i + 1)
    Image.fromarray(image).save(os.path.join(image_dir, name))
    entries.append((i + 1, name, boxes, labels))
  path = os.path.join(out_dir, f"instances_{split}.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(_coco_dict(spec, entries), f)
  os.replace(path + ".tmp", path)
  return path


def _check_max_objects(spec: CanvasSpec, max_objects: int) -> None:
  if max_objects < spec.max_digits:
    raise ValueError(f"max_objects={max_objects} < CanvasSpec.max_digits="
                     f"{spec.max_digits}: ground truth would be cut")


def holdout_set(spec: CanvasSpec, num_images: int, seed: int,
                max_objects: int) -> dict[str, Any]:
  """Fixed held-out canvases from the HOLDOUT digits.

  Returns {"images" (N, S, S, 3) float32 in [-1, 1], "boxes" (N, G, 4)
  float32, "labels" (N, G) int32 (-1 padding), "image_id" (N,) int32
  (= i + 1), "scale" (N,) float32 ones (canvas pixels are the original
  pixels), "coco" (the COCO ground-truth dict, as write_coco writes),
  "category_ids" [1..10], "class_names" ["zero".."nine"], "skipped" []}:
  the keys of coco.records_holdout.
  """
  spec.validate()
  _check_max_objects(spec, max_objects)
  images, boxes, labels, entries = [], [], [], []
  for i in range(num_images):
    image, b, l = canvas_example(spec, "holdout", i, seed)
    pb, pl, _ = box_transforms.pad_objects(b, l, max_objects)
    images.append(to_model_image(image))
    boxes.append(pb)
    labels.append(pl)
    entries.append((i + 1, _file_name(i + 1), b, l))
  s = spec.size
  return {
      "images": np.stack(images) if images else np.zeros((0, s, s, 3),
                                                         np.float32),
      "boxes": np.stack(boxes) if boxes else np.zeros((0, max_objects, 4),
                                                      np.float32),
      "labels": np.stack(labels) if labels else np.zeros((0, max_objects),
                                                         np.int32),
      "image_id": np.arange(1, num_images + 1, dtype=np.int32),
      "scale": np.ones((num_images,), np.float32),
      "coco": _coco_dict(spec, entries),
      "category_ids": list(CATEGORY_IDS),
      "class_names": list(digits.CLASS_WORDS),
      "skipped": [],  # as coco.records_holdout; generated data has no bad
  }


def _zoom(spec: CanvasSpec, image: np.ndarray, boxes: np.ndarray,
          labels: np.ndarray, rng: np.random.Generator):
  """Crops a random square holding every box whole, resized back to S.

  Box-consistent scale augmentation that never cuts a digit (a cut digit
  would be visible ink without a box). Flips are not used: a mirrored
  digit is not the same digit.
  """
  s = spec.size
  ux0, uy0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
  ux1, uy1 = int(np.ceil(boxes[:, 2].max())), int(np.ceil(boxes[:, 3].max()))
  low = max(ux1 - ux0, uy1 - uy0, int(np.ceil(_MIN_ZOOM_FRACTION * s)))
  side = int(rng.integers(low, s + 1))
  x0 = int(rng.integers(max(0, ux1 - side), min(ux0, s - side) + 1))
  y0 = int(rng.integers(max(0, uy1 - side), min(uy0, s - side) + 1))
  image, boxes, labels = box_transforms.crop(
      image, boxes, labels, (x0, y0, x0 + side, y0 + side))
  image, boxes, _ = box_transforms.resize_keep_aspect(image, boxes, s)
  return image, boxes, labels


@dataclasses.dataclass(frozen=True)
class MakeCanvas(grain.transforms.MapWithIndex):
  """Stream position -> one training canvas of this process's digits."""
  spec: CanvasSpec
  seed: int
  max_objects: int
  process_index: int = 0
  process_count: int = 1
  augment: bool = True

  def map_with_index(self, index: int, element):
    del element  # the canvas is a function of its position alone
    images, targets = _split("train")
    pool = slice(self.process_index, None, self.process_count)
    images, targets = images[pool], targets[pool]
    rng = np.random.default_rng([int(self.seed), _STREAM_CODE,
                                 self.process_index, self.process_count,
                                 int(index)])
    placements = _layout(self.spec, images, targets, rng)
    image = _render(self.spec, images, placements)
    boxes, labels = _arrays(placements)
    if self.augment and len(boxes) and rng.random() < 0.5:
      image, boxes, labels = _zoom(self.spec, image, boxes, labels, rng)
    boxes, labels, _ = box_transforms.pad_objects(boxes, labels,
                                                  self.max_objects)
    return {"images": to_model_image(image), "boxes": boxes,
            "labels": labels}


def canvas_dataset(spec: CanvasSpec, *, batch_size: int, seed: int,
                   max_objects: int, process_index: int = 0,
                   process_count: int = 1, augment: bool = True
                   ) -> grain.IterDataset:
  """This process's infinite stream of training batches (TRAIN digits).

  Batches: {"images" (B, S, S, 3) float32 in [-1, 1], "boxes" (B, G, 4)
  float32, "labels" (B, G) int32 (-1 padding)}. Example k of the stream is
  a pure function of (seed, process_index, process_count, k) and the
  pipeline is plain grain ops (range -> repeat -> map_with_index -> batch),
  so the iterator's state is a position and restores exactly. Processes
  draw from disjoint slices of the train digits.

  augment: every canvas is already a fresh random layout (digits, sizes,
  positions); augment=True additionally zooms half the canvases into a
  random square that keeps every digit whole (up to 2x: digits then reach
  2 * max_scale px). No horizontal flip: a mirrored digit is not a digit.
  """
  spec.validate()
  _check_max_objects(spec, max_objects)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if len(_split("train")[0]) < process_count:
    raise ValueError(f"{process_count} processes cannot share "
                     f"{len(_split('train')[0])} training digits")
  ds = grain.MapDataset.range(1).repeat()
  ds = ds.map_with_index(MakeCanvas(spec, int(seed), int(max_objects),
                                    int(process_index), int(process_count),
                                    bool(augment)))
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))
