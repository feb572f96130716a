"""Video data as records of frame sequences (florax/data/temporal.py,
florax/data/video_records.py, the clip path of florax/data/converters.py)
and the video tasks on them (florax/tasks/video.py: records, multi-view
testing, exports).

1. Temporal sampling equals hand-worked indices (fitting strides, the last
   frame repeated in a short clip, evenly spaced views).
2. Folders of frames convert to clip records whose frames are the files'
   bytes; a clip with a corrupt frame or no frame is skipped and counted;
   captions rows may name clip folders.
3. The clip transform reads exactly the rendered frames at the sampled
   indices (eval, full-frame crop); in training one crop box serves every
   frame (a static clip stays static; the digit still moves in its
   labelled direction); a record without frames or with frames of two
   sizes is a counted bad record.
4. The tasks on records: batches of batch_spec's keys; multi-view
   classification = numpy's mean of the views' softmax; retrieval's
   multi-view embedding = the renormalised mean; the exports serve the
   evaluator's outputs; config refusals name the field.
"""

import csv
import io
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import video_coswin as video_configs
from florax import export, tasks
from florax.data import bad_records
from florax.data import converters
from florax.data import moving_digits as md
from florax.data import records
from florax.data import temporal
from florax.data import video_records
from florax.tasks import base as task_base
from tests.helpers import apply_overrides

SPEC = md.ClipSpec.from_config(video_configs.get_config("tiny_classify").data)


# -- 1. temporal sampling --------------------------------------------------------

def test_temporal_indices_by_hand():
  # 4 frames at stride 3 span 10 of 12: centred start (12 - 10) // 2 = 1.
  np.testing.assert_array_equal(temporal.eval_indices(12, 4, 3),
                                [[1, 4, 7, 10]])
  # 3 views over starts 0..2: 0, 1, 2.
  np.testing.assert_array_equal(temporal.eval_indices(12, 4, 3, views=3),
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  # A 5-frame clip: the span does not fit; the last frame repeats.
  np.testing.assert_array_equal(temporal.eval_indices(5, 4, 2),
                                [[0, 2, 4, 4]])
  np.testing.assert_array_equal(temporal.eval_indices(5, 4, 2, views=2),
                                [[0, 2, 4, 4], [0, 2, 4, 4]])
  seen = set()
  for i in range(300):
    t = temporal.train_indices(7, 3, (1, 3, 4), np.random.default_rng(i))
    seen.add(tuple(t))
  # stride 1: starts 0..4; stride 3: span 7, start 0; stride 4 never fits.
  assert seen == {(s, s + 1, s + 2) for s in range(5)} | {(0, 3, 6)}
  # No stride fits: the smallest, from 0, last frame repeated.
  np.testing.assert_array_equal(
      temporal.train_indices(2, 3, (2, 3), np.random.default_rng(0)),
      [0, 1, 1])


# -- 2. conversion -------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  folders = root / "folders"
  md.write_clip_folders(str(folders), SPEC, split="train", max_clips=40)
  # A clip with a truncated frame and an empty clip folder: skipped.
  bad = folders / "left" / "zz_bad"
  bad.mkdir()
  for t in range(3):
    (bad / f"{t:03d}.png").write_bytes(
        (folders / "left" / os.listdir(folders / "left")[0] /
         "000.png").read_bytes()[:(60 if t == 1 else None)])
  (folders / "up" / "zz_empty").mkdir()
  out = root / "records"
  meta = converters.convert_class_folders(
      str(folders), str(out), holdout_fraction=0.3, progress=False)
  return folders, out, meta


def test_clip_folders_convert_to_frame_records(clip_dir):
  folders, out, meta = clip_dir
  reasons = {s["id"]: s["reason"] for s in meta["skipped"]["records"]}
  assert set(reasons) == {"left/zz_bad", "up/zz_empty"}
  assert "undecodable frame 1" in reasons["left/zz_bad"]
  assert "no frames" in reasons["up/zz_empty"]
  assert meta["class_names"] == ["down", "left", "right", "up"]
  read = records.read_all(str(out))
  assert len(read) == 40 and {r["id"] for r in read} == {
      f"{d}/{c}" for d in md.DIRECTIONS for c in os.listdir(folders / d)
      if not c.startswith("zz")}
  for r in read[:5]:
    files = sorted(os.listdir(folders / r["id"]))
    assert len(r["frames"]) == SPEC.render_frames == len(files)
    for frame, name in zip(r["frames"], files):
      assert frame == (folders / r["id"] / name).read_bytes()
    assert r["image"] == b"" and r["prompt"]
    assert meta["class_names"][r["label"]] == r["id"].split("/")[0]
    assert r["texts"] == [r["id"].split("/")[0]]


def test_captions_rows_may_name_clip_folders(clip_dir, tmp_path):
  folders, _, _ = clip_dir
  with open(folders / "captions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  meta = converters.convert_captions(str(folders / "captions.csv"),
                                     str(tmp_path / "r"), progress=False)
  read = {r["id"]: r for r in records.read_all(str(tmp_path / "r"))}
  assert meta["skipped"]["count"] == 0 and len(read) == len(rows) == 40
  for row in rows[:5]:
    r = read[row["path"]]
    assert r["texts"] == [row["caption"]]
    assert meta["class_names"][r["label"]] == row["label"]
    assert len(r["frames"]) == SPEC.render_frames
  # The UniCL labels: equal captions share one.
  by_text = {}
  for r in read.values():
    by_text.setdefault(r["texts"][0], set()).add(r["text_labels"][0])
  assert all(len(v) == 1 for v in by_text.values())
  assert len({next(iter(v)) for v in by_text.values()}) == len(by_text)


# -- 3. the clip transform -----------------------------------------------------------

def _decoded(record, index):
  return np.stack([np.asarray(Image.open(io.BytesIO(
      record["frames"][i])).convert("RGB"), np.float32) / 127.5 - 1
                   for i in index])


def test_eval_clip_is_the_sampled_frames(clip_dir):
  _, out, _ = clip_dir
  record = records.read_all(str(out))[0]
  t = video_records.ClipTransform(frames=4, size=32, eval_stride=3,
                                  train=False, views=3)
  got = t.random_map(record, np.random.default_rng(0))
  assert got["video"].shape == (3, 4, 32, 32, 3)
  for v, index in enumerate(temporal.eval_indices(12, 4, 3, 3)):
    np.testing.assert_allclose(got["video"][v], _decoded(record, index),
                               atol=1e-6)
  assert got["label"] == record["label"]


def _centre_of_mass(frame):
  ink = np.clip(frame.mean(-1) + 1, 0, None)
  ys, xs = np.mgrid[:ink.shape[0], :ink.shape[1]]
  return np.array([(ink * ys).sum(), (ink * xs).sum()]) / ink.sum()


def test_train_clip_shares_one_crop_and_keeps_the_motion(clip_dir):
  _, out, meta = clip_dir
  t = video_records.ClipTransform(frames=4, size=32, train_strides=(2, 3),
                                  train=True, scale=(0.5, 1.0))
  for i, record in enumerate(records.read_all(str(out))[:12]):
    got = t.random_map(record, np.random.default_rng(i))["video"]
    assert got.shape == (4, 32, 32, 3)
    direction = meta["class_names"][record["label"]]
    step = np.diff([_centre_of_mass(f) for f in got], axis=0).mean(0)
    dy, dx = md.STEPS[direction]
    along = step[0] * dy + step[1] * dx  # the labelled axis
    across = abs(step[0] * dx) + abs(step[1] * dy)
    # (a crop cutting the digit off at an edge moves its centre across too)
    assert along > 0.5 and along > 2 * across, (direction, step)
  # A static clip (one frame repeated): every output frame is the same crop.
  static = dict(record, frames=[record["frames"][0]] * 12)
  got = t.random_map(static, np.random.default_rng(5))["video"]
  assert np.ptp(got[0]) > 0
  for f in got[1:]:
    np.testing.assert_array_equal(f, got[0])


def test_bad_clip_records_are_counted_markers(clip_dir):
  _, out, _ = clip_dir
  record = records.read_all(str(out))[0]
  t = video_records.ClipTransform(frames=4, size=32, train=True)
  no_frames = t.random_map(dict(record, frames=[]), np.random.default_rng(0))
  assert bad_records.is_bad(no_frames)
  small = Image.new("RGB", (16, 16))
  buf = io.BytesIO()
  small.save(buf, "PNG")
  mixed = dict(record, frames=[buf.getvalue()] + record["frames"][1:])
  marker = video_records.ClipTransform(
      frames=12, size=32, train_strides=(1,), train=True).random_map(
          mixed, np.random.default_rng(0))
  assert bad_records.is_bad(marker) and "16x16" in str(marker)


# -- 4. the tasks on records ---------------------------------------------------------

def _config(name, path, **overrides):
  cfg = video_configs.get_config(name)
  with cfg.unlocked():
    apply_overrides(cfg, {"data.name": "records", "data.records.path": path,
                          "train.batch_size": 4, "eval_batch_size": 8,
                          **overrides})
  return cfg


def _params(task, seed):
  abstract = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  flat = {k: (1.0 if k.endswith("/scale") else 0.0)
          + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
          for k, v in export.flatten_params(abstract).items()}
  return jax.tree.map(jax.numpy.asarray, export.unflatten_params(flat))


def test_classify_on_records_multi_view_and_export(clip_dir, tmp_path):
  from florax import inference, serving  # pylint: disable=g-import-not-at-top
  _, out, _ = clip_dir
  task = tasks.build(_config("tiny_classify", str(out),
                             **{"data.eval_views": 2}), str(tmp_path / "w"))
  it = task.train_iterators(0, 1)[task_base.DEFAULT_KIND]
  batch = next(it)
  spec = task.batch_spec(4)
  assert {k: v.shape for k, v in batch.items()} == {
      k: v.shape for k, v in spec.items()}
  params = _params(task, 1)
  metrics = task.evaluate(params)
  clips = task.holdout()
  assert clips["video"].shape[1] == 2
  apply = jax.jit(lambda p, v: task.model.apply({"params": p}, v))
  logits = np.stack([np.asarray(apply(params, clips["video"][:, v]),
                                np.float64) for v in range(2)], 1)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = np.mean(probs.mean(1).argmax(-1) == clips["label"])
  assert metrics["eval/top1"] == pytest.approx(want)
  assert metrics["eval/loss"] == pytest.approx(-np.mean(np.log(
      probs.mean(1)[np.arange(len(probs)), clips["label"]])), rel=1e-5)
  assert metrics["eval/skipped"] == 0
  serving.write(str(tmp_path / "export"), task.config, params, None,
                task.serving(), step=1, platforms=("cpu",))
  model = inference.load(str(tmp_path / "export"), backend="exported",
                         max_batch=8)
  np.testing.assert_allclose(model.call("classify", video=clips["video"][:5,
                                                                        0]),
                             logits[:5, 0], atol=2e-5)


def test_retrieval_on_records_multi_view_and_export(clip_dir, tmp_path):
  from florax import inference, serving  # pylint: disable=g-import-not-at-top
  folders, _, _ = clip_dir
  meta = converters.convert_captions(str(folders / "captions.csv"),
                                     str(tmp_path / "r"), progress=False,
                                     holdout_fraction=0.3)
  assert meta["splits"]["validation"]["num_records"] > 5
  task = tasks.build(_config("tiny_retrieval", str(tmp_path / "r"),
                             **{"data.eval_views": 3}), str(tmp_path / "w"))
  batch = next(task.train_iterators(0, 1)[task_base.DEFAULT_KIND])
  assert set(batch) == {"video", "ids", "caption_label"}
  assert batch["ids"].shape == (4, task.config.data.max_len)
  params = _params(task, 2)
  metrics = task.evaluate(params)
  clips = task.holdout(task.text_tokenizer)
  encode_video, encode_text = map(jax.jit, export.encoders(task.model))
  views = np.stack([np.asarray(encode_video(params, clips["video"][:, v]))
                    for v in range(3)], 1)
  video_emb = views.mean(1)
  video_emb /= np.linalg.norm(video_emb, axis=-1, keepdims=True)
  captions, first, inverse = np.unique(np.asarray(clips["caption"]),
                                       return_index=True, return_inverse=True)
  caption_emb = np.asarray(encode_text(params, clips["ids"][first]))
  sim = caption_emb @ video_emb.T  # (captions, clips)
  hits = []
  for i, c in enumerate(inverse):  # text->video R@1, ties pessimistic
    best_right = sim[c][inverse == c].max()
    hits.append(np.sum(sim[c][inverse != c] >= best_right) < 1)
  assert metrics["eval/t2v_r1"] == pytest.approx(np.mean(hits))
  serving.write(str(tmp_path / "export"), task.config, params,
                task.serving_tokenizer(), task.serving(), step=1,
                platforms=("cpu",))
  model = inference.load(str(tmp_path / "export"), backend="exported",
                         max_batch=8)
  np.testing.assert_allclose(model.call("encode_video",
                                        video=clips["video"][:4, 1]),
                             views[:4, 1], atol=2e-5)
  np.testing.assert_allclose(model.call("encode_text",
                                        text=list(captions[:3])),
                             caption_emb[:3], atol=2e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"data.records.path": ""}, "data.records.path"),
    ({"data.eval_split": "test"}, "no split 'test'"),
    ({"data.eval_views": 0}, "data.eval_views"),
    ({"data.records.colour": 1}, "data.records.colour"),
    ({"data.train_strides": ()}, "data.train_strides"),
    ({"model.num_classes": 3}, "model.num_classes"),
])
def test_records_config_refusals(clip_dir, overrides, match, tmp_path):
  _, out, _ = clip_dir
  with pytest.raises(ValueError, match=match):
    tasks.build(_config("tiny_classify", str(out), **overrides),
                str(tmp_path))
