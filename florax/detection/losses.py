"""ATSS head losses (Zhang et al. 2020), normalised as mmdetection's ATSSHead.

Per image, with `matched` from florax.detection.atss.assign (gt index or -1):
  * cls: sigmoid focal loss (Lin et al. 2017) summed over all anchors and
    classes; the target is the one-hot of the matched gt's label for
    positives and all zeros for negatives (no background logit);
  * box: GIoU loss 1 - GIoU(decode(anchor, delta), gt) over positives, each
    weighted by its centerness target (FCOS, Tian et al. 2019);
  * centerness: binary cross-entropy with logits against the centerness
    target, over positives.
Over a batch (mmdetection's loss_single, with the same avg factors):
  L = cls / max(P, 1) + box_weight * box / max(W, 1e-6) + ctr / max(P, 1)
with P the number of positives and W the sum of the positives' centerness
targets over the whole batch (one device's view = the batch passed in; under
jit with a sharded global batch that is the global batch, like mmdetection's
reduce_mean over GPUs).

Targets (assignment, one-hot labels, boxes, centerness) are stop_gradient'ed:
the loss is differentiated only through the predictions. All math is fp32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from florax.detection import atss
from florax.detection import boxes as box_lib


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25,
                       gamma: float = 2.0):
  """Elementwise focal loss alpha_t (1 - p_t)^gamma * CE for targets in {0,1}.

  Computed from log-sigmoids (CE) and sigmoid(-+x) (1 - p_t), so large |x|
  neither overflows nor loses the small probabilities.
  """
  x = jnp.asarray(logits, jnp.float32)
  t = jnp.asarray(targets, jnp.float32)
  ce = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
  one_minus_pt = t * jax.nn.sigmoid(-x) + (1.0 - t) * jax.nn.sigmoid(x)
  alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
  return alpha_t * one_minus_pt ** gamma * ce


def binary_cross_entropy_with_logits(logits, targets):
  """Elementwise -t log sigmoid(x) - (1 - t) log sigmoid(-x), stable."""
  x = jnp.asarray(logits, jnp.float32)
  t = jnp.asarray(targets, jnp.float32)
  return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def centerness_target(anchor_centers, boxes):
  """FCOS centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)).

  l, t, r, b are the distances from the point to the box's sides. Defined for
  points inside the box (all ATSS positives are); a point outside gets 0
  rather than NaN so masked-out entries stay finite.
  """
  p = jnp.asarray(anchor_centers, jnp.float32)
  b = jnp.asarray(boxes, jnp.float32)
  l, t = p[..., 0] - b[..., 0], p[..., 1] - b[..., 1]
  r, bo = b[..., 2] - p[..., 0], b[..., 3] - p[..., 1]
  ratio_x = jnp.minimum(l, r) / jnp.maximum(jnp.maximum(l, r), 1e-12)
  ratio_y = jnp.minimum(t, bo) / jnp.maximum(jnp.maximum(t, bo), 1e-12)
  return jnp.sqrt(jnp.maximum(ratio_x, 0.0) * jnp.maximum(ratio_y, 0.0))


def loss_terms(cls_logits, deltas, centerness_logits, anchors, matched,
               gt_boxes, gt_labels, *, alpha: float = 0.25,
               gamma: float = 2.0,
               stds: Sequence[float] = box_lib.DEFAULT_STDS):
  """Per-image sums of the ATSS loss terms (see module docstring).

  Args:
    cls_logits: (A, C); deltas: (A, 4); centerness_logits: (A,).
    anchors: (A, 4); matched: (A,) gt index or -1 (from atss.assign).
    gt_boxes: (G, 4); gt_labels: (G,) int, -1 on padding rows.
  Returns:
    dict of scalars: cls, box, box_weight, centerness, num_pos.
  """
  cls_logits = jnp.asarray(cls_logits, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  num_classes = cls_logits.shape[-1]
  matched = jax.lax.stop_gradient(jnp.asarray(matched, jnp.int32))
  pos = matched >= 0
  idx = jnp.maximum(matched, 0)
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  # Negatives regress onto their own anchor (a non-degenerate box) so the
  # masked-out GIoU stays finite and so does its gradient.
  tgt_boxes = jnp.where(pos[:, None], gt_boxes[idx], anchors)
  tgt_labels = jnp.asarray(gt_labels, jnp.int32)[idx]
  cls_targets = jax.nn.one_hot(tgt_labels, num_classes) * pos[:, None]
  ctr_targets = jnp.where(
      pos, centerness_target(box_lib.centers(anchors), tgt_boxes), 0.0)
  cls_targets, tgt_boxes, ctr_targets = jax.lax.stop_gradient(
      (cls_targets, tgt_boxes, ctr_targets))

  cls = jnp.sum(sigmoid_focal_loss(cls_logits, cls_targets, alpha, gamma))
  pred = box_lib.decode(anchors, deltas, stds)
  box = jnp.sum(jnp.where(
      pos, (1.0 - box_lib.giou(pred, tgt_boxes)) * ctr_targets, 0.0))
  ctr = jnp.sum(jnp.where(
      pos, binary_cross_entropy_with_logits(centerness_logits, ctr_targets),
      0.0))
  return {"cls": cls, "box": box, "box_weight": jnp.sum(ctr_targets),
          "centerness": ctr, "num_pos": jnp.sum(pos.astype(jnp.float32))}


def atss_loss(cls_logits, deltas, centerness_logits, anchors,
              level_sizes: Sequence[int], gt_boxes, gt_labels, *,
              topk: int = 9, box_weight: float = 2.0, alpha: float = 0.25,
              gamma: float = 2.0,
              stds: Sequence[float] = box_lib.DEFAULT_STDS):
  """Batch ATSS loss: assignment + terms per image, normalised over the batch.

  Args:
    cls_logits: (B, A, C); deltas: (B, A, 4); centerness_logits: (B, A).
    anchors: (A, 4) shared by all images; level_sizes: static per-level A_l.
    gt_boxes: (B, G, 4); gt_labels: (B, G) int, -1 on padding rows.
    box_weight: weight of the GIoU term (mmdetection's loss_bbox weight 2.0).
  Returns:
    (total, metrics): metrics has the normalised terms loss_cls, loss_box,
    loss_centerness, num_pos (mean positives per image) and num_pos_total.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  level_sizes = tuple(int(n) for n in level_sizes)
  matched = jax.vmap(
      lambda b, l: atss.assign(anchors, level_sizes, b, l, topk))(
          gt_boxes, gt_labels)
  matched = jax.lax.stop_gradient(matched)
  terms = jax.vmap(
      lambda c, d, z, m, b, l: loss_terms(c, d, z, anchors, m, b, l,
                                          alpha=alpha, gamma=gamma,
                                          stds=stds))(
          cls_logits, deltas, centerness_logits, matched, gt_boxes, gt_labels)
  sums = {k: jnp.sum(v) for k, v in terms.items()}
  num_pos = jnp.maximum(sums["num_pos"], 1.0)
  loss_cls = sums["cls"] / num_pos
  loss_box = box_weight * sums["box"] / jnp.maximum(sums["box_weight"], 1e-6)
  loss_ctr = sums["centerness"] / num_pos
  total = loss_cls + loss_box + loss_ctr
  metrics = {"loss_cls": loss_cls, "loss_box": loss_box,
             "loss_centerness": loss_ctr,
             "num_pos": sums["num_pos"] / terms["num_pos"].shape[0],
             "num_pos_total": sums["num_pos"]}
  return total, metrics
