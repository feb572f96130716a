"""Data-side faults: empty conversions, overwrite, holdout split, truncated
images, the tokenizer corpus, non-UTF-8 captions, skip warnings and limit."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from florax.data import bad_records
from florax.data import converters
from florax.data import corpus
from florax.data import prompts
from florax.data import record_pipeline
from florax.data import records
from florax.data.folder_source import CaptionFolderSource
from florax.data.tokenizer import train_tokenizer

flags.FLAGS.mark_as_parsed()
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(seed: int, side: int = 8) -> bytes:
  arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3),
                                             np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def _captions(folder, rows, name="caps.csv"):
  """rows: (file, caption bytes, image bytes or None for a missing file)."""
  os.makedirs(folder, exist_ok=True)
  with open(folder / name, "wb") as f:
    f.write(b"path,caption\n")
    for file, caption, image in rows:
      if image is not None:
        (folder / file).write_bytes(image)
      f.write(file.encode() + b"," + caption + b"\n")
  return str(folder / name)


def _good(n, prefix="img"):
  return [(f"{prefix}{i}.jpg", b"picture number %d" % (i % 3), _jpeg(i))
          for i in range(n)]


def _convert(csv_path, out, **kw):
  return converters.convert_captions(csv_path, str(out), progress=False, **kw)


def _leftovers(parent):
  return [p for p in os.listdir(parent) if ".partial-" in p or ".old-" in p]


# 1. nothing written -> non-zero exit with the reasons ---------------------


def test_make_dataset_fails_when_every_record_is_skipped(tmp_path):
  caps = _captions(tmp_path / "in", [("a.jpg", b"one", None),
                                     ("b.jpg", b"two", None)])
  out = tmp_path / "ds"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.make_dataset", f"--captions={caps}",
       f"--out={out}", "--num_workers=1"],
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines()[-3:] == [
      f"make_dataset: captions:{caps}: wrote 0 records; all 2 inputs were "
      "skipped. First reasons:",
      "  a.jpg: cannot read image file (No such file or directory)",
      "  b.jpg: cannot read image file (No such file or directory)"]
  assert not out.exists() and not _leftovers(tmp_path)


def test_header_only_captions_file_is_an_error(tmp_path):
  caps = _captions(tmp_path, [])
  with pytest.raises(converters.ConversionError) as e:
    _convert(caps, tmp_path / "ds")
  assert str(e.value) == (f"captions:{caps}: wrote 0 records; the input "
                          "holds no examples (empty or header-only file?)")
  assert not (tmp_path / "ds").exists()


# 2. --overwrite ------------------------------------------------------------


def test_existing_output_needs_overwrite_which_replaces_it_safely(tmp_path):
  out = tmp_path / "ds"
  old_caps = _captions(tmp_path / "old", _good(3, "old"))
  _convert(old_caps, out)
  old = records.read_all(str(out))
  with pytest.raises(FileExistsError) as e:
    _convert(old_caps, out)
  assert str(e.value) == (f"{out} exists and is not empty; choose another "
                          "output directory or pass --overwrite to replace "
                          "the dataset in it")
  # a failed conversion leaves the old dataset as it was
  bad = _captions(tmp_path / "bad", [("x.jpg", b"gone", None)])
  with pytest.raises(converters.ConversionError, match="wrote 0 records"):
    _convert(bad, out, overwrite=True)
  assert records.read_all(str(out)) == old
  assert not _leftovers(tmp_path)
  # a good one replaces it
  _convert(_captions(tmp_path / "new", _good(2, "new")), out, overwrite=True)
  assert sorted(r["id"] for r in records.read_all(str(out))) == [
      "new0.jpg", "new1.jpg"]
  assert sorted(os.listdir(out)) == ["metadata.json",
                                     "train-00000-of-00001.array_record"]
  assert not _leftovers(tmp_path)
  # never replaces a folder that is not a dataset
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError) as e:
    _convert(old_caps, tmp_path / "mine", overwrite=True)
  assert str(e.value) == ("--overwrite replaces only a florax dataset "
                          f"directory; {tmp_path / 'mine'} has no "
                          "metadata.json: remove it yourself")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# 3. held-out split -----------------------------------------------------------


def _held_out(record_id, fraction):
  # independent spelling of the documented rule
  h = int(hashlib.sha256(record_id.encode()).hexdigest()[:16], 16)
  return h < fraction * 2**64


def test_holdout_split_by_id_hash(tmp_path):
  rows = _good(40)
  ids = {f for f, _, _ in rows}
  want = {i for i in ids if _held_out(i, 0.25)}
  assert 0 < len(want) < 40
  metas = []
  for n, (order, per_shard) in enumerate(((rows, 7), (rows[::-1], 100))):
    out = tmp_path / f"ds{n}"
    metas.append(_convert(_captions(tmp_path / f"in{n}", order), out,
                          records_per_shard=per_shard,
                          holdout_fraction=0.25))
    assert records.split_names(str(out)) == ["train", "validation"]
    val = records.RecordSource(str(out), split="validation")
    got = {val[i]["id"] for i in range(len(val))}
    assert got == want  # independent of order and shard layout
    train = records.RecordSource(str(out))  # default: train
    assert {train[i]["id"] for i in range(len(train))} == ids - want
  meta = metas[0]
  assert meta["splits"]["validation"]["num_records"] == len(want)
  assert meta["splits"]["train"]["num_records"] == 40 - len(want)
  assert meta["num_records"] == 40
  # one UniCL table over both splits: a text has one label in both
  labels = {}
  for r in records.read_all(str(tmp_path / "ds0")):  # all splits
    for t, l in zip(r["texts"], r["text_labels"]):
      labels.setdefault(t, set()).add(l)
  assert len(labels) == 3 and all(len(v) == 1 for v in labels.values())
  with pytest.raises(ValueError, match=r"has no split 'test'; it has "
                     r"\['train', 'validation'\]"):
    records.RecordSource(str(tmp_path / "ds0"), split="test")
  with pytest.raises(converters.ConversionError) as e:
    _convert(_captions(tmp_path / "in0", rows), tmp_path / "x",
             holdout_fraction=1.0)
  assert str(e.value) == "holdout_fraction must be in [0, 1), got 1.0"


def test_metadata_without_splits_reads_as_train(tmp_path):
  out = tmp_path / "ds"
  _convert(_captions(tmp_path, _good(3)), out)
  meta = records.read_metadata(str(out))
  (shard,) = meta.pop("splits")["train"]["shards"]
  os.rename(out / shard["file"], out / "records-00000-of-00001.array_record")
  shard["file"] = "records-00000-of-00001.array_record"
  meta["shards"] = [shard]  # the layout before splits
  records.write_metadata(str(out), meta)
  assert records.split_names(str(out)) == ["train"]
  assert len(records.RecordSource(str(out))) == 3
  assert len(list(records.iter_texts(str(out)))) == 3


def test_pipeline_reads_the_configured_split(tmp_path):
  out = tmp_path / "ds"
  _convert(_captions(tmp_path, _good(40)), out, holdout_fraction=0.25)
  n_val = len(records.RecordSource(str(out), split="validation"))
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(path=str(out), split="validation"))
  assert len(record_pipeline.make_source(cfg)) == n_val


# 4. truncated images are caught at conversion by default ----------------------


def test_truncated_jpeg_is_skipped_by_default(tmp_path):
  whole = _jpeg(1, side=64)  # half of it ends inside the scan data
  rows = [("ok.jpg", b"fine", _jpeg(0)),
          ("cut.jpg", b"cut", whole[:len(whole) // 2])]
  caps = _captions(tmp_path, rows)
  meta = _convert(caps, tmp_path / "ds")
  assert meta["num_records"] == 1 and meta["skipped"]["count"] == 1
  (skip,) = meta["skipped"]["records"]
  assert skip["id"] == "cut.jpg"
  assert re.fullmatch(r"undecodable image \(image file is truncated "
                      r"\(\d+ bytes not processed\)\)", skip["reason"])
  # opting out keeps it (then it is caught in training)
  meta = _convert(caps, tmp_path / "ds2", verify_images=False)
  assert meta["num_records"] == 2


# 5. the tokenizer corpus is what training sees -----------------------------


def test_tokenizer_corpus_expands_class_names_through_templates(tmp_path):
  for c in ("golden_retriever", "tabby_cat"):
    os.makedirs(tmp_path / "root" / c)
    for i in range(2):
      (tmp_path / "root" / c / f"{i}.jpg").write_bytes(_jpeg(i))
  out = str(tmp_path / "ds")
  converters.convert_class_folders(str(tmp_path / "root"), out,
                                   progress=False)
  want = (prompts.descriptions("golden retriever") +
          prompts.descriptions("tabby cat"))
  assert want[0] == "a photo of the golden retriever."
  assert list(records.iter_texts(out)) == want  # each class expanded once
  assert corpus.training_texts("records", out) == want


def test_training_texts_of_captions_skip_bad_texts(tmp_path):
  rows = [("a.jpg", b"a dog", _jpeg(0)), ("b.jpg", b"caf\xe9", _jpeg(1)),
          ("c.jpg", b"", _jpeg(2)), ("d.jpg", b"a cat", _jpeg(3))]
  caps = _captions(tmp_path, rows)
  assert corpus.training_texts("captions", caps) == ["a dog", "a cat"]
  with pytest.raises(ValueError, match="no tokenizer corpus for data source "
                     "'tfds'"):
    corpus.training_texts("tfds", caps)


def test_training_texts_leave_out_the_holdout(tmp_path):
  rows = [(f"{i}.jpg", b"caption %d" % i, _jpeg(i)) for i in range(30)]
  out = str(tmp_path / "ds")
  _convert(_captions(tmp_path, rows), out, holdout_fraction=0.3)
  val = {r["texts"][0] for r in records.read_all(out, "validation")}
  texts = corpus.training_texts("records", out)
  assert val and not val & set(texts) and len(texts) == 30 - len(val)


# 6. non-UTF-8 caption read directly (data.name=captions) ----------------------


def test_non_utf8_caption_in_captions_source_is_skipped_and_counted(
    tmp_path, caplog):
  rows = _good(8) + [("latin.jpg", b"caf\xe9 au lait", _jpeg(9))]
  caps = _captions(tmp_path, rows)
  texts = [t for i in converters.caption_items(caps)[0] for t in i.texts]
  with pytest.raises(ValueError, match="is not valid UTF-8; build the corpus "
                     "with florax.data.corpus.training_texts"):
    train_tokenizer(texts, 64)  # was an opaque SentencePiece RuntimeError
  tok = train_tokenizer(corpus.training_texts("captions", caps), 64)
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(source="captions", path=caps, batch_size=4, image_size=8,
                  max_text_len=8, num_epochs=1, read_threads=1,
                  max_skip_fraction=0.5, min_seen_for_skip_limit=100))
  with caplog.at_level(logging.WARNING, logger="florax.data"):
    it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                             process_index=0, process_count=1)
    batches = list(it)
  assert it.metrics()["data/skipped"] == 1
  assert sum(len(b["label"]) for b in batches) == 8
  assert ("data: skipping bad record latin.jpg: text is not valid UTF-8"
          in caplog.messages)


def test_one_bad_caption_of_several_skips_the_record(tmp_path):
  (tmp_path / "a.jpg").write_bytes(_jpeg(0))
  with open(tmp_path / "caps.jsonl", "wb") as f:
    f.write(b'{"path": "a.jpg", "caption": ["a dog", "caf\xe9"]}\n')
  rec = CaptionFolderSource(str(tmp_path / "caps.jsonl"))[0]
  assert rec["error"] == "text is not valid UTF-8"  # as conversion does


# 7. skip warnings once per id; the limit names the real config field -------


def test_bad_record_warned_once_over_two_epochs(tmp_path, caplog):
  rows = _good(7) + [("warn_once_missing.jpg", b"gone", None)]
  caps = _captions(tmp_path, rows)
  tok = train_tokenizer(corpus.training_texts("captions", caps), 64)
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(source="captions", path=caps, batch_size=1, image_size=8,
                  max_text_len=8, num_epochs=2, read_threads=1,
                  max_skip_fraction=0.5, min_seen_for_skip_limit=100))
  with caplog.at_level(logging.WARNING, logger="florax.data"):
    it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                             process_index=0, process_count=1)
    assert len(list(it)) == 14
  assert it.metrics()["data/skipped"] == 2  # still counted every epoch
  warned = [m for m in caplog.messages if "warn_once_missing.jpg" in m]
  assert len(warned) == 1


def test_skip_limit_names_the_config_field(tmp_path):
  rows = _good(3) + [(f"m{i}.jpg", b"gone", None) for i in range(3)]
  caps = _captions(tmp_path, rows)
  tok = train_tokenizer(corpus.training_texts("captions", caps), 64)
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(source="captions", path=caps, batch_size=1, image_size=8,
                  max_text_len=8, num_epochs=1, read_threads=1, shuffle=False,
                  max_skip_fraction=0.1, min_seen_for_skip_limit=2))
  it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                           process_index=0, process_count=1)
  with pytest.raises(bad_records.TooManyBadRecords) as e:
    list(it)
  assert "above data.records.max_skip_fraction=0.1. Fix the dataset" in str(
      e.value)
