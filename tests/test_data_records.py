"""Converters round-trip; UniCL labels agree across shards; TFDS source."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from absl import flags
from PIL import Image

from florax.data import converters
from florax.data import record_pipeline
from florax.data import records
from florax.data.tokenizer import train_tokenizer
from florax.data.unicl_labels import LabelTable

flags.FLAGS.mark_as_parsed()


def _jpeg(seed: int, size=(40, 32), fmt="JPEG") -> bytes:
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


def _by_id(dataset_dir):
  return {r["id"]: r for r in records.read_all(dataset_dir)}


def _ref_norm(text):
  # Independent spelling of the documented rule (lower, squeeze, strip '.').
  return " ".join(text.lower().split()).rstrip(".!,;:").strip()


def _check_labels_follow_descriptions(recs):
  pairs = [(_ref_norm(t), l) for r in recs for t, l in
           zip(r["texts"], r["text_labels"])]
  for a_text, a_label in pairs:
    for b_text, b_label in pairs:
      assert (a_text == b_text) == (a_label == b_label), (a_text, b_text)


def test_captions_csv_round_trip(tmp_path):
  captions = ["A dog.", "a  dog", "a cat", "Ein Hund über Äpfeln", "a cat!",
              "a bird", "two dogs", "a DOG"]
  labels = ["dog", "dog", "cat", "dog", "cat", "bird", "dog", "dog"]
  images = {}
  with open(tmp_path / "caps.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["path", "caption", "label"])
    for i, (c, l) in enumerate(zip(captions, labels)):
      os.makedirs(tmp_path / "img" / str(i % 2), exist_ok=True)
      rel = f"img/{i % 2}/{i}.jpg"
      images[rel] = _jpeg(i)
      (tmp_path / rel).write_bytes(images[rel])
      w.writerow([rel, c, l])
  out = tmp_path / "ds"
  meta = converters.convert_captions(str(tmp_path / "caps.csv"), str(out),
                                     records_per_shard=3, progress=False)
  assert len(meta["splits"]["train"]["shards"]) == 3
  assert meta["num_records"] == 8
  assert meta["class_names"] == ["bird", "cat", "dog"]
  recs = _by_id(out)
  assert sorted(recs) == sorted(images)
  for i, (c, l) in enumerate(zip(captions, labels)):
    r = recs[f"img/{i % 2}/{i}.jpg"]
    assert r["image"] == images[f"img/{i % 2}/{i}.jpg"]  # byte-identical
    assert r["texts"] == [c]
    assert r["label"] == ["bird", "cat", "dog"].index(l)
  _check_labels_follow_descriptions(recs.values())
  assert len({_ref_norm(c) for c in captions}) == len(meta["unicl"]["table"])


def test_webdataset_round_trip_with_two_workers(tmp_path):
  expected = {}
  tars = []
  for t in range(2):
    path = tmp_path / f"shard{t}.tar"
    with tarfile.open(path, "w") as tar:
      for k in range(3):
        key = f"{t:02d}{k:03d}"
        img = _jpeg(10 * t + k, fmt="PNG" if k == 1 else "JPEG")
        ext = ".png" if k == 1 else ".jpg"
        caption = f"caption {k} of shard {t}" if k != 2 else "shared caption"
        if k == 0:
          text_name, text = ".json", json.dumps({"caption": caption}).encode()
        else:
          text_name, text = ".txt", caption.encode()
        for name, data in ((key + ext, img), (key + text_name, text)):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
        expected[f"shard{t}.tar/{key}"] = (img, caption)
    tars.append(str(path))
  out = tmp_path / "ds"
  meta = converters.convert_webdataset(tars, str(out), num_workers=2,
                                       progress=False)
  assert meta["num_records"] == 6 and meta["skipped"]["count"] == 0
  recs = _by_id(out)
  assert sorted(recs) == sorted(expected)
  for rid, (img, caption) in expected.items():
    assert recs[rid]["image"] == img and recs[rid]["texts"] == [caption]
  # the caption shared by both tars gets one label, though written by two
  # different worker processes
  shared = {recs[r]["text_labels"][0] for r in recs
            if recs[r]["texts"] == ["shared caption"]}
  assert len(shared) == 1
  _check_labels_follow_descriptions(recs.values())


def test_class_folders_round_trip(tmp_path):
  images = {}
  for c in ("golden_retriever", "tabby_cat"):
    os.makedirs(tmp_path / "root" / c)
    for i in range(3):
      images[f"{c}/{i}.jpg"] = _jpeg(hash(c) % 100 + i)
      (tmp_path / "root" / c / f"{i}.jpg").write_bytes(images[f"{c}/{i}.jpg"])
  meta = converters.convert_class_folders(str(tmp_path / "root"),
                                          str(tmp_path / "ds"), progress=False)
  assert meta["class_names"] == ["golden retriever", "tabby cat"]
  recs = _by_id(tmp_path / "ds")
  assert sorted(recs) == sorted(images)
  for rid, img in images.items():
    r = recs[rid]
    cls = rid.split("/")[0]
    assert r["image"] == img and r["prompt"]
    assert r["texts"] == [cls.replace("_", " ")]
    assert r["label"] == ["golden_retriever", "tabby_cat"].index(cls)
  _check_labels_follow_descriptions(recs.values())


def test_conversion_skips_and_lists_bad_inputs(tmp_path):
  (tmp_path / "ok.jpg").write_bytes(_jpeg(0))
  (tmp_path / "e.jpg").write_bytes(_jpeg(1))
  (tmp_path / "u.jpg").write_bytes(_jpeg(2))
  with open(tmp_path / "caps.csv", "wb") as f:
    f.write(b"path,caption\nok.jpg,fine\nmissing.jpg,gone\ne.jpg,\n"
            b"u.jpg,caf\xe9 latin-1\n")
  meta = converters.convert_captions(str(tmp_path / "caps.csv"),
                                     str(tmp_path / "ds"), progress=False)
  assert meta["num_records"] == 1
  assert sorted(s["id"] for s in meta["skipped"]["records"]) == [
      "e.jpg", "missing.jpg", "u.jpg"]
  with pytest.raises(FileExistsError):
    converters.convert_captions(str(tmp_path / "caps.csv"),
                                str(tmp_path / "ds"), progress=False)


def test_reader_refuses_other_schema_version(tmp_path):
  rec = records.Record(id="x", image=b"123", texts=["t"], text_labels=[0])
  data = records.serialize(rec)
  assert records.deserialize(data)["image"] == b"123"
  import msgpack
  obj = msgpack.unpackb(data)
  obj["v"] = 99
  with pytest.raises(ValueError, match="schema version 99"):
    records.deserialize(msgpack.packb(obj, use_bin_type=True))


def test_label_table_independent_of_shard_order():
  a = ["a dog", "A cat.", "a bird"]
  b = ["a fish", "a  DOG", "a cat"]
  t1 = LabelTable.merge(a, b)
  t2 = LabelTable.merge(b[::-1], a[::-1])
  for text in a + b:
    assert t1.label(text) == t2.label(text)
  assert len(t1) == 4
  with pytest.raises(KeyError, match="not in the UniCL label table"):
    t1.label("a horse")


def test_unicl_labels_consistent_across_two_processes(tmp_path):
  # 12 images, 4 distinct descriptions spelled differently; two simulated
  # processes read disjoint shards and must agree on every label.
  variants = ["a red car", "A red car.", "a blue boat", "a Blue  boat",
              "a tree", "a tree!", "the sky", "The sky"]
  with open(tmp_path / "caps.jsonl", "w") as f:
    for i in range(12):
      (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i))
      f.write(json.dumps({"path": f"{i}.jpg",
                          "caption": variants[i % 8]}) + "\n")
  converters.convert_captions(str(tmp_path / "caps.jsonl"),
                              str(tmp_path / "ds"), records_per_shard=5,
                              progress=False)
  tok = train_tokenizer(variants * 4, 64)
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(path=str(tmp_path / "ds"), batch_size=12, image_size=16,
                  max_text_len=12, num_epochs=1, read_threads=1))
  seen = {}
  for p in range(2):
    it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                             process_index=p, process_count=2)
    batch = next(it)
    for ids, label in zip(batch["text"], batch["label"]):
      seen.setdefault(_ref_norm(tok.decode(ids)), set()).add((p, int(label)))
  assert len(seen) == 4
  labels_per_text = {t: {l for _, l in v} for t, v in seen.items()}
  assert all(len(v) == 1 for v in labels_per_text.values())
  assert len({next(iter(v)) for v in labels_per_text.values()}) == 4
  # both processes saw at least one shared description
  assert any(len({p for p, _ in v}) == 2 for v in seen.values())


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from florax.data.tfds_source import TfdsSource
  tok = train_tokenizer([f"a photo of the {i}." for i in range(10)], 64)
  with tfds.testing.mock_data(num_examples=8):
    raw = tfds.data_source("mnist", split="train",
                           builder_kwargs={"file_format": "array_record"})
    src = TfdsSource("mnist", "train", image_key="image", label_key="label")
    assert len(src) == 8 and src.class_names[:3] == ["0", "1", "2"]
    for i in range(8):
      rec = src[i]
      np.testing.assert_array_equal(rec["image"], raw[i]["image"])
      assert rec["label"] == int(raw[i]["label"])
      assert rec["texts"] == [str(int(raw[i]["label"]))] and rec["prompt"]
    cfg = record_pipeline.default_data_config()
    cfg.update(dict(source="tfds", batch_size=4, image_size=16, max_text_len=16,
                    shuffle=False, num_epochs=1, read_threads=1))
    cfg.tfds.name = "mnist"
    it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                             process_index=0, process_count=1)
    batch = next(it)
  assert batch["image"].shape == (4, 16, 16, 3)
  # class-name texts -> UniCL label equals the table entry of the class name
  for j in range(4):
    assert batch["label"][j] == src.label_table.label(
        str(int(raw[j]["label"])))
  with pytest.raises(KeyError, match="no feature 'caption'"):
    with tfds.testing.mock_data(num_examples=2):
      TfdsSource("mnist", "train", text_key="caption")
