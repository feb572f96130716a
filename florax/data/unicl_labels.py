"""UniCL labels: one integer per distinct normalised description, dataset-wide.

UniCL (Florence eq. 1) treats two pairs as positives when their descriptions
are the same. Comparing strings inside a batch would miss nothing, but labels
must be integers on device, and they must agree across shards, worker
processes and hosts. So the table is built once over the whole dataset, from
the *set* of normalised descriptions sorted lexicographically: the result does
not depend on the order in which shards or processes saw the texts.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Mapping

NORMALIZATION_VERSION = 1
_SPACES = re.compile(r"\s+")
_TRAILING = ".!,;:"


def normalize_description(text: str) -> str:
  """Canonical form under which two descriptions count as identical.

  Unicode NFKC, lower case, runs of whitespace collapsed, trailing sentence
  punctuation dropped: "A photo of a  Dog." and "a photo of a dog" are the same
  description; "a photo of dogs" is not.

  Args:
    text: a caption or class name.

  Returns:
    The normalised string.
  """
  if not isinstance(text, str):
    raise TypeError(f"description must be str, got {type(text).__name__}")
  text = unicodedata.normalize("NFKC", text).lower()
  text = _SPACES.sub(" ", text).strip()
  return text.rstrip(_TRAILING).rstrip()


class LabelTable:
  """Maps descriptions to UniCL labels; picklable (shipped to Grain workers)."""

  def __init__(self, table: Mapping[str, int]):
    self._table = dict(table)
    values = sorted(self._table.values())
    if values != list(range(len(values))):
      raise ValueError("a UniCL label table must map onto 0..n-1 exactly once")

  @classmethod
  def build(cls, texts: Iterable[str]) -> "LabelTable":
    """Builds the table from every description of the dataset (any order)."""
    unique = sorted({normalize_description(t) for t in texts})
    return cls({t: i for i, t in enumerate(unique)})

  @classmethod
  def merge(cls, *text_sets: Iterable[str]) -> "LabelTable":
    """Builds one table from the descriptions seen by several shards."""
    merged: set[str] = set()
    for texts in text_sets:
      merged.update(normalize_description(t) for t in texts)
    return cls.build(merged)

  def __len__(self) -> int:
    return len(self._table)

  def label(self, text: str) -> int:
    """UniCL label of `text`; KeyError names the text when it is unknown."""
    key = normalize_description(text)
    try:
      return self._table[key]
    except KeyError:
      raise KeyError(f"description {key!r} is not in the UniCL label table "
                     "(was the table built over the whole dataset?)") from None

  def to_json(self) -> dict:
    return {"normalization": NORMALIZATION_VERSION, "table": self._table}

  @classmethod
  def from_json(cls, obj: Mapping) -> "LabelTable":
    if obj.get("normalization") != NORMALIZATION_VERSION:
      raise ValueError(
          f"UniCL table uses normalisation v{obj.get('normalization')}; this "
          f"florax implements v{NORMALIZATION_VERSION}: reconvert the dataset")
    return cls(obj["table"])
