"""ATSS inference: per-level top-k, box decoding, class-aware NMS.

Follows mmdetection's ATSSHead at test time with static shapes:
  1. score(anchor, class) = sigmoid(cls_logit) * sigmoid(centerness_logit)
     (ATSS uses the centerness as a score factor, as FCOS);
  2. on each level keep the top min(pre_nms_topk, A_l * C) (anchor, class)
     pairs by score (ties: lower flat index anchor * C + class first), and
     drop those with score <= score_threshold (mmdetection's strict ">");
  3. decode the kept pairs' anchors with their deltas, clip to the image;
  4. class-aware greedy NMS, keeping the max_detections best.
An anchor may appear once per class. Levels follow florax.detection.anchors'
layout (`level_sizes` static). Output is padded to max_detections rows in
decreasing score order: padded rows have valid=False, zero boxes and scores,
and class -1. jit-compilable and vmappable over images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from florax.detection import boxes as box_lib
from florax.detection import nms as nms_lib


def detect(cls_logits, deltas, centerness_logits, anchors,
           level_sizes: Sequence[int], *, image_size: tuple[int, int],
           score_threshold: float = 0.05, pre_nms_topk: int = 1000,
           iou_threshold: float = 0.6, max_detections: int = 100,
           stds: Sequence[float] = box_lib.DEFAULT_STDS):
  """Detections of one image.

  Args:
    cls_logits: (A, C); deltas: (A, 4); centerness_logits: (A,).
    anchors: (A, 4); level_sizes: static per-level anchor counts.
    image_size: (height, width) to clip boxes to.
  Returns:
    dict: boxes (M, 4), scores (M,), classes (M,) int32, valid (M,) bool,
    M = max_detections.
  """
  cls_logits = jnp.asarray(cls_logits, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  deltas = jnp.asarray(deltas, jnp.float32)
  num_classes = cls_logits.shape[-1]
  level_sizes = tuple(int(n) for n in level_sizes)
  if sum(level_sizes) != anchors.shape[0]:
    raise ValueError(f"level_sizes {level_sizes} do not sum to "
                     f"{anchors.shape[0]} anchors")
  scores = (jax.nn.sigmoid(cls_logits)
            * jax.nn.sigmoid(jnp.asarray(centerness_logits,
                                         jnp.float32))[:, None])

  cand_scores, cand_anchor, cand_class = [], [], []
  start = 0
  for size in level_sizes:
    flat = scores[start:start + size].reshape(-1)
    k = min(pre_nms_topk, size * num_classes)
    top, idx = jax.lax.top_k(flat, k)
    cand_scores.append(top)
    cand_anchor.append(start + idx // num_classes)
    cand_class.append(idx % num_classes)
    start += size
  cand_scores = jnp.concatenate(cand_scores)
  cand_anchor = jnp.concatenate(cand_anchor)
  cand_class = jnp.concatenate(cand_class).astype(jnp.int32)
  keep = cand_scores > score_threshold

  height, width = image_size
  cand_boxes = box_lib.clip(
      box_lib.decode(anchors[cand_anchor], deltas[cand_anchor], stds),
      height, width)
  idx, valid = nms_lib.batched_nms(cand_boxes, cand_scores, cand_class,
                                   iou_threshold, max_detections, valid=keep)
  return {
      "boxes": jnp.where(valid[:, None], cand_boxes[idx], 0.0),
      "scores": jnp.where(valid, cand_scores[idx], 0.0),
      "classes": jnp.where(valid, cand_class[idx], -1).astype(jnp.int32),
      "valid": valid,
  }
