"""The embedded default dataset: scikit-learn's handwritten digits.

1,797 real 8x8 grey images of the digits 0-9 that ship inside scikit-learn,
so the quickstart needs no download. Each image becomes an image-label-
description triplet: the image resized to the config's resolution as RGB,
a description drawn from prompt templates over the class names ("a photo of
the digit seven", "a handwritten 7", ...), and the UniCL label = hash key of
the class text, so every description of a class is a positive of the others.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")

# "{word}" is the class name, "{digit}" the numeral; both name the same class.
TEMPLATES = (
    "a photo of the digit {word}.",
    "a handwritten {digit}.",
    "a drawing of the number {word}.",
    "the digit {digit}, written by hand.",
    "a blurry photo of a {word}.",
    "a scanned image of the digit {word}.",
    "a low resolution photo of the number {digit}.",
    "a black and white picture of a handwritten {word}.",
)

HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 1234  # fixed forever: the held-out split is never trained on


def describe(class_id: int, template: str) -> str:
  return template.format(word=CLASS_WORDS[class_id], digit=str(class_id))


def all_descriptions() -> list[str]:
  return [describe(c, t) for c in range(10) for t in TEMPLATES]


def matched_descriptions(labels) -> tuple[list[str], list[str]]:
  """(own, other) for a sequence of labels: example i described with
  template i mod T, and the same template naming digit (label + 1 + i mod
  9) mod 10 (never its own): the held-out image-text matching pairs."""
  t = TEMPLATES
  own = [describe(int(c), t[i % len(t)]) for i, c in enumerate(labels)]
  other = [describe(int(c + 1 + i % 9) % 10, t[i % len(t)])
           for i, c in enumerate(labels)]
  return own, other


def unicl_label(class_text: str) -> int:
  """Stable 31-bit hash key of a normalised class text (UniCL's y)."""
  norm = " ".join(class_text.lower().split())
  return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=4).digest(),
                        "little") & 0x7FFFFFFF


def load_split(split: str):
  """Returns (images uint8 (n, 8, 8), class ids (n,)) for 'train'/'holdout'."""
  from sklearn.datasets import load_digits
  data = load_digits()
  images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
  targets = data.target.astype(np.int32)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
  n_hold = int(round(HOLDOUT_FRACTION * len(images)))
  if split == "holdout":
    idx = np.sort(order[:n_hold])
  elif split == "train":
    idx = np.sort(order[n_hold:])
  else:
    raise ValueError(f"unknown digits split {split!r}; use 'train' or 'holdout'")
  return images[idx], targets[idx]


def to_rgb(image_u8: np.ndarray, size: int) -> np.ndarray:
  """8x8 uint8 -> (size, size, 3) float32 in [-1, 1], bilinear resize."""
  img = Image.fromarray(image_u8, mode="L").resize((size, size),
                                                    Image.BILINEAR)
  x = np.asarray(img, np.float32) / 127.5 - 1.0
  return np.repeat(x[:, :, None], 3, axis=2)
