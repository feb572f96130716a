"""Video tasks (florax/tasks/video.py) and moving-digit clips
(florax/data/moving_digits.py).

1. Data: the stream is a function of the seed (resume continues exactly,
   another seed differs); every clip's digit really moves in its labelled
   direction (the centre of mass of its bright pixels, frame by frame);
   the temporal sampling (random stride/start in training, centred at
   eval_stride in evaluation); captions name the digit and the direction.
2. `adapt_init_source` on a UniCL-shaped 2-D param tree gives exactly the
   video tasks' init names and shapes (the text tower etc. unchanged), and
   then a static clip gives the 2-D tower's pooled feature (the inflation
   property of florax/models/video_coswin.py); the trainer's init_from
   calls it.
3. The text<->video recall on a hand-made similarity matrix with duplicate
   captions equals the hand-counted R@k.
4. The classification loss equals numpy's label-smoothed cross-entropy.
5. Config refusals name the field; every preset validates.

Params are drawn in numpy from jax.eval_shape shapes (no init compiles).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import florence
from configs import video_coswin as video_configs
from florax import export, tasks
from florax.data import digits
from florax.data import moving_digits as md
from florax.data import tokenizer as tok_lib
from florax.models import coswin, two_tower
from florax.models import video_coswin as vc
from florax.tasks import base as task_base
from florax.tasks import video
from florax.train import trainer as trainer_lib
from tests.helpers import apply_overrides

SPEC = md.ClipSpec.from_config(video_configs.get_config("tiny_classify").data)


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_tokenizer(digits.all_descriptions(), 160)


def _stream(seed, tokenizer=None, batch=4):
  return md.moving_digits_dataset(SPEC, batch_size=batch, seed=seed,
                                  tokenizer=tokenizer, max_len=16)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# -- 1. data -------------------------------------------------------------------

def test_stream_is_deterministic_and_resumes_exactly(tok):
  it = iter(_stream(0, tok))
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  rest = [next(it) for _ in range(3)]
  again = iter(_stream(0, tok))
  for want in first:
    _same(next(again), want)
  resumed = iter(_stream(0, tok))
  resumed.set_state(state)
  for want in rest:
    _same(next(resumed), want)
  other = next(iter(_stream(1, tok)))
  assert not np.array_equal(other["video"], first[0]["video"])
  b = first[0]
  assert b["video"].shape == (4, 4, 32, 32, 3) and b["video"].dtype == np.float32
  assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0
  assert b["ids"].shape == (4, 16)


def _centres(video):
  """(frames, 2) centre of mass (y, x) of the bright pixels of each frame,
  from the pixels alone."""
  w = (video[..., 0] + 1.0)  # background is exactly -1 -> weight 0
  ys, xs = np.mgrid[:video.shape[1], :video.shape[2]]
  total = w.sum(axis=(1, 2))
  assert (total > 0).all()
  return np.stack([(w * ys).sum((1, 2)) / total,
                   (w * xs).sum((1, 2)) / total], axis=1)


def _check_moves(video, direction):
  c = _centres(video)
  dy, dx = np.diff(c, axis=0).T
  along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx),
                   "down": (dy, dx)}[md.DIRECTIONS[direction]]
  # Every step moves >= 1 px the labelled way and not at all across it.
  assert (along >= 1.0 - 1e-4).all(), (md.DIRECTIONS[direction], c)
  np.testing.assert_allclose(across, 0.0, atol=1e-4)


def test_clips_move_in_their_labelled_direction():
  it = iter(_stream(3, batch=16))
  labels = []
  for _ in range(4):
    b = next(it)
    for video_, label in zip(b["video"], b["label"]):
      _check_moves(video_, int(label))
    labels.extend(b["label"].tolist())
  assert set(labels) == set(range(len(md.DIRECTIONS)))
  held = md.holdout_clips(SPEC)
  for video_, label in zip(held["video"][:40], held["label"][:40]):
    _check_moves(video_, int(label))
  assert np.bincount(held["label"]).min() >= len(held["label"]) // 4


def test_temporal_sampling():
  # Evaluation: the centred clip at eval_stride (span 10 of 12 -> start 1).
  np.testing.assert_array_equal(md.frame_times(SPEC, None), [1, 4, 7, 10])
  seen = set()
  for i in range(200):
    t = md.frame_times(SPEC, np.random.default_rng(i))
    stride = t[1] - t[0]
    assert stride in SPEC.train_strides
    np.testing.assert_array_equal(np.diff(t), stride)
    assert t[0] >= 0 and t[-1] < SPEC.render_frames
    seen.add((int(t[0]), int(stride)))
  # every start of both strides occurs: 12 - 7 + 1 = 6 and 12 - 10 + 1 = 3
  assert seen == {(s, 2) for s in range(6)} | {(s, 3) for s in range(3)}


def test_captions_name_digit_and_direction(tok):
  b = next(iter(_stream(5, tok, batch=16)))
  for ids, digit, label, key in zip(b["ids"], b["digit"], b["label"],
                                    b["caption_label"]):
    text = tok.decode(ids)
    word, num = digits.CLASS_WORDS[digit], str(digit)
    assert word in text.split() or num in text.split(), text
    assert text.endswith(f"moving {md.DIRECTIONS[label]}"), text
    assert key == md.caption_label(int(digit), int(label))
  held = md.holdout_clips(SPEC, tokenizer=tok, max_len=16)
  _, targets = digits.load_split("holdout")
  np.testing.assert_array_equal(held["digit"], targets)
  for cap, digit, label, ids in zip(held["caption"], held["digit"],
                                    held["label"], held["ids"]):
    assert cap == f"a {digits.CLASS_WORDS[digit]} moving " \
                  f"{md.DIRECTIONS[label]}"
    assert tok.decode(ids) == cap
  assert len(set(held["caption"])) == 40  # 10 digits x 4 directions


# -- 2. 2-D -> video seeding ---------------------------------------------------

def _config(name, **overrides):
  cfg = video_configs.get_config(name)
  with cfg.unlocked():
    apply_overrides(cfg, overrides)
  return cfg


def _random_flat(abstract, seed):
  """numpy values for an abstract tree: N(0, 0.1^2), LayerNorm scales
  1 + N(0, 0.1^2), relative position biases N(0, 1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, leaf in export.flatten_params(nn.unbox(abstract)).items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name.endswith("relative_position_bias"):
      out[name] = noise
    else:
      out[name] = (1.0 if name.endswith("/scale") else 0.0) + 0.1 * noise
  return out


@pytest.fixture(scope="module")
def unicl_source():
  """A flat UniCL-shaped 2-D checkpoint (configs/florence.py:tiny's)."""
  cfg = florence.get_config("tiny")
  model = two_tower.from_config(cfg.model)
  abstract = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, cfg.data.max_len), jnp.int32))["params"]
  return _random_flat(abstract, 0)


def _task(cfg, tmp_path):
  return tasks.build(cfg, str(tmp_path))


def _shapes(task):
  abstract = jax.eval_shape(task.init, jax.random.key(0))
  return {k: tuple(v.shape) for k, v in
          export.flatten_params(nn.unbox(abstract)).items()}


def test_adapt_init_source_gives_the_video_init_shapes(unicl_source,
                                                       tmp_path):
  retrieval = _task(_config("tiny_retrieval"), tmp_path / "r")
  adapted = retrieval.adapt_init_source(dict(unicl_source))
  want = _shapes(retrieval)
  assert {k: tuple(v.shape) for k, v in adapted.items()} == want
  for name, value in unicl_source.items():  # the rest passes unchanged
    if not name.startswith("image_encoder/"):
      assert adapted[name] is value
  # The 3-D stem kernel is the 2-D one over time / kt.
  k2 = unicl_source["image_encoder/stem/conv/kernel"]
  k3 = adapted["image_encoder/stem/conv/kernel"]
  np.testing.assert_allclose(k3, np.broadcast_to(k2, k3.shape) / k3.shape[0])
  classify = _task(_config("tiny_classify"), tmp_path / "c")
  want = _shapes(classify)
  got = classify.adapt_init_source(dict(unicl_source))
  assert {k for k in want if not k.startswith("head/")} == {
      k for k in got if k.startswith("image_encoder/")}
  for k in want:
    if k.startswith("image_encoder/"):
      assert tuple(got[k].shape) == want[k], k
  # A 3-D tower (a video run's) and a source without a tower pass as is.
  assert classify.adapt_init_source(adapted) is adapted
  text_only = {k: v for k, v in unicl_source.items()
               if k.startswith("text_encoder/")}
  assert classify.adapt_init_source(text_only) is text_only
  # The base task leaves every source alone.
  assert task_base.Task.adapt_init_source(classify, text_only) is text_only


def test_static_clip_gives_the_2d_pooled_feature(unicl_source, tmp_path):
  task = _task(_config("tiny_classify"), tmp_path)
  adapted = task.adapt_init_source(dict(unicl_source))
  tower3 = export.unflatten_params(
      {k[len("image_encoder/"):]: jnp.asarray(v) for k, v in adapted.items()
       if k.startswith("image_encoder/")})
  tower2 = export.unflatten_params(
      {k[len("image_encoder/"):]: jnp.asarray(v)
       for k, v in unicl_source.items() if k.startswith("image_encoder/")})
  cfg3 = task.video_config
  cfg2 = coswin.CoSwinConfig(**{f.name: getattr(cfg3, f.name)
                                for f in dataclasses.fields(
                                    coswin.CoSwinConfig)})
  frames = jnp.asarray(np.random.default_rng(1).uniform(
      -1, 1, (2, 32, 32, 3)), jnp.float32)

  @jax.jit
  def both(p3, p2, images):
    static = jnp.repeat(images[:, None], SPEC.frames, axis=1)
    return (vc.VideoCoSwin(cfg3).apply({"params": p3}, static)[0],
            coswin.CoSwin(cfg2).apply({"params": p2}, images)[0])
  pooled3, pooled2 = both(tower3, tower2, frames)
  np.testing.assert_allclose(pooled3, pooled2, atol=1e-5)


def test_trainer_init_from_calls_the_hook(monkeypatch):
  seen = {}

  class FakeTask:
    def adapt_init_source(self, source):
      seen["source"] = source
      return {"w": source["w"] * 2}

  monkeypatch.setattr(trainer_lib.init_from_lib, "read_source",
                      lambda path, step: ({"w": np.ones(2, np.float32)},
                                          "fake"))
  def load(params, source, prefixes):
    seen["loaded"] = source
    return params, {"loaded": ["w"], "fresh": [], "skipped": [],
                    "resized": []}
  monkeypatch.setattr(trainer_lib.init_from_lib, "load_matching", load)
  trainer = trainer_lib.Trainer.__new__(trainer_lib.Trainer)
  trainer.config = ml_collections.ConfigDict(
      {"init_from": {"path": "/somewhere", "step": -1, "prefixes": ()}})
  trainer.task = FakeTask()
  trainer.ema_decay = 0.0
  trainer._init_from({"params": {}})  # pylint: disable=protected-access
  np.testing.assert_array_equal(seen["loaded"]["w"], [2.0, 2.0])


# -- 3. retrieval metric ---------------------------------------------------------

def test_text_video_recall_with_duplicate_captions():
  # 5 clips with captions A B A C B (distinct captions A=0, B=1, C=2).
  clip_caption = np.array([0, 1, 0, 2, 1])
  sims = np.array([  # caption x clip
      [0.90, 0.10, 0.20, 0.95, 0.00],   # A: clip 3 (C) beats both A clips
      [0.10, 0.50, 0.30, 0.20, 0.80],   # B: clip 4 first -> hit
      [0.30, 0.30, 0.30, 0.30, 0.30],   # C: ties, pessimistic -> rank 4
  ], np.float32)
  out = video.text_video_recall(np.eye(5, dtype=np.float32), sims,
                                clip_caption, ks=(1, 2, 3, 5))
  # text->video, one query per clip (A B A C B): ranks 1 0 1 4 0. Clip 2's
  # caption scores its own clip 0.2 but clip 0 (also "A") counts as a hit.
  assert out["eval/t2v_r1"] == pytest.approx(2 / 5)
  assert out["eval/t2v_r2"] == pytest.approx(4 / 5)
  assert out["eval/t2v_r3"] == pytest.approx(4 / 5)
  assert out["eval/t2v_r5"] == pytest.approx(1.0)
  # video->text against the 3 distinct captions: ranks 0 0 2 1 0.
  assert out["eval/v2t_r1"] == pytest.approx(3 / 5)
  assert out["eval/v2t_r2"] == pytest.approx(4 / 5)
  assert out["eval/v2t_r3"] == pytest.approx(1.0)


# -- 4. classification loss --------------------------------------------------------

def test_classification_loss_is_numpy_cross_entropy(tmp_path):
  task = _task(_config("tiny_classify", **{"finetune.label_smoothing": 0.2}),
               tmp_path)
  params = _random_flat(jax.eval_shape(task.init, jax.random.key(0)), 2)
  params = jax.tree.map(jnp.asarray, export.unflatten_params(params))
  batch = next(iter(_stream(7, batch=4)))
  batch = {"video": jnp.asarray(batch["video"]),
           "label": jnp.asarray(batch["label"])}

  @jax.jit
  def run(p, b):
    loss, metrics = task.loss(p, b, jax.random.key(0))
    return loss, metrics, task.model.apply({"params": p}, b["video"])
  loss, metrics, logits = run(params, batch)
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(batch["label"])
  logp = logits - logits.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  k, s = 4, 0.2
  target = np.full((4, k), s / k)
  target[np.arange(4), labels] += 1 - s
  assert float(loss) == pytest.approx(-(target * logp).sum(1).mean(),
                                      rel=1e-5)
  assert float(metrics["accuracy"]) == pytest.approx(
      np.mean(logits.argmax(1) == labels))
  assert np.ptp(logits) > 0.1  # a head that actually separates the classes


# -- 5. config -----------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,match", [
    ("tiny_classify", {"data.name": "digits"}, "data.name"),
    ("tiny_classify", {"data.frames": 3}, "frames=3"),
    ("tiny_classify", {"data.digit_size": 30}, "data.digit_size"),
    ("tiny_classify", {"data.eval_stride": 5}, "data.eval_stride"),
    ("tiny_classify", {"data.train_strides": (9,)}, "data.train_strides"),
    ("tiny_classify", {"model.num_classes": 3}, "model.num_classes"),
    ("tiny_classify", {"finetune.label_smoothing": 1.0},
     "finetune.label_smoothing"),
    ("tiny_classify", {"model.video.window_sizes": [[2, 4, 4]]},
     "window_sizes"),
    ("tiny_classify", {"model.video.temporal_padding": "reflect"},
     "temporal_padding"),
    ("tiny_retrieval", {"model.embed_dim": 0}, "model.embed_dim"),
    ("tiny_retrieval", {"data.max_len": 8}, "data.max_len=8 cuts"),
    ("tiny_retrieval", {"model.text.vocab_size": 100}, "vocab_size"),
    ("tiny_retrieval", {"contrastive.chunk_size": 4}, "chunk_size"),
])
def test_config_refusals(name, overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    _task(_config(name, **overrides), tmp_path)


def test_unknown_video_field_is_refused(tmp_path):
  cfg = video_configs.get_config("tiny_classify")
  with cfg.unlocked():
    cfg.model.video.frames_per_token = 2
  with pytest.raises(ValueError, match="model.video.frames_per_token"):
    _task(cfg, tmp_path)
  with pytest.raises(ValueError, match="unknown video_coswin preset"):
    video_configs.get_config("huge")


@pytest.mark.parametrize("name", ["tiny_classify", "tiny_retrieval",
                                  "b_classify", "b_retrieval"])
def test_presets_validate(name, tmp_path):
  task = _task(video_configs.get_config(name), tmp_path)
  assert isinstance(task, (video.VideoClassifyTask, video.VideoRetrievalTask))
