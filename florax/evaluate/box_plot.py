"""A PNG grid of images with predicted (and ground-truth) boxes.

Conventions: images (N, H, W, 3) float in [-1, 1] (model inputs) or uint8;
boxes (x1, y1, x2, y2) in the images' pixels; class indices into
`class_names`. Predictions are solid boxes labelled "<class> <score>",
ground truth dashed white boxes. The file is (columns * panel_inches * dpi)
x (rows * panel_inches * dpi) pixels: a 128 px canvas is drawn at ~2.3x,
so digit-sized boxes and their labels stay readable. Uses matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

_COLUMNS = 4
_COLORS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
           "#46f0f0", "#f032e6", "#bcf60c", "#fabebe")


def grid_shape(n: int, columns: int = _COLUMNS) -> tuple[int, int]:
  """(rows, columns) of the grid for n images."""
  cols = max(1, min(columns, n))
  return max(1, math.ceil(n / cols)), cols


def _display(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.clip((image.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(
      np.uint8)


def _name(class_names, c: int) -> str:
  if class_names is not None and 0 <= c < len(class_names):
    return str(class_names[c])
  return str(c)


def save_box_plot(path: str, images, detections: Mapping[str, Any],
                  gt: Mapping[str, Any] | None = None,
                  class_names: Sequence[str] | None = None,
                  max_images: int = 8, score_threshold: float = 0.3, *,
                  columns: int = _COLUMNS, panel_inches: float = 3.0,
                  dpi: int = 100) -> str:
  """Draws the first `max_images` images with their boxes; returns path.

  Args:
    images: (N, H, W, 3) float in [-1, 1] or uint8.
    detections: {"boxes" (N, M, 4), "scores" (N, M), "classes" (N, M),
      optional "valid" (N, M)}; boxes scoring below score_threshold are
      left out.
    gt: optional {"boxes" (N, G, 4), "labels" (N, G)} (-1 = padding).
    class_names: names of the class indices (default: the indices).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  images = np.asarray(images)
  n = min(len(images), max_images)
  if n < 1:
    raise ValueError("save_box_plot needs at least one image")
  boxes = np.asarray(detections["boxes"], np.float32)
  scores = np.asarray(detections["scores"], np.float32)
  classes = np.asarray(detections["classes"]).astype(np.int64)
  valid = np.asarray(detections.get("valid", np.ones(scores.shape, bool)),
                     bool)
  rows, cols = grid_shape(n, columns)
  fig = plt.figure(figsize=(cols * panel_inches, rows * panel_inches),
                   dpi=dpi)
  try:
    for i in range(n):
      ax = fig.add_axes([(i % cols) / cols, 1 - (i // cols + 1) / rows,
                         1 / cols, 1 / rows])
      ax.imshow(_display(images[i]), interpolation="nearest")
      # a grey frame instead of axes: panels of black canvases would
      # otherwise run into each other
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_edgecolor("#808080")
      if gt is not None:
        for box, label in zip(np.asarray(gt["boxes"])[i],
                              np.asarray(gt["labels"])[i]):
          if label < 0:
            continue
          x1, y1, x2, y2 = (float(v) for v in box)
          # pixel-edge boxes: pixel c spans [c - 0.5, c + 0.5] in imshow
          ax.add_patch(patches.Rectangle(
              (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
              edgecolor="white", linestyle="--", linewidth=1.0))
      order = np.argsort(-scores[i], kind="stable")
      for j in order:
        if not valid[i, j] or scores[i, j] < score_threshold:
          continue
        c = int(classes[i, j])
        color = _COLORS[c % len(_COLORS)]
        x1, y1, x2, y2 = (float(v) for v in boxes[i, j])
        ax.add_patch(patches.Rectangle(
            (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
            edgecolor=color, linewidth=1.5))
        # the label sits above the box, or below it when the box touches
        # the top edge (it would be clipped away there)
        above = y1 > 0.1 * images.shape[1]
        ax.text(x1 - 0.5, (y1 if above else y2) - 0.5,
                f"{_name(class_names, c)} {scores[i, j]:.2f}", fontsize=7,
                color="black", va="bottom" if above else "top", ha="left",
                clip_on=True,
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1,
                      "alpha": 0.85})
    fig.savefig(path, dpi=dpi, facecolor="black")
  finally:
    plt.close(fig)
  return path
