"""FLAVA's three datasets on the embedded digits, one stream per batch kind.

FLAVA (Singh et al. 2022, §3.3) trains on image-only, text-only and paired
data picked round-robin: each step is ONE kind, drawn by the trainer from
`train.mixture` as a pure function of (seed, step). Each kind is its own
Grain pipeline here (sharded per process, shuffled per epoch, every random
choice a function of (seed, element index)), so each resumes exactly from
its own checkpointed position:

  image  digit images, block-masked for MIM ({'images', 'image_mask'});
  text   the digits' descriptions, BERT-masked for MLM ({'ids', 'targets',
         'mlm_mask'});
  pair   (image, one description of its class), both masked for MMM (the
         image block-wise, mmm_text_rate of the text), with the clean text
         in 'targets' for the contrastive loss and the class in 'label'
         (class-level positives, ITM matches).

The masking recipes are florax.data.beit3_digits' (stochastic rounding of
the masked counts, BEiT's block masks, BERT's 80/10/10).
"""

from __future__ import annotations

import grain

from florax.data import beit3_digits
from florax.data import digits_images
from florax.data.tokenizer import TextTokenizer

KINDS = ("image", "text", "pair")


def kind_dataset(kind: str, *, tokenizer: TextTokenizer,
                 settings: beit3_digits.MaskSettings, image_size: int,
                 max_len: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 random_shift: int = 0, train_examples: int = -1
                 ) -> grain.IterDataset:
  """This process's batches of one kind (`batch_size` examples each)."""
  kind_seed = seed + 1000 * (1 + KINDS.index(kind))
  if kind == "text":
    ds = grain.MapDataset.source(beit3_digits._descriptions())  # pylint: disable=protected-access
    ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=kind_seed).repeat()
    ds = ds.random_map(beit3_digits.MaskText(tokenizer, max_len, settings),
                       seed=kind_seed + 1)
  elif kind in ("image", "pair"):
    ds = digits_images.train_shard(process_index, process_count,
                                   train_examples, batch_size)
    ds = ds.shuffle(seed=kind_seed).repeat()
    ds = ds.random_map(digits_images.DigitImage(image_size, random_shift),
                       seed=kind_seed + 1)
    mask = (beit3_digits.MaskImage(settings) if kind == "image" else
            beit3_digits.MaskPair(tokenizer, max_len, settings,
                                  with_label=True))
    ds = ds.random_map(mask, seed=kind_seed + 2)
  else:
    raise ValueError(f"unknown FLAVA batch kind {kind!r}; one of {KINDS}")
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))
