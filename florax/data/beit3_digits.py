"""BEiT-3's masked data modeling batches on the embedded digits.

One step of BEiT-3 pre-training (Wang et al. 2022, §2.2-2.3) holds images,
texts and image-text pairs in a fixed composition (2048 + 2048 + 2048 in the
paper). On the digits that is

  image  the digit images alone, 40% of their patches block-masked (MIM);
  text   the digits' descriptions as the text-only corpus, BERT-masked
         (15% of the tokens; 80% [MASK], 10% random, 10% kept: MLM);
  pair   (image, one of its descriptions), masked for MVLM: 50% of the
         text tokens (BERT's 80/10/10) and the image as in MIM. The paper's
         *separate* masking (its Table 8b) masks ONE modality per pair, text
         or image with equal odds, and leaves the other intact; *joint*
         masking masks both.

Masked counts are rounded stochastically (`stochastic_round`), so the
masked fractions are the configured ones on average even for the digits'
short descriptions and 4x4 patch grids, where rounding to the nearest
integer is biased by several points.

Each part is its own Grain pipeline (sharded per process, shuffled per
epoch, every random choice a function of (seed, element index)), and
`mixtures.FixedComposition` takes one batch of each per step, so the state
of the whole stream is three positions and a restore continues it exactly.

The trainer wants one leading batch dimension per batch kind; the three
parts may have different sizes, so each part's per-process batch of n rows
is laid out as (rows, n // rows, ...) with rows = gcd of the three sizes
(divided by the process count): the leading dimension is what the mesh
shards, and the task folds it back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import grain
import numpy as np

from florax.data import digits
from florax.data import digits_images
from florax.data import masking
from florax.data import mixtures
from florax.data.tokenizer import TextTokenizer

PARTS = ("image", "text", "pair")
MVLM_MODES = ("separate", "joint")


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """The three masking recipes (BEiT-3 §2.2 defaults)."""
  grid: int                   # patches per image side
  vocab_size: int             # random replacements: [0, vocab_size) but
  mask_id: int                # the [MASK] id and
  special_ids: tuple[int, ...] = masking.DEFAULT_SPECIAL_IDS  # (never chosen)
  mlm_rate: float = 0.15
  mask_prob: float = 0.8
  random_prob: float = 0.1
  mim_ratio: float = 0.4
  min_block: int = 16
  mvlm_text_rate: float = 0.5
  mvlm_mode: str = "separate"
  # separate masking: probability that a pair's text (else its image) is
  # the masked modality.
  mvlm_text_prob: float = 0.5

  def block_mask(self, rng: np.random.Generator) -> np.ndarray:
    """BEiT's block-wise mask of ratio * patches (stochastically rounded)."""
    n = stochastic_round(self.mim_ratio * self.grid * self.grid, rng)
    return masking.block_mask(rng, (self.grid, self.grid), n,
                              self.min_block).reshape(-1)

  def bert_mask(self, ids, rng, rate):
    """BERT's masking of rate * maskable tokens (stochastically rounded)."""
    ids = np.asarray(ids)
    maskable = int(masking.maskable(ids, (*self.special_ids,
                                          self.mask_id)).sum())
    n = stochastic_round(rate * maskable, rng)
    if n == 0:  # bert_mask would still pick one
      return ids.astype(np.int32), np.zeros(ids.shape, bool)
    # rate n / maskable makes bert_mask pick exactly n tokens.
    return masking.bert_mask(ids, rng, vocab_size=self.vocab_size,
                             mask_id=self.mask_id, rate=n / maskable,
                             mask_prob=self.mask_prob,
                             random_prob=self.random_prob,
                             special_ids=self.special_ids)


def stochastic_round(x: float, rng: np.random.Generator) -> int:
  """floor(x) or ceil(x) with E = x. A masked count rounded to the nearest
  integer is biased for short sequences (15% of a 9-token description is
  1.35 tokens: always 1, i.e. 11%; 40% of a 4x4 grid: always 6 = 37.5%);
  rounded this way the masked fraction is the configured one on average
  and every example is within one token (patch) of it."""
  low = int(np.floor(x))
  return low + int(rng.random() < x - low)


def text_fields(ids, rng, settings: MaskSettings, rate: float | None):
  """{'ids' (corrupted), 'targets' (original), 'mlm_mask'}; rate None: no
  token is masked."""
  ids = np.asarray(ids, np.int32)
  if rate is None:
    return {"ids": ids, "targets": ids, "mlm_mask": np.zeros(ids.shape, bool)}
  out, chosen = settings.bert_mask(ids, rng, rate)
  return {"ids": out, "targets": ids, "mlm_mask": chosen}


@dataclasses.dataclass(frozen=True)
class MaskImage(grain.transforms.RandomMap):
  """{'image', 'label'} -> {'images', 'image_mask'}: MIM."""
  settings: MaskSettings

  def random_map(self, element, rng: np.random.Generator):
    return {"images": element["image"],
            "image_mask": self.settings.block_mask(rng)}


@dataclasses.dataclass(frozen=True)
class MaskText(grain.transforms.RandomMap):
  """A description -> its tokens, BERT-masked at mlm_rate: MLM."""
  tokenizer: TextTokenizer
  max_len: int
  settings: MaskSettings

  def random_map(self, element, rng: np.random.Generator):
    ids = self.tokenizer.encode(str(element), self.max_len)
    return text_fields(ids, rng, self.settings, self.settings.mlm_rate)


@dataclasses.dataclass(frozen=True)
class MaskPair(grain.transforms.RandomMap):
  """{'image', 'label'} + one random description of its class, masked for
  MVLM (separate: text or image; joint: both); with_label keeps the class
  (FLAVA's class-level contrastive positives and ITM matches)."""
  tokenizer: TextTokenizer
  max_len: int
  settings: MaskSettings
  with_label: bool = False

  def random_map(self, element, rng: np.random.Generator):
    s = self.settings
    template = digits.TEMPLATES[rng.integers(len(digits.TEMPLATES))]
    ids = self.tokenizer.encode(
        digits.describe(int(element["label"]), template), self.max_len)
    out = mask_pair(ids, element["image"], rng, s)
    if self.with_label:
      out["label"] = np.int32(element["label"])
    return out


def mask_pair(ids, image, rng: np.random.Generator, s: MaskSettings) -> dict:
  """An (image, token ids) pair masked for MVLM: separate masking picks the
  text (probability mvlm_text_prob) or the image, joint masks both."""
  if s.mvlm_mode == "joint":
    mask_text = mask_image = True
  else:
    mask_text = bool(rng.random() < s.mvlm_text_prob)
    mask_image = not mask_text
  out = text_fields(ids, rng, s, s.mvlm_text_rate if mask_text else None)
  out["images"] = image
  out["image_mask"] = (s.block_mask(rng) if mask_image else
                       np.zeros(s.grid * s.grid, bool))
  return out


def group_rows(batch: dict, rows: int) -> dict:
  """(n, ...) leaves -> (rows, n // rows, ...): the trainer's one leading
  dimension per batch kind (see the module docstring)."""
  return {k: v.reshape((rows, v.shape[0] // rows) + v.shape[1:])
          for k, v in batch.items()}


def ungroup_rows(part: dict) -> dict:
  """The inverse of `group_rows` (also on jax arrays)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in part.items()}


def rows_per_step(composition: dict) -> int:
  """The leading dimension of a global batch: gcd of the three sizes."""
  return math.gcd(*(int(composition[p]) for p in PARTS))


def _descriptions() -> list[str]:
  return digits.all_descriptions()


def _finish(ds, batch: int, rows: int) -> grain.IterDataset:
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.map(lambda b: group_rows(b, rows))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))


def part_dataset(part: str, *, tokenizer: TextTokenizer, settings: MaskSettings,
                 image_size: int, max_len: int, batch_size: int, rows: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 random_shift: int = 0, train_examples: int = -1
                 ) -> grain.IterDataset:
  """This process's stream of one part: `batch_size` examples a step, laid
  out as (rows, batch_size // rows, ...). Each part shuffles with its own
  seed, so the image and pair streams visit the digits in different orders.
  """
  part_seed = seed + 1000 * (1 + PARTS.index(part))
  if part == "image":
    ds = digits_images.train_shard(process_index, process_count,
                                   train_examples, batch_size)
    ds = ds.shuffle(seed=part_seed).repeat()
    ds = ds.random_map(digits_images.DigitImage(image_size, random_shift),
                       seed=part_seed + 1)
    ds = ds.random_map(MaskImage(settings), seed=part_seed + 2)
    return _finish(ds, batch_size, rows)
  if part == "text":
    ds = grain.MapDataset.source(_descriptions())
    ds = ds[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"process {process_index} of {process_count} gets no "
                       "description of the text-only corpus")
    ds = ds.shuffle(seed=part_seed).repeat()
    ds = ds.random_map(MaskText(tokenizer, max_len, settings),
                       seed=part_seed + 1)
    return _finish(ds, batch_size, rows)
  if part == "pair":
    ds = digits_images.train_shard(process_index, process_count,
                                   train_examples, batch_size)
    ds = ds.shuffle(seed=part_seed).repeat()
    ds = ds.random_map(digits_images.DigitImage(image_size, random_shift),
                       seed=part_seed + 1)
    ds = ds.random_map(MaskPair(tokenizer, max_len, settings),
                       seed=part_seed + 2)
    return _finish(ds, batch_size, rows)
  raise ValueError(f"unknown BEiT-3 batch part {part!r}; one of {PARTS}")


def mdm_iterator(*, tokenizer: TextTokenizer, settings: MaskSettings,
                 composition: dict, image_size: int, max_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 random_shift: int = 0, train_examples: int = -1,
                 parts: Sequence[str] = PARTS
                 ) -> mixtures.FixedComposition:
  """This process's BEiT-3 stream: {'image': {...}, 'text': {...}, 'pair':
  {...}} with composition[part] // process_count examples of each part.

  Args:
    composition: global examples per step of each part.
  """
  rows = rows_per_step(composition)
  if rows % process_count:
    raise ValueError(
        f"data.composition {dict(composition)}: the common divisor {rows} of "
        f"its sizes is not divisible by the {process_count} processes")
  local_rows = rows // process_count
  return mixtures.FixedComposition({
      p: iter(part_dataset(
          p, tokenizer=tokenizer, settings=settings, image_size=image_size,
          max_len=max_len, batch_size=int(composition[p]) // process_count,
          rows=local_rows, seed=seed, process_index=process_index,
          process_count=process_count, random_shift=random_shift,
          train_examples=train_examples))
      for p in parts})
