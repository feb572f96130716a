"""Record pipeline: exact resume (with workers), bad data, process shards."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from florax.data import bad_records
from florax.data import converters
from florax.data import record_pipeline
from florax.data.tokenizer import train_tokenizer

flags.FLAGS.mark_as_parsed()


def _write_folder(path, n, bad=()):
  """n JPEGs + captions.jsonl; `bad` names rows to break."""
  rng = np.random.default_rng(0)
  with open(path / "caps.jsonl", "w") as f:
    for i in range(n):
      arr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
      buf = io.BytesIO()
      Image.fromarray(arr).save(buf, format="JPEG")
      data, caption = buf.getvalue(), f"picture number {i % 7}"
      if ("corrupt", i) in bad:
        data = data[:40] + b"\x00" * 50
      if ("empty", i) in bad:
        caption = ""
      if ("missing", i) not in bad:
        (path / f"{i}.jpg").write_bytes(data)
      f.write(json.dumps({"path": f"{i}.jpg", "caption": caption}) + "\n")


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer([f"picture number {i}" for i in range(7)] * 3, 64)


def _cfg(path, **kw):
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(path=str(path), batch_size=4, image_size=16,
                  max_text_len=10, read_threads=2, read_buffer=8))
  cfg.update(kw)
  return cfg


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(tmp_path, tok, workers):
  _write_folder(tmp_path, 10)
  converters.convert_captions(str(tmp_path / "caps.jsonl"),
                              str(tmp_path / "ds"), records_per_shard=4,
                              progress=False)
  cfg = _cfg(tmp_path / "ds", num_workers=workers)
  cfg.image_mask.enabled = True
  cfg.image_mask.patch_size = 4
  cfg.text_mask.enabled = True
  kw = dict(tokenizer=tok, process_index=0, process_count=1)
  it = record_pipeline.make_train_iterator(cfg, **kw)
  # 3 epochs of 10 records at batch 4: crosses epoch boundaries
  expected = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected += [next(it) for _ in range(5)]  # the uninterrupted continuation
  it.close()
  resumed = record_pipeline.make_train_iterator(cfg, **kw)
  resumed.set_state(state)
  for want in expected[3:]:
    _assert_batches_equal(next(resumed), want)
  resumed.close()
  # epochs are reshuffled: the first 10 examples differ in order from the next
  labels = np.concatenate([b["text"][:, 3] for b in expected])
  assert not np.array_equal(labels[:8], labels[10:18])


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
  bad = {("corrupt", 2), ("missing", 5), ("empty", 7)}
  _write_folder(tmp_path, 20, bad)
  cfg = _cfg(tmp_path / "caps.jsonl", source="captions", num_epochs=1,
             max_skip_fraction=0.2, min_seen_for_skip_limit=16)
  it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                           process_index=0, process_count=1)
  batches = list(it)  # ends (one epoch) instead of hanging
  assert it.metrics()["data/skipped"] == 3
  assert sum(len(b["label"]) for b in batches) == 16  # 17 good, drop_remainder
  # above the limit: a clear error naming the limit
  cfg.max_skip_fraction = 0.1
  it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                           process_index=0, process_count=1)
  with pytest.raises(bad_records.TooManyBadRecords,
                     match=r"max_skip_fraction=0.1"):
    list(it)


def test_all_bad_data_stops_instead_of_hanging(tmp_path, tok):
  _write_folder(tmp_path, 6, {("missing", i) for i in range(6)})
  cfg = _cfg(tmp_path / "caps.jsonl", source="captions",
             min_seen_for_skip_limit=20)  # repeats forever
  it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                           process_index=0, process_count=1)
  with pytest.raises(bad_records.TooManyBadRecords, match="20 of 20"):
    next(it)


def test_processes_read_disjoint_shards_and_layout_is_checked(tmp_path, tok):
  _write_folder(tmp_path, 12)
  converters.convert_captions(str(tmp_path / "caps.jsonl"),
                              str(tmp_path / "ds"), progress=False)
  cfg = _cfg(tmp_path / "ds", batch_size=12, num_epochs=1, flip=False,
             train_augment=False)
  images = []
  for p in range(2):
    it = record_pipeline.make_train_iterator(cfg, tokenizer=tok,
                                             process_index=p, process_count=2)
    images.append(next(it)["image"])
  both = np.concatenate(images)
  assert len({x.tobytes() for x in both}) == 12  # disjoint and complete
  state = it.get_state()
  other = record_pipeline.make_train_iterator(
      _cfg(tmp_path / "ds", batch_size=12), tokenizer=tok, process_index=0,
      process_count=3)
  with pytest.raises(ValueError, match="process_count"):
    other.set_state(state)


def test_global_batch_assembles_jax_arrays():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  local = {"x": np.arange(len(jax.devices()) * 6, dtype=np.float32
                          ).reshape(-1, 3)}
  out = record_pipeline.global_batch(local, NamedSharding(mesh, P("data")))
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
