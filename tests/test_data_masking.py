"""BERT token masking proportions; BEiT block masking count and shape."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from florax.data import masking


def test_bert_masking_proportions_over_100k_tokens():
  rng = np.random.default_rng(0)
  vocab, mask_id = 1000, 1000
  chosen_n = maskable_n = masked = randomised = kept = 0
  specials_touched = 0
  while maskable_n < 100_000:
    length = int(rng.integers(20, 64))
    ids = rng.integers(4, vocab, size=64)
    ids[0], ids[length - 1], ids[length:] = 2, 3, 0  # bos ... eos pad
    out, chosen = masking.bert_mask(ids, rng, vocab_size=vocab,
                                    mask_id=mask_id)
    special = ids < 4
    specials_touched += int((chosen & special).sum() + (out != ids)[special]
                            .sum())
    maskable_n += int((~special).sum())
    chosen_n += int(chosen.sum())
    masked += int((out[chosen] == mask_id).sum())
    changed = chosen & (out != ids) & (out != mask_id)
    randomised += int(changed.sum())
    kept += int((chosen & (out == ids)).sum())
    assert ((out != ids) <= chosen).all()  # only chosen tokens change
  assert specials_touched == 0
  assert abs(chosen_n / maskable_n - 0.15) < 0.01
  # a random replacement equal to the original counts as kept: p = 0.1/996
  assert abs(masked / chosen_n - 0.8) < 0.01
  assert abs(randomised / chosen_n - 0.1) < 0.01
  assert abs(kept / chosen_n - 0.1) < 0.01


def test_bert_mask_transform_adds_targets():
  t = masking.BertMasking(vocab_size=50, mask_id=50)
  ids = np.array([2, 10, 11, 12, 13, 14, 15, 3, 0, 0], np.int32)
  out = t.random_map({"text": ids}, np.random.default_rng(0))
  np.testing.assert_array_equal(out["text_targets"], ids)
  assert out["text_mask"].sum() == 1  # round(0.15 * 6)
  assert t.random_map(None, np.random.default_rng(0)) is None


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((16, 16), 0.4),
                                        ((8, 8), 0.5)])
def test_block_mask_hits_ratio_and_is_blockwise(grid, ratio):
  rng = np.random.default_rng(0)
  n = grid[0] * grid[1]
  target = int(round(ratio * n))
  comps_block, comps_iid = [], []
  for _ in range(50):
    mask = masking.block_mask(rng, grid, target)
    assert abs(int(mask.sum()) - target) <= 1
    comps_block.append(ndimage.label(mask)[1])
    iid = np.zeros(n, bool)
    iid[rng.choice(n, target, replace=False)] = True
    comps_iid.append(ndimage.label(iid.reshape(grid))[1])
    # blockwise: masked patches mostly have masked 4-neighbours
    padded = np.pad(mask, 1).astype(int)
    nbrs = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] +
            padded[1:-1, 2:])
    assert nbrs[mask].mean() >= 2.0
  assert np.mean(comps_block) <= 6
  assert np.mean(comps_block) < np.mean(comps_iid) / 3


def test_block_masking_transform_shape():
  t = masking.BlockMasking(grid=(14, 14), ratio=0.4)
  out = t.random_map({"image": np.zeros((224, 224, 3))},
                     np.random.default_rng(1))
  assert out["image_mask"].shape == (196,) and out["image_mask"].sum() == 78
