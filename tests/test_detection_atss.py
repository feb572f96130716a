"""ATSS box math, assignment and losses against plain-numpy references.

The references below follow the published algorithms with explicit loops
(ATSS Algorithm 1 with mmdetection's conventions: unbiased std, centre-inside
margin 0.01, highest-IoU tie-break) and are computed in float64; the inputs
avoid exact ties at the decision boundaries, so float32 vs float64 rounding
cannot flip a decision.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from florax.detection import anchors as anchor_lib
from florax.detection import atss
from florax.detection import boxes as box_lib
from florax.detection import losses

FEATURES = ((8, 8), (4, 4), (2, 2))   # a 64 x 64 image
STRIDES = (8, 16, 32)
STDS = (0.1, 0.1, 0.2, 0.2)


# ----------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------

def np_area(b):
  return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def np_iou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = np_area(a) + np_area(b) - inter
  return inter / union if union > 0 else 0.0


def np_giou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = np_area(a) + np_area(b) - inter
  enclose = ((max(a[2], b[2]) - min(a[0], b[0]))
             * (max(a[3], b[3]) - min(a[1], b[1])))
  return inter / union - (enclose - union) / enclose


def np_center(b):
  return ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)


def np_anchors(features, strides, scale):
  out = []
  for (h, w), s in zip(features, strides):
    for y in range(h):
      for x in range(w):
        cx, cy, half = (x + 0.5) * s, (y + 0.5) * s, scale * s / 2.0
        out.append([cx - half, cy - half, cx + half, cy + half])
  return np.array(out, np.float64)


def np_positive_sets(anchors, level_sizes, gt_boxes, gt_labels, topk=9):
  """ATSS Algorithm 1: for each gt, the set of anchors positive for it."""
  anchors = np.asarray(anchors, np.float64)
  gt_boxes = np.asarray(gt_boxes, np.float64)
  sets = []
  for g in range(len(gt_boxes)):
    if gt_labels[g] < 0:
      sets.append(set())
      continue
    gx, gy = np_center(gt_boxes[g])
    candidates = []
    start = 0
    for size in level_sizes:
      dists = []
      for a in range(start, start + size):
        ax, ay = np_center(anchors[a])
        dists.append(math.sqrt((ax - gx) ** 2 + (ay - gy) ** 2))
      order = np.argsort(np.array(dists), kind="stable")
      candidates += [start + int(i) for i in order[:min(topk, size)]]
      start += size
    ious = [np_iou(anchors[a], gt_boxes[g]) for a in candidates]
    mean = sum(ious) / len(ious)
    std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
    positives = set()
    for a, v in zip(candidates, ious):
      ax, ay = np_center(anchors[a])
      x1, y1, x2, y2 = gt_boxes[g]
      inside = min(ax - x1, ay - y1, x2 - ax, y2 - ay) > 0.01
      if v >= mean + std and inside:
        positives.add(a)
    sets.append(positives)
  return sets


def np_assign(anchors, level_sizes, gt_boxes, gt_labels, topk=9):
  sets = np_positive_sets(anchors, level_sizes, gt_boxes, gt_labels, topk)
  matched = np.full(len(anchors), -1, np.int64)
  for a in range(len(anchors)):
    best, best_iou = -1, -1.0
    for g in range(len(gt_boxes)):      # ascending g: ties keep the lowest
      if a in sets[g]:
        v = np_iou(anchors[a], gt_boxes[g])
        if v > best_iou:
          best, best_iou = g, v
    matched[a] = best
  return matched


def np_decode(anchor, delta, max_ratio=abs(math.log(16 / 1000))):
  ax, ay = np_center(anchor)
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  dw = min(max(delta[2] * STDS[2], -max_ratio), max_ratio)
  dh = min(max(delta[3] * STDS[3], -max_ratio), max_ratio)
  gx, gy = ax + aw * delta[0] * STDS[0], ay + ah * delta[1] * STDS[1]
  gw, gh = aw * math.exp(dw), ah * math.exp(dh)
  return [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2]


def np_encode(anchor, box):
  ax, ay = np_center(anchor)
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  gx, gy = np_center(box)
  gw, gh = box[2] - box[0], box[3] - box[1]
  return [(gx - ax) / aw / STDS[0], (gy - ay) / ah / STDS[1],
          math.log(gw / aw) / STDS[2], math.log(gh / ah) / STDS[3]]


def np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def np_focal(x, t, alpha=0.25, gamma=2.0):
  p = np_sigmoid(x)
  if t == 1:
    return -alpha * (1 - p) ** gamma * math.log(p)
  return -(1 - alpha) * p ** gamma * math.log(1 - p)


def np_centerness(point, box):
  l, t = point[0] - box[0], point[1] - box[1]
  r, b = box[2] - point[0], box[3] - point[1]
  return math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))


def np_bce(x, t):
  p = np_sigmoid(x)
  return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def np_loss_terms(cls_logits, deltas, ctr_logits, anchors, matched,
                  gt_boxes, gt_labels):
  num_anchors, num_classes = cls_logits.shape
  out = dict(cls=0.0, box=0.0, box_weight=0.0, centerness=0.0, num_pos=0.0)
  for a in range(num_anchors):
    m = matched[a]
    for c in range(num_classes):
      t = 1 if (m >= 0 and gt_labels[m] == c) else 0
      out["cls"] += np_focal(float(cls_logits[a, c]), t)
    if m < 0:
      continue
    gt = [float(v) for v in gt_boxes[m]]
    w = np_centerness(np_center(anchors[a]), gt)
    pred = np_decode([float(v) for v in anchors[a]],
                     [float(v) for v in deltas[a]])
    out["box"] += (1 - np_giou(pred, gt)) * w
    out["box_weight"] += w
    out["centerness"] += np_bce(float(ctr_logits[a]), w)
    out["num_pos"] += 1
  return out


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------

def _anchor_set(scale=4.0):
  return (anchor_lib.anchors(FEATURES, STRIDES, scale),
          anchor_lib.level_sizes(FEATURES))


G = 4
TINY = [1.0, 1.0, 3.0, 3.0]  # contains no anchor centre at any level


def _hand_built_images():
  pad = [0.0, 0.0, 0.0, 0.0]
  return [
      # one object + a tiny object that contains no anchor centre
      ([[8, 8, 40, 40], TINY, pad, pad], [2, 0, -1, -1]),
      # two overlapping objects competing for the same anchors (anchor 27
      # goes to gt 0, anchor 19 to gt 1 by IoU)
      ([[10, 10, 42, 42], [12, 8, 48, 40], pad, pad], [1, 3, -1, -1]),
      # empty image (padding rows hold garbage that would otherwise match)
      ([[8, 8, 40, 40], [10, 10, 42, 42], pad, pad], [-1, -1, -1, -1]),
      # padding rows mixed with real ones
      ([[10, 10, 42, 42], [2, 30, 30, 62], [20, 20, 60, 60],
        [34, 4, 60, 28]], [-1, 0, -1, 4]),
  ]


def _random_gts(rng, batch, num_gt, num_real, size=64.0):
  xy = rng.uniform(0, size * 0.7, size=(batch, num_gt, 2))
  wh = rng.uniform(4, size * 0.6, size=(batch, num_gt, 2))
  gt = np.concatenate([xy, np.minimum(xy + wh, size - 0.5)], -1)
  labels = rng.integers(0, 5, size=(batch, num_gt))
  for b in range(batch):
    labels[b, num_real[b]:] = -1
  return gt.astype(np.float32), labels.astype(np.int32)


# ----------------------------------------------------------------------------
# anchors and box math
# ----------------------------------------------------------------------------

def test_anchor_layout():
  for scale in (4.0, 8.0):
    a = anchor_lib.anchors(FEATURES, STRIDES, scale)
    assert a.shape == (84, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, np_anchors(FEATURES, STRIDES, scale))
  assert anchor_lib.level_sizes(FEATURES) == (64, 16, 4)
  assert anchor_lib.level_sizes(((3, 5), (2, 3))) == (15, 6)


def test_iou_and_giou():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0, 50, (12, 2)), np.zeros((12, 2))], 1)
  a[:, 2:] = a[:, :2] + rng.uniform(1, 30, (12, 2))
  b = np.concatenate([rng.uniform(0, 50, (9, 2)), np.zeros((9, 2))], 1)
  b[:, 2:] = b[:, :2] + rng.uniform(1, 30, (9, 2))
  a[0] = [5, 5, 5, 5]          # zero-area against zero-area: union 0 -> 0
  b[0] = [5, 5, 5, 5]
  ref = np.array([[np_iou(x, y) for y in b] for x in a])
  assert ref[0, 0] == 0.0 and (ref > 0).any() and (ref[1:] == 0).any()
  np.testing.assert_allclose(box_lib.pairwise_iou(a, b), ref, atol=1e-6)
  np.testing.assert_allclose(box_lib.area(a), [np_area(x) for x in a],
                             rtol=1e-6)
  aa, bb = a[1:9], b[1:9]      # includes disjoint pairs (negative GIoU)
  ref_g = np.array([np_giou(x, y) for x, y in zip(aa, bb)])
  assert (ref_g < 0).any()
  np.testing.assert_allclose(box_lib.giou(aa, bb), ref_g, atol=1e-6)
  np.testing.assert_allclose(box_lib.giou(aa.reshape(2, 4, 4),
                                          bb.reshape(2, 4, 4)),
                             ref_g.reshape(2, 4), atol=1e-6)
  np.testing.assert_allclose(box_lib.centers(a),
                             [np_center(x) for x in a], rtol=1e-6)


def test_encode_decode():
  rng = np.random.default_rng(1)
  anchors = np.zeros((20, 4))
  anchors[:, :2] = rng.uniform(0, 100, (20, 2))
  anchors[:, 2:] = anchors[:, :2] + rng.uniform(8, 64, (20, 2))
  boxes = np.zeros((20, 4))
  boxes[:, :2] = rng.uniform(0, 100, (20, 2))
  boxes[:, 2:] = boxes[:, :2] + rng.uniform(2, 90, (20, 2))
  enc = np.array(box_lib.encode(anchors, boxes))
  np.testing.assert_allclose(
      enc, [np_encode(a, b) for a, b in zip(anchors, boxes)],
      rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(box_lib.decode(anchors, enc), boxes,
                             rtol=1e-4, atol=1e-3)
  # Large deltas exercise the clamp of dw / dh.
  deltas = rng.normal(0, 30, (20, 4))
  ref = [np_decode(a, d) for a, d in zip(anchors, deltas)]
  assert any(abs(d[2] * 0.2) > abs(math.log(16 / 1000)) for d in deltas)
  np.testing.assert_allclose(box_lib.decode(anchors, deltas), ref,
                             rtol=1e-4, atol=1e-2)
  clipped = np.array(box_lib.clip(np.array([[-5., 3., 70., 90.]]), 64, 60))
  np.testing.assert_array_equal(clipped, [[0., 3., 60., 64.]])


def test_focal_bce_centerness():
  rng = np.random.default_rng(2)
  x = rng.normal(0, 3, (50,)).astype(np.float32)
  t = rng.integers(0, 2, (50,)).astype(np.float32)
  np.testing.assert_allclose(
      losses.sigmoid_focal_loss(x, t),
      [np_focal(float(a), int(b)) for a, b in zip(x, t)], rtol=1e-4,
      atol=1e-7)
  np.testing.assert_allclose(
      losses.sigmoid_focal_loss(x, t, alpha=0.5, gamma=1.0),
      [np_focal(float(a), int(b), 0.5, 1.0) for a, b in zip(x, t)],
      rtol=1e-4, atol=1e-7)
  # Stable at extreme logits: log-sigmoid, not log(sigmoid).
  big = losses.sigmoid_focal_loss(np.array([-100., 100., 100., -100.]),
                                  np.array([1., 0., 1., 0.]))
  np.testing.assert_allclose(big, [0.25 * 100, 0.75 * 100, 0, 0], rtol=1e-5)
  w = rng.uniform(0, 1, (50,)).astype(np.float32)
  np.testing.assert_allclose(
      losses.binary_cross_entropy_with_logits(x, w),
      [np_bce(float(a), float(b)) for a, b in zip(x, w)], rtol=1e-5)
  box = np.array([10., 20., 50., 44.])
  pts = rng.uniform([11, 21], [49, 43], (30, 2))
  np.testing.assert_allclose(
      losses.centerness_target(pts, np.broadcast_to(box, (30, 4))),
      [np_centerness(p, box) for p in pts], rtol=1e-5)


# ----------------------------------------------------------------------------
# assignment
# ----------------------------------------------------------------------------

def test_assign_hand_built_cases():
  anchors, sizes = _anchor_set()
  images = _hand_built_images()
  fn = jax.jit(lambda b, l: atss.assign(anchors, sizes, b, l))
  for gt, labels in images:
    got = np.array(fn(np.float32(gt), np.int32(labels)))
    np.testing.assert_array_equal(got, np_assign(anchors, sizes, gt, labels))
  # The cases test what they claim.
  m0 = np_assign(anchors, sizes, *images[0])
  assert (m0 == 0).any() and not (m0 == 1).any()        # tiny box: no match
  sets = np_positive_sets(anchors, sizes, *images[1])
  contested = sets[0] & sets[1]
  m1 = np_assign(anchors, sizes, *images[1])
  # Real competition, resolved both ways by IoU.
  assert {int(m1[a]) for a in contested} == {0, 1}
  assert (np_assign(anchors, sizes, *images[2]) == -1).all()
  m3 = np_assign(anchors, sizes, *images[3])
  assert set(m3[m3 >= 0].tolist()) == {1, 3}


def test_assign_tie_goes_to_lowest_gt():
  anchors, sizes = _anchor_set()
  box = [8., 8., 40., 40.]
  labels = np.int32([3, 1, -1, -1])
  gt = np.float32([box, box, [0, 0, 0, 0], [0, 0, 0, 0]])
  got = np.array(atss.assign(anchors, sizes, gt, labels))
  assert (got == 0).any() and not (got == 1).any()
  np.testing.assert_array_equal(got, np_assign(anchors, sizes, gt, labels))


def test_assign_topk_above_level_size():
  # topk = 20 > 16 anchors of level 2 and > 4 of level 3.
  anchors, sizes = _anchor_set(scale=8.0)
  rng = np.random.default_rng(3)
  gt, labels = _random_gts(rng, 1, 5, [5])
  got = np.array(jax.jit(
      lambda b, l: atss.assign(anchors, sizes, b, l, topk=20))(
          gt[0], labels[0]))
  ref = np_assign(anchors, sizes, gt[0], labels[0], topk=20)
  assert (ref >= 0).any()
  np.testing.assert_array_equal(got, ref)


def test_assign_jit_vmap_batch():
  anchors, sizes = _anchor_set()
  images = _hand_built_images()
  rng = np.random.default_rng(4)
  rgt, rlab = _random_gts(rng, 4, G, [4, 3, 2, 1])
  gts = np.concatenate([np.float32([g for g, _ in images]), rgt])
  labels = np.concatenate([np.int32([l for _, l in images]), rlab])
  fn = jax.jit(jax.vmap(lambda b, l: atss.assign(anchors, sizes, b, l)))
  got = np.array(fn(gts, labels))
  for i in range(len(gts)):
    np.testing.assert_array_equal(
        got[i], np_assign(anchors, sizes, gts[i], labels[i]), err_msg=str(i))


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------

B, C = 3, 5


def _loss_inputs(seed=5):
  anchors, sizes = _anchor_set(scale=8.0)
  rng = np.random.default_rng(seed)
  gts, labels = _random_gts(rng, B, G, [3, 1, 4])
  num_anchors = anchors.shape[0]
  cls = rng.normal(-2, 1.5, (B, num_anchors, C)).astype(np.float32)
  deltas = rng.normal(0, 1, (B, num_anchors, 4)).astype(np.float32)
  ctr = rng.normal(0, 1, (B, num_anchors)).astype(np.float32)
  return anchors, sizes, cls, deltas, ctr, gts, labels


def test_loss_terms_match_reference():
  anchors, sizes, cls, deltas, ctr, gts, labels = _loss_inputs()
  for b in range(B):
    matched = np_assign(anchors, sizes, gts[b], labels[b])
    assert (matched >= 0).any()
    got = losses.loss_terms(cls[b], deltas[b], ctr[b], anchors,
                            np.int32(matched), gts[b], labels[b])
    ref = np_loss_terms(cls[b], deltas[b], ctr[b], anchors, matched,
                        gts[b], labels[b])
    for k, v in ref.items():
      np.testing.assert_allclose(got[k], v, rtol=2e-4, err_msg=k)


def test_atss_loss_matches_reference():
  anchors, sizes, cls, deltas, ctr, gts, labels = _loss_inputs()
  labels = labels.copy()
  labels[1] = -1                              # one empty image in the batch
  total, metrics = jax.jit(
      lambda *a: losses.atss_loss(*a[:4], sizes, *a[4:]))(
          cls, deltas, ctr, anchors, gts, labels)
  sums = dict(cls=0.0, box=0.0, box_weight=0.0, centerness=0.0, num_pos=0.0)
  for b in range(B):
    matched = np_assign(anchors, sizes, gts[b], labels[b])
    terms = np_loss_terms(cls[b], deltas[b], ctr[b], anchors, matched,
                          gts[b], labels[b])
    for k in sums:
      sums[k] += terms[k]
  ref_cls = sums["cls"] / max(sums["num_pos"], 1)
  ref_box = 2.0 * sums["box"] / max(sums["box_weight"], 1e-6)
  ref_ctr = sums["centerness"] / max(sums["num_pos"], 1)
  np.testing.assert_allclose(metrics["loss_cls"], ref_cls, rtol=2e-4)
  np.testing.assert_allclose(metrics["loss_box"], ref_box, rtol=2e-4)
  np.testing.assert_allclose(metrics["loss_centerness"], ref_ctr, rtol=2e-4)
  np.testing.assert_allclose(total, ref_cls + ref_box + ref_ctr, rtol=2e-4)
  np.testing.assert_allclose(metrics["num_pos"], sums["num_pos"] / B)
  np.testing.assert_allclose(metrics["num_pos_total"], sums["num_pos"])


def test_atss_loss_all_empty_is_finite():
  anchors, sizes, cls, deltas, ctr, gts, labels = _loss_inputs()
  labels = np.full_like(labels, -1)
  total, metrics = jax.jit(
      lambda *a: losses.atss_loss(*a[:4], sizes, *a[4:]))(
          cls, deltas, ctr, anchors, gts, labels)
  ref = sum(np_focal(float(x), 0) for x in cls.reshape(-1))
  np.testing.assert_allclose(total, ref, rtol=2e-4)
  assert float(metrics["loss_box"]) == 0.0
  assert float(metrics["num_pos"]) == 0.0


def test_atss_loss_gradients():
  anchors, sizes, cls, deltas, ctr, gts, labels = _loss_inputs()

  def loss_fn(c, d, z, g):
    return losses.atss_loss(c, d, z, anchors, sizes, g, labels)[0]

  grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3)))(
      cls, deltas, ctr, gts)
  for name, g in zip(("cls", "deltas", "centerness"), grads[:3]):
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert np.abs(g).max() > 0, name
  # Targets are constants: no gradient reaches the ground truth.
  np.testing.assert_array_equal(np.asarray(grads[3]), 0.0)
  # d total / d logit of a negative anchor = focal'(x, 0) / num_pos.
  matched = np_assign(anchors, sizes, gts[0], labels[0])
  num_pos = sum(int((np_assign(anchors, sizes, gts[b], labels[b]) >= 0)
                    .sum()) for b in range(B))
  a = int(np.where(matched < 0)[0][0])
  x, eps = float(cls[0, a, 0]), 1e-4
  fd = (np_focal(x + eps, 0) - np_focal(x - eps, 0)) / (2 * eps) / num_pos
  np.testing.assert_allclose(grads[0][0, a, 0], fd, rtol=1e-3)
