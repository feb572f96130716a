"""Window geometry for Swin-style attention: partitioning, shifts, masks.

Everything here depends only on static shapes, so masks and index tables are
built with numpy at trace time and enter the graph as constants.

Grids that the window does not divide are padded at the bottom/right (as
Swin does); unlike Swin, padded tokens are *masked out as keys*, so the
output of a valid token never depends on padding.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

MASK_VALUE = -1e9  # finite: fully masked rows of padded queries stay NaN-free


def effective_window(grid: tuple[int, int], window: int, shift: int):
  """Per-axis window and shift: a window larger than the grid shrinks to it
  and then shifting is pointless (Swin's rule)."""
  wins, shifts = [], []
  for g in grid:
    if g <= window:
      wins.append(g)
      shifts.append(0)
    else:
      wins.append(window)
      shifts.append(shift)
  return tuple(wins), tuple(shifts)


def padded_grid(grid, win):
  return tuple(-(-g // w) * w for g, w in zip(grid, win))


def partition(x, win):
  """(B, H, W, C) with H, W multiples of win -> (B*nW, wh*ww, C)."""
  return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c",
                   wh=win[0], ww=win[1])


def merge(x, win, grid):
  """Inverse of `partition` for a padded grid (H, W)."""
  return rearrange(x, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                   nh=grid[0] // win[0], nw=grid[1] // win[1],
                   wh=win[0], ww=win[1])


def attention_mask(grid, win, shift):
  """Additive mask (nW, N, N) for a (possibly padded, possibly shifted) grid.

  Key j is visible from query i iff both lie in the same region of the
  shifted image (Swin's shift mask) and key j is a real (unpadded) token.
  Returns None when no masking is needed.
  Args:
    grid: the unpadded (H, W).
    win: effective window (wh, ww).
    shift: effective shift (sh, sw); 0 means no shift on that axis.
  """
  hp, wp = padded_grid(grid, win)
  if (hp, wp) == tuple(grid) and not any(shift):
    return None
  region = np.zeros((hp, wp), np.int32)
  count = 0
  h_slices = ((0, hp - win[0]), (hp - win[0], hp - shift[0]), (hp - shift[0], hp)) \
      if shift[0] else ((0, hp),)
  w_slices = ((0, wp - win[1]), (wp - win[1], wp - shift[1]), (wp - shift[1], wp)) \
      if shift[1] else ((0, wp),)
  for h0, h1 in h_slices:
    for w0, w1 in w_slices:
      region[h0:h1, w0:w1] = count
      count += 1
  valid = np.zeros((hp, wp), bool)
  valid[:grid[0], :grid[1]] = True
  # The feature map is rolled by -shift before partitioning; roll the
  # validity map the same way. (Region ids are defined on the rolled map.)
  valid = np.roll(valid, (-shift[0], -shift[1]), axis=(0, 1))
  region_w = partition(region[None, :, :, None], win)[..., 0]   # (nW, N)
  valid_w = partition(valid[None, :, :, None], win)[..., 0]     # (nW, N)
  same = region_w[:, :, None] == region_w[:, None, :]
  visible = same & valid_w[:, None, :]
  return np.where(visible, 0.0, MASK_VALUE).astype(np.float32)


def relative_position_index(win, table_window: int):
  """(N, N) indices into a ((2w-1)^2, heads) bias table for a (wh, ww)
  window; windows smaller than the table's use a subset of it."""
  coords = np.stack(np.meshgrid(np.arange(win[0]), np.arange(win[1]),
                                indexing="ij")).reshape(2, -1)   # (2, N)
  rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)
  return (rel[0] * (2 * table_window - 1) + rel[1]).astype(np.int32)
