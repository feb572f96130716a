"""EVA masked image modeling against a frozen teacher (florax.tasks.eva_mim).

The teacher is the tiny Florence run of tests/trained_tiny.py (16 px, its
CoSwin's last stage a 2x2 grid of 128 channels); the student a 2-layer ViT.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import eva
from florax import config_io, export, restore, tasks
from florax.evaluate import checkpoint_eval
from florax.models import two_tower
from florax.parallel import mesh as mesh_lib
from florax.losses import masked_cosine
from florax.tasks import frozen_tower
from florax.train import init_from
from florax.train import trainer as trainer_lib
from tests import helpers, trained_tiny


def eva_config(**overrides):
  c = eva.get_config("tiny")
  with c.unlocked():
    c.teacher.path = trained_tiny.workdir()
    c.data.image_size = c.model.image.image_size = 16
    c.train.batch_size = 16
    c.train.steps = 3
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 3
    c.optimizer.warmup_steps = 1
    c.evals.linear_probe.enabled = False
    c.evals.linear_probe_100.enabled = False
    helpers.apply_overrides(c, overrides)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Three EVA steps on 8 devices (data 4 x fsdp 2); the trainer."""
  workdir = str(tmp_path_factory.mktemp("eva") / "run")
  t = trainer_lib.Trainer(tasks.build(
      eva_config(**{"mesh.axes.data": 4, "mesh.axes.fsdp": 2}), workdir))
  t.initial = jax.device_get(t.init_state()["params"])
  t.train()
  return t


# -- the loss ------------------------------------------------------------------


def _numpy_loss(pred, target, mask):
  cos = np.sum(pred * target, -1) / (np.linalg.norm(pred, axis=-1)
                                     * np.linalg.norm(target, axis=-1))
  return -cos[mask].mean()


def test_negative_cosine_on_masked_patches_matches_numpy():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 7, 5)).astype(np.float32)
  target = rng.normal(size=(3, 7, 5)).astype(np.float32)
  mask = rng.random((3, 7)) < 0.4
  loss, cos = masked_cosine.masked_negative_cosine(pred, target, mask)
  np.testing.assert_allclose(loss, _numpy_loss(pred, target, mask),
                             rtol=1e-6)
  np.testing.assert_allclose(cos, -loss)


def test_visible_patches_get_exactly_zero_gradient():
  rng = np.random.default_rng(1)
  pred = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 9)) < 0.4)
  grad_pred, grad_target = jax.grad(
      lambda p, t: masked_cosine.masked_negative_cosine(p, t, mask)[0],
      argnums=(0, 1))(pred, target)
  g = np.asarray(grad_pred)
  assert np.all(g[~np.asarray(mask)] == 0.0)
  assert np.all(np.abs(g[np.asarray(mask)]).sum(-1) > 0)
  assert np.all(np.asarray(grad_target) == 0.0)  # the teacher's side


def test_teacher_grid_is_resampled_to_the_student_grid():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  pooled = frozen_tower.resample_to_grid(x, 2)
  want = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_array_equal(pooled, want)
  up = np.asarray(frozen_tower.resample_to_grid(x, 8))
  for i in range(8):
    for j in range(8):
      np.testing.assert_array_equal(up[:, i, j], x[:, i // 2, j // 2])
  with pytest.raises(ValueError, match="multiples"):
    frozen_tower.resample_to_grid(x, 3)


# -- the teacher inside the step ----------------------------------------------


def test_teacher_features_are_the_florence_image_tower(trained):
  """The targets are the teacher's CoSwin last stage after its final norm,
  computed from the teacher's own checkpoint by the Florence model code."""
  task = trained.task
  teacher_cfg = config_io.load(trained_tiny.workdir())
  model = two_tower.from_config(teacher_cfg.model)
  flat, _ = init_from.read_source(trained_tiny.workdir())
  params = export.unflatten_params(flat)
  images = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)).astype(
      np.float32)
  _, aux = model.apply({"params": params}, images,
                       method=lambda m, x: m.image_encoder(x, True))
  want = np.asarray(aux["stage_features"][-1])
  mu = want.mean(-1, keepdims=True)
  var = want.var(-1, keepdims=True)
  norm = params["image_encoder"]["norm"]
  want = (want - mu) / np.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]
  got = task.targets(trained.frozen, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got),
                             want.reshape(3, 4, 128), rtol=1e-4, atol=1e-4)


def test_teacher_is_frozen_and_never_saved(trained):
  params = jax.device_get(trained.state["params"])
  assert sorted(params) == ["image_encoder", "mim_head"]
  assert params["image_encoder"]["mask_token"].shape == (1, 1, 64)
  # The student trained; the teacher is what the source holds, untouched.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       params, trained.initial)
  assert max(jax.tree.leaves(moved)) > 0
  flat, _ = init_from.read_source(trained_tiny.workdir())
  teacher_now = export.flatten_params(jax.device_get(trained.frozen))
  for k, v in teacher_now.items():
    np.testing.assert_array_equal(v, flat["image_encoder/" + k])
  # The optimizer state holds moments of the student's params only.
  n_params = len(jax.tree.leaves(params))
  mu = [s for s in jax.tree.leaves(
      trained.state["opt_state"],
      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
  assert len(mu) == 1 and len(jax.tree.leaves(mu[0].mu)) == n_params
  # The checkpoint holds the student only.
  spec = restore.checkpoint_params_spec(trained.workdir, 3)
  assert sorted(spec) == ["image_encoder", "mim_head"]
  record = json.load(open(os.path.join(trained.workdir, "frozen.json")))
  assert record["source"].startswith("teacher: checkpoint step 4 of ")


def test_resume_with_another_teacher_is_refused(trained):
  cfg = eva_config(**{"teacher.step": 2, "mesh.axes.data": 4,
                      "mesh.axes.fsdp": 2})
  other = trainer_lib.Trainer(tasks.build(cfg, trained.workdir))
  with pytest.raises(ValueError, match="frozen variables"):
    other.load_frozen()


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_compiled_step_counts_the_teacher_forward(tmp_path):
  """One device: the step's FLOPs >= the student's forward+backward with
  the targets given + the teacher's forward alone (each compiled apart)."""
  cfg = eva_config(**{"mesh.axes.data": 1})
  mesh = mesh_lib.make_mesh(dict(cfg.mesh.axes), jax.devices()[:1])
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "w"), mesh))
  task = t.task
  step = _flops(t.compile_step())
  batch = t.abstract_batch()
  images = jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32)
  teacher = _flops(jax.jit(task.targets).lower(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                   t.abstract_frozen), images).compile())
  target = jax.ShapeDtypeStruct((16, 4, 128), jnp.float32)

  def student_loss(params, batch, target):
    pred = task.model.apply({"params": params}, batch["image"],
                            batch["image_mask"])
    return masked_cosine.masked_negative_cosine(pred, target,
                                                batch["image_mask"])[0]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          t.abstract_state["params"])
  student = _flops(jax.jit(jax.grad(student_loss)).lower(
      abstract, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                 for k, v in batch.items()}, target).compile())
  assert teacher > 0.2 * student  # the teacher is no rounding error here
  assert step >= 0.98 * (student + teacher), (step, student, teacher)


def test_planner_shows_the_teacher_bytes():
  from launch import plan
  cfg = eva_config(**{"mesh.axes.data": 8})
  row = plan.plan_stage(cfg, 0)
  boxed = frozen_tower.FrozenImageTower(trained_tiny.workdir()).spec()
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(boxed)))
  assert row["num_frozen"] == n
  assert row["frozen"] == 4 * n  # fp32, replicated at stage 0
  assert "frozen" in plan.table([row])


def test_mim_learns_the_masked_features(trained):
  rows = [json.loads(l) for l in open(os.path.join(trained.workdir,
                                                   "metrics.jsonl"))
          if "train/masked_cosine" in l]
  assert len(rows) == 3 and all(np.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.parametrize("field,value,match", [
    ("teacher.path", "", "no teacher"),
    ("mim.mask_ratio", 1.0, "mask_ratio"),
    ("model.image.patch_size", 3, "patch size"),
    ("model.image.arch", "coswin", "ViT"),
    ("evals.linear_probe.type", "zeroshot", "image-only"),
])
def test_bad_config_is_refused_before_compiling(tmp_path, field, value,
                                                match):
  cfg = eva_config(**{field: value})
  if field == "evals.linear_probe.type":
    cfg.evals.linear_probe.enabled = True
  with pytest.raises((ValueError, TypeError), match=match):
    tasks.build(cfg, str(tmp_path / "w"))


def test_student_grid_must_fit_the_teacher_grid(tmp_path):
  # 16 px / patch 16: a 1x1 student grid pools the teacher's 2x2 map; a
  # patch of 16 at 48 px (3x3) against the teacher at 16 px (2x2) cannot.
  cfg = eva_config(**{"data.image_size": 48, "model.image.image_size": 48,
                      "model.image.patch_size": 16})
  with pytest.raises(ValueError, match="multiple of the other"):
    tasks.build(cfg, str(tmp_path / "w"))


def test_initial_params_are_the_start_of_a_run(trained, tmp_path):
  """launch.evaluate --initial evaluates what a run starts from: with
  init_from, the source's student; the head (not in the source) fresh."""
  cfg = eva_config(**{"mesh.axes.data": 4, "mesh.axes.fsdp": 2,
                      "init_from.path": trained.workdir,
                      "init_from.prefixes": (("image_encoder",
                                              "image_encoder"),)})
  params, _, _, _ = checkpoint_eval.initial_params(cfg, str(tmp_path / "w"))
  params = jax.device_get(params)
  want = jax.device_get(trained.state["params"])
  jax.tree.map(np.testing.assert_array_equal, params["image_encoder"],
               want["image_encoder"])
  jax.tree.map(np.testing.assert_array_equal, params["mim_head"],
               trained.initial["mim_head"])  # same seed, not loaded


def test_vit_teacher_from_an_export(tmp_path):
  """An image-only ViT export (what launch.import_weights writes for a CLIP
  or EVA tower) as the teacher: its features are the ViT's final patch
  tokens, its pixels re-normalised from the student's [-1, 1] to its own
  CLIP statistics, and its 32 px resolution reached by resizing."""
  from configs import imported
  from florax.data import preprocess
  from florax.models import vit
  image = dict(arch="vit", **vars(vit.config_for("tiny/8", 32)))
  model_cfg = dict(image=image, embed_dim=0, dtype="float32", num_classes=0)
  mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
  spec = preprocess.resize_center_crop_spec(32, 32, mean, std)
  config = imported.config(model_cfg, 32, None, spec)
  model = two_tower.from_config(config.model)
  params = model.init(jax.random.key(5), jnp.zeros((1, 32, 32, 3)))["params"]
  out = str(tmp_path / "vit_export")
  export.write_export(out, config, nn.unbox(params), None, step=0,
                      platforms=(), preprocess=spec)
  tower = frozen_tower.FrozenImageTower(out)
  assert (tower.arch, tower.grid, tower.width) == ("vit", 4, 64)
  assert tower.source() == f"export {os.path.abspath(out)}"
  tower.set_input_stats([0.5] * 3, [0.5] * 3)
  frozen = tower.load(jax.devices()[0])
  student_pixels = np.random.default_rng(3).uniform(
      -1, 1, (2, 16, 16, 3)).astype(np.float32)
  got = np.asarray(tower.patch_features(frozen, jnp.asarray(student_pixels)))
  # Reference: [0, 1] pixels -> the teacher's normalisation -> resize.
  raw = student_pixels * 0.5 + 0.5
  x = (raw - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  x = jax.image.resize(x, (2, 32, 32, 3), "bilinear")
  _, aux = vit.ViT(vit.config_for("tiny/8", 32)).apply(
      {"params": nn.unbox(params)["image_encoder"]}, x)
  want = np.asarray(aux["tokens"])[:, 1:].reshape(2, 4, 4, 64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
