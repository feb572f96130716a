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


def test_bert_masking_with_bert_vocabulary_specials():
  """BERT's layout: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103
  among ordinary ids: none is ever chosen, and a random replacement is
  uniform over the other ids of [0, vocab)."""
  rng = np.random.default_rng(1)
  vocab, specials = 300, (0, 100, 101, 102, 103)
  ordinary = np.setdiff1d(np.arange(vocab), specials)
  counts = np.zeros(vocab, np.int64)
  for _ in range(4000):
    ids = rng.choice(ordinary, size=32)
    ids[0], ids[20], ids[21:] = 101, 102, 0
    ids[5] = 100  # an [UNK] inside the text
    out, chosen = masking.bert_mask(ids, rng, vocab_size=vocab, mask_id=103,
                                    special_ids=specials, random_prob=0.5,
                                    mask_prob=0.4)
    assert not chosen[np.isin(ids, specials)].any()
    rand = chosen & (out != ids) & (out != 103)
    np.add.at(counts, out[rand], 1)
  assert counts[list(specials)].sum() == 0
  expected = counts.sum() / len(ordinary)
  # chi-square over the 295 ordinary ids (df 294: mean 294, sd ~24)
  chi2 = float(np.sum((counts[ordinary] - expected) ** 2 / expected))
  assert chi2 < 294 + 6 * 24.2, chi2


def test_random_tokens_keep_the_sentencepiece_stream():
  """With the default specials (ids < 4) the draw is numpy's own
  integers(4, vocab) for the same generator state."""
  a, b = np.random.default_rng(7), np.random.default_rng(7)
  np.testing.assert_array_equal(masking.random_tokens(a, 1000, 50),
                                b.integers(4, 50, size=1000))


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
