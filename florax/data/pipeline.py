"""Grain pipeline of the embedded digits dataset (image, text, label).

source -> this process's shard -> shuffle (reshuffled every epoch) -> repeat
-> random description + tokenize + resize -> batch -> iterator. Every random
choice is a function of (seed, element index), so the iterator's state is a
position and restoring it continues the stream exactly.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from florax.data import digits
from florax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DigitsSource:
  """Random-access source over one split (picklable for Grain workers)."""
  split: str

  def __post_init__(self):
    images, targets = digits.load_split(self.split)
    object.__setattr__(self, "_images", images)
    object.__setattr__(self, "_targets", targets)

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    return {"image_u8": self._images[i], "class_id": self._targets[i]}

  def __reduce__(self):  # rebuild from the package, don't pickle the arrays
    return (DigitsSource, (self.split,))


@dataclasses.dataclass(frozen=True)
class MakeTriplet(grain.transforms.RandomMap):
  """Resized RGB image + one random description, tokenized + UniCL label."""
  tokenizer: Tokenizer
  image_size: int
  max_len: int
  random_shift: int = 0  # pixels of random translation (augmentation)

  def random_map(self, element, rng: np.random.Generator):
    cid = int(element["class_id"])
    template = digits.TEMPLATES[rng.integers(len(digits.TEMPLATES))]
    image = digits.to_rgb(element["image_u8"], self.image_size)
    if self.random_shift:
      dy, dx = rng.integers(-self.random_shift, self.random_shift + 1, 2)
      image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    return {
        "image": image,
        "text": self.tokenizer.encode(digits.describe(cid, template),
                                      self.max_len),
        "label": np.int32(digits.unicl_label(digits.CLASS_WORDS[cid])),
    }


def digits_train_dataset(tokenizer: Tokenizer, *, image_size: int,
                         max_len: int, batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1,
                         random_shift: int = 0, train_examples: int = -1
                         ) -> grain.IterDataset:
  """The per-process training stream: batches of `batch_size` triplets.

  `train_examples` >= 0 keeps only the first that many training examples
  (data-scaling experiments); -1 keeps all.
  """
  ds = grain.MapDataset.source(DigitsSource("train"))
  if train_examples >= 0:
    ds = ds[:train_examples]
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(
        f"the digits train split is empty (train_examples={train_examples}) "
        f"for process {process_index} of {process_count}")
  if len(ds) < batch_size:
    raise ValueError(
        f"per-process batch {batch_size} is larger than this process's "
        f"{len(ds)} training examples")
  ds = ds.shuffle(seed=seed).repeat()
  ds = ds.random_map(MakeTriplet(tokenizer, image_size, max_len, random_shift),
                     seed=seed + 1)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))


def holdout_arrays(image_size: int):
  """The held-out split as (images float32 (n, S, S, 3), class ids (n,))."""
  images, targets = digits.load_split("holdout")
  if len(images) == 0:
    raise ValueError("the digits holdout split is empty")
  return np.stack([digits.to_rgb(im, image_size) for im in images]), targets
