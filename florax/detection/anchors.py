"""Anchor grids for the ATSS head (one square anchor per location and level).

ATSS (Zhang et al. 2020) shows one anchor per location suffices once positives
are chosen adaptively; its default is a square of side 8 * stride.

Layout convention (every module in florax.detection relies on it):
  * levels are concatenated in the order given (normally finest first,
    strides 8, 16, 32, ...), so level l owns rows
    [sum(level_sizes[:l]), sum(level_sizes[:l + 1])) of every (A, ...) array;
  * within a level, locations are row-major: index = y * w + x, matching a
    (h, w, ...) feature map reshaped to (h * w, ...).

Anchor centres sit at ((x + 0.5) * stride, (y + 0.5) * stride), the centre of
the stride x stride image cell that feature (x, y) summarises. With this
choice the grid is symmetric in the image (the first and last centres are
stride / 2 from the borders) and anchors of every level share the image
centre; mmdetection's AnchorGenerator defaults to center_offset=0 (centres on
the cell's top-left corner), which shifts every level by a different
half-stride. Models trained with one convention should be evaluated with it.

Everything here is static (numpy): shapes never depend on data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def level_sizes(feature_shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  """Number of anchors (h * w) of each level, in the given level order."""
  return tuple(int(h) * int(w) for h, w in feature_shapes)


def anchors(feature_shapes: Sequence[tuple[int, int]],
            strides: Sequence[int], scale: float = 8.0) -> np.ndarray:
  """(A, 4) float32 anchors, A = sum(level_sizes(feature_shapes)).

  Args:
    feature_shapes: (h, w) of each level's feature map.
    strides: the stride (pixels per feature cell) of each level.
    scale: anchor side in units of the level's stride.
  """
  if len(feature_shapes) != len(strides):
    raise ValueError(f"{len(feature_shapes)} feature shapes but "
                     f"{len(strides)} strides")
  out = []
  for (h, w), stride in zip(feature_shapes, strides):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64),
                         np.arange(w, dtype=np.float64), indexing="ij")
    cx = ((xs + 0.5) * stride).reshape(-1)
    cy = ((ys + 0.5) * stride).reshape(-1)
    half = 0.5 * scale * stride
    out.append(np.stack([cx - half, cy - half, cx + half, cy + half], -1))
  return np.concatenate(out, 0).astype(np.float32)
