"""The embedded digits as an image stream (no text): masked image modeling,
tokenizer training and classification fine-tuning on the CPU demo data.

Same sharding, shuffling and determinism as `pipeline.digits_train_dataset`
(every random choice is a function of (seed, element index), so the
iterator's state is a position); per-example transforms such as
`masking.BlockMasking` are appended before batching.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from florax.data import digits
from florax.data.pipeline import DigitsSource


@dataclasses.dataclass(frozen=True)
class DigitImage(grain.transforms.RandomMap):
  """{'image': (S, S, 3) in [-1, 1], 'label': class id}, randomly shifted."""
  image_size: int
  random_shift: int = 0

  def random_map(self, element, rng: np.random.Generator):
    image = digits.to_rgb(element["image_u8"], self.image_size)
    if self.random_shift:
      dy, dx = rng.integers(-self.random_shift, self.random_shift + 1, 2)
      image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    return {"image": image, "label": np.int32(element["class_id"])}


def train_shard(process_index: int, process_count: int, train_examples: int,
                batch_size: int) -> grain.MapDataset:
  """This process's share of the train split's first `train_examples` (all
  if < 0); refuses a per-process batch larger than the share."""
  ds = grain.MapDataset.source(DigitsSource("train"))
  if train_examples >= 0:
    ds = ds[:train_examples]
  ds = ds[process_index::process_count]
  if len(ds) < max(batch_size, 1):
    raise ValueError(
        f"per-process batch {batch_size} is larger than this process's "
        f"{len(ds)} digits training examples (data.train_examples="
        f"{train_examples}, process {process_index} of {process_count})")
  return ds


def digits_image_dataset(*, image_size: int, batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1,
                         random_shift: int = 0, train_examples: int = -1,
                         transforms: Sequence[grain.transforms.RandomMap] = (),
                         keys: Sequence[str] | None = None
                         ) -> grain.IterDataset:
  """This process's stream of `batch_size`-row batches of the train split.

  Args:
    transforms: RandomMaps applied to each {'image', 'label'} example.
    keys: the batch's keys (default: all the transforms leave).
  """
  ds = train_shard(process_index, process_count, train_examples, batch_size)
  ds = ds.shuffle(seed=seed).repeat()
  for i, t in enumerate([DigitImage(image_size, random_shift), *transforms]):
    ds = ds.random_map(t, seed=seed + 1 + i)
  if keys is not None:
    keys = tuple(keys)
    ds = ds.map(lambda e: {k: e[k] for k in keys})
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))
