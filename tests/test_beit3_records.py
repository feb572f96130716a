"""BEiT-3 masked data modeling on your own data (florax.data.beit3_records,
beit3_mdm with data.name='records'): every pair's text belongs to its image,
the parts' layout is the task's batch spec, a text corpus file feeds the
text part, bad records are skipped and counted, the stream resumes exactly,
and config mistakes are refused before anything compiles."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from florax import tasks
from florax.tasks import base
from florax.data import beit3_digits, beit3_records, converters
from florax.data import tokenizer as tok_lib
from test_beit3_mdm import fake_vq, tiny_config  # noqa: F401  (fixture)

N = 24  # records; image i is a flat grey of level 10 * (i % 12)
WORDS = ("zero one two three four five six seven eight nine ten "
         "eleven").split()


def _write(path, corrupt=()):
  lines = []
  for i in range(N):
    arr = np.full((20, 20, 3), 10 * (i % 12), np.uint8)
    data = path / f"{i}.png"
    Image.fromarray(arr).save(data)
    if i in corrupt:
      data.write_bytes(data.read_bytes()[:30])
    lines.append(json.dumps({"path": f"{i}.png",
                             "caption": f"grey level {WORDS[i % 12]}"}))
  (path / "caps.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("beit3_records")
  _write(root)
  converters.convert_captions(str(root / "caps.jsonl"), str(root / "ds"),
                              records_per_shard=8, progress=False)
  tok = tok_lib.train_tokenizer(
      [f"grey level {w}" for w in WORDS] * 4 + ["a corpus line"] * 4, 40)
  name, blob = tok.serialize()
  (root / name).write_bytes(blob)
  (root / "corpus.txt").write_text("a corpus line\n\ngrey level two\n" * 4)
  return root, tok, str(root / name)


def _records(path, **kw):
  cfg = beit3_records.records_config()
  cfg.path = str(path)
  cfg.train_augment = False  # centre crop of a flat image: its level
  cfg.color_jitter = 0.0
  cfg.read_threads = 1
  cfg.update(kw)
  cfg.source = "records"
  return cfg


def _settings(tok, **kw):
  return beit3_digits.MaskSettings(grid=2, vocab_size=tok.vocab_size,
                                   mask_id=tok.vocab_size, min_block=1, **kw)


def _stream(root, tok, corpus="", **kw):
  return beit3_records.mdm_iterator(
      records=_records(root / "ds"), text_corpus=corpus, tokenizer=tok,
      settings=_settings(tok, **kw),
      composition={"image": 4, "text": 8, "pair": 4}, image_size=16,
      max_len=16, seed=3)


def test_pairs_hold_their_own_text_and_the_layout_is_rows(data):
  root, tok, _ = data
  it = _stream(root, tok, mvlm_mode="joint")
  for _ in range(3):
    batch = next(it)
    assert batch["image"]["images"].shape == (4, 1, 16, 16, 3)
    assert batch["text"]["ids"].shape == (4, 2, 16)
    pair = beit3_digits.ungroup_rows(batch["pair"])
    for image, targets in zip(pair["images"], pair["targets"]):
      # mean/std 0.5: pixel = 2 * level / 255 - 1
      level = int(round((image.mean() + 1) * 255 / 2 / 10))
      assert tok.decode(targets) == f"grey level {WORDS[level]}"
    # joint masking: both sides; 40% of 4 patches rounds stochastically
    assert set(pair["image_mask"].sum(1).tolist()) <= {1, 2}
    assert pair["mlm_mask"].any(1).all()
  it.close()


def test_text_corpus_feeds_the_text_part_and_blank_lines_are_skipped(data):
  root, tok, _ = data
  it = _stream(root, tok, corpus=str(root / "corpus.txt"))
  seen = set()
  for _ in range(4):
    part = beit3_digits.ungroup_rows(next(it)["text"])
    seen |= {tok.decode(t) for t in part["targets"]}
  assert seen == {"a corpus line", "grey level two"}
  assert it.metrics()["data/text/skipped"] > 0  # the blank lines
  it.close()


def test_bad_records_are_skipped_and_counted(tmp_path, data):
  _, tok, _ = data
  _write(tmp_path, corrupt=(3, 9))
  converters.convert_captions(str(tmp_path / "caps.jsonl"),
                              str(tmp_path / "ds"), records_per_shard=8,
                              progress=False, verify_images=False)
  cfg = _records(tmp_path / "ds", max_skip_fraction=0.5,
                 min_seen_for_skip_limit=1)
  it = beit3_records.mdm_iterator(
      records=cfg, text_corpus="", tokenizer=tok, settings=_settings(tok),
      composition={"image": 4, "text": 4, "pair": 4}, image_size=16,
      max_len=16, seed=0)
  for _ in range(12):  # two epochs of each part
    next(it)
  m = it.metrics()
  assert m["data/image/skipped"] >= 2 and m["data/pair/skipped"] >= 2
  assert m["data/text/skipped"] == 0  # the text part decodes no image
  it.close()


def test_the_stream_resumes_exactly(data):
  root, tok, _ = data
  it = _stream(root, tok)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  it.close()
  again = _stream(root, tok)
  again.set_state(state)
  for w in want:
    got = next(again)
    for part in w:
      for k in w[part]:
        np.testing.assert_array_equal(got[part][k], w[part][k])
  again.close()


def _task_config(root, tok_file, **kw):
  overrides = {"data.name": "records", "data.text_tokenizer_path": tok_file,
               "model.multiway.vocab_size": 64,
               "data.records.path": str(root / "ds"),
               "data.records.read_threads": 1, **kw}
  return tiny_config(**overrides)


def test_the_task_feeds_its_batch_spec_from_records(data, fake_vq, tmp_path):
  root, _, tok_file = data
  task = tasks.build(_task_config(root, tok_file), str(tmp_path))
  spec = task.batch_spec()
  batch = next(task.train_iterators(0, 1)["train"])
  for part in spec:
    for k, s in spec[part].items():
      assert batch[part][k].shape == s.shape, (part, k)
      assert batch[part][k].dtype == s.dtype, (part, k)
  assert task.preprocess_spec()["mean"] == [0.5] * 3


@pytest.mark.parametrize("overrides,match", [
    ({"data.records.path": ""}, "needs data.records.path"),
    ({"data.text_tokenizer_path": ""}, "set data.text_tokenizer_path"),
    ({"data.text_corpus": "/nonexistent.txt"}, "does not exist"),
])
def test_bad_records_config_is_refused(data, fake_vq, tmp_path, overrides,
                                       match):
  root, _, tok_file = data
  cfg = _task_config(root, tok_file)
  with cfg.unlocked():
    for k, v in overrides.items():
      node = cfg
      *path, leaf = k.split(".")
      for p in path:
        node = node[p]
      node[leaf] = v
  with pytest.raises(ValueError, match=match):
    tasks.build(cfg, str(tmp_path))


def test_part_owned_record_fields_are_refused(data, fake_vq, tmp_path):
  root, _, tok_file = data
  cfg = _task_config(root, tok_file)
  with cfg.unlocked():
    cfg.data.records.image_mask = {"enabled": True}
  with pytest.raises(ValueError, match=r"unknown fields \['image_mask'\]"):
    tasks.build(cfg, str(tmp_path))


# -- FLAVA's three kinds on the same records -----------------------------------

def _flava_config(root, tok_file, **kw):
  from test_flava_task import tiny_config as flava_tiny  # pylint: disable=g-import-not-at-top
  return flava_tiny(**{
      "data.name": "records", "data.text_tokenizer_path": tok_file,
      "data.records.path": str(root / "ds"), "data.records.read_threads": 1,
      "data.records.train_augment": False, "data.records.color_jitter": 0.0,
      "data.image_size": 16, "model.flava.image.image_size": 16,
      "model.flava.image.patch_size": 8, "model.flava.text.vocab_size": 64,
      "data.max_len": 16, "flava.positives": "instance",
      "flava.itm_match": "instance", "flava.min_block": 1, **kw})


def test_flava_kinds_read_records_with_instance_pairs(data, fake_vq,
                                                      tmp_path):
  root, tok, tok_file = data
  fake_vq["kwargs"] = {"grid": 2, "image_size": 16}
  task = tasks.build(_flava_config(root, tok_file), str(tmp_path))
  task.validate()
  kinds = task.batch_kinds()
  assert "label" not in kinds["pair"]  # records carry no class
  its = task.train_iterators(0, 1)
  for kind, spec in kinds.items():
    batch = next(its[kind])
    for k, s in spec.items():
      assert batch[k].shape == s.shape and batch[k].dtype == s.dtype, (kind,
                                                                       k)
  pair = next(its["pair"])
  for image, targets in zip(pair["images"], pair["targets"]):
    level = int(round((image.mean() + 1) * 255 / 2 / 10))
    assert tok.decode(targets) == f"grey level {WORDS[level]}"
  # The pair kind's losses run on instance pairs (no class in the batch).
  params = nn.unbox(task.init(jax.random.key(0)))
  ctx = base.StepContext(step=0, kind="pair",
                         frozen=task.visual_tokenizer.load(None))
  loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1),
                                                 ctx))(params, pair)
  assert np.isfinite(float(loss)) and float(metrics["itm_loss"]) > 0
  assert task.evaluate(None) == {}  # no digits evaluation on records
  with pytest.raises(ValueError, match="must be 'instance'"):
    tasks.build(_flava_config(root, tok_file, **{"flava.positives": "class"}),
                str(tmp_path / "c")).validate()
