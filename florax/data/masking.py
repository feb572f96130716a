"""Masked-modeling corruptions as Grain transforms: BERT text, BEiT block image.

BERT (Devlin et al. 2019, §3.1): 15% of the maskable tokens are chosen; of
those 80% become [MASK], 10% a random token, 10% stay. Special tokens
(`special_ids`: a tokenizer's `special_ids` -- pad, bos, eos, [UNK], [MASK];
florax's SentencePiece default: ids < 4) are never chosen, and a random
replacement is any id of [0, vocab_size) but a special one (BERT's own
vocabulary keeps [CLS]=101, [SEP]=102, [MASK]=103 among ordinary pieces, so
"ids >= 4" would mask [SEP] and draw [MASK] as a "random" token).

BEiT block-wise masking (Bao et al. 2022, Alg. 1): rectangles of random area
(>= `min_block` patches) and log-uniform aspect are added while they do not
overshoot the target. Rectangles alone can stall a few patches short; the
remainder is then grown from the border of the masked region, one patch at a
time, so the count is exact and the mask stays made of contiguous blocks.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

from florax.data import bad_records
from florax.data.tokenizer import EOS_ID

NUM_SPECIAL_IDS = EOS_ID + 1  # pad, unk, bos, eos


DEFAULT_SPECIAL_IDS = tuple(range(NUM_SPECIAL_IDS))


def maskable(ids, special_ids=DEFAULT_SPECIAL_IDS) -> np.ndarray:
  """bool, True where ids[i] is text (not one of `special_ids`)."""
  return ~np.isin(np.asarray(ids), np.asarray(special_ids, np.int64))


def random_tokens(rng: np.random.Generator, n: int, vocab_size: int,
                  special_ids=DEFAULT_SPECIAL_IDS) -> np.ndarray:
  """n ids uniform over [0, vocab_size) minus `special_ids`, int32.

  One draw over the ordinary ids' count, then stepped over each special id
  in increasing order (r >= s -> r + 1): with the specials 0..3 this is
  exactly rng.integers(4, vocab_size), so SentencePiece runs keep their
  random stream."""
  specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
  r = rng.integers(0, vocab_size - len(specials), size=n)
  for s in specials:
    r = r + (r >= s)
  return r.astype(np.int32)


def bert_mask(ids: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
              mask_id: int, rate: float = 0.15, mask_prob: float = 0.8,
              random_prob: float = 0.1, special_ids=DEFAULT_SPECIAL_IDS
              ) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts one id sequence.

  Args:
    ids: int (L,) token ids.
    rng: numpy Generator.
    vocab_size: random replacements are drawn from [0, vocab_size) minus
      `special_ids` and `mask_id`.
    mask_id: id of [MASK] (florax default: vocab_size, an extra embedding row).
    rate: fraction of maskable tokens chosen as targets.
    mask_prob, random_prob: split of the chosen tokens; the rest stay.
    special_ids: ids never chosen nor drawn (a tokenizer's `special_ids`).

  Returns:
    (corrupted ids int32 (L,), chosen bool (L,)).
  """
  ids = np.asarray(ids)
  special_ids = (*special_ids, mask_id)
  positions = np.flatnonzero(maskable(ids, special_ids))
  chosen = np.zeros(ids.shape, bool)
  out = ids.astype(np.int32).copy()
  if positions.size == 0:
    return out, chosen
  n = max(1, int(round(rate * positions.size)))
  picked = rng.choice(positions, size=n, replace=False)
  chosen[picked] = True
  u = rng.random(n)
  out[picked[u < mask_prob]] = mask_id
  rand = picked[(u >= mask_prob) & (u < mask_prob + random_prob)]
  out[rand] = random_tokens(rng, rand.size, vocab_size, special_ids)
  return out, chosen


def block_mask(rng: np.random.Generator, grid: tuple[int, int],
               num_masked: int, min_block: int = 16,
               max_block: int | None = None,
               min_aspect: float = 0.3) -> np.ndarray:
  """BEiT block-wise mask with exactly `num_masked` True patches.

  Args:
    rng: numpy Generator.
    grid: (rows, cols) of patches.
    num_masked: patches to mask (<= rows * cols).
    min_block: smallest rectangle area tried (BEiT: 16).
    max_block: largest rectangle area (default: num_masked).
    min_aspect: aspect ratios are log-uniform in [min_aspect, 1/min_aspect].

  Returns:
    bool (rows, cols).
  """
  rows, cols = grid
  if not 0 <= num_masked <= rows * cols:
    raise ValueError(f"cannot mask {num_masked} of {rows}x{cols} patches")
  mask = np.zeros(grid, bool)
  count, failures = 0, 0
  max_block = max_block or num_masked
  log_aspect = (math.log(min_aspect), -math.log(min_aspect))
  while count < num_masked and failures < 20:
    remaining = num_masked - count
    area = rng.uniform(min(min_block, remaining), min(max_block, remaining))
    aspect = math.exp(rng.uniform(*log_aspect))
    h = min(rows, max(1, int(round(math.sqrt(area * aspect)))))
    w = min(cols, max(1, int(round(math.sqrt(area / aspect)))))
    top = int(rng.integers(0, rows - h + 1))
    left = int(rng.integers(0, cols - w + 1))
    new = h * w - int(mask[top:top + h, left:left + w].sum())
    if 0 < new <= remaining:
      mask[top:top + h, left:left + w] = True
      count += new
      failures = 0
    else:
      failures += 1
  while count < num_masked:
    grown = np.zeros_like(mask)
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    border = np.flatnonzero(grown & ~mask)
    if border.size == 0:  # nothing masked yet (num_masked < min_block tries)
      border = np.flatnonzero(~mask)
    mask.flat[int(rng.choice(border))] = True
    count += 1
  return mask


def _passthrough(element) -> bool:
  return element is None or bad_records.is_bad(element)


@dataclasses.dataclass(frozen=True)
class BertMasking(grain.transforms.RandomMap):
  """Adds `text_targets` (original ids) and `text_mask`; corrupts `text`."""
  vocab_size: int
  mask_id: int
  rate: float = 0.15
  mask_prob: float = 0.8
  random_prob: float = 0.1
  key: str = "text"
  special_ids: tuple[int, ...] = DEFAULT_SPECIAL_IDS

  def random_map(self, element, rng: np.random.Generator):
    if _passthrough(element):
      return element
    element = dict(element)
    ids = element[self.key]
    element[f"{self.key}_targets"] = np.asarray(ids, np.int32)
    element[self.key], element[f"{self.key}_mask"] = bert_mask(
        ids, rng, vocab_size=self.vocab_size, mask_id=self.mask_id,
        rate=self.rate, mask_prob=self.mask_prob,
        random_prob=self.random_prob, special_ids=self.special_ids)
    return element


@dataclasses.dataclass(frozen=True)
class BlockMasking(grain.transforms.RandomMap):
  """Adds `image_mask` bool (num_patches,), row-major over the patch grid."""
  grid: tuple[int, int]
  ratio: float = 0.4
  min_block: int = 16
  max_block: int | None = None
  min_aspect: float = 0.3

  def random_map(self, element, rng: np.random.Generator):
    if _passthrough(element):
      return element
    element = dict(element)
    n = int(round(self.ratio * self.grid[0] * self.grid[1]))
    element["image_mask"] = block_mask(
        rng, self.grid, n, self.min_block, self.max_block,
        self.min_aspect).reshape(-1)
    return element
