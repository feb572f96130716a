"""florax record format: ArrayRecord shards of msgpack records + metadata.json.

A dataset directory holds

  train-00000-of-00004.array_record ...     one msgpack map per record
  validation-00001-of-00004.array_record    (held-out split, if any)
  metadata.json                             per-split counts and shards,
                                            schema version, UniCL table
                                            (over all splits), class names,
                                            skipped ids

metadata.json lists `splits: {name: {num_records, shards}}`; metadata written
before splits existed (top-level `shards`, `records-*` files) reads as one
`train` split.

Record schema v1 (a msgpack map):
  v            int        schema version (1)
  id           str        stable record id (relative path, tar/key, ...)
  image        bytes      the original encoded image (never re-encoded), or
                          b"" for text-only records
  texts        list[str]  captions, or class names when `prompt` is set
  text_labels  list[int]  UniCL label of each text (dataset-wide table)
  label        int        class label, -1 if none
  prompt       bool       texts are short class names: templates apply

Optional fields (written only when non-empty, so image/text records are
unchanged and older files read the same):
  frames       list[bytes] a video clip: its frames, each an encoded image,
                          in time order (`image` is then b"")
  boxes        list[list[float]]  detection boxes, (x1, y1, x2, y2) in pixels
                          of the encoded image
  box_labels   list[int]  the class index of each box
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import msgpack

from florax.data import corpus

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
FORMAT_NAME = "florax-records"
# group_size:1 keeps random access cheap (one record per chunk); Grain reads
# records by index after a global shuffle.
_WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass
class Record:
  """One example: encoded image bytes, its texts and labels."""
  id: str
  image: bytes = b""
  texts: list[str] = dataclasses.field(default_factory=list)
  text_labels: list[int] = dataclasses.field(default_factory=list)
  label: int = -1
  prompt: bool = False
  frames: list[bytes] = dataclasses.field(default_factory=list)
  boxes: list[list[float]] = dataclasses.field(default_factory=list)
  box_labels: list[int] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def serialize(record: Record) -> bytes:
  """Packs a record; validates the fields a reader relies on."""
  if not isinstance(record.image, (bytes, bytearray)):
    raise TypeError(f"record {record.id}: image must be encoded bytes, got "
                    f"{type(record.image).__name__}")
  if record.text_labels and len(record.text_labels) != len(record.texts):
    raise ValueError(f"record {record.id}: {len(record.texts)} texts but "
                     f"{len(record.text_labels)} text labels")
  if len(record.boxes) != len(record.box_labels):
    raise ValueError(f"record {record.id}: {len(record.boxes)} boxes but "
                     f"{len(record.box_labels)} box labels")
  if any(len(b) != 4 for b in record.boxes):
    raise ValueError(f"record {record.id}: boxes must be (x1, y1, x2, y2)")
  obj = {"v": SCHEMA_VERSION, "id": record.id, "image": bytes(record.image),
         "texts": list(record.texts), "text_labels": list(record.text_labels),
         "label": int(record.label), "prompt": bool(record.prompt)}
  if record.frames:
    if not all(isinstance(f, (bytes, bytearray)) for f in record.frames):
      raise TypeError(f"record {record.id}: frames must be encoded bytes")
    obj["frames"] = [bytes(f) for f in record.frames]
  if record.boxes:
    obj["boxes"] = [[float(v) for v in b] for b in record.boxes]
    obj["box_labels"] = [int(c) for c in record.box_labels]
  return msgpack.packb(obj, use_bin_type=True)


_OPTIONAL_FIELDS = ("frames", "boxes", "box_labels")


def deserialize(data: bytes) -> dict[str, Any]:
  """Unpacks a record into a plain dict (cheap to pickle between processes)."""
  obj = msgpack.unpackb(data, raw=False)
  version = obj.get("v")
  if version != SCHEMA_VERSION:
    raise ValueError(f"record {obj.get('id')!r} has schema version {version}; "
                     f"this florax reads version {SCHEMA_VERSION}")
  obj.pop("v")
  for field in _OPTIONAL_FIELDS:
    obj.setdefault(field, [])
  return obj


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


class ShardWriter:
  """Writes records into one ArrayRecord file; use as a context manager."""

  def __init__(self, path: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path = path
    self.count = 0
    self._writer = array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS)

  def write(self, record: Record) -> None:
    self._writer.write(serialize(record))
    self.count += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_metadata(dataset_dir: str, metadata: Mapping[str, Any]) -> None:
  """Writes metadata.json atomically."""
  meta = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
          **metadata}
  path = os.path.join(dataset_dir, METADATA_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
  os.replace(path + ".tmp", path)


def read_metadata(dataset_dir: str) -> dict[str, Any]:
  path = os.path.join(dataset_dir, METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{dataset_dir} has no {METADATA_FILE}: not a florax dataset directory "
        "(convert it with `python -m launch.make_dataset`)")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_NAME:
    raise ValueError(f"{path}: format is {meta.get('format')!r}, expected "
                     f"{FORMAT_NAME!r}")
  if meta.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path}: schema version {meta.get('schema_version')}, "
                     f"this florax reads {SCHEMA_VERSION}")
  return meta


def splits(metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{split: {"num_records", "shards"}}; pre-split metadata is all train."""
  if "splits" in metadata:
    return dict(metadata["splits"])
  return {"train": {"num_records": metadata["num_records"],
                    "shards": metadata["shards"]}}


def split_names(dataset_dir: str) -> list[str]:
  """The splits of a dataset directory, e.g. ["train", "validation"]."""
  return list(splits(read_metadata(dataset_dir)))


def require_splits(dataset_dir: str, wanted, how: str) -> None:
  """ValueError naming the first of `wanted` the directory lacks; `how`
  says how to make it."""
  names = split_names(dataset_dir)
  for split in wanted:
    if split not in names:
      raise ValueError(f"data.records.path={dataset_dir} has no split "
                       f"{split!r} (it has {names}): {how}")


def shard_paths(dataset_dir: str, split: str = "train") -> list[str]:
  """The shard files of `split` listed in metadata.json, checked to exist."""
  all_splits = splits(read_metadata(dataset_dir))
  if split not in all_splits:
    raise ValueError(f"{dataset_dir} has no split {split!r}; it has "
                     f"{sorted(all_splits)}")
  paths = [os.path.join(dataset_dir, s["file"])
           for s in all_splits[split]["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"shards listed in metadata are missing: {missing}")
  return paths


class RecordSource:
  """Random-access source over a dataset directory (Grain `RandomAccessDataSource`).

  Returns record dicts (see module docstring) of one split. Picklable: Grain
  workers reopen the ArrayRecord files lazily.
  """

  def __init__(self, dataset_dir: str, split: str = "train"):
    self.dataset_dir = dataset_dir
    self.split = split
    self.metadata = read_metadata(dataset_dir)
    self._paths = shard_paths(dataset_dir, split)
    self._source = None
    info = splits(self.metadata)[split]
    expected = sum(s["count"] for s in info["shards"])
    if expected != info["num_records"]:
      raise ValueError(f"{dataset_dir}: split {split!r} shard counts sum to "
                       f"{expected} but num_records is {info['num_records']}")
    self._len = expected

  def _open(self):
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top
      self._source = grain.sources.ArrayRecordDataSource(self._paths)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    return deserialize(self._open()[index])

  def __repr__(self) -> str:
    return (f"RecordSource({self.dataset_dir!r}, split={self.split!r}, "
            f"n={self._len})")


def _sources(dataset_dir: str, split: str | None) -> list[RecordSource]:
  names = split_names(dataset_dir) if split is None else [split]
  return [RecordSource(dataset_dir, name) for name in names]


def read_all(dataset_dir: str, split: str | None = None
             ) -> list[dict[str, Any]]:
  """Records of one split (None: all), in shard order (tests, small tools)."""
  return [src[i] for src in _sources(dataset_dir, split)
          for i in range(len(src))]


def iter_texts(dataset_dir: str, split: str | None = None) -> Iterator[str]:
  """The texts training uses, streamed (for tokenizer training).

  Class-name texts come template-expanded, as TextTransform feeds them to the
  model (see `corpus.tokenizer_texts`). `split`: one split, None for all.
  """
  def examples():
    for src in _sources(dataset_dir, split):
      for i in range(len(src)):
        r = src[i]
        yield r["id"], r["texts"], r.get("prompt", False)
  return corpus.tokenizer_texts(examples())
