"""Which frames of a clip a video model reads (Video Swin's sampling).

A model reads `frames` frames `stride` apart: a span of (frames - 1) *
stride + 1 source frames. Training draws the stride from the strides whose
span fits the clip (the smallest when none fits) and a uniform start;
evaluation takes `eval_stride`, one view centred in the clip, or `views`
starts spread evenly from the first to the last possible one (multi-view
testing averages the model's scores over them). A clip shorter than the
span repeats its last frame, so every record gives `frames` frames.

Used by the generated moving digits (florax/data/moving_digits.py) and by
clip records (florax/data/video_records.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def span(frames: int, stride: int) -> int:
  return (frames - 1) * stride + 1


def indices(available: int, frames: int, stride: int, start: int
            ) -> np.ndarray:
  """(frames,) source indices from `start`, the last frame repeated past
  the end."""
  return np.minimum(start + stride * np.arange(frames), available - 1)


def train_indices(available: int, frames: int, strides: Sequence[int],
                  rng: np.random.Generator) -> np.ndarray:
  """A random fitting stride and a random start: (frames,) indices."""
  fits = [s for s in strides if span(frames, s) <= available]
  stride = (int(fits[rng.integers(len(fits))]) if fits
            else int(min(strides)))
  start = int(rng.integers(0, max(available - span(frames, stride), 0) + 1))
  return indices(available, frames, stride, start)


def eval_indices(available: int, frames: int, stride: int, views: int = 1
                 ) -> np.ndarray:
  """(views, frames) indices: one centred view, or `views` evenly spaced."""
  room = max(available - span(frames, stride), 0)
  if views == 1:
    starts = [room // 2]
  else:
    starts = np.round(np.linspace(0, room, views)).astype(int)
  return np.stack([indices(available, frames, stride, int(s))
                   for s in starts])
