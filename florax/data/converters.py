"""Converters to florax records: captions file, webdataset tars, class folders.

Video clips convert through the same two converters that read files: a
captions row whose `path` is a folder of frames, or a class folder holding
one subfolder of frames per clip (`root/<class>/<clip>/<frame images>`),
becomes one record whose `frames` are the clip's encoded frames in file-name
order (`video_folder_items`). Sampling frames out of a clip happens at
training time (florax/data/video_records.py), so one conversion serves any
frame count and stride.

Two passes. The first collects every text (cheap: captions files and class
folders hold them already; tars are scanned for their .txt/.json members only)
and builds the dataset-wide UniCL table, so that every shard written in the
second pass labels identical descriptions identically. The second pass copies
the encoded image bytes unchanged into ArrayRecord shards, one task per
output shard, over a pool of processes, with a tqdm progress bar.

Bad inputs (missing file, empty or non-UTF-8 caption, a key without image or
text) are skipped and listed in metadata.json. With `verify_images` (the
default) every image is decoded once, so truncated or corrupt files are
skipped here rather than at every epoch of training.

`holdout_fraction` sends a fixed fraction of records, chosen by a hash of the
record id, to a `validation` split of the same directory (see `split_of`).
The dataset is written into a `<out>.partial-<pid>` directory beside `out`
and renamed into place only when complete: a failed or empty conversion
leaves any previous dataset untouched. A conversion that writes no record at
all raises `ConversionError` with the first skip reasons.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tarfile
import time
from typing import Any, Callable, Iterable, Sequence

from florax.data import bad_records
from florax.data import records
from florax.data.unicl_labels import LabelTable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_MAX_LISTED_SKIPS = 1000
_REASONS_IN_ERROR = 5
HOLDOUT_SPLIT = "validation"


class ConversionError(ValueError):
  """A conversion that cannot produce a usable dataset."""


@dataclasses.dataclass
class Item:
  """One input example before its image is read."""
  id: str
  path: str | None  # image file; None for tar members
  texts: list[str]
  label: int = -1
  prompt: bool = False
  # a video clip: its frame files in time order (`path` is then the folder)
  frame_paths: list[str] | None = None


@dataclasses.dataclass
class _Task:
  kind: str  # "files" or "tar"
  out_dir: str
  index: int  # shard index; shards are named <split>-<index>-of-<count>
  count: int
  items: list[Item] | None = None
  tar_path: str | None = None
  table: dict | None = None
  verify_images: bool = True
  holdout_fraction: float = 0.0


def split_of(record_id: str, holdout_fraction: float) -> str:
  """"validation" for a fixed pseudo-random fraction of ids, else "train".

  A hash of the id decides, not the position: the split does not depend on
  worker count, shard layout or input order, and a record keeps its split
  when a grown input is converted again.
  """
  if holdout_fraction <= 0:
    return "train"
  digest = hashlib.sha256(record_id.encode("utf-8", "surrogateescape"))
  u = int.from_bytes(digest.digest()[:8], "big") / 2.0**64
  return HOLDOUT_SPLIT if u < holdout_fraction else "train"


def _verify_image(data: bytes) -> None:
  """Decodes the image fully: `verify()` only parses headers and passes a
  truncated JPEG, `load()` reads every byte. JPEG draft mode decodes at 1/8
  scale, which still reads the whole entropy-coded stream (truncation and
  corruption surface) for a fraction of the IDCT cost."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    if img.format == "JPEG":
      img.draft("RGB", (1, 1))
    img.load()


def _check_image(item_id: str, image: bytes, verify: bool,
                 what: str = "image") -> None:
  if not image:
    raise bad_records.BadRecordError(item_id, f"{what} file is empty")
  if verify:
    try:
      _verify_image(image)
    except Exception as e:  # PIL raises many types for corrupt data
      raise bad_records.BadRecordError(item_id, f"undecodable {what} ({e})")


def _make_record(item_id: str, image: bytes, texts: Sequence[Any], label: int,
                 prompt: bool, table: LabelTable, verify: bool,
                 frames: Sequence[bytes] = ()) -> records.Record:
  """A record of one image, or of a clip's `frames` (image then b"")."""
  if frames:
    for i, frame in enumerate(frames):
      _check_image(item_id, frame, verify, f"frame {i}")
  else:
    _check_image(item_id, image, verify)
  clean = [bad_records.check_text(item_id, t) for t in texts]
  if not clean:
    raise bad_records.BadRecordError(item_id, "no text")
  return records.Record(id=item_id, image=image, texts=clean,
                        text_labels=[table.label(t) for t in clean],
                        label=label, prompt=prompt, frames=list(frames))


def _read_file(item_id: str, path: str, what: str = "image") -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise bad_records.BadRecordError(
        item_id, f"cannot read {what} file ({e.strerror})") from None


def _frame_files(folder: str) -> list[str]:
  """A clip folder's frame images in file-name order (zero-pad the names:
  frame_10 sorts before frame_2)."""
  return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.lower().endswith(IMAGE_EXTENSIONS)]


def _tar_groups(tar_path: str, texts_only: bool):
  """Yields (key, {ext: bytes}) per webdataset key, in archive order."""
  name = os.path.basename(tar_path)
  current, members = None, {}
  with tarfile.open(tar_path, "r:*") as tar:
    for info in tar:
      if not info.isfile():
        continue
      base = os.path.basename(info.name)
      if "." not in base:
        continue
      # webdataset: the key is the path up to the first dot of the basename.
      dot = base.index(".")
      key = os.path.join(os.path.dirname(info.name), base[:dot])
      ext = base[dot:].lower()
      if key != current:
        if current is not None:
          yield f"{name}/{current}", members
        current, members = key, {}
      wanted = ext in (".txt", ".json") or (not texts_only and
                                            ext in IMAGE_EXTENSIONS)
      if wanted:
        members[ext] = tar.extractfile(info).read()
  if current is not None:
    yield f"{name}/{current}", members


def _tar_texts(item_id: str, members: dict[str, bytes]) -> list[Any]:
  if ".txt" in members:
    return [members[".txt"]]
  if ".json" in members:
    try:
      obj = json.loads(members[".json"])
    except (ValueError, UnicodeDecodeError):
      raise bad_records.BadRecordError(item_id, "json member is unreadable")
    caption = obj.get("caption", obj.get("text"))
    if caption is None:
      raise bad_records.BadRecordError(item_id, "json member has no caption")
    return caption if isinstance(caption, list) else [caption]
  raise bad_records.BadRecordError(item_id, "no .txt or .json member")


def _scan_tar_texts(tar_path: str) -> list[str]:
  texts = []
  for item_id, members in _tar_groups(tar_path, texts_only=True):
    try:
      texts.extend(bad_records.check_text(item_id, t)
                   for t in _tar_texts(item_id, members))
    except bad_records.BadRecordError:
      pass  # reported in the writing pass
  return texts


def _run_task(task: _Task
              ) -> tuple[dict[str, tuple[str, int]], list[tuple[str, str]]]:
  """Writes one shard per split; returns ({split: (file, count)}, skipped).

  A split's shard file is opened at its first record, so no empty files.
  """
  table = LabelTable.from_json(task.table)
  skipped = []
  writers: dict[str, records.ShardWriter] = {}

  def write(record: records.Record) -> None:
    split = split_of(record.id, task.holdout_fraction)
    if split not in writers:
      writers[split] = records.ShardWriter(os.path.join(
          task.out_dir, records.shard_name(split, task.index, task.count)))
    writers[split].write(record)

  try:
    if task.kind == "files":
      for item in task.items:
        try:
          if item.frame_paths is not None:
            if not item.frame_paths:
              raise bad_records.BadRecordError(item.id,
                                               "clip folder has no frames")
            image, frames = b"", [_read_file(item.id, p, "frame")
                                  for p in item.frame_paths]
          else:
            image, frames = _read_file(item.id, item.path), ()
          write(_make_record(item.id, image, item.texts, item.label,
                             item.prompt, table, task.verify_images, frames))
        except bad_records.BadRecordError as e:
          skipped.append((e.record_id, e.reason))
    else:
      for item_id, members in _tar_groups(task.tar_path, texts_only=False):
        try:
          images = [e for e in IMAGE_EXTENSIONS if e in members]
          if not images:
            raise bad_records.BadRecordError(item_id, "no image member")
          write(_make_record(
              item_id, members[images[0]], _tar_texts(item_id, members), -1,
              False, table, task.verify_images))
        except bad_records.BadRecordError as e:
          skipped.append((e.record_id, e.reason))
  finally:
    for writer in writers.values():
      writer.close()
  return ({split: (os.path.basename(w.path), w.count)
           for split, w in writers.items()}, skipped)


def _executor(num_workers: int):
  """A spawn process pool, or None to run inline (1 worker)."""
  if num_workers <= 1:
    return None
  return concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn"))


def _pool_map(fn: Callable, tasks: Sequence, pool, desc: str,
              weights: Sequence[int] | None = None, progress: bool = True):
  """Maps `fn` over tasks in `pool` (None: inline), with a progress bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  weights = list(weights) if weights is not None else [1] * len(tasks)
  results = [None] * len(tasks)
  with tqdm(total=sum(weights), desc=desc, unit="rec",
            disable=not progress) as bar:
    if pool is None or len(tasks) <= 1:
      for i, t in enumerate(tasks):
        results[i] = fn(t)
        bar.update(weights[i])
    else:
      futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
      for fut in concurrent.futures.as_completed(futures):
        i = futures[fut]
        results[i] = fut.result()
        bar.update(weights[i])
  return results


def _finish(out_dir: str, results, class_names, table: LabelTable,
            source: str, holdout_fraction: float) -> dict:
  """Writes metadata.json; raises ConversionError when nothing was written."""
  skipped = []
  splits = {"train": {"num_records": 0, "shards": []}}
  if holdout_fraction > 0:
    splits[HOLDOUT_SPLIT] = {"num_records": 0, "shards": []}
  for written, skips in results:
    skipped.extend(skips)
    for split, (file, count) in written.items():
      splits[split]["shards"].append({"file": file, "count": count})
      splits[split]["num_records"] += count
  total = sum(s["num_records"] for s in splits.values())
  if total == 0:
    if skipped:
      raise ConversionError(
          f"{source}: wrote 0 records; all {len(skipped)} inputs were "
          "skipped. First reasons:" + "".join(
              f"\n  {i}: {r}" for i, r in skipped[:_REASONS_IN_ERROR]))
    raise ConversionError(f"{source}: wrote 0 records; the input holds no "
                          "examples (empty or header-only file?)")
  meta = {
      "num_records": total,
      "splits": splits,
      "holdout": {"fraction": holdout_fraction, "split": HOLDOUT_SPLIT,
                  "rule": "sha256(utf-8 id)[:8] / 2**64 < fraction"},
      "class_names": class_names,
      "unicl": table.to_json(),
      "skipped": {"count": len(skipped),
                  "records": [{"id": i, "reason": r}
                              for i, r in skipped[:_MAX_LISTED_SKIPS]]},
      "source": source,
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  records.write_metadata(out_dir, meta)
  return meta


def _check_holdout(holdout_fraction: float) -> None:
  if not 0 <= holdout_fraction < 1:
    raise ConversionError(f"holdout_fraction must be in [0, 1), got "
                          f"{holdout_fraction}")


@contextlib.contextmanager
def _staged_output(out_dir: str, overwrite: bool):
  """Yields a fresh directory beside `out_dir`; on success swaps it in.

  Refuses a non-empty `out_dir` unless `overwrite`, and even then replaces
  only a florax dataset (a directory with metadata.json), never an arbitrary
  folder. On any error the staging directory is removed and `out_dir` is left
  as it was.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} is a file, not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty; choose "
                            "another output directory or pass --overwrite "
                            "to replace the dataset in it")
    if not os.path.exists(os.path.join(out_dir, records.METADATA_FILE)):
      raise FileExistsError(f"--overwrite replaces only a florax dataset "
                            f"directory; {out_dir} has no "
                            f"{records.METADATA_FILE}: remove it yourself")
  staging = f"{out_dir}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
  os.makedirs(staging)
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  # Move the old dataset aside, the new one in, then delete the old one: a
  # crash between the renames leaves both, as <out>.old-<pid> and
  # <out>.partial-<pid>, never half a dataset at <out>.
  old = f"{out_dir}.old-{os.getpid()}"
  if os.path.exists(out_dir):
    os.rename(out_dir, old)
  try:
    os.rename(staging, out_dir)
  except BaseException:
    if os.path.exists(old):
      os.rename(old, out_dir)
    raise
  shutil.rmtree(old, ignore_errors=True)


def label_table(items: Iterable[Item]) -> LabelTable:
  """The UniCL table of the items' usable texts (bad ones are skipped)."""
  texts = []
  for item in items:
    for t in item.texts:
      try:
        texts.append(bad_records.check_text(item.id, t))
      except bad_records.BadRecordError:
        pass  # its record is skipped and reported
  return LabelTable.build(texts)


def _convert_items(items: list[Item], out_dir: str, class_names, source: str,
                   num_workers: int, records_per_shard: int,
                   verify_images: bool, holdout_fraction: float,
                   overwrite: bool, progress: bool) -> dict:
  _check_holdout(holdout_fraction)
  table = label_table(items)  # over every split: labels agree across them
  n_shards = max(1, math.ceil(len(items) / records_per_shard))
  if num_workers > 1 and len(items) >= 2 * num_workers:
    n_shards = max(n_shards, num_workers)
  with _staged_output(out_dir, overwrite) as staging:
    tasks = []
    for s in range(n_shards):
      # contiguous chunks keep the shard order equal to the input order
      chunk = items[s * len(items) // n_shards:
                    (s + 1) * len(items) // n_shards]
      tasks.append(_Task("files", staging, s, n_shards, items=chunk,
                         table=table.to_json(), verify_images=verify_images,
                         holdout_fraction=holdout_fraction))
    pool = _executor(min(num_workers, n_shards))
    try:
      results = _pool_map(_run_task, tasks, pool, "converting",
                          [len(t.items) for t in tasks], progress)
    finally:
      if pool is not None:
        pool.shutdown()
    return _finish(staging, results, class_names, table, source,
                   holdout_fraction)


def _class_index(labels: Iterable[Any]) -> tuple[dict, list[str] | None]:
  """String labels become indices into sorted class names; ints stay."""
  labels = [l for l in labels if l not in (None, "")]
  if not labels:
    return {}, None
  if all(isinstance(l, int) or (isinstance(l, str) and l.lstrip("-").isdigit())
         for l in labels):
    return {l: int(l) for l in labels}, None
  names = sorted({str(l) for l in labels})
  index = {n: i for i, n in enumerate(names)}
  return {l: index[str(l)] for l in labels}, names


def _read_caption_rows(captions_file: str) -> list[dict[str, Any]]:
  """Rows of a CSV (header: path, caption[, label]) or JSONL file.

  Read with surrogateescape so one non-UTF-8 caption becomes one skipped
  record instead of a failed conversion.
  """
  with open(captions_file, encoding="utf-8", errors="surrogateescape",
            newline="") as f:
    if captions_file.endswith((".jsonl", ".json")):
      rows = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except ValueError as e:
            raise ValueError(f"{captions_file}:{n}: not JSON ({e})") from None
      return rows
    return list(csv.DictReader(f))


def _field(row: dict, names: Sequence[str], captions_file: str, n: int):
  for name in names:
    if name in row:
      return row[name]
  raise ValueError(f"{captions_file}: row {n} has none of the columns "
                   f"{list(names)} (found {sorted(row)})")


def caption_items(captions_file: str, image_root: str | None = None
                  ) -> tuple[list[Item], list[str] | None]:
  """Items of an image folder described by a captions CSV/JSONL file.

  Args:
    captions_file: CSV with a header (`path`, `caption`, optional `label`) or
      JSONL objects with the same keys (`caption` may be a list).
    image_root: folder the paths are relative to (default: the file's folder).

  Returns:
    (items, class_names or None).
  """
  root = image_root or os.path.dirname(os.path.abspath(captions_file))
  rows = _read_caption_rows(captions_file)
  labels, class_names = _class_index(r.get("label") for r in rows)
  items = []
  for n, row in enumerate(rows, 1):
    rel = _field(row, ("path", "image", "file"), captions_file, n)
    caption = _field(row, ("caption", "text", "captions"), captions_file, n)
    texts = caption if isinstance(caption, list) else [caption]
    label = row.get("label")
    path = os.path.join(root, str(rel))
    items.append(Item(id=str(rel), path=path, texts=texts,
                      label=labels[label] if label not in (None, "") else -1,
                      frame_paths=(_frame_files(path) if os.path.isdir(path)
                                   else None)))
  return items, class_names


def class_folder_items(root: str) -> tuple[list[Item], list[str]]:
  """Items of `root/<class name>/<image>`, or of `root/<class name>/<clip
  folder>/<frames>` (a video record per clip folder); the text is the class
  name."""
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f"{root} has no class subfolders")
  items = []
  for label, name in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, name))):
      path = os.path.join(root, name, f)
      clip = os.path.isdir(path)
      if clip or f.lower().endswith(IMAGE_EXTENSIONS):
        items.append(Item(id=f"{name}/{f}", path=path,
                          texts=[name.replace("_", " ")], label=label,
                          prompt=True,
                          frame_paths=_frame_files(path) if clip else None))
  return items, [c.replace("_", " ") for c in classes]


def convert_captions(captions_file: str, out_dir: str, *,
                     image_root: str | None = None, num_workers: int = 1,
                     records_per_shard: int = 10_000,
                     verify_images: bool = True,
                     holdout_fraction: float = 0.0, overwrite: bool = False,
                     progress: bool = True) -> dict:
  """(a) image folder + captions file -> dataset dir; returns the metadata.

  The keyword arguments of the three converters: num_workers (processes),
  records_per_shard, verify_images (decode every image once, skip bad ones),
  holdout_fraction (see `split_of`), overwrite (replace the dataset at
  out_dir), progress (tqdm bar).
  """
  items, class_names = caption_items(captions_file, image_root)
  return _convert_items(items, out_dir, class_names, f"captions:{captions_file}",
                        num_workers, records_per_shard, verify_images,
                        holdout_fraction, overwrite, progress)


def convert_class_folders(root: str, out_dir: str, *, num_workers: int = 1,
                          records_per_shard: int = 10_000,
                          verify_images: bool = True,
                          holdout_fraction: float = 0.0,
                          overwrite: bool = False,
                          progress: bool = True) -> dict:
  """(c) one subfolder per class -> dataset dir; returns the metadata."""
  items, class_names = class_folder_items(root)
  return _convert_items(items, out_dir, class_names, f"class_folders:{root}",
                        num_workers, records_per_shard, verify_images,
                        holdout_fraction, overwrite, progress)


def convert_webdataset(tar_paths: Sequence[str], out_dir: str, *,
                       num_workers: int = 1, verify_images: bool = True,
                       holdout_fraction: float = 0.0, overwrite: bool = False,
                       progress: bool = True) -> dict:
  """(b) webdataset tars (img2dataset layout) -> a shard per tar and split."""
  tar_paths = sorted(tar_paths)
  if not tar_paths:
    raise ValueError("no tar files given")
  _check_holdout(holdout_fraction)
  n = len(tar_paths)
  with _staged_output(out_dir, overwrite) as staging:
    pool = _executor(min(num_workers, n))  # one pool for both passes
    try:
      text_lists = _pool_map(_scan_tar_texts, tar_paths, pool,
                             "scanning texts", progress=progress)
      table = LabelTable.merge(*text_lists)
      tasks = [_Task("tar", staging, i, n, tar_path=p, table=table.to_json(),
                     verify_images=verify_images,
                     holdout_fraction=holdout_fraction)
               for i, p in enumerate(tar_paths)]
      results = _pool_map(_run_task, tasks, pool, "converting",
                          [len(t) for t in text_lists], progress)
    finally:
      if pool is not None:
        pool.shutdown()
    return _finish(staging, results, None, table,
                   f"webdataset:{len(tar_paths)} tars", holdout_fraction)
