"""COCO box mAP of detector outputs, with pycocotools, all in memory.

Conventions: model outputs are per image padded arrays, boxes (N, M, 4) as
(x1, y1, x2, y2) pixels of the model input, scores (N, M), classes (N, M)
as class indices (positions in the dataset's category list), valid (N, M)
marking real detections. `detections_to_coco` turns them into COCO result
dicts ([x, y, w, h] boxes, COCO category ids), dividing by the per-image
`scale` to get back to original image pixels when the input was resized.

`coco_metrics` runs the standard COCOeval ("bbox"): IoU thresholds
0.50:0.05:0.95, 101 recall points, at most 100 detections per image (the
highest scores), area ranges small < 32^2 <= medium < 96^2 <= large.
pycocotools reports -1 for an area range without ground truth; this module
returns NaN there instead, so an average over runs cannot silently absorb a
-1. An empty detection list is evaluated like any other (AP = 0 where
there is ground truth), not special-cased.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(boxes, scores, classes, valid, image_ids,
                       category_ids: Sequence[int], scales=None
                       ) -> list[dict[str, Any]]:
  """Padded per-image detections -> COCO results.

  Args:
    boxes: (N, M, 4) x1y1x2y2 pixels; scores, classes, valid: (N, M).
    image_ids: (N,) COCO image ids.
    category_ids: COCO id of each class index.
    scales: (N,) or None; boxes are divided by scales[i] (model input
      pixels -> original pixels).

  Returns:
    [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] for the
    valid entries, in image then slot order.
  """
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.asarray(classes)
  valid = np.asarray(valid, bool)
  image_ids = np.asarray(image_ids).reshape(-1)
  n = len(image_ids)
  if boxes.shape[:1] != (n,) or boxes.shape[-1] != 4 or boxes.ndim != 3:
    raise ValueError(f"boxes must be (N={n}, M, 4), got {boxes.shape}")
  for name, arr in (("scores", scores), ("classes", classes),
                    ("valid", valid)):
    if arr.shape != boxes.shape[:2]:
      raise ValueError(f"{name} must be {boxes.shape[:2]}, got {arr.shape}")
  if scales is not None:
    scales = np.asarray(scales, np.float64).reshape(-1)
    if scales.shape != (n,):
      raise ValueError(f"scales must be ({n},), got {scales.shape}")
    boxes = boxes / scales[:, None, None]
  out = []
  for i, j in zip(*np.nonzero(valid)):
    c = int(classes[i, j])
    if not 0 <= c < len(category_ids):
      raise ValueError(f"class index {c} (image {i}, slot {j}) is outside "
                       f"the {len(category_ids)} categories")
    x1, y1, x2, y2 = (float(v) for v in boxes[i, j])
    out.append({"image_id": int(image_ids[i]),
                "category_id": int(category_ids[c]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[i, j])})
  return out


def _ground_truth(gt: Mapping[str, Any]):
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  for key in ("images", "annotations", "categories"):
    if key not in gt:
      raise ValueError(f"ground truth is not a COCO instances dict: no "
                       f"{key!r} key")
  anns = []
  for a in gt["annotations"]:
    a = dict(a)  # COCOeval writes into the dicts; keep the caller's clean
    x, y, w, h = a["bbox"]
    a.setdefault("area", float(w) * float(h))
    a.setdefault("iscrowd", 0)
    anns.append(a)
  coco = COCO()
  coco.dataset = {"images": [dict(i) for i in gt["images"]],
                  "annotations": anns,
                  "categories": [dict(c) for c in gt["categories"]]}
  coco.createIndex()
  return coco


def _results(gt_coco, detections: Sequence[Mapping[str, Any]]):
  """The detections as a COCO object (what COCO.loadRes makes, without its
  crash on an empty list)."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  image_ids = set(gt_coco.getImgIds())
  cat_ids = set(gt_coco.getCatIds())
  anns = []
  for k, d in enumerate(detections):
    if d["image_id"] not in image_ids:
      raise ValueError(f"detection {k} has image_id {d['image_id']}, which "
                       "is not in the ground truth")
    if d["category_id"] not in cat_ids:
      raise ValueError(f"detection {k} has category_id {d['category_id']}, "
                       "which is not in the ground truth")
    x, y, w, h = (float(v) for v in d["bbox"])
    anns.append({"id": k + 1, "image_id": d["image_id"],
                 "category_id": d["category_id"], "bbox": [x, y, w, h],
                 "score": float(d["score"]), "area": w * h, "iscrowd": 0})
  coco = COCO()
  coco.dataset = {"images": list(gt_coco.dataset["images"]),
                  "annotations": anns,
                  "categories": list(gt_coco.dataset["categories"])}
  coco.createIndex()
  return coco


def coco_metrics(gt: Mapping[str, Any],
                 detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """{"AP", "AP50", "AP75", "APs", "APm", "APl"} of COCOeval("bbox").

  gt: a COCO instances dict (images, annotations, categories), e.g. the
  "coco" entry of digits_canvas.holdout_set / coco.records_holdout or a
  loaded instances json. detections: COCO results (detections_to_coco).
  NaN (not pycocotools' -1) for an area range without ground truth.
  """
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  # pycocotools prints progress and the summary table; keep logs clean.
  with contextlib.redirect_stdout(io.StringIO()):
    gt_coco = _ground_truth(gt)
    dt_coco = _results(gt_coco, detections)
    evaluator = COCOeval(gt_coco, dt_coco, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  stats = [float(v) for v in evaluator.stats[:len(METRIC_KEYS)]]
  return {k: (math.nan if v == -1 else v) for k, v in zip(METRIC_KEYS, stats)}
