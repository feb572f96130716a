"""BEiT v2's VQ-KD tokenizer (florax.models.vqkd, florax.tasks.vqkd) and the
frozen tokenizer other tasks read (florax.tasks.vq_tokenizer).

The pure pieces (cosine nearest code, the loss, straight-through, usage
metrics, the dead-code pull) are checked against numpy transcriptions; the
task trains two steps against a random ViT teacher export
(16 px, a 2x2 grid, CLIP pixel statistics: the teacher's pixels are
re-normalised) and its workdir is then read back as a frozen tokenizer.
"""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imported
from configs import vqkd as vqkd_configs
from florax import export, tasks
from florax.data import preprocess
from florax.models import two_tower, vit
from florax.models import vqkd
from florax.parallel import mesh as mesh_lib
from florax.tasks import vq_tokenizer
from florax.train import init_from
from florax.train import trainer as trainer_lib
from tests import helpers

CLIP_MEAN, CLIP_STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- pure functions against numpy ----------------------------------------------


def test_nearest_code_is_the_cosine_argmax():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 8)).astype(np.float32)
  # Codes of very different norms: the cosine, not the dot product, decides.
  codebook = (rng.normal(size=(16, 8))
              * rng.uniform(0.01, 10, (16, 1))).astype(np.float32)
  want = np.argmax(_unit(h) @ _unit(codebook).T, axis=-1)
  got = np.asarray(vqkd.nearest_code(jnp.asarray(h), jnp.asarray(codebook)))
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32
  # ... which differs from the raw dot product's choice somewhere here.
  assert np.any(np.argmax(h @ codebook.T, -1) != want)


def test_usage_metrics_match_numpy():
  rng = np.random.default_rng(1)
  indices = rng.choice([0, 3, 4, 9, 11], size=(4, 6), p=[.4, .3, .1, .1, .1])
  counts = np.bincount(indices.reshape(-1), minlength=12).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  hist = np.asarray(vqkd.code_histogram(jnp.asarray(indices, jnp.int32), 12))
  np.testing.assert_array_equal(hist, counts)
  got = vqkd.usage_metrics(jnp.asarray(hist))
  np.testing.assert_allclose(got["perplexity"], np.exp(-np.sum(p * np.log(p))),
                             rtol=1e-5)
  assert float(got["used_codes"]) == len(np.unique(indices))
  # All K codes equally used: perplexity K.
  flat = vqkd.usage_metrics(jnp.ones((12,)))
  np.testing.assert_allclose(flat["perplexity"], 12.0, rtol=1e-5)


def _batch(seed=2, b=2, n=6, d=4, k=10, c=5):
  rng = np.random.default_rng(seed)
  h = _unit(rng.normal(size=(b, n, d))).astype(np.float32)
  codebook = (rng.normal(size=(k, d)) * 0.3).astype(np.float32)
  rec = rng.normal(size=(b, n, c)).astype(np.float32)
  target = rng.normal(size=(b, n, c)).astype(np.float32)
  return h, codebook, rec, target


def _numpy_loss(rec, target, h, codebook, w):
  codes = _unit(codebook)
  idx = np.argmax(h @ codes.T, -1)
  z = codes[idx]
  cos = np.sum(_unit(rec) * _unit(target), -1).mean()
  sq = np.sum((h - z) ** 2, -1).mean()
  flat = h.reshape(-1, h.shape[-1])
  picks = np.argmax(codes @ flat.T, -1)  # each code's most similar token
  used = np.bincount(idx.reshape(-1), minlength=len(codebook)) > 0
  dead = sum(np.sum((codes[k] - flat[picks[k]]) ** 2)
             for k in range(len(codebook)) if not used[k]) / len(codebook)
  return (-cos + w.codebook * sq + w.commitment * sq + w.dead_code * dead,
          cos, sq, dead, used.sum())


@functools.partial(jax.jit, static_argnums=4)
def _jax_loss(rec, target, h, codebook, w):
  h, codebook = jnp.asarray(h), jnp.asarray(codebook)
  codes = vqkd.l2_normalize(codebook)
  idx = vqkd.nearest_code(h, codebook)
  z = jnp.take(codes, idx, axis=0)
  picks = vqkd.dead_code_targets(h.reshape(-1, h.shape[-1]), codebook)
  return vqkd.vqkd_loss(jnp.asarray(rec), jnp.asarray(target), h, z, idx,
                        codebook, picks, w)


def test_loss_matches_numpy():
  h, codebook, rec, target = _batch()
  w = vqkd.LossWeights(codebook=0.5, commitment=0.25, dead_code=2.0)
  want, cos, sq, dead, used = _numpy_loss(rec, target, h, codebook, w)
  assert 0 < used < len(codebook) and dead > 0  # every term is exercised
  loss, m = _jax_loss(rec, target, h, codebook, w)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["cosine"], cos, rtol=1e-5)
  np.testing.assert_allclose(m["codebook_loss"], sq, rtol=1e-5)
  np.testing.assert_allclose(m["commitment"], sq, rtol=1e-5)
  np.testing.assert_allclose(m["dead_code_loss"], dead, rtol=1e-5)
  assert float(m["codebook/used_codes"]) == used


def test_straight_through_passes_the_decoder_gradient_to_the_encoder():
  """d L(decoder(h + sg[z - h])) / dh == dL(decoder(z)) / dz at z, the
  forward value is L(decoder(z)), and the codebook gets none of it."""
  h, codebook, _, target = _batch(3)
  w_dec = np.random.default_rng(4).normal(size=(4, 5)).astype(np.float32)
  codes = _unit(codebook)
  z = codes[np.argmax(h @ codes.T, -1)]

  def rec_loss(x):
    return -jnp.mean(jnp.sum(vqkd.l2_normalize(jnp.tanh(x @ w_dec))
                             * _unit(target), -1))
  value, g_h = jax.jit(jax.value_and_grad(
      lambda hh: rec_loss(vqkd.straight_through(hh, jnp.asarray(z)))))(
          jnp.asarray(h))
  g_z = jax.jit(jax.grad(rec_loss))(jnp.asarray(z))
  np.testing.assert_allclose(value, rec_loss(jnp.asarray(z)), rtol=1e-6)
  np.testing.assert_allclose(g_h, g_z, rtol=1e-6, atol=1e-8)
  assert np.abs(np.asarray(g_h)).max() > 1e-3
  # Through the real loss: the codebook's gradient from reconstruction is 0.
  zero = vqkd.LossWeights(codebook=0.0, commitment=0.0, dead_code=0.0)

  def full(cb, hh):
    cb_codes = vqkd.l2_normalize(cb)
    idx = vqkd.nearest_code(hh, cb)
    zz = jnp.take(cb_codes, idx, axis=0)
    rec = jnp.tanh(vqkd.straight_through(hh, zz) @ w_dec)
    return vqkd.vqkd_loss(rec, jnp.asarray(target), hh, zz, idx, cb,
                          jnp.zeros((cb.shape[0],), jnp.int32), zero)[0]
  g_cb, g_hh = jax.jit(jax.grad(full, argnums=(0, 1)))(
      jnp.asarray(codebook), jnp.asarray(h))
  assert np.all(np.asarray(g_cb) == 0.0)
  np.testing.assert_allclose(g_hh, g_z, rtol=1e-5, atol=1e-7)
  # The commitment term adds 2 w (h - z) / tokens to the encoder's gradient.
  w = vqkd.LossWeights(codebook=0.0, commitment=0.5, dead_code=0.0)
  g_commit = jax.jit(jax.grad(lambda hh: vqkd.vqkd_loss(
      jnp.zeros((2, 6, 5)) + 1.0, jnp.asarray(target), hh, jnp.asarray(z),
      jnp.zeros((2, 6), jnp.int32), jnp.asarray(codebook),
      jnp.zeros((10,), jnp.int32), w)[0]))(jnp.asarray(h))
  np.testing.assert_allclose(g_commit, 2 * 0.5 * (h - z) / 12, rtol=1e-5,
                             atol=1e-7)


def test_dead_code_term_moves_unused_codes_only():
  h, codebook, _, _ = _batch(5)
  hh, cb = jnp.asarray(h), jnp.asarray(codebook)
  idx = vqkd.nearest_code(hh, cb)
  counts = vqkd.code_histogram(idx, cb.shape[0])
  flat = hh.reshape(-1, 4)
  picks = vqkd.dead_code_targets(flat, cb)
  np.testing.assert_array_equal(
      picks, np.argmax(_unit(codebook) @ h.reshape(-1, 4).T, -1))
  g_cb, g_h = jax.jit(jax.grad(
      lambda c, x: vqkd.dead_code_loss(c, counts, x.reshape(-1, 4), picks),
      argnums=(0, 1)))(cb, hh)
  used = np.asarray(counts) > 0
  g_cb = np.asarray(g_cb)
  assert used.any() and (~used).any()
  assert np.all(g_cb[used] == 0.0)          # used codes: exactly untouched
  assert np.all(np.abs(g_cb[~used]).sum(-1) > 0)
  assert np.all(np.asarray(g_h) == 0.0)     # the encoder: untouched
  # A gradient step brings each dead code closer to its token.
  moved = codebook - 0.5 * g_cb
  before = np.sum(_unit(codebook) * h.reshape(-1, 4)[np.asarray(picks)], -1)
  after = np.sum(_unit(moved) * h.reshape(-1, 4)[np.asarray(picks)], -1)
  assert np.all(after[~used] > before[~used])
  np.testing.assert_array_equal(after[used], before[used])


# -- the task ------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A random image-only ViT export (16 px, patch 8: a 2x2 grid of 64
  channels, one block) with CLIP pixel statistics. Its params are drawn
  with numpy (compiling jax's initialisers costs more than the test)."""
  image = dict(arch="vit", **vars(vit.config_for("tiny/8", 16)))
  image["depth"] = 1
  model_cfg = dict(image=image, embed_dim=0, dtype="float32", num_classes=0)
  spec = preprocess.resize_center_crop_spec(16, 16, CLIP_MEAN, CLIP_STD)
  config = imported.config(model_cfg, 16, None, spec)
  shapes = export.flatten_params(nn.unbox(jax.eval_shape(
      two_tower.from_config(config.model).init, jax.random.key(0),
      jnp.zeros((1, 16, 16, 3)))["params"]))
  rng = np.random.default_rng(5)
  params = export.unflatten_params({
      k: (np.ones(v.shape, np.float32) if k.endswith("scale") else
          rng.normal(0, 0.1, v.shape).astype(np.float32))
      for k, v in shapes.items()})
  out = str(tmp_path_factory.mktemp("teacher") / "vit_export")
  export.write_export(out, config, params, None, step=0, platforms=(),
                      preprocess=spec)
  return out


def vqkd_config(teacher_path, **overrides):
  c = vqkd_configs.get_config("tiny")
  with c.unlocked():
    c.teacher.path = teacher_path
    c.data.image_size = c.model.image.image_size = 16
    c.model.image.depth = 1
    c.model.codebook_size = 16
    c.model.code_dim = 8
    c.model.decoder.update(dict(depth=1, width=32, num_heads=2, mlp_dim=64))
    c.mesh.axes.data = 1
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.evals.codebook.data.max_examples = 24
    c.eval_batch_size = 8
    helpers.apply_overrides(c, overrides)
  return c


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
  """Two VQ-KD steps on one device (compiling for more costs more than
  this checks), and the evaluation of the result."""
  cfg = vqkd_config(teacher)
  mesh = mesh_lib.make_mesh(dict(cfg.mesh.axes), jax.devices()[:1])
  workdir = str(tmp_path_factory.mktemp("vqkd") / "run")
  t = trainer_lib.Trainer(tasks.build(cfg, workdir, mesh))
  t.train()
  t.final = t.evaluate(t.state, t.frozen)
  return t


def test_training_logs_codebook_usage(trained):
  rows = [json.loads(l) for l in open(os.path.join(trained.workdir,
                                                   "metrics.jsonl"))]
  train = [r for r in rows if "train/codebook/used_codes" in r]
  assert len(train) == 2
  for r in train:
    assert 1 <= r["train/codebook/used_codes"] <= 16
    assert 1 <= r["train/codebook/perplexity"] <= r[
        "train/codebook/used_codes"] + 1e-4
    assert np.isfinite(r["train/loss"]) and -1 <= r["train/cosine"] <= 1
  params = jax.device_get(trained.state["params"])
  assert sorted(params) == ["codebook", "decode_head", "decoder",
                            "encode_head", "encoder"]
  assert params["codebook"].shape == (16, 8)
  record = json.load(open(os.path.join(trained.workdir, "frozen.json")))
  assert record["source"].startswith("teacher: export ")


def test_held_out_usage_is_the_histogram_of_the_codes(trained):
  task = trained.task
  final = trained.final
  images = task._eval_set(task.config.evals.codebook.data).images
  assert len(images) == 24
  params = trained.state["params"]
  codes = task.code_indices(params, images)
  assert codes.shape == (24, 4)
  counts = np.bincount(codes.reshape(-1), minlength=16)
  p = counts[counts > 0] / counts.sum()
  assert final["eval/codebook_used_codes"] == (counts > 0).sum()
  np.testing.assert_allclose(final["eval/codebook_used_fraction"],
                             (counts > 0).sum() / 16)
  np.testing.assert_allclose(final["eval/codebook_perplexity"],
                             np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
  assert -1 <= final["eval/codebook_cosine"] <= 1


def test_frozen_tokenizer_gives_the_runs_codes(trained):
  tok = vq_tokenizer.FrozenVQTokenizer(trained.workdir)
  assert (tok.num_codes, tok.grid, tok.image_size, tok.step) == (16, 2, 16, 2)
  assert tok.source().startswith("vqkd checkpoint step 2 of ")
  assert sorted(nn.unbox(tok.spec())) == ["codebook", "encode_head",
                                          "encoder"]  # no decoder
  # The consumer normalises with CLIP statistics; the tokenizer was trained
  # on [-1, 1] pixels.
  tok.set_input_stats(CLIP_MEAN, CLIP_STD)
  params = tok.load(jax.devices()[0])
  raw = np.random.default_rng(6).uniform(0, 1, (3, 16, 16, 3)).astype(
      np.float32)
  consumer = (raw - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(
      CLIP_STD, np.float32)
  got = np.asarray(jax.jit(tok.codes)(params, jnp.asarray(consumer)))
  assert got.shape == (3, 4) and got.dtype == np.int32
  # Reference: the run's checkpoint through the model's encode on [-1, 1].
  flat, _ = init_from.read_source(trained.workdir)
  full = export.unflatten_params(flat)
  model = vqkd.VQKD(trained.task.model_config)
  _, want = model.apply({"params": full}, raw * 2 - 1, method=model.encode)
  np.testing.assert_array_equal(got, np.asarray(want).reshape(3, 4))
  with pytest.raises(ValueError, match="4x4 .* 2x2 grid"):
    tok.check_grid(4, "model.image")
  tok.check_grid(2)


def test_frozen_tokenizer_refuses_other_runs(trained, teacher, tmp_path):
  with pytest.raises(ValueError, match="not a VQ-KD tokenizer run"):
    vq_tokenizer.FrozenVQTokenizer(teacher)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    vq_tokenizer.FrozenVQTokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="step 7 is not a checkpoint"):
    vq_tokenizer.FrozenVQTokenizer(trained.workdir, step=7)
  # A config whose code_dim disagrees with the checkpoint's codebook.
  other = str(tmp_path / "edited")
  shutil.copytree(trained.workdir, other)
  cfg = json.load(open(os.path.join(other, "config.json")))
  cfg["model"]["code_dim"] = 12
  json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"codebook has shape \(16, 8\)"):
    vq_tokenizer.FrozenVQTokenizer(other).load(jax.devices()[0])


@pytest.mark.parametrize("field,value,match", [
    ("model.codebook_size", 0, "codebook_size must be a positive"),
    ("model.code_dim", 0, "code_dim must be a positive"),
    ("model.decoder.num_heads", 3, "decoder_width 32 is not divisible"),
    ("vq.dead_code_weight", -1.0, "dead_code_weight"),
    ("teacher.path", "", "no teacher"),
    ("model.image.patch_size", 16, "multiple of the other"),
    ("model.image.image_size", 32, "image_size"),
    ("evals.codebook.type", "linear_probe", "codebook_usage"),
])
def test_bad_config_is_refused_before_compiling(teacher, tmp_path, field,
                                                value, match):
  # 16 px / patch 16: a 1x1 tokenizer grid pools the teacher's 2x2 map, so
  # the grid case uses a 48 px tokenizer (3x3) against the 2x2 teacher.
  cfg = vqkd_config(teacher, **{field: value})
  if field == "model.image.patch_size":
    cfg = vqkd_config(teacher, **{"data.image_size": 48,
                                  "model.image.image_size": 48, field: value})
  mesh = mesh_lib.make_mesh(dict(cfg.mesh.axes), jax.devices()[:1])
  with pytest.raises((ValueError, TypeError), match=match):
    tasks.build(cfg, str(tmp_path / "w"), mesh)


def test_beit3_mdm_steps_take_their_mim_targets_from_this_tokenizer(
    trained, tmp_path):
  """BEiT-3's masked data modeling through the trainer, its MIM targets
  coming from this VQ-KD run as a frozen tokenizer (the digits demo,
  shortened: 2 steps of a 2-layer Multiway at 16 px, one device)."""
  from configs import beit3 as beit3_configs  # pylint: disable=g-import-not-at-top
  from florax.tasks import beit3_mdm  # pylint: disable=g-import-not-at-top
  cfg = beit3_configs.get_config("tiny")
  with cfg.unlocked():
    cfg.tokenizer.path = trained.workdir
    cfg.data.image_size = cfg.model.multiway.image_size = 16
    cfg.mdm.min_block = 1
    cfg.data.composition.update(dict(image=8, text=16, pair=8))
    cfg.model.multiway.update(dict(depth=2, width=32, mlp_dim=64))
    cfg.mesh.axes.data = 1
    cfg.train.steps = 2
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 2
    cfg.optimizer.warmup_steps = 1
  mesh = mesh_lib.make_mesh(dict(cfg.mesh.axes), jax.devices()[:1])
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path), mesh))
  t.train()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  last = [r for r in rows if "train/loss" in r][-1]
  assert last["step"] == 2 and np.isfinite(last["train/loss"])
  for part in beit3_mdm.PARTS:
    assert 0 <= last[f"train/{part}_accuracy"] <= 1
    assert last[f"train/{part}_masked"] > 0
  with open(tmp_path / "frozen.json") as f:
    assert trained.workdir in json.load(f)["source"]
  # The MIM head predicts this tokenizer's 16 codes.
  head = jax.device_get(t.state["params"])["mim_head"]["kernel"]
  assert np.shape(head)[-1] == 16
