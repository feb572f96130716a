"""Converters to florax records: captions file, webdataset tars, class folders.

Two passes. The first collects every text (cheap: captions files and class
folders hold them already; tars are scanned for their .txt/.json members only)
and builds the dataset-wide UniCL table, so that every shard written in the
second pass labels identical descriptions identically. The second pass copies
the encoded image bytes unchanged into ArrayRecord shards, one task per
output shard, over a pool of processes, with a tqdm progress bar.

Bad inputs (missing file, empty or non-UTF-8 caption, a key without image or
text) are skipped and listed in metadata.json; with `verify_images` images PIL
cannot parse are skipped too (otherwise they are caught at training time).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from typing import Any, Callable, Iterable, Sequence

from florax.data import bad_records
from florax.data import records
from florax.data.unicl_labels import LabelTable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_MAX_LISTED_SKIPS = 1000


@dataclasses.dataclass
class Item:
  """One input example before its image is read."""
  id: str
  path: str | None  # image file; None for tar members
  texts: list[str]
  label: int = -1
  prompt: bool = False


@dataclasses.dataclass
class _Task:
  kind: str  # "files" or "tar"
  out_path: str
  items: list[Item] | None = None
  tar_path: str | None = None
  table: dict | None = None
  verify_images: bool = False


def _verify_image(data: bytes) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    img.verify()


def _make_record(item_id: str, image: bytes, texts: Sequence[Any], label: int,
                 prompt: bool, table: LabelTable,
                 verify: bool) -> records.Record:
  if not image:
    raise bad_records.BadRecordError(item_id, "image file is empty")
  clean = [bad_records.check_text(item_id, t) for t in texts]
  if not clean:
    raise bad_records.BadRecordError(item_id, "no text")
  if verify:
    try:
      _verify_image(image)
    except Exception as e:  # PIL raises many types for corrupt data
      raise bad_records.BadRecordError(item_id, f"undecodable image ({e})")
  return records.Record(id=item_id, image=image, texts=clean,
                        text_labels=[table.label(t) for t in clean],
                        label=label, prompt=prompt)


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


def _run_task(task: _Task) -> tuple[str, int, list[tuple[str, str]]]:
  """Writes one shard; returns (file, count, [(id, reason) skipped])."""
  table = LabelTable.from_json(task.table)
  skipped = []
  with records.ShardWriter(task.out_path) as writer:
    if task.kind == "files":
      for item in task.items:
        try:
          try:
            with open(item.path, "rb") as f:
              image = f.read()
          except OSError as e:
            raise bad_records.BadRecordError(
                item.id, f"cannot read image file ({e.strerror})") from None
          writer.write(_make_record(item.id, image, item.texts, item.label,
                                    item.prompt, table, task.verify_images))
        except bad_records.BadRecordError as e:
          skipped.append((e.record_id, e.reason))
    else:
      for item_id, members in _tar_groups(task.tar_path, texts_only=False):
        try:
          images = [e for e in IMAGE_EXTENSIONS if e in members]
          if not images:
            raise bad_records.BadRecordError(item_id, "no image member")
          writer.write(_make_record(
              item_id, members[images[0]], _tar_texts(item_id, members), -1,
              False, table, task.verify_images))
        except bad_records.BadRecordError as e:
          skipped.append((e.record_id, e.reason))
    count = writer.count
  return os.path.basename(task.out_path), count, skipped


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


def _finish(out_dir: str, tasks: list[_Task], results, class_names,
            table: LabelTable, source: str, pre_skipped) -> dict:
  skipped = list(pre_skipped)
  shards = []
  for file, count, skips in results:
    shards.append({"file": file, "count": count})
    skipped.extend(skips)
  meta = {
      "num_records": sum(s["count"] for s in shards),
      "shards": shards,
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


def _prepare_out(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(os.path.join(out_dir, records.METADATA_FILE)) or (
      records.glob_shards(out_dir)):
    raise FileExistsError(f"{out_dir} already holds a dataset; choose an "
                          "empty output directory")


def _convert_items(items: list[Item], out_dir: str, class_names, source: str,
                   pre_skipped, num_workers: int, records_per_shard: int,
                   verify_images: bool, progress: bool) -> dict:
  _prepare_out(out_dir)
  texts = []
  for item in items:
    for t in item.texts:
      try:
        texts.append(bad_records.check_text(item.id, t))
      except bad_records.BadRecordError:
        pass
  table = LabelTable.build(texts)
  n_shards = max(1, math.ceil(len(items) / records_per_shard))
  if num_workers > 1 and len(items) >= 2 * num_workers:
    n_shards = max(n_shards, num_workers)
  tasks = []
  for s in range(n_shards):
    # contiguous chunks keep the shard order equal to the input order
    chunk = items[s * len(items) // n_shards:(s + 1) * len(items) // n_shards]
    tasks.append(_Task("files", os.path.join(
        out_dir, records.shard_name(s, n_shards)), items=chunk,
                       table=table.to_json(), verify_images=verify_images))
  pool = _executor(min(num_workers, n_shards))
  try:
    results = _pool_map(_run_task, tasks, pool, "converting",
                        [len(t.items) for t in tasks], progress)
  finally:
    if pool is not None:
      pool.shutdown()
  return _finish(out_dir, tasks, results, class_names, table, source,
                 pre_skipped)


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
    items.append(Item(id=str(rel), path=os.path.join(root, str(rel)),
                      texts=texts,
                      label=labels[label] if label not in (None, "") else -1))
  return items, class_names


def class_folder_items(root: str) -> tuple[list[Item], list[str]]:
  """Items of `root/<class name>/<image>`; the text is the class name."""
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f"{root} has no class subfolders")
  items = []
  for label, name in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, name))):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        items.append(Item(id=f"{name}/{f}", path=os.path.join(root, name, f),
                          texts=[name.replace("_", " ")], label=label,
                          prompt=True))
  return items, [c.replace("_", " ") for c in classes]


def convert_captions(captions_file: str, out_dir: str, *,
                     image_root: str | None = None, num_workers: int = 1,
                     records_per_shard: int = 10_000,
                     verify_images: bool = False,
                     progress: bool = True) -> dict:
  """(a) image folder + captions file -> dataset dir; returns the metadata."""
  items, class_names = caption_items(captions_file, image_root)
  return _convert_items(items, out_dir, class_names, f"captions:{captions_file}",
                        [], num_workers, records_per_shard, verify_images,
                        progress)


def convert_class_folders(root: str, out_dir: str, *, num_workers: int = 1,
                          records_per_shard: int = 10_000,
                          verify_images: bool = False,
                          progress: bool = True) -> dict:
  """(c) one subfolder per class -> dataset dir; returns the metadata."""
  items, class_names = class_folder_items(root)
  return _convert_items(items, out_dir, class_names, f"class_folders:{root}",
                        [], num_workers, records_per_shard, verify_images,
                        progress)


def convert_webdataset(tar_paths: Sequence[str], out_dir: str, *,
                       num_workers: int = 1, verify_images: bool = False,
                       progress: bool = True) -> dict:
  """(b) webdataset tars (img2dataset layout) -> one shard per tar."""
  tar_paths = sorted(tar_paths)
  if not tar_paths:
    raise ValueError("no tar files given")
  _prepare_out(out_dir)
  n = len(tar_paths)
  pool = _executor(min(num_workers, n))  # one pool for both passes
  try:
    text_lists = _pool_map(_scan_tar_texts, tar_paths, pool,
                           "scanning texts", progress=progress)
    table = LabelTable.merge(*text_lists)
    tasks = [_Task("tar", os.path.join(out_dir, records.shard_name(i, n)),
                   tar_path=p, table=table.to_json(),
                   verify_images=verify_images)
             for i, p in enumerate(tar_paths)]
    results = _pool_map(_run_task, tasks, pool, "converting",
                        [len(t) for t in text_lists], progress)
  finally:
    if pool is not None:
      pool.shutdown()
  return _finish(out_dir, tasks, results, None, table,
                 f"webdataset:{len(tar_paths)} tars", [])
