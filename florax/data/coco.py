"""COCO-format detection data: instances json -> florax records -> batches.

Conventions (shared with florax/data/digits_canvas.py):
  * class index = position of the category in the json's categories sorted
    by COCO id; the COCO ids are kept (metadata `categories`, the holdout
    dict's `category_ids`) for evaluation.
  * boxes are (x1, y1, x2, y2) float32 pixels; records store them in the
    pixels of the ORIGINAL encoded image (COCO [x, y, w, h] -> x1 = x,
    x2 = x + w).
  * model inputs: images float32 (B, S, S, 3) in [-1, 1] (x / 127.5 - 1),
    the image resized so its longest side is S and zero-padded (black,
    -1.0) at the bottom/right; boxes (B, G, 4) in those resized pixels;
    labels (B, G) int32, -1 for padding; `scale` (B,) float32 = S / the
    original longest side (original box = box / scale); `image_id` (B,)
    int32 = the COCO image id.

`load_instances` validates the json. An annotation is skipped and counted
by reason when its category id is unknown, its image id is unknown or its
image was skipped, its bbox is not 4 numbers, its width or height is not
positive, or it leaves the image by more than `TOLERANCE_PX` (boxes within
the tolerance are clipped to the image). iscrowd annotations are kept out
of training (counted under "iscrowd"), the COCO convention. An image is
skipped and counted when its file is missing, cannot be decoded, or its
decoded size differs from the json's width/height (its boxes would be in
other pixels). Images without boxes are kept (pure background). A json that
is not COCO instances raises ValueError naming the file and the missing key.

`convert_coco` writes one split per call into a records directory (staged
like converters.py: a failed conversion leaves the directory as it was).
Converting another split into the same directory keeps the splits already
there (their shards are carried over); re-converting an existing split
needs overwrite=True and replaces that split only. All splits of a
directory must have the same categories, since class indices must agree.
Record ids are "<coco image id>/<file_name>": the pipeline reads the image
id back from them.

`records_detection_dataset` streams batches (train: random crop + flip);
bad records become bad_records markers, dropped before batching and
counted by the returned `bad_records.SkipAccountingIterator`
(`metrics()["data/skipped"]`), which raises TooManyBadRecords above
`max_skip_fraction`. `records_holdout` loads a fixed evaluation set with a
COCO ground-truth dict in ORIGINAL image pixels (crowd regions are not in
the records, so for official COCO numbers evaluate against the original
instances json instead).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from typing import Any

import grain
import numpy as np
from PIL import Image

from florax.data import bad_records
from florax.data import box_transforms
from florax.data import converters
from florax.data import records
from florax.data.unicl_labels import LabelTable

TOLERANCE_PX = 1.0
_MAX_LISTED_SKIPS = 1000
_REASONS_IN_ERROR = 5

# Reasons (stable strings: they are the keys of the skip counts).
MISSING_FILE = "missing image file"
UNDECODABLE = "undecodable image"
SIZE_MISMATCH = "image size differs from the json"
DUPLICATE_IMAGE = "duplicate image id"
UNKNOWN_IMAGE = "unknown image id"
IMAGE_SKIPPED = "its image was skipped"
UNKNOWN_CATEGORY = "unknown category id"
MALFORMED_BOX = "bbox is not 4 numbers"
CROWD = "iscrowd"
NON_POSITIVE = "non-positive box size"
OUTSIDE = "box outside the image"


def _not_coco(path: str, where: str, key: str) -> ValueError:
  return ValueError(f"{path}: not a COCO instances file: {where} has no "
                    f"{key!r} key")


def _require(obj: Any, keys, path: str, where: str) -> None:
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: not a COCO instances file: {where} is a "
                     f"{type(obj).__name__}, not an object")
  for key in keys:
    if key not in obj:
      raise _not_coco(path, where, key)


class _Report:
  """Skip counts by reason plus the first skipped items."""

  def __init__(self):
    self.images = {}
    self.annotations = {}
    self.listed = []

  def skip(self, kind: str, item_id: Any, reason: str) -> None:
    counts = self.images if kind == "image" else self.annotations
    counts[reason] = counts.get(reason, 0) + 1
    if len(self.listed) < _MAX_LISTED_SKIPS:
      self.listed.append({"id": f"{kind}:{item_id}", "reason": reason})


def _check_image(path: str, width: int, height: int, verify: bool
                 ) -> str | None:
  """The skip reason of an image file, None when usable."""
  if not os.path.isfile(path):
    return MISSING_FILE
  try:
    with Image.open(path) as img:
      size = img.size
      if verify:
        # draft decodes a JPEG at 1/8 scale: the whole entropy-coded stream
        # is still read, so truncation and corruption surface, much cheaper.
        if img.format == "JPEG":
          img.draft("RGB", (1, 1))
        img.load()
  except Exception:  # PIL raises many types for corrupt data
    return UNDECODABLE
  if size != (width, height):
    return SIZE_MISMATCH
  return None


def _clip_box(bbox, width: int, height: int, tolerance: float
              ) -> tuple[list[float] | None, str | None]:
  """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped, or (None, reason)."""
  if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or
      not all(isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v) for v in bbox)):
    return None, MALFORMED_BOX
  x, y, w, h = (float(v) for v in bbox)
  if w <= 0 or h <= 0:
    return None, NON_POSITIVE
  if (x < -tolerance or y < -tolerance or x + w > width + tolerance or
      y + h > height + tolerance):
    return None, OUTSIDE
  x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
  x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
  if x2 <= x1 or y2 <= y1:  # a sliver on the border clipped to nothing
    return None, NON_POSITIVE
  return [x1, y1, x2, y2], None


def load_instances(instances_json: str, image_root: str, *,
                   verify_images: bool = True,
                   tolerance: float = TOLERANCE_PX
                   ) -> tuple[list[dict], list[dict], dict]:
  """Reads and validates a COCO instances json (see the module docstring).

  Args:
    instances_json: path of the json.
    image_root: folder the images' file_name are relative to.
    verify_images: decode every image fully (else only its header is read).
    tolerance: px a box may leave the image by and still be clipped.

  Returns:
    (images, categories, report): images in json order, each
    {"id", "file_name", "path", "width", "height", "boxes" float32 (n, 4)
    x1y1x2y2 px, "labels" int32 (n,) class index, "category_ids"};
    categories [{"id", "name"}] sorted by id (class index order); report
    {"images", "images_kept", "annotations", "annotations_kept",
    "skipped_images" {reason: n}, "skipped_annotations" {reason: n},
    "skipped" [{"id": "image:<id>" | "annotation:<id>", "reason"}] (first
    1000)}.
  """
  path = instances_json
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read a COCO instances json ({e})"
                     ) from None
  _require(data, ("images", "annotations", "categories"), path,
           "the top level")
  for key in ("images", "annotations", "categories"):
    if not isinstance(data[key], list):
      raise ValueError(f"{path}: not a COCO instances file: {key!r} is not "
                       "a list")
  for i, c in enumerate(data["categories"]):
    _require(c, ("id", "name"), path, f"categories[{i}]")
  cats = sorted(({"id": int(c["id"]), "name": str(c["name"])}
                 for c in data["categories"]), key=lambda c: c["id"])
  ids = [c["id"] for c in cats]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{path}: category ids are not unique: {ids}")
  if not cats:
    raise ValueError(f"{path}: the json lists no categories")
  cat_index = {cid: i for i, cid in enumerate(ids)}

  report = _Report()
  images, by_id = [], {}
  for i, im in enumerate(data["images"]):
    _require(im, ("id", "file_name", "width", "height"), path, f"images[{i}]")
    image_id = int(im["id"])
    if image_id in by_id:
      report.skip("image", image_id, DUPLICATE_IMAGE)
      continue
    entry = {"id": image_id, "file_name": str(im["file_name"]),
             "path": os.path.join(image_root, str(im["file_name"])),
             "width": int(im["width"]), "height": int(im["height"]),
             "boxes": [], "labels": [], "category_ids": []}
    reason = _check_image(entry["path"], entry["width"], entry["height"],
                          verify_images)
    by_id[image_id] = entry if reason is None else None
    if reason is not None:
      report.skip("image", image_id, reason)
      continue
    images.append(entry)

  kept_annotations = 0
  for i, ann in enumerate(data["annotations"]):
    _require(ann, ("image_id", "bbox", "category_id"), path,
             f"annotations[{i}]")
    ann_id = ann.get("id", f"#{i}")
    image_id = int(ann["image_id"])
    if image_id not in by_id:
      report.skip("annotation", ann_id, UNKNOWN_IMAGE)
      continue
    entry = by_id[image_id]
    if entry is None:
      report.skip("annotation", ann_id, IMAGE_SKIPPED)
      continue
    if int(ann["category_id"]) not in cat_index:
      report.skip("annotation", ann_id, UNKNOWN_CATEGORY)
      continue
    if ann.get("iscrowd", 0):
      report.skip("annotation", ann_id, CROWD)
      continue
    box, reason = _clip_box(ann["bbox"], entry["width"], entry["height"],
                            tolerance)
    if reason is not None:
      report.skip("annotation", ann_id, reason)
      continue
    entry["boxes"].append(box)
    entry["labels"].append(cat_index[int(ann["category_id"])])
    entry["category_ids"].append(int(ann["category_id"]))
    kept_annotations += 1
  for entry in images:
    entry["boxes"] = np.asarray(entry["boxes"], np.float32).reshape(-1, 4)
    entry["labels"] = np.asarray(entry["labels"], np.int32)
  summary = {
      "images": len(data["images"]), "images_kept": len(images),
      "annotations": len(data["annotations"]),
      "annotations_kept": kept_annotations,
      "skipped_images": dict(report.images),
      "skipped_annotations": dict(report.annotations),
      "skipped": report.listed,
  }
  return images, cats, summary


def record_id(image_id: int, file_name: str) -> str:
  return f"{int(image_id)}/{file_name}"


def parse_record_id(rid: str) -> tuple[int, str]:
  """(COCO image id, file_name) of a record id written by convert_coco."""
  head, _, name = str(rid).partition("/")
  try:
    return int(head), name
  except ValueError:
    raise bad_records.BadRecordError(
        str(rid), "record id is not '<coco image id>/<file_name>' (not "
        "written by coco.convert_coco?)") from None


def _previous_dataset(out_dir: str, split: str, overwrite: bool,
                      cats: list[dict]) -> dict | None:
  """The metadata of a dataset at out_dir whose other splits are kept.

  None when there is nothing to keep (no dataset, or one that overwrite
  replaces as a whole).
  """
  if not os.path.isdir(out_dir) or not os.listdir(out_dir):
    return None
  if not os.path.exists(os.path.join(out_dir, records.METADATA_FILE)):
    raise FileExistsError(f"{out_dir} exists, is not empty and is not a "
                          "florax dataset; choose another output directory")
  meta = records.read_metadata(out_dir)
  if "coco" not in meta or "categories" not in meta:
    if overwrite:
      return None
    raise FileExistsError(f"{out_dir} holds a florax dataset that is not a "
                          "COCO detection conversion; choose another output "
                          "directory or pass overwrite=True to replace it")
  if meta["categories"] != cats:
    if overwrite:
      return None
    raise converters.ConversionError(
        f"{out_dir}: its splits have other categories than this json (class "
        "indices would disagree); convert into another directory or pass "
        "overwrite=True to replace the whole dataset")
  if split in records.splits(meta) and not overwrite:
    raise FileExistsError(f"{out_dir} already has split {split!r}; pass "
                          "overwrite=True to replace that split")
  return meta


def _carry_file(src: str, dst: str) -> None:
  try:
    os.link(src, dst)  # the old directory is deleted after the swap
  except OSError:
    shutil.copy2(src, dst)


def convert_coco(instances_json: str, image_root: str, out_dir: str, *,
                 split: str = "train", overwrite: bool = False,
                 records_per_shard: int = 10_000,
                 verify_images: bool = True) -> dict:
  """One COCO split -> florax records in out_dir; returns the metadata.

  Records: the original encoded image bytes, `boxes` (x1, y1, x2, y2 px of
  that image), `box_labels` (class index), label -1, texts = names of the
  categories present (class-index order, prompt=True), text_labels = their
  UniCL labels over all category names. Metadata adds to the converters'
  keys (num_records, splits, class_names, unicl, skipped, source,
  created): `categories` [{"id", "name"}] in class-index order and
  `coco` {split: load_instances' report + "source"}; `skipped` = {"count",
  "by_reason", "records"} summed over the splits (images and annotations,
  crowd annotations included under "iscrowd").
  """
  if not split or os.sep in split or split.startswith("."):
    raise ValueError(f"bad split name {split!r}")
  images, cats, report = load_instances(instances_json, image_root,
                                        verify_images=verify_images)
  previous = _previous_dataset(os.path.abspath(out_dir), split, overwrite,
                               cats)
  names = [c["name"] for c in cats]
  table = LabelTable.build(names)
  # An existing dataset was vetted by _previous_dataset: the staged output
  # may replace it (its other splits are carried into the new one).
  replace_all = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
  staged = converters._staged_output  # pylint: disable=protected-access
  with staged(out_dir, replace_all) as staging:
    all_splits = {}
    per_split = {}
    if previous is not None:
      for name, info in records.splits(previous).items():
        if name == split:
          continue
        for shard in info["shards"]:
          _carry_file(os.path.join(out_dir, shard["file"]),
                      os.path.join(staging, shard["file"]))
        all_splits[name] = info
        per_split[name] = previous["coco"][name]
    shards, written = [], 0
    n_shards = max(1, math.ceil(len(images) / records_per_shard))
    for s in range(n_shards):
      chunk = images[s * len(images) // n_shards:
                     (s + 1) * len(images) // n_shards]
      file = records.shard_name(split, s, n_shards)
      with records.ShardWriter(os.path.join(staging, file)) as writer:
        for im in chunk:
          try:
            with open(im["path"], "rb") as f:
              data = f.read()
          except OSError:  # gone since load_instances looked
            report["skipped_images"][MISSING_FILE] = (
                report["skipped_images"].get(MISSING_FILE, 0) + 1)
            report["skipped"].append({"id": f"image:{im['id']}",
                                      "reason": MISSING_FILE})
            report["images_kept"] -= 1
            continue
          present = sorted(set(int(c) for c in im["labels"]))
          texts = [names[c] for c in present]
          writer.write(records.Record(
              id=record_id(im["id"], im["file_name"]), image=data,
              texts=texts, text_labels=[table.label(t) for t in texts],
              label=-1, prompt=True,
              boxes=[[float(v) for v in b] for b in im["boxes"]],
              box_labels=[int(c) for c in im["labels"]]))
      if writer.count:
        shards.append({"file": file, "count": writer.count})
        written += writer.count
      else:
        os.remove(os.path.join(staging, file))
    if written == 0:
      reasons = "".join(f"\n  {s['id']}: {s['reason']}"
                        for s in report["skipped"][:_REASONS_IN_ERROR])
      raise converters.ConversionError(
          f"{instances_json}: wrote 0 records for split {split!r}; "
          f"{report['images']} images in the json." +
          (" First reasons:" + reasons if reasons else ""))
    all_splits[split] = {"num_records": written, "shards": shards}
    per_split[split] = {**report, "source": os.path.abspath(instances_json)}
    by_reason, listed = {}, []
    for name, rep in per_split.items():
      for counts in (rep["skipped_images"], rep["skipped_annotations"]):
        for reason, n in counts.items():
          by_reason[reason] = by_reason.get(reason, 0) + n
      listed.extend({**s, "split": name} for s in rep["skipped"])
    meta = {
        "num_records": sum(s["num_records"] for s in all_splits.values()),
        "splits": all_splits,
        "class_names": names,
        "categories": cats,
        "unicl": table.to_json(),
        "skipped": {"count": sum(by_reason.values()), "by_reason": by_reason,
                    "records": listed[:_MAX_LISTED_SKIPS]},
        "coco": per_split,
        "source": "coco:" + ",".join(f"{k}={v['source']}"
                                     for k, v in per_split.items()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    records.write_metadata(staging, meta)
  return meta


def categories(dataset_dir: str) -> list[dict]:
  """[{"id", "name"}] in class-index order, from a converted dataset."""
  meta = records.read_metadata(dataset_dir)
  if "categories" not in meta:
    raise ValueError(f"{dataset_dir} has no 'categories' in its metadata: "
                     "not written by coco.convert_coco")
  return [{"id": int(c["id"]), "name": str(c["name"])}
          for c in meta["categories"]]


def decode_record(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                         int, str]:
  """(image uint8 (H, W, 3), boxes (n, 4), labels (n,), image id, file
  name) of a record; BadRecordError when it cannot be used."""
  rid = str(record.get("id", "?"))
  image_id, file_name = parse_record_id(rid)
  data = record.get("image") or b""
  if not data:
    raise bad_records.BadRecordError(rid, "no image data")
  try:
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(img.convert("RGB"))
  except Exception as e:  # PIL raises many types for corrupt data
    raise bad_records.BadRecordError(rid, f"undecodable image ({e})") from None
  boxes = np.asarray(record.get("boxes") or [], np.float32)
  labels = np.asarray(record.get("box_labels") or [], np.int32)
  if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
    raise bad_records.BadRecordError(rid, f"boxes of shape {boxes.shape}")
  boxes = boxes.reshape(-1, 4)
  if len(boxes) != len(labels):
    raise bad_records.BadRecordError(
        rid, f"{len(boxes)} boxes but {len(labels)} box labels")
  return image, boxes, labels, image_id, file_name


def prepare(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *,
            size: int, max_objects: int,
            rng: np.random.Generator | None = None,
            min_crop_fraction: float = 0.5) -> dict[str, Any]:
  """Decoded image -> model example (see the module docstring).

  With an rng (training): a random crop (p=0.5) on the original pixels,
  then a horizontal flip (p=0.5). The crop comes before the resize, so a
  crop zooms in (scale augmentation) instead of leaving padding; `scale`
  is then the crop's resize factor.
  """
  if rng is not None:
    if rng.random() < 0.5:
      image, boxes, labels = box_transforms.random_crop(
          image, boxes, labels, rng, min_crop_fraction)
    if rng.random() < 0.5:
      image, boxes = box_transforms.hflip(image, boxes)
  image, boxes, scale = box_transforms.resize_keep_aspect(image, boxes, size)
  image = box_transforms.pad_to(image, size)
  boxes, labels, _ = box_transforms.pad_objects(boxes, labels, max_objects)
  return {"images": image.astype(np.float32) / np.float32(127.5)
                    - np.float32(1),
          "boxes": boxes, "labels": labels, "scale": np.float32(scale)}


@dataclasses.dataclass(frozen=True)
class DetectionTransform(grain.transforms.RandomMap):
  """Record -> {"images", "boxes", "labels", "image_id", "scale"}, or a
  bad_records marker."""
  size: int
  max_objects: int
  train: bool = True
  min_crop_fraction: float = 0.5

  def random_map(self, element: dict, rng: np.random.Generator):
    try:
      image, boxes, labels, image_id, _ = decode_record(element)
      out = prepare(image, boxes, labels, size=self.size,
                    max_objects=self.max_objects,
                    rng=rng if self.train else None,
                    min_crop_fraction=self.min_crop_fraction)
    except bad_records.BadRecordError as e:
      return bad_records.bad_marker(e.record_id, e.reason)
    out["image_id"] = np.int32(image_id)
    return out


def records_detection_dataset(dataset_dir: str, split: str, *, size: int,
                              batch_size: int, seed: int, max_objects: int,
                              process_index: int = 0, process_count: int = 1,
                              train: bool = True,
                              max_skip_fraction: float = 0.01,
                              min_seen_for_skip_limit: int = 1000,
                              read_threads: int = 4
                              ) -> bad_records.SkipAccountingIterator:
  """This process's iterator of detection batches from a records split.

  train=True: this process's records [process_index::process_count],
  shuffled (seeded, reshuffled each epoch), repeated forever, augmented,
  full batches. train=False: one pass in record order, no augmentation,
  the last batch may be short.

  Returns a grain DatasetIterator (get_state/set_state restore exactly;
  `metrics()` has data/skipped) of {"images" (B, S, S, 3) float32,
  "boxes" (B, G, 4) float32, "labels" (B, G) int32, "image_id" (B,) int32,
  "scale" (B,) float32}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  source = records.RecordSource(dataset_dir, split)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} records cannot feed {process_count} "
                     "processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if train:
    ds = ds.shuffle(seed=seed).repeat()
  # seeds differ per process: the shards differ, so must the augmentations
  map_seed = int(np.random.SeedSequence([seed, process_index])
                 .generate_state(1)[0])
  ds = ds.random_map(DetectionTransform(size, max_objects, train),
                     seed=map_seed)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=8))
  it = bad_records.SkipBadRecordsIterDataset(it, max_skip_fraction,
                                             min_seen_for_skip_limit)
  it = it.batch(batch_size, drop_remainder=train)
  layout = {"process_index": process_index, "process_count": process_count,
            "num_workers": 0, "local_batch": batch_size}
  return bad_records.SkipAccountingIterator(
      iter(it), max_skip_fraction, min_seen_for_skip_limit, layout)


def records_holdout(dataset_dir: str, split: str, size: int,
                    max_objects: int, *, limit: int | None = None
                    ) -> dict[str, Any]:
  """A fixed evaluation set from a records split (first `limit` records).

  Returns {"images" (N, S, S, 3) float32 in [-1, 1], "boxes" (N, G, 4)
  float32 in RESIZED pixels (as the model sees them), "labels" (N, G)
  int32, "image_id" (N,) int32, "scale" (N,) float32 (original = resized /
  scale), "coco": ground truth in ORIGINAL pixels with every box (also
  those cut by max_objects), "category_ids", "class_names", "skipped"
  [{"id", "reason"}] (bad records, left out)}. Everything is held in
  memory: N * S * S * 12 bytes of images.
  """
  source = records.RecordSource(dataset_dir, split)
  cats = categories(dataset_dir)
  n = len(source) if limit is None else min(limit, len(source))
  images, boxes, labels, image_ids, scales, skipped = [], [], [], [], [], []
  gt_images, gt_anns = [], []
  for i in range(n):
    record = source[i]
    try:
      image, b, l, image_id, file_name = decode_record(record)
      out = prepare(image, b, l, size=size, max_objects=max_objects)
    except bad_records.BadRecordError as e:
      skipped.append({"id": e.record_id, "reason": e.reason})
      continue
    images.append(out["images"])
    boxes.append(out["boxes"])
    labels.append(out["labels"])
    image_ids.append(image_id)
    scales.append(out["scale"])
    gt_images.append({"id": image_id, "file_name": file_name,
                      "width": int(image.shape[1]),
                      "height": int(image.shape[0])})
    for box, label in zip(b, l):
      x1, y1, x2, y2 = (float(v) for v in box)
      gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id,
                      "category_id": cats[int(label)]["id"],
                      "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  return {
      "images": (np.stack(images) if images
                 else np.zeros((0, size, size, 3), np.float32)),
      "boxes": (np.stack(boxes) if boxes
                else np.zeros((0, max_objects, 4), np.float32)),
      "labels": (np.stack(labels) if labels
                 else np.zeros((0, max_objects), np.int32)),
      "image_id": np.asarray(image_ids, np.int32),
      "scale": np.asarray(scales, np.float32),
      "coco": {"images": gt_images, "annotations": gt_anns,
               "categories": [dict(c) for c in cats]},
      "category_ids": [int(c["id"]) for c in cats],
      "class_names": [str(c["name"]) for c in cats],
      "skipped": skipped,
  }
