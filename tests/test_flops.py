"""Analytic FLOPs (florax.models.flops) against the programs they describe.

The reference is each program's own op-by-op count: every dot_general and
convolution of the lowered, unrolled (no scan, no remat) step, 2 FLOPs per
multiply-add (`flops.hlo_matmul_flops`, itself checked against XLA's cost
analysis of single ops). The closed forms never see that program, so a
layer they miss or double-count (a gate, padded windows, the teacher, the
B x B logits) shows up as a difference. XLA's aggregate count of the
compiled step also includes elementwise work, so it must be larger; the
ratio is printed (pytest -s).
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import eva, eva_clip, finetune, florence
from florax.models import coswin, flops, multiway, text, vit
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks.classify import ClassifyTask
from florax.tasks.eva_mim import EVAMIMTask
from florax.tasks.unicl import UniCLTask
from florax.train import hardware
from tests import helpers

BATCH = 4


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _cost(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _close(analytic, counted, rel=0.02):
  assert abs(analytic - counted) <= rel * counted, (analytic, counted)


# -- the op-by-op counter against XLA, one op at a time ------------------------


def _conv(stride, pad):
  return lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kernel,stride,pad,size", [
    (7, 4, 3, 32),   # CvT stem: taps on the zero padding are not counted
    (3, 2, 1, 8),    # CvT merge
    (8, 8, 0, 32),   # ViT patch embedding
])
def test_counter_matches_xla_on_a_convolution_and_its_gradients(
    kernel, stride, pad, size):
  conv = _conv(stride, pad)
  x = jnp.ones((2, size, size, 3))
  w = jnp.ones((kernel, kernel, 3, 5))
  y = conv(x, w)
  programs = {
      "forward": (conv, (x, w)),
      # lhs-dilated and rhs-dilated convolutions: the input and weight
      # gradients.
      "dx": (lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
             (x, w, y)),
      "dw": (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
             (x, w, y)),
  }
  counts = {}
  for name, (fn, args) in programs.items():
    lowered = jax.jit(fn).lower(*args)
    counts[name] = flops.hlo_matmul_flops(lowered)
    assert counts[name] == _cost(lowered.compile()), name
  # The closed form (per image), and the same count for all three.
  assert counts["forward"] == counts["dx"] == counts["dw"] == 2 * flops.conv(
      size, kernel, stride, pad, 3, 5)


def test_counter_counts_batched_dots_called_functions_and_refuses_loops():
  a, b = jnp.ones((4, 3, 5)), jnp.ones((4, 5, 6))
  inner = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
  lowered = jax.jit(lambda a, b: inner(a, b) + inner(a, b)).lower(a, b)
  # Two calls of one function count twice (deduplicated or not).
  assert flops.hlo_matmul_flops(lowered) == 2 * 2 * 4 * 3 * 5 * 6
  loop = jax.jit(lambda a, b: jax.lax.fori_loop(
      0, 3, lambda i, x: jnp.tanh(inner(x, b)[..., :5]), a)).lower(a, b)
  with pytest.raises(ValueError, match="loop"):
    flops.hlo_matmul_flops(loop)
  assert flops.hlo_matmul_flops(loop, allow_loops=True) == 2 * 4 * 3 * 5 * 6


# -- each family's step --------------------------------------------------------


def _mesh_rules(cfg):
  return (mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]),
          sharding_lib.rules_from_config(cfg.sharding.rules))


def _train_program(task, frozen=None):
  """task.value_and_grad (the train step's FLOP content: the optimizer
  update is elementwise) on one abstract global batch, lowered."""
  params = _abstract(nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))
  batch = _abstract(task.batch_spec(BATCH))

  def step(p, b, f):
    ctx = base.StepContext(step=jnp.int32(0), frozen=f)
    return task.value_and_grad(p, b, jax.random.key(1), ctx)
  return jax.jit(step).lower(params, batch, frozen)


def _unrolled(cfg):
  """Checks the preset is unrolled: no scanned layers, no remat."""
  for tower in ("image", "text"):
    sub = cfg.model.get(tower)
    if sub is not None:
      assert not sub.get("scan", False) and sub.get("remat", "none") == "none"
  return cfg


def clip_vit(tmp_path):
  cfg = _unrolled(eva_clip.get_config("tiny"))
  return UniCLTask(cfg, str(tmp_path), *_mesh_rules(cfg)), None


def florence_coswin(tmp_path):
  # 48 px: CoSwin-tiny's second stage is a 6x6 grid in windows of 4, so the
  # padded (and shift-masked) windows are part of the count.
  cfg = _unrolled(helpers.apply_overrides(florence.get_config("tiny"),
                                          {"data.image_size": 48}))
  return UniCLTask(cfg, str(tmp_path), *_mesh_rules(cfg)), None


def _teacher_export(path, image_size=16):
  """A tiny CoSwin teacher 'export': its config only (the FLOP count and
  the abstract frozen params need no weights)."""
  image = {k: list(v) if isinstance(v, tuple) else v for k, v in
           vars(coswin.CoSwinConfig(**coswin.PRESETS["tiny"])).items()}
  config = {"model": {"image": {"arch": "coswin", **image},
                      "dtype": "float32", "embed_dim": 64},
            "data": {"name": "digits", "image_size": image_size}}
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  (path / "params.safetensors").write_bytes(b"")
  return str(path)


def eva_mim(tmp_path):
  # The teacher sees 16 px (a resize of the student's 32 px) and gives a
  # 2x2 grid, repeated onto the student's 4x4 patches.
  cfg = _unrolled(helpers.apply_overrides(eva.get_config("tiny"), {
      "teacher.path": _teacher_export(tmp_path / "teacher")}))
  task = EVAMIMTask(cfg, str(tmp_path), *_mesh_rules(cfg))
  return task, _abstract(nn.unbox(task.frozen_spec()))


def classify(tmp_path, probe=False):
  cfg = _unrolled(finetune.get_config("tiny,probe" if probe else "tiny"))
  return ClassifyTask(cfg, str(tmp_path), *_mesh_rules(cfg)), None


FAMILIES = {"clip_vit": clip_vit, "florence_coswin": florence_coswin,
            "eva_mim": eva_mim, "classify": classify,
            "classify_probe": lambda p: classify(p, probe=True)}


def _duplicate_logits(task) -> float:
  """What florax's sharded global contrastive loss computes beyond the
  model FLOPs: the B x B logits once per direction (i2t rows, t2i rows),
  forward and backward; the analytic count has them once."""
  cc = task.config.get("contrastive")
  if not isinstance(task, UniCLTask) or not (cc and cc.global_loss):
    return 0.0
  return 3 * flops.contrastive_logits(BATCH, task.config.model.embed_dim)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_analytic_step_flops_equal_the_unrolled_programs_count(
    family, tmp_path):
  task, frozen = FAMILIES[family](tmp_path)
  analytic = task.step_flops(base.DEFAULT_KIND, BATCH)
  lowered = _train_program(task, frozen)
  counted = flops.hlo_matmul_flops(lowered)
  _close(analytic, counted)  # the bound ...
  # ... and in fact exact, up to the loss's known duplicate.
  assert analytic + _duplicate_logits(task) == pytest.approx(counted,
                                                             rel=1e-9)
  # XLA's own total (its cost analysis of the same program) adds the
  # elementwise work: norms, softmax, GELU, the loss, the random draws.
  aggregate = _cost(lowered)
  assert aggregate >= analytic, (aggregate, analytic)
  line = (f"{family}: analytic {analytic:.6g}, HLO dots/convs {counted:.6g}"
          f" ({analytic / counted - 1:+.1e}), XLA aggregate {aggregate:.6g} "
          f"({aggregate / analytic:.3f}x analytic)")
  if family == "classify_probe":  # the cheapest compile: after XLA's passes
    compiled = _cost(lowered.compile())
    assert compiled >= analytic, (compiled, analytic)
    line += f", compiled {compiled / analytic:.3f}x"
  print("\n" + line)


def test_unicl_logits_grow_with_the_square_of_the_batch(tmp_path):
  task, _ = clip_vit(tmp_path)
  one, two = (task.step_flops(base.DEFAULT_KIND, b) for b in (64, 128))
  # Doubling the batch doubles the pairs; the logits (3 x 2 x B^2 x D,
  # D = embed_dim 64) grow 4x.
  assert two - 2 * one == pytest.approx(3 * 2 * 64 * (128**2 - 2 * 64**2),
                                        rel=1e-12)


def test_multiway_pair_forward_and_backward(tmp_path):
  cfg = multiway.config_for("tiny")
  model = multiway.Multiway(cfg)
  images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
  ids = jnp.ones((2, 8), jnp.int32)
  params = _abstract(nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                             images, ids)))

  def loss(p, images, ids):
    return jnp.sum(model.apply(p, images, ids)[0])
  fwd = flops.multiway_forward(cfg, images=True, text_len=8)
  lowered = jax.jit(jax.grad(loss)).lower(params, images, ids)
  _close(2 * fwd.train(), flops.hlo_matmul_flops(lowered))
  # Text only: no patch embedding, 8 tokens.
  counted = flops.hlo_matmul_flops(jax.jit(
      lambda p, ids: model.apply(p, None, ids)).lower(params, ids))
  _close(2 * flops.multiway_forward(cfg, False, 8).flops, counted)


@pytest.mark.parametrize("name,build", [
    ("vit swiglu, mean pool, no class token", lambda: (
        vit.ViT(vit.config_for("tiny/8", 32, act="swiglu", class_token=False,
                               pool="mean", fc_norm=True)), 32)),
    # 40 px: 10x10 then 5x5 tokens in windows of 4, both padded.
    ("swin patch stem and merging, padded windows", lambda: (
        coswin.CoSwin(coswin.CoSwinConfig(**{
            **coswin.PRESETS["tiny"], "stem": "patch", "merge": "patch"})),
        40)),
])
def test_tower_options_forward(name, build):
  """Options that change the count, forward only (lowering, no compile)."""
  module, size = build()
  images = jnp.zeros((2, size, size, 3))
  params = _abstract(nn.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                             images)))
  counted = flops.hlo_matmul_flops(jax.jit(module.apply).lower(params,
                                                               images))
  cfg = module.config
  want = (flops.vit_forward(cfg) if isinstance(cfg, vit.ViTConfig)
          else flops.coswin_forward(cfg, size))
  _close(2 * want.flops, counted)


def test_text_tower_forward_counts_the_batch_length():
  cfg = text.TextConfig(**{**text.PRESETS["tiny"], "vocab_size": 50})
  module = text.TextTransformer(cfg)
  ids = jnp.ones((3, 12), jnp.int32)
  params = _abstract(nn.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                             ids)))
  counted = flops.hlo_matmul_flops(jax.jit(module.apply).lower(params, ids))
  _close(3 * flops.text_forward(cfg, 12).flops, counted)


def test_multiway_rejects_an_empty_input():
  with pytest.raises(ValueError, match="images, text or both"):
    flops.multiway_forward(multiway.config_for("tiny"), images=False)


# -- the trainer's source -------------------------------------------------------


class _Compiled:
  """A stand-in compiled step for the cost-analysis fallback."""

  def cost_analysis(self):
    return {"flops": 123.0}

  def as_text(self):
    return "ENTRY main { while(...) }"


def test_trainer_divides_the_analytic_count_over_the_mesh(tmp_path, capsys):
  from florax import tasks
  from florax.train import trainer as trainer_lib
  cfg = finetune.get_config("tiny")
  with cfg.unlocked():
    cfg.mesh.axes.data = 8
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "w")))
  per_device = t.flops_per_device({"train": _Compiled()})
  assert per_device["train"] == t.task.step_flops(
      "train", cfg.train.batch_size) / 8
  assert "analytic model FLOPs" in capsys.readouterr().out
  # No analytic count: XLA's, flagged as a lower bound when there are loops.
  t.task.step_flops = lambda kind, batch: None
  assert t.flops_per_device({"train": _Compiled()}) == {"train": 123.0}
  assert "LOWER BOUND" in capsys.readouterr().out


# -- the measured peak ---------------------------------------------------------


def test_measured_matmul_peak_is_positive_and_stable_in_n():
  small = hardware.measure_matmul_peak(jnp.float32, n=128, repeats=3)
  large = hardware.measure_matmul_peak(jnp.float32, n=256, repeats=3)
  assert math.isfinite(small) and small > 0
  assert math.isfinite(large) and large > 0
  # Same order of magnitude (a shared 2-core machine is noisy).
  assert 0.05 < large / small < 20, (small, large)
  with pytest.raises(ValueError, match="positive"):
    hardware.measure_matmul_peak(jnp.float32, n=128, repeats=0)
