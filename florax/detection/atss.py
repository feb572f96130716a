"""Adaptive Training Sample Selection (Zhang et al. 2020, Algorithm 1).

For every valid ground-truth box g:
  1. on each pyramid level pick the min(topk, level size) anchors whose
     centres are closest (L2) to g's centre -> candidates C_g;
  2. t_g = mean + std of IoU(C_g, g);
  3. a candidate is positive for g if IoU >= t_g and its centre lies inside g
     (all of the l, t, r, b distances to g's sides > 0.01, as mmdetection).
An anchor positive for several boxes goes to the box of highest IoU (ties:
lowest box index); all others are negatives (-1).

Static-shape conventions: anchors (A, 4) are shared by all images and laid out
as in florax.detection.anchors (levels concatenated, `level_sizes` static);
ground truth is padded to G rows with gt_labels = -1 on padding rows, which
never produce positives. Ties in centre distance go to the lowest
anchor index (lax.top_k's order), which plain ATSS leaves unspecified.
Everything is jnp with static shapes, so `assign` jits and vmaps over images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from florax.detection import boxes as box_lib

# Margin of mmdetection's ATSSAssigner for "anchor centre inside the gt box".
_INSIDE_EPS = 0.01


def assign(anchors, level_sizes: Sequence[int], gt_boxes, gt_labels,
           topk: int = 9):
  """ATSS assignment of one image.

  Args:
    anchors: (A, 4) anchors, levels concatenated in `level_sizes` order.
    level_sizes: static number of anchors per level (sums to A).
    gt_boxes: (G, 4) ground-truth boxes (padding rows may hold anything).
    gt_labels: (G,) int class index, -1 for padding rows.
    topk: candidates per level (capped at the level's size).
  Returns:
    (A,) int32: index into gt_boxes of the assigned box, or -1.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  num_anchors = anchors.shape[0]
  num_gt = gt_boxes.shape[0]
  level_sizes = tuple(int(n) for n in level_sizes)
  if sum(level_sizes) != num_anchors:
    raise ValueError(f"level_sizes {level_sizes} sum to {sum(level_sizes)}, "
                     f"not the {num_anchors} anchors")
  valid_gt = jnp.asarray(gt_labels) >= 0                        # (G,)

  ious = box_lib.pairwise_iou(gt_boxes, anchors)                 # (G, A)
  anchor_ctr = box_lib.centers(anchors)                          # (A, 2)
  gt_ctr = box_lib.centers(gt_boxes)                             # (G, 2)
  # Squared distance ranks like L2 and avoids sqrt rounding creating or
  # breaking ties.
  dist2 = jnp.sum((gt_ctr[:, None, :] - anchor_ctr[None, :, :]) ** 2, -1)

  cand = []
  start = 0
  for size in level_sizes:
    k = min(topk, size)
    _, idx = jax.lax.top_k(-dist2[:, start:start + size], k)    # (G, k)
    cand.append(idx + start)
    start += size
  cand = jnp.concatenate(cand, 1)                                # (G, K)
  num_cand = cand.shape[1]

  cand_iou = jnp.take_along_axis(ious, cand, 1)                  # (G, K)
  mean = jnp.mean(cand_iou, 1)
  # Unbiased std (ddof=1): mmdetection's ATSSAssigner uses torch.Tensor.std,
  # which divides by K - 1. With a single candidate torch would give NaN
  # (and no positives); we take std = 0 instead.
  var = jnp.sum((cand_iou - mean[:, None]) ** 2, 1) / max(num_cand - 1, 1)
  threshold = mean + jnp.sqrt(var)

  cand_ctr = anchor_ctr[cand]                                    # (G, K, 2)
  g = gt_boxes[:, None, :]
  side_dist = jnp.stack([cand_ctr[..., 0] - g[..., 0],
                         cand_ctr[..., 1] - g[..., 1],
                         g[..., 2] - cand_ctr[..., 0],
                         g[..., 3] - cand_ctr[..., 1]], -1)
  inside = jnp.min(side_dist, -1) > _INSIDE_EPS

  positive = (cand_iou >= threshold[:, None]) & inside & valid_gt[:, None]
  # Candidates of one gt are distinct anchors (levels are disjoint, top_k
  # indices are distinct), so scattering with max never loses information.
  pos_ga = jnp.zeros((num_gt, num_anchors), jnp.bool_).at[
      jnp.arange(num_gt)[:, None], cand].max(positive)

  # Resolve anchors positive for several gts by IoU; argmax returns the first
  # maximum, i.e. the lowest gt index on ties.
  score = jnp.where(pos_ga, ious, -jnp.inf)                      # (G, A)
  best = jnp.argmax(score, 0).astype(jnp.int32)
  return jnp.where(jnp.any(pos_ga, 0), best, -1).astype(jnp.int32)
