"""Greedy NMS, class-aware NMS and ATSS post-processing against numpy loops.

Scores are distinct (a permutation) so the visiting order is unambiguous,
and the references follow the textbook greedy algorithm step by step.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from florax.detection import anchors as anchor_lib
from florax.detection import nms as nms_lib
from florax.detection import postprocess

STDS = (0.1, 0.1, 0.2, 0.2)


def np_iou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
           - inter)
  return inter / union if union > 0 else 0.0


def np_nms(boxes, scores, thr, max_out, classes=None, valid=None):
  """Greedy NMS: highest score first, drop boxes with IoU > thr to a kept
  box of the same class. Returns the kept input indices in order."""
  n = len(boxes)
  cand = [i for i in range(n)
          if scores[i] > -np.inf and (valid is None or valid[i])]
  cand.sort(key=lambda i: (-scores[i], i))
  keep = []
  for i in cand:
    if len(keep) == max_out:
      break
    suppressed = False
    for j in keep:
      same = classes is None or classes[i] == classes[j]
      if same and np_iou(boxes[i], boxes[j]) > thr:
        suppressed = True
    if not suppressed:
      keep.append(i)
  return keep


def _clustered_boxes(rng, n, clusters=6, size=100.0):
  centers = rng.uniform(20, size - 20, (clusters, 2))
  c = centers[rng.integers(0, clusters, n)] + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(10, 30, (n, 2))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
  scores = (rng.permutation(n) / n + 0.01).astype(np.float32)
  return boxes, scores


def _check(got, ref, max_out):
  idx, valid = (np.asarray(x) for x in got)
  assert idx.shape == (max_out,) and valid.shape == (max_out,)
  assert idx.dtype == np.int32 and valid.dtype == np.bool_
  k = len(ref)
  np.testing.assert_array_equal(valid, np.arange(max_out) < k)
  np.testing.assert_array_equal(idx[:k], ref)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("max_out", [3, 80])
def test_nms_matches_greedy(thr, max_out):
  rng = np.random.default_rng(0)
  boxes, scores = _clustered_boxes(rng, 60)
  ref = np_nms(boxes, scores, thr, max_out)
  full = np_nms(boxes, scores, thr, 1000)
  assert 3 < len(full) < 60      # some suppressed, more than 3 survivors
  _check(nms_lib.nms(boxes, scores, thr, max_out), ref, max_out)
  _check(jax.jit(nms_lib.nms, static_argnums=(2, 3))(
      boxes, scores, thr, max_out), ref, max_out)


def test_nms_all_suppressed_and_invalid():
  box = np.float32([[10, 10, 30, 40]] * 7)
  scores = np.float32([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.4])
  _check(nms_lib.nms(box, scores, 0.5, 4), [1], 4)
  # -inf scores and the valid mask are never kept.
  rng = np.random.default_rng(1)
  boxes, scores = _clustered_boxes(rng, 30)
  _check(nms_lib.nms(boxes, np.full(30, -np.inf, np.float32), 0.5, 5), [], 5)
  s = scores.copy()
  s[::3] = -np.inf
  valid = np.ones(30, bool)
  valid[1::5] = False
  ref = np_nms(boxes, np.where(valid, s, -np.inf), 0.5, 40)
  assert np.argmax(scores) in (set(range(0, 30, 3)) | set(range(1, 30, 5)))
  _check(nms_lib.nms(boxes, s, 0.5, 40, valid=valid), ref, 40)


def test_batched_nms_and_vmap():
  rng = np.random.default_rng(2)
  batch = []
  for _ in range(3):
    boxes, scores = _clustered_boxes(rng, 50, clusters=4)
    classes = rng.integers(0, 3, 50).astype(np.int32)
    batch.append((boxes, scores, classes))
  fn = jax.jit(jax.vmap(
      lambda b, s, c: nms_lib.batched_nms(b, s, c, 0.5, 30)))
  idx, valid = fn(*(np.stack(x) for x in zip(*batch)))
  for i, (boxes, scores, classes) in enumerate(batch):
    ref = np_nms(boxes, scores, 0.5, 30, classes)
    # Class-aware keeps more than class-agnostic on this data.
    assert len(ref) > len(np_nms(boxes, scores, 0.5, 30))
    _check((idx[i], valid[i]), ref, 30)


# ----------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------

def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def np_decode(anchor, delta, max_ratio=abs(math.log(16 / 1000))):
  ax, ay = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  dw = min(max(delta[2] * STDS[2], -max_ratio), max_ratio)
  dh = min(max(delta[3] * STDS[3], -max_ratio), max_ratio)
  gx, gy = ax + aw * delta[0] * STDS[0], ay + ah * delta[1] * STDS[1]
  gw, gh = aw * math.exp(dw), ah * math.exp(dh)
  return [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2]


def np_detect(cls, deltas, ctr, anchors, sizes, image_size, score_thr,
              pre_nms, iou_thr, max_det):
  height, width = image_size
  num_classes = cls.shape[1]
  cand = []                      # (score, anchor, class)
  start = 0
  for size in sizes:
    pairs = []
    for a in range(start, start + size):
      for c in range(num_classes):
        s = _sigmoid(float(cls[a, c])) * _sigmoid(float(ctr[a]))
        pairs.append((s, a, c))
    pairs.sort(key=lambda p: -p[0])
    cand += [p for p in pairs[:pre_nms] if p[0] > score_thr]
    start += size
  boxes, scores, classes = [], [], []
  for s, a, c in cand:
    b = np_decode([float(v) for v in anchors[a]],
                  [float(v) for v in deltas[a]])
    b = [min(max(b[0], 0), width), min(max(b[1], 0), height),
         min(max(b[2], 0), width), min(max(b[3], 0), height)]
    boxes.append(b)
    scores.append(s)
    classes.append(c)
  keep = np_nms(boxes, scores, iou_thr, max_det, classes)
  return ([boxes[i] for i in keep], [scores[i] for i in keep],
          [classes[i] for i in keep])


def test_detect_matches_reference():
  features, strides = ((8, 8), (4, 4), (2, 2)), (8, 16, 32)
  anchors = anchor_lib.anchors(features, strides, 4.0)
  sizes = anchor_lib.level_sizes(features)
  num_classes = 3
  rng = np.random.default_rng(3)
  images = []
  for _ in range(2):
    cls = rng.normal(-1, 2, (84, num_classes)).astype(np.float32)
    deltas = rng.normal(0, 1, (84, 4)).astype(np.float32)
    ctr = rng.normal(0, 1, (84,)).astype(np.float32)
    images.append((cls, deltas, ctr))
  kw = dict(image_size=(64, 60), score_threshold=0.1, pre_nms_topk=20,
            iou_threshold=0.5, max_detections=15)
  fn = jax.jit(jax.vmap(lambda c, d, z: postprocess.detect(
      c, d, z, anchors, sizes, **kw)))
  out = fn(*(np.stack(x) for x in zip(*images)))
  single = postprocess.detect(*images[0], anchors, sizes, **kw)
  for k in single:
    np.testing.assert_array_equal(np.asarray(single[k]), out[k][0])
  for i, (cls, deltas, ctr) in enumerate(images):
    ref_boxes, ref_scores, ref_classes = np_detect(
        cls, deltas, ctr, anchors, sizes, kw["image_size"],
        kw["score_threshold"], kw["pre_nms_topk"], kw["iou_threshold"],
        kw["max_detections"])
    n = len(ref_scores)
    assert 0 < n
    valid = np.asarray(out["valid"][i])
    np.testing.assert_array_equal(valid, np.arange(15) < n)
    np.testing.assert_allclose(out["scores"][i][:n], ref_scores, rtol=1e-5)
    np.testing.assert_array_equal(out["classes"][i][:n], ref_classes)
    np.testing.assert_allclose(out["boxes"][i][:n], ref_boxes, rtol=1e-5,
                               atol=1e-3)
    np.testing.assert_array_equal(out["classes"][i][n:], -1)
    np.testing.assert_array_equal(out["scores"][i][n:], 0.0)
  # The configuration exercises every stage: the per-level top-k drops
  # candidates, the threshold drops some, NMS suppresses some, and the
  # output is full (max_detections binding) for at least one image.
  cls, deltas, ctr = images[0]
  _, s_all, _ = np_detect(cls, deltas, ctr, anchors, sizes, (64, 60), 0.1,
                          10**6, 1.01, 10**6)
  _, s_topk, _ = np_detect(cls, deltas, ctr, anchors, sizes, (64, 60), 0.1,
                           20, 1.01, 10**6)
  _, s_nms, _ = np_detect(cls, deltas, ctr, anchors, sizes, (64, 60), 0.1,
                          20, 0.5, 10**6)
  assert len(s_all) > len(s_topk) > len(s_nms)
  assert len(s_topk) < 20 + 20 + 12       # the threshold dropped some
  assert np.asarray(out["valid"]).sum(1).max() == 15
