"""Axis-aligned box arithmetic for the detection adapter.

Conventions (shared by every module in florax.detection):
  * boxes are float32 (x1, y1, x2, y2) in pixels, in continuous coordinates:
    width = x2 - x1 and height = y2 - y1 (no "+1" as in old Detectron code);
  * functions work on the trailing axis of size 4 and broadcast over any
    leading axes, so they can be vmapped or applied to padded batches;
  * divisions that may hit zero (degenerate boxes) use a safe denominator and
    a `where`, so neither the value nor the gradient becomes NaN.

The box coder is the standard delta-XYWH parameterisation (R-CNN; mmdetection's
DeltaXYWHBBoxCoder with zero means), with the stds ATSS uses by default:

  dx = (gx - ax) / aw / std0     dy = (gy - ay) / ah / std1
  dw = log(gw / aw) / std2       dh = log(gh / ah) / std3

where (ax, ay, aw, ah) and (gx, gy, gw, gh) are centre/size of the anchor and
of the target box.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

DEFAULT_STDS = (0.1, 0.1, 0.2, 0.2)
# Largest |dw| / |dh| (after multiplying by the std) that decode exponentiates:
# a box can grow or shrink by at most 1000/16 relative to its anchor, which
# keeps exp() finite for untrained heads (mmdetection's wh_ratio_clip).
DEFAULT_MAX_RATIO = abs(math.log(16.0 / 1000.0))


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _safe_div(num, den):
  """num / den where den > 0, else 0 (with a finite gradient)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def area(boxes):
  """(..., 4) -> (...,) area; negative extents count as zero."""
  boxes = _f32(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def _intersection(a, b):
  """Intersection area of broadcastable (..., 4) arrays."""
  w = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2])
                  - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
  h = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3])
                  - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
  return w * h


def elementwise_iou(a, b):
  """IoU of broadcastable (..., 4) arrays (0 where the union is 0)."""
  a, b = _f32(a), _f32(b)
  inter = _intersection(a, b)
  union = area(a) + area(b) - inter
  return _safe_div(inter, union)


def pairwise_iou(a, b):
  """(N, 4), (M, 4) -> (N, M) IoU matrix (0 where the union is 0)."""
  a, b = _f32(a), _f32(b)
  return elementwise_iou(a[:, None, :], b[None, :, :])


def giou(a, b):
  """Generalised IoU (Rezatofighi et al. 2019) of equal-shaped (..., 4) boxes.

  giou = iou - (|C| - |A u B|) / |C| with C the smallest enclosing box; in
  [-1, 1]. Terms with a zero denominator are taken as 0.
  """
  a, b = _f32(a), _f32(b)
  inter = _intersection(a, b)
  union = area(a) + area(b) - inter
  iou = _safe_div(inter, union)
  enclose = jnp.stack([jnp.minimum(a[..., 0], b[..., 0]),
                       jnp.minimum(a[..., 1], b[..., 1]),
                       jnp.maximum(a[..., 2], b[..., 2]),
                       jnp.maximum(a[..., 3], b[..., 3])], -1)
  c = area(enclose)
  return iou - _safe_div(c - union, c)


def centers(boxes):
  """(..., 4) -> (..., 2) box centres (cx, cy)."""
  boxes = _f32(boxes)
  return jnp.stack([(boxes[..., 0] + boxes[..., 2]) * 0.5,
                    (boxes[..., 1] + boxes[..., 3]) * 0.5], -1)


def _cxcywh(boxes):
  return ((boxes[..., 0] + boxes[..., 2]) * 0.5,
          (boxes[..., 1] + boxes[..., 3]) * 0.5,
          boxes[..., 2] - boxes[..., 0],
          boxes[..., 3] - boxes[..., 1])


def encode(anchors, boxes, stds: Sequence[float] = DEFAULT_STDS):
  """Regression targets (..., 4) taking `anchors` to `boxes` (see module doc).

  Both must have positive width and height (log of the size ratio).
  """
  anchors, boxes = _f32(anchors), _f32(boxes)
  ax, ay, aw, ah = _cxcywh(anchors)
  gx, gy, gw, gh = _cxcywh(boxes)
  return jnp.stack([(gx - ax) / aw / stds[0],
                    (gy - ay) / ah / stds[1],
                    jnp.log(gw / aw) / stds[2],
                    jnp.log(gh / ah) / stds[3]], -1)


def decode(anchors, deltas, stds: Sequence[float] = DEFAULT_STDS,
           max_ratio: float = DEFAULT_MAX_RATIO):
  """Inverse of `encode`: boxes (..., 4) from anchors and predicted deltas.

  dw and dh are clamped to [-max_ratio, max_ratio] after the std is applied
  and before exp(), so an untrained head cannot produce inf boxes.
  """
  anchors, deltas = _f32(anchors), _f32(deltas)
  ax, ay, aw, ah = _cxcywh(anchors)
  dx = deltas[..., 0] * stds[0]
  dy = deltas[..., 1] * stds[1]
  dw = jnp.clip(deltas[..., 2] * stds[2], -max_ratio, max_ratio)
  dh = jnp.clip(deltas[..., 3] * stds[3], -max_ratio, max_ratio)
  gx, gy = ax + aw * dx, ay + ah * dy
  gw, gh = aw * jnp.exp(dw), ah * jnp.exp(dh)
  return jnp.stack([gx - 0.5 * gw, gy - 0.5 * gh,
                    gx + 0.5 * gw, gy + 0.5 * gh], -1)


def clip(boxes, height, width):
  """Clips (..., 4) boxes to the image [0, width] x [0, height]."""
  boxes = _f32(boxes)
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
