"""Image-classification fine-tuning (florax/tasks/classify.py), the weight
EMA (florax/train/ema.py) and frozen params (optimizer.freeze).

1. Mixup/CutMix: `apply_mix` for given draws equals a numpy transcription of
   timm's Mixup (mode='batch', timm 1.0's rand_bbox) fed the same draws;
   with timm installed, also timm's own Mixup with its np.random calls
   answered by those draws. `draw_mix`'s draws follow timm's distributions.
2. Soft targets are the smoothing formula; the loss the trainer logged is
   numpy's soft-target cross-entropy of the logits of the numpy-mixed
   batch (that step's batch, draws and checkpointed params).
3. The EMA transformation against a naive loop (and transparent to the
   updates); frozen params get exactly zero updates; head-only training
   leaves every tower param bit-identical while the head learns.
4. Layer decay through this task's params: BEiT's closed form.
5. validate() names the field of every bad option, before compiling.
6. One Trainer run on the digits over 8 devices (module fixture, stopped
   and resumed midway): held-out top-1 well above chance; the logged
   evaluation is that of the EMA weights; the EMA is in the checkpoint,
   comes back on resume and in `export --ema`, whose
   `inference.classify` gives the task's logits; init_from restarts the
   EMA at the loaded weights.
7. BEiT-3's Multiway tower (arch 'multiway', the beit3_tiny preset): the
   logits are numpy's LayerNorm (fc_norm) of the mean of the Multiway's own
   patch tokens, through the head; the language / VL experts and the mask
   token get exactly zero gradient and are exactly what the preset freezes;
   the analytic step FLOPs equal the lowered gradient's matmul count; layer
   decay is BEiT-3's, by hand; init_from maps a BEiT-3-style `multiway/...`
   tree onto the tower; validate() names the field.
"""

import functools
import json
import os
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common, finetune
from florax import export, inference, restore, tasks
from florax.data import digits
from florax.evaluate import checkpoint_eval
from florax.models import flops, multiway
from florax.tasks import base as task_base
from florax.tasks import classify
from florax.train import checkpoint as ckpt_lib
from florax.train import ema as ema_lib
from florax.train import init_from
from florax.train import layer_decay
from florax.train import optimizer as opt_lib
from florax.train import trainer as trainer_lib
from tests.fixtures import torch_env
from tests.helpers import apply_overrides

SIZE = 16
N_DRAWS = 4000


def tiny_config(**overrides):
  """The tiny preset at 16 px (a 4x4 grid of 4 px patches), small batch."""
  cfg = finetune.get_config("tiny")
  with cfg.unlocked():
    cfg.model.image = finetune.image_config("tiny/4", SIZE)
    apply_overrides(cfg, {
        "data.image_size": SIZE, "data.random_shift": 0,
        "train.batch_size": 32, "train.steps": 120, "train.log_every": 40,
        "train.eval_every": 120, "train.checkpoint_every": 60,
        "optimizer.warmup_steps": 5, "model.head_init_scale": 1.0,
        "finetune.mixup_alpha": 0.8, "finetune.cutmix_alpha": 1.0,
        **overrides})
  return cfg


# -- 1. Mixup / CutMix against timm -------------------------------------------

def timm_reference(x, target, draws, cfg, num_classes):
  """timm.data.Mixup.__call__ (mode='batch', correct_lam=True) in numpy on
  NHWC images, each of its random calls answered by `draws`:
  np.random.rand() < prob -> draws.apply, np.random.rand() < switch_prob
  -> draws.use_cutmix, np.random.beta -> draws.lam, np.random.randint ->
  draws.cy then draws.cx."""
  x = np.array(x, np.float32)
  lam, use_cutmix = 1.0, False
  active = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
  if active and bool(draws.apply):  # _params_per_batch
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
      use_cutmix = bool(draws.use_cutmix)
    elif cfg.cutmix_alpha > 0:
      use_cutmix = True
    lam = float(draws.lam)
  if lam != 1.0:  # _mix_batch
    if use_cutmix:  # cutmix_bbox_and_lam -> rand_bbox
      img_h, img_w = x.shape[1:3]
      ratio = np.sqrt(1 - lam)
      cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
      cy, cx = int(draws.cy), int(draws.cx)
      yl = np.clip(cy - cut_h // 2, 0, img_h)
      yh = np.clip(cy + (cut_h + 1) // 2, 0, img_h)
      xl = np.clip(cx - cut_w // 2, 0, img_w)
      xh = np.clip(cx + (cut_w + 1) // 2, 0, img_w)
      lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
      x[:, yl:yh, xl:xh, :] = x[::-1].copy()[:, yl:yh, xl:xh, :]
    else:
      x = x * lam + x[::-1] * (1.0 - lam)
  off = cfg.label_smoothing / num_classes  # mixup_target
  on = 1.0 - cfg.label_smoothing + off
  y1 = np.full((len(target), num_classes), off)
  y1[np.arange(len(target)), target] = on
  return x, y1 * lam + y1[::-1] * (1.0 - lam), lam


def _draws(apply, use_cutmix, lam, cy, cx):
  return classify.MixDraws(np.bool_(apply), np.bool_(use_cutmix),
                           np.float32(lam), np.int32(cy), np.int32(cx))


# (apply, use_cutmix, lam, cy, cx): mixup; cutmix inside, clipped at a
# corner, with an exact half side, almost the whole image; not applied.
DRAWS = [_draws(True, False, 0.3, 0, 0), _draws(True, True, 0.6, 7, 9),
         _draws(True, True, 0.2, 0, SIZE - 1), _draws(True, True, 0.75, 8, 8),
         _draws(True, True, 0.001, 3, 12), _draws(False, True, 0.4, 5, 5)]
CONFIGS = [classify.MixConfig(0.8, 1.0, label_smoothing=0.1),
           classify.MixConfig(0.8, 0.0, label_smoothing=0.0),
           classify.MixConfig(0.0, 1.0, label_smoothing=0.2),
           classify.MixConfig(0.0, 0.0, label_smoothing=0.1)]


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(6, SIZE, SIZE, 3)).astype(np.float32),
          rng.integers(0, 10, 6).astype(np.int32))


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(lambda x, y, d: classify.apply_mix(x, y, d, cfg, 10))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["both", "mixup", "cutmix",
                                              "off"])
def test_apply_mix_matches_timm_algorithm(batch, cfg):
  x, y = batch
  for d in DRAWS:
    out, targets, lam = _jitted_apply(cfg)(x, y, d)
    ref_x, ref_y, ref_lam = timm_reference(x, y, d, cfg, 10)
    np.testing.assert_allclose(np.asarray(out), ref_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), ref_y, atol=1e-6)
    np.testing.assert_allclose(float(lam), ref_lam, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-6)


def test_apply_mix_matches_timm_itself(batch, monkeypatch):
  torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  from timm.data import mixup  # pylint: disable=g-import-not-at-top
  x, y = batch
  # mix_prob < 1, so that a draw can also leave the batch unmixed.
  cfg = classify.MixConfig(0.8, 1.0, mix_prob=0.5, switch_prob=0.5)
  for d in DRAWS:
    rands = iter([0.0 if d.apply else 0.99, 0.0 if d.use_cutmix else 0.99])
    ints = iter([int(d.cy), int(d.cx)])
    monkeypatch.setattr(np.random, "rand", lambda *a: next(rands))
    monkeypatch.setattr(np.random, "beta", lambda *a: float(d.lam))
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(ints))
    mixer = mixup.Mixup(mixup_alpha=cfg.mixup_alpha,
                        cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                        switch_prob=cfg.switch_prob,
                        label_smoothing=cfg.label_smoothing, num_classes=10)
    tx, ty = mixer(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(y.astype(np.int64)))
    out, targets, _ = _jitted_apply(cfg)(x, y, d)
    np.testing.assert_allclose(np.asarray(out),
                               tx.numpy().transpose(0, 2, 3, 1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), ty.numpy(), atol=1e-6)


def test_draws_follow_timm_distributions(run):
  cfg = run.trainer.task.mix_config()
  d = run.draws
  n = len(d.apply)
  se = lambda p: 4 * np.sqrt(p * (1 - p) / n)
  assert abs(d.apply.mean() - cfg.mix_prob) < se(cfg.mix_prob)
  assert abs(d.use_cutmix.mean() - cfg.switch_prob) < se(cfg.switch_prob)
  for kind, alpha in ((d.use_cutmix, cfg.cutmix_alpha),
                      (~d.use_cutmix, cfg.mixup_alpha)):
    lam = d.lam[kind]
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2
    assert abs(lam.mean() - 0.5) < 4 * np.sqrt(var / len(lam))
    assert abs(lam.var() - var) < 0.1 * var
    assert lam.min() >= 0 and lam.max() <= 1
  assert set(np.unique(d.cy)) == set(np.unique(d.cx)) == set(range(SIZE))


# -- 2. soft targets and the loss ---------------------------------------------

def test_mixup_target_is_the_smoothing_formula():
  labels = np.array([3, 0, 9, 3])
  s, k, lam = 0.1, 10, 0.7
  got = np.asarray(classify.mixup_target(labels, k, lam, s))
  smooth = (1 - s) * np.eye(k)[labels] + s / k
  np.testing.assert_allclose(got, lam * smooth + (1 - lam) * smooth[::-1],
                             atol=1e-7)


def _np_cross_entropy(logits, targets):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return float(np.mean(-(targets * logp).sum(1)))


def test_logged_loss_is_soft_target_cross_entropy(run):
  """The loss the trainer logged (8 devices) at a CutMix step and at the
  step after a checkpoint, recomputed in numpy from the checkpoint's
  params, that step's batch and the draws of that step's rng."""
  t = run.trainer
  abstract = restore.abstract_params(t.task)
  logged = _logged(t.workdir)
  data = iter(t.task.train_iterators(0, 1)["train"])
  batches = [next(data) for _ in range(61)]
  for step in sorted({run.cutmix_step, 60}):  # the state after `step` steps
    params, _ = restore.restore_params(t.workdir, abstract, step,
                                       t.param_shardings)
    draws = jax.tree.map(lambda v, s=step: v[s], run.draws)
    batch = batches[step]
    mixed, targets, lam = timm_reference(batch["image"], batch["label"],
                                         draws, t.task.mix_config(), 10)
    want = _np_cross_entropy(t.task.logits_map()(params, mixed), targets)
    row = logged[step + 1]
    np.testing.assert_allclose(row["train/loss"], want, rtol=1e-5)
    np.testing.assert_allclose(row["train/mix_lambda"], lam, atol=1e-6)
  assert run.draws.apply[run.cutmix_step] and (
      run.draws.use_cutmix[run.cutmix_step])


def test_eval_metrics_are_pessimistic_top_k():
  rng = np.random.default_rng(4)
  logits = rng.integers(0, 4, size=(50, 6)).astype(np.float64)  # many ties
  logits[3, 2] = np.nan
  labels = rng.integers(0, 6, 50)
  got = classify.classification_metrics(logits, labels, ks=(1, 5))
  for k in (1, 5):  # hit: fewer than k other classes score >= (or NaN)
    hits = [sum(1 for j in range(6) if j != y and not row[j] < row[y]) < k
            and not np.isnan(row[y]) for row, y in zip(logits, labels)]
    assert got[f"eval/top{k}"] == pytest.approx(np.mean(hits))
  finite = np.isfinite(logits).all(1)
  z = logits[finite] - logits[finite].max(1, keepdims=True)
  ce = np.log(np.exp(z).sum(1)) - z[np.arange(finite.sum()), labels[finite]]
  ok = classify.classification_metrics(logits[finite], labels[finite])
  assert ok["eval/loss"] == pytest.approx(ce.mean())


# -- 3. EMA and frozen params -------------------------------------------------

def _opt_config(**fields):
  cfg = common.base_config().optimizer
  with cfg.unlocked():
    cfg.update(dict(learning_rate=0.1, warmup_steps=0, clip_norm=0.0,
                    weight_decay=0.1, **fields))
  return cfg


def _small_params():
  rng = np.random.default_rng(1)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
          "b": {"bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}


def test_ema_matches_a_naive_loop():
  decay = 0.8
  params = _small_params()
  tx, _ = opt_lib.build_optimizer(_opt_config(ema_decay=decay), 10, params)
  plain, _ = opt_lib.build_optimizer(_opt_config(), 10, params)
  state, plain_state = tx.init(params), plain.init(params)
  update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
  p, q = params, params
  naive = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  rng = np.random.default_rng(2)
  for _ in range(5):
    grads = jax.tree.map(lambda v: jnp.asarray(
        rng.normal(size=v.shape), jnp.float32), params)
    updates, state = update(grads, state, p)
    plain_updates, plain_state = plain_update(grads, plain_state, q)
    # The EMA never changes the updates.
    jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q,
                                                                plain_updates)
    naive = jax.tree.map(lambda e, v: decay * e + (1 - decay) * np.asarray(
        v, np.float64), naive, q)
  jax.tree.map(lambda e, n: np.testing.assert_allclose(e, n, atol=1e-6),
               ema_lib.ema_params(state), naive)
  assert not np.allclose(ema_lib.ema_params(state)["a"]["kernel"],
                         p["a"]["kernel"])
  with pytest.raises(ValueError, match="ema_decay = 0"):
    ema_lib.ema_params(plain_state)


def test_freeze_gives_exactly_zero_updates():
  params = _small_params()
  tx, _ = opt_lib.build_optimizer(_opt_config(freeze=("^a/",)), 10, params)
  plain, _ = opt_lib.build_optimizer(_opt_config(), 10, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  plain_updates, _ = plain.update(grads, plain.init(params), params)
  # Weight decay (0.1) included: nothing moves a frozen param.
  assert not np.any(np.asarray(updates["a"]["kernel"]))
  np.testing.assert_array_equal(updates["b"]["bias"],
                                plain_updates["b"]["bias"])
  for bad, match in (("(", "not a regular expression"),
                     ("^c/", "matches no parameter")):
    with pytest.raises(ValueError, match=r"optimizer\.freeze.*" + match):
      opt_lib.build_optimizer(_opt_config(freeze=(bad,)), 10, params)


def test_head_only_training_never_moves_the_tower(run, batch, tmp_path):
  # As the ',probe' presets, but with weight and layer decay on: neither
  # may move the frozen tower.
  cfg = tiny_config(**{"finetune.train_backbone": False,
                       "optimizer.freeze": ("^image_encoder/",),
                       "finetune.mixup_alpha": 0.0,
                       "finetune.cutmix_alpha": 0.0,
                       "optimizer.weight_decay": 0.05,
                       "optimizer.layer_decay": 0.8})
  task = tasks.build(cfg, str(tmp_path))
  params = jax.device_get(run.trainer.state["params"])  # any will do
  tx, _ = opt_lib.build_optimizer(cfg.optimizer, cfg.train.steps, params)
  x, y = batch

  @jax.jit
  def step(p, s, rng):
    (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(
        p, {"image": x, "label": y}, rng)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, grads

  p, s = params, tx.init(params)
  for i in range(3):
    p, s, grads = step(p, s, jax.random.key(10 + i))
    assert not any(np.any(np.asarray(g))
                   for g in jax.tree.leaves(grads["image_encoder"]))
  jax.tree.map(np.testing.assert_array_equal, p["image_encoder"],
               params["image_encoder"])
  assert not np.allclose(p["head"]["kernel"], params["head"]["kernel"])


# -- 4. layer decay -----------------------------------------------------------

def test_layer_decay_of_the_classifier_is_beits_closed_form(tmp_path):
  task = tasks.build(tiny_config(), str(tmp_path))
  abstract = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
  depth, decay = 2, 0.7
  names = list(export.flatten_params(abstract))
  got = dict(zip(names, layer_decay.multipliers(abstract, decay)))
  for name in names:
    if m := re.match(r"image_encoder/encoder/block(\d+)/", name):
      layer = int(m[1]) + 1
    elif re.match(r"image_encoder/(patch_embed|cls_token|pos_embed)", name):
      layer = 0
    else:  # fc_norm, the head: after the encoder, the full lr
      assert name.startswith(("image_encoder/fc_norm", "head/")), name
      layer = depth + 1
    want = decay ** (depth + 1 - layer)
    np.testing.assert_allclose(1.0 if got[name] is None else got[name], want,
                               rtol=1e-12, err_msg=name)


# -- 5. validate --------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    ({"finetune.mixup_alpha": -0.1}, r"finetune\.mixup_alpha"),
    ({"finetune.cutmix_alpha": -1.0}, r"finetune\.cutmix_alpha"),
    ({"finetune.label_smoothing": 1.0}, r"finetune\.label_smoothing"),
    ({"finetune.label_smoothing": -0.1}, r"finetune\.label_smoothing"),
    ({"finetune.mix_prob": 1.5}, r"finetune\.mix_prob"),
    ({"finetune.switch_prob": -0.5}, r"finetune\.switch_prob"),
    ({"finetune.train_backbone": False}, r"optimizer\.freeze"),
    ({"model.num_classes": 1}, r"model\.num_classes"),
    ({"model.num_classes": 5}, r"model\.num_classes=5.*digits"),
    ({"model.image.arch": "resnet"}, r"model\.image\.arch"),
    ({"model.image.image_size": 18}, r"data's image size 16"),
    ({"model.image.image_size": 18, "data.image_size": 18}, "patch size 4"),
    ({"data.name": "records"}, r"data\.name"),
    ({"model.embed_dim": 16}, r"model\.embed_dim"),
    ({"model.head_dropout": 1.0}, r"model\.head_dropout"),
    ({"optimizer.ema_decay": 1.0}, r"optimizer\.ema_decay"),
])
def test_validate_names_the_field(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    tasks.build(tiny_config(**overrides), str(tmp_path))


# -- 6. a training run --------------------------------------------------------

class Run(NamedTuple):
  trainer: trainer_lib.Trainer
  final: dict
  draws: classify.MixDraws  # of the steps' rngs, then of more rngs
  cutmix_step: int  # the run stopped and resumed there


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
  """120 steps on the digits, stopped (with a checkpoint) after the first
  CutMix step's predecessor and resumed from it."""
  workdir = str(tmp_path_factory.mktemp("classify"))
  # Mixup/CutMix on 40% of the steps (the full rate slows this short run);
  # CutMix on 30% of those (distinct rates: the draws test tells them apart).
  cfg = tiny_config(**{"finetune.mix_prob": 0.4, "finetune.switch_prob": 0.3,
                       "optimizer.ema_decay": 0.9, "train.log_every": 1})
  t = trainer_lib.Trainer(tasks.build(cfg, workdir))
  # The rng of step s is fold_in(the run's rng, s) (Trainer._train_step);
  # the loss draws from the first half of its split.
  base = jax.random.wrap_key_data(t.train_rng_data)
  steps = jax.vmap(lambda s: jax.random.fold_in(base, s))(
      jnp.arange(cfg.train.steps))
  more = jax.random.split(jax.random.key(3), N_DRAWS - cfg.train.steps)
  draw = jax.jit(jax.vmap(lambda r: classify.draw_mix(
      jax.random.split(r)[0], t.task.mix_config(), SIZE, SIZE)))
  draws = jax.tree.map(np.asarray,
                       draw(jnp.concatenate([steps, more])))
  cutmix_step = int(np.flatnonzero(draws.apply & draws.use_cutmix)[0])
  assert 0 < cutmix_step < 60
  t.train(max_steps=cutmix_step)  # checkpoint at cutmix_step
  final = t.train()  # resumed: params, optimizer state (EMA), data, rng
  return Run(t, final, draws, cutmix_step)


def _logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  return {r["step"]: r for r in rows}


def test_heldout_top1_rises_well_above_chance(run):
  final = run.final
  assert final["eval/top1"] > 0.3  # chance: 0.1
  assert final["eval/top5"] >= final["eval/top1"]


def test_evaluation_uses_the_ema_weights(run):
  t, final = run.trainer, run.final
  ema = ema_lib.ema_params(t.state["opt_state"])
  of_ema = t.task.evaluate(ema)
  of_params = t.task.evaluate(t.state["params"])
  assert of_ema == pytest.approx(final, abs=1e-9)
  assert abs(of_params["eval/loss"] - final["eval/loss"]) > 1e-4
  # launch.evaluate's re-evaluation of the checkpoint reproduces the log.
  step, again = checkpoint_eval.evaluate_workdir(t.config, t.workdir,
                                                 write=False, task=t.task)
  assert step == t.config.train.steps
  assert again == pytest.approx(final, abs=1e-6)


def test_the_ema_is_checkpointed_and_resumed(run):
  t = run.trainer
  ema = jax.device_get(ema_lib.ema_params(t.state["opt_state"]))
  # What a resume restores: the whole train state, EMA included.
  checkpointer = ckpt_lib.Checkpointer(t.workdir, 3, 60,
                                       data_names=("data_train",))
  assert checkpointer.latest_step() == 120
  state = checkpointer.restore(120, t.abstract_state, restore_data=False)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(ema_lib.ema_params(state["opt_state"])), ema)
  # The EMA alone, as `launch.export --ema` reads it (an older step too).
  abstract = restore.abstract_params(t.task)
  alone, _ = ema_lib.restore_ema_params(t.workdir, abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(alone), ema)
  old, _ = ema_lib.restore_ema_params(t.workdir, abstract, step=60)
  params_60, _ = restore.restore_params(t.workdir, abstract, step=60)
  assert not np.allclose(old["head"]["kernel"], params_60["head"]["kernel"])


def test_export_ema_classifies_like_the_task(run, tmp_path):
  t = run.trainer
  out = str(tmp_path / "export")
  manifest = export.export_workdir(t.config, t.workdir, out, ema=True,
                                   platforms=("cpu",))
  assert manifest["num_classes"] == 10 and manifest["tokenizer"] is None
  model = inference.load(out)
  raw, _ = digits.load_split("holdout")
  got = model.classify(raw[:8])
  pixels = np.stack([digits.to_rgb(im, SIZE) for im in raw[:8]])
  ema = jax.device_get(ema_lib.ema_params(t.state["opt_state"]))
  want = t.task.model.apply({"params": ema}, pixels)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_init_from_restarts_the_ema_at_the_loaded_weights(run, tmp_path):
  t = run.trainer
  cfg = tiny_config(**{"optimizer.ema_decay": 0.9,
                       "init_from.path": t.workdir,
                       "init_from.prefixes": (("image_encoder",
                                               "image_encoder"),)})
  fresh = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "ft")))
  state = jax.device_get(fresh.init_state())
  ema = ema_lib.ema_params(state["opt_state"])
  source = jax.device_get(t.state["params"])
  jax.tree.map(np.testing.assert_array_equal, state["params"]["image_encoder"],
               source["image_encoder"])
  jax.tree.map(np.testing.assert_array_equal, ema, state["params"])


# -- 7. BEiT-3's Multiway tower (model.image.arch='multiway') -----------------

B3_BATCH = 4


def beit3_config(**overrides):
  """The beit3_tiny preset (the tiny Multiway: 32 px, patch 8)."""
  cfg = finetune.get_config("beit3_tiny")
  with cfg.unlocked():
    apply_overrides(cfg, {"data.random_shift": 0, **overrides})
  return cfg


class Beit3(NamedTuple):
  task: classify.ClassifyTask
  params: dict  # jax arrays of the task's shapes, random values
  batch: dict


def _random_like(abstract, seed: int):
  """Random params of `abstract`'s shapes: kernels and embeddings ~ N(0,
  0.1^2), norm scales ~ N(1, 0.1^2), other vectors ~ N(0, 0.1^2). The
  Multiway's init compiles for ~10 s on 2 cores; any values serve the tests
  (and a fresh fc_norm, the identity, or the 0.001-scaled head would hide
  mistakes in the reference check)."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    mean = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return jnp.asarray(mean + 0.1 * rng.normal(size=x.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def beit3(tmp_path_factory) -> Beit3:
  task = tasks.build(beit3_config(), str(tmp_path_factory.mktemp("beit3")))
  params = _random_like(
      nn.unbox(jax.eval_shape(task.init, jax.random.key(0))), 1)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(B3_BATCH, 32, 32, 3)).astype(np.float32)
  labels = np.arange(B3_BATCH, dtype=np.int32)
  return Beit3(task, params, {"image": images, "label": labels})


@pytest.fixture(scope="module")
def beit3_grad(beit3):
  """(the lowered gradient program of the task's loss, its gradients)."""
  lowered = jax.jit(jax.grad(
      lambda p, b: beit3.task.loss(p, b, jax.random.key(2))[0])).lower(
          beit3.params, beit3.batch)
  return lowered, jax.device_get(lowered.compile()(beit3.params,
                                                   beit3.batch))


def test_multiway_logits_are_fc_norm_of_the_mean_patch_token(beit3):
  params = jax.device_get(beit3.params)
  got = jax.jit(beit3.task.model.apply)({"params": beit3.params},
                                        beit3.batch["image"])
  # The backbone's own image tokens, on the same params.
  tokens, _ = jax.jit(lambda p, x: multiway.Multiway(
      multiway.config_for("tiny")).apply({"params": p}, images=x))(
          beit3.params["image_encoder"]["multiway"], beit3.batch["image"])
  pooled = np.asarray(tokens, np.float64)[:, 1:].mean(axis=1)  # no [cls]
  fc, head = params["image_encoder"]["fc_norm"], params["head"]
  mu = pooled.mean(-1, keepdims=True)
  var = ((pooled - mu) ** 2).mean(-1, keepdims=True)
  normed = (pooled - mu) / np.sqrt(var + 1e-5) * fc["scale"] + fc["bias"]
  want = normed @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _language_side(name: str) -> bool:
  """A language or vision-language expert of the Multiway (norm1_l,
  mlp_vl, the final norm_l, ...)."""
  return any(part.endswith(("_l", "_vl")) for part in name.split("/"))


def test_multiway_language_experts_get_exactly_zero_gradient(beit3,
                                                             beit3_grad):
  grads = export.flatten_params(beit3_grad[1])
  assert not any("text_embed" in n for n in grads)  # no text input at all
  zero = {n for n, g in grads.items() if not np.any(g)}
  unused = {n for n in grads if _language_side(n)} | {
      "image_encoder/multiway/vision_embed/mask_token"}
  assert any("mlp_vl" in n for n in unused) and len(unused) > 20
  assert zero == unused
  # The preset freezes exactly those (no AdamW weight decay on them).
  mask = opt_lib.frozen_mask(beit3.params,
                             beit3.task.config.optimizer.freeze)
  frozen = {n for n, f in export.flatten_params(mask).items() if f}
  assert frozen == unused


def test_multiway_step_flops_equal_the_programs_matmuls(beit3, beit3_grad):
  counted = flops.hlo_matmul_flops(beit3_grad[0])
  analytic = beit3.task.step_flops(task_base.DEFAULT_KIND, B3_BATCH)
  assert analytic == pytest.approx(counted, rel=1e-9)


def test_multiway_layer_decay_is_beit3s(beit3):
  cfg = beit3.task.config
  decay, depth = cfg.optimizer.layer_decay, 3
  assert decay == 0.65
  names = list(export.flatten_params(beit3.params))
  got = dict(zip(names, layer_decay.multipliers(beit3.params, decay)))
  for name in names:
    if m := re.match(r"image_encoder/multiway/block(\d+)/", name):
      want = 0.65 ** (depth - int(m[1]))  # block i is layer i + 1
    elif name.startswith("image_encoder/multiway/vision_embed/"):
      want = 0.65 ** (depth + 1)  # layer 0
    else:  # norm_v / norm_l, fc_norm, the head: after the encoder
      assert re.match(r"(image_encoder/(multiway/norm_[vl]|fc_norm)|head)/",
                      name), name
      want = 1.0
    np.testing.assert_allclose(1.0 if got[name] is None else got[name], want,
                               rtol=1e-12, err_msg=name)


def test_multiway_init_from_loads_a_beit3_backbone(beit3, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # A beit3_mdm run's params: the backbone initialised with images AND text
  # (text_embed too) under `multiway/`, and an MDM head.
  backbone = _random_like(nn.unbox(jax.eval_shape(
      lambda: multiway.Multiway(multiway.config_for("tiny")).init(
          jax.random.key(7), images=jnp.zeros((1, 32, 32, 3)),
          text=jnp.ones((1, 4), jnp.int32))["params"])), 7)
  source = {f"multiway/{k}": np.asarray(v, np.float32) for k, v in
            export.flatten_params(jax.device_get(backbone)).items()}
  assert any(k.startswith("multiway/text_embed/") for k in source)
  source["mlm_head/kernel"] = np.ones((64, 128), np.float32)
  save_file(source, str(tmp_path / "params.safetensors"))
  read, _ = init_from.read_source(str(tmp_path))
  prefixes = [tuple(p) for p in beit3.task.config.init_from.prefixes]
  params, report = init_from.load_matching(beit3.params, read, prefixes)
  flat = export.flatten_params(jax.device_get(params))
  tower = sorted(n for n in flat if n.startswith("image_encoder/multiway/"))
  assert sorted(report["loaded"]) == tower and not report["skipped"]
  assert sorted(report["fresh"]) == sorted(
      n for n in flat if not n.startswith("image_encoder/multiway/"))
  for name in tower:
    np.testing.assert_array_equal(
        flat[name], source["multiway/" + name[len("image_encoder/multiway/"):]],
        err_msg=name)


@pytest.mark.parametrize("overrides,match", [
    ({"model.image.image_size": 64}, r"model\.image\.image_size=32"),
    ({"model.image.num_vl_layers": 4}, "num_vl_layers"),
    ({"model.image.pool": "mean"}, r"model\.image\.pool.*MultiwayConfig"),
])
def test_multiway_validate_names_the_field(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    tasks.build(beit3_config(**overrides), str(tmp_path))
