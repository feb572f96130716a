"""Reads an image folder + captions file directly, without conversion.

Handy for small datasets and for checking a folder before converting it.
Images are read lazily, so a missing or unreadable file, like an empty or
non-UTF-8 caption, turns into a record with an `error` field that the
pipeline skips and counts, like any bad record.
"""

from __future__ import annotations

from typing import Any

from florax.data import bad_records
from florax.data import converters


class CaptionFolderSource:
  """Grain random-access source of record dicts (see florax.data.records).

  Args:
    captions_file: CSV/JSONL with path, caption[, label] (see converters).
    image_root: folder the paths are relative to (default: the file's folder).
  """

  def __init__(self, captions_file: str, image_root: str | None = None):
    self._items, self.class_names = converters.caption_items(
        captions_file, image_root)
    self.label_table = converters.label_table(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = self._items[index]
    record = {"id": item.id, "image": None, "texts": list(item.texts),
              "label": item.label, "prompt": item.prompt, "text_labels": []}
    try:
      # one bad text skips the record, as conversion does: else the good
      # texts would be trained on without UniCL labels
      record["texts"] = [bad_records.check_text(item.id, t)
                         for t in item.texts]
      record["text_labels"] = [self.label_table.label(t)
                               for t in record["texts"]]
    except bad_records.BadRecordError as e:
      record["error"] = e.reason
      return record
    try:
      with open(item.path, "rb") as f:
        record["image"] = f.read()
    except OSError as e:
      record["error"] = f"cannot read image file {item.path} ({e.strerror})"
    return record
