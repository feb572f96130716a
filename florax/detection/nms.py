"""Greedy non-maximum suppression with static shapes (jit/vmap friendly).

Greedy NMS: visit candidates by decreasing score (equal scores: lower input
index first); keep one unless a kept box (of the same class, for
`batched_nms`) has IoU > iou_threshold with it. Candidates whose score is
-inf or NaN, or whose `valid` flag is False, are never kept.

Implementation: one argsort, then a lax.while_loop over the sorted candidates
that computes one IoU row per step (O(N) memory instead of an N x N matrix,
which matters at ~5 levels x 1000 candidates). The loop stops after the last
valid candidate or once max_outputs boxes are kept; greedy NMS keeps boxes in
score order, so stopping early does not change the first max_outputs.

Class awareness multiplies the IoU by "same class" rather than offsetting
boxes by class * image size: offsets of ~1e5 pixels cost float32 precision
in the IoU, the mask is exact.

Outputs are padded to max_outputs: `indices` (into the inputs) in
decreasing-score order, `valid` marking real entries; padded slots hold
index 0 and must be masked with `valid`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from florax.detection import boxes as box_lib


def _greedy(boxes, scores, classes, valid, iou_threshold, max_outputs):
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  n = boxes.shape[0]
  ok = (scores > -jnp.inf) & ~jnp.isnan(scores)
  if valid is not None:
    ok &= jnp.asarray(valid, jnp.bool_)
  key = jnp.where(ok, scores, -jnp.inf)
  # Valid candidates first, by decreasing score; stable keeps ties in input
  # order.
  order = jnp.argsort(-key, stable=True)
  sorted_boxes = boxes[order]
  sorted_classes = jnp.asarray(classes, jnp.int32)[order]
  num_ok = jnp.sum(ok.astype(jnp.int32))

  def cond(state):
    i, num_kept, _ = state
    return (i < num_ok) & (num_kept < max_outputs)

  def body(state):
    i, num_kept, keep = state
    iou = box_lib.elementwise_iou(sorted_boxes[i], sorted_boxes)
    same = sorted_classes == sorted_classes[i]
    kept_now = ~jnp.any(keep & same & (iou > iou_threshold))
    return (i + 1, num_kept + kept_now.astype(jnp.int32),
            keep.at[i].set(kept_now))

  _, num_kept, keep = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), jnp.bool_)))

  # Kept candidates first, still in score order.
  indices = order[jnp.argsort(~keep, stable=True)].astype(jnp.int32)
  if max_outputs <= n:
    indices = indices[:max_outputs]
  else:
    indices = jnp.pad(indices, (0, max_outputs - n))
  out_valid = jnp.arange(max_outputs) < num_kept
  return jnp.where(out_valid, indices, 0), out_valid


def nms(boxes, scores, iou_threshold: float, max_outputs: int, valid=None):
  """Greedy NMS of (N, 4) boxes with (N,) scores.

  Args:
    boxes: (N, 4); scores: (N,) (-inf never kept).
    iou_threshold: a box is suppressed by a kept box with IoU > this.
    max_outputs: static number of output slots.
    valid: optional (N,) bool; False entries are never kept.
  Returns:
    (indices (max_outputs,) int32, valid (max_outputs,) bool).
  """
  classes = jnp.zeros(jnp.shape(scores), jnp.int32)
  return _greedy(boxes, scores, classes, valid, iou_threshold, max_outputs)


def batched_nms(boxes, scores, classes, iou_threshold: float,
                max_outputs: int, valid=None):
  """Class-aware NMS: boxes of different `classes` never suppress each other.

  Same arguments and outputs as `nms`, plus classes (N,) int.
  """
  return _greedy(boxes, scores, classes, valid, iou_threshold, max_outputs)
