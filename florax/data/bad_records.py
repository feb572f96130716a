"""Bad data: skip, count, report, and stop above a limit — never hang.

An undecodable image, a missing file, an empty or non-UTF-8 text turns the
example into a `BadRecord` marker inside the (possibly multi-process) map
stage. `SkipBadRecordsIterDataset` drops the markers before batching, logs
their record ids (once per id and process, not every epoch), and stamps each
surviving example with how many were dropped just before it (`_skipped`);
batching sums cannot happen across worker processes any other way.
`SkipAccountingIterator` (main process) pops those counts, keeps the run's
totals in its checkpointed state, exposes `data/skipped`, and raises
`TooManyBadRecords` naming the limit.

Both sides check the fraction, so a dataset of nothing but bad records ends
with an error inside the worker instead of an endless search for a good one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grain

SKIPPED_KEY = "_skipped"
_log = logging.getLogger("florax.data")
# Ids already warned about in this process: a bad record comes back every
# epoch, and its warning would too (it is still counted every time).
_warned_ids: set[str] = set()


class BadRecordError(Exception):
  """Raised by transforms for input that cannot be used."""

  def __init__(self, record_id: str, reason: str):
    super().__init__(f"record {record_id!r}: {reason}")
    self.record_id = record_id
    self.reason = reason


class TooManyBadRecords(RuntimeError):
  pass


def check_text(record_id: str, text: Any) -> str:
  """Returns `text` if usable; raises BadRecordError otherwise."""
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError:
      raise BadRecordError(record_id, "text is not valid UTF-8") from None
  if not isinstance(text, str):
    raise BadRecordError(record_id, f"text has type {type(text).__name__}")
  try:
    text.encode("utf-8")  # lone surrogates come from surrogateescape reads
  except UnicodeEncodeError:
    raise BadRecordError(record_id, "text is not valid UTF-8") from None
  if not text.strip():
    raise BadRecordError(record_id, "text is empty")
  return text


def bad_marker(record_id: str, reason: str) -> dict[str, Any]:
  return {"_bad_id": str(record_id), "_bad_reason": reason}


def is_bad(element: Any) -> bool:
  return isinstance(element, dict) and "_bad_id" in element


def _limit_message(skipped: int, seen: int, max_fraction: float,
                   where: str) -> str:
  return (f"data: {skipped} of {seen} records were bad ({skipped / seen:.1%}) "
          f"{where}, above data.records.max_skip_fraction={max_fraction}. Fix "
          "the dataset or raise the limit (see the logged record ids).")


def warn_once(record_id: str, reason: str) -> None:
  """Logs a skipped record the first time this process meets its id."""
  if record_id not in _warned_ids:
    _warned_ids.add(record_id)
    _log.warning("data: skipping bad record %s: %s", record_id, reason)


def _over_limit(skipped: int, seen: int, max_fraction: float,
                min_seen: int) -> bool:
  return seen >= min_seen and skipped > max_fraction * seen


class _SkipBadIterator(grain.DatasetIterator):
  """Worker side: drops markers, stamps survivors with the dropped count."""

  def __init__(self, parent, max_fraction: float, min_seen: int):
    super().__init__(parent)
    self._max_fraction = max_fraction
    self._min_seen = min_seen
    self._seen = 0
    self._skipped = 0

  def __next__(self):
    dropped = 0
    while True:
      element = next(self._parent)
      self._seen += 1
      if not is_bad(element):
        break
      dropped += 1
      self._skipped += 1
      warn_once(element["_bad_id"], element["_bad_reason"])
      if _over_limit(self._skipped, self._seen, self._max_fraction,
                     self._min_seen):
        raise TooManyBadRecords(_limit_message(
            self._skipped, self._seen, self._max_fraction,
            "in one input worker"))
    element = dict(element)
    element[SKIPPED_KEY] = dropped
    return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self._seen,
            "skipped": self._skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._seen = state["seen"]
    self._skipped = state["skipped"]


class SkipBadRecordsIterDataset(grain.IterDataset):
  """Drops `BadRecord` markers (goes before `batch`)."""

  def __init__(self, parent: grain.IterDataset, max_fraction: float,
               min_seen: int):
    super().__init__(parent)
    self._max_fraction = max_fraction
    self._min_seen = min_seen

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__(), self._max_fraction,
                            self._min_seen)


class SkipAccountingIterator(grain.DatasetIterator):
  """Main side: sums `_skipped`, enforces the limit, checkpoints the totals.

  `layout` (process index/count, workers) is stored in the state so that a
  restore into a different layout is refused with a clear message rather than
  silently replaying or skipping data.
  """

  def __init__(self, parent, max_fraction: float, min_seen: int,
               layout: dict[str, int]):
    super().__init__(parent)
    self._max_fraction = max_fraction
    self._min_seen = min_seen
    self._layout = dict(layout)
    self.skipped = 0
    self.examples = 0
    self.last_wait_s = 0.0

  def __next__(self):
    start = time.perf_counter()
    batch = next(self._parent)
    self.last_wait_s = time.perf_counter() - start
    batch = dict(batch)
    dropped = batch.pop(SKIPPED_KEY, None)
    if dropped is not None:
      self.skipped += int(dropped.sum())
      self.examples += len(dropped)
    seen = self.skipped + self.examples
    if _over_limit(self.skipped, seen, self._max_fraction, self._min_seen):
      raise TooManyBadRecords(_limit_message(
          self.skipped, seen, self._max_fraction, "in this process"))
    return batch

  def metrics(self) -> dict[str, float]:
    """Counters for the trainer's metrics (`data/skipped` is cumulative)."""
    seen = max(self.skipped + self.examples, 1)
    return {"data/skipped": self.skipped,
            "data/skipped_fraction": self.skipped / seen,
            "data/next_wait_s": self.last_wait_s}

  def get_state(self):
    return {"pipeline": self._parent.get_state(), "skipped": self.skipped,
            "examples": self.examples, "layout": self._layout}

  def set_state(self, state):
    saved = state.get("layout")
    if saved != self._layout:
      raise ValueError(
          f"data iterator state was saved with layout {saved} but this run "
          f"has {self._layout}; exact resume needs the same process count, "
          "process index, worker count and batch size. Restore with the "
          "original layout, or start the data iterator fresh (set "
          "--config.train.restore_data_state=False) to accept a different data "
          "order.")
    self._parent.set_state(state["pipeline"])
    self.skipped = state["skipped"]
    self.examples = state["examples"]

  def close(self):
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()
