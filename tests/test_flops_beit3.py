"""Analytic step FLOPs of BEiT-3's masked data modeling (beit3_mdm) and of
the VQ-KD tokenizer (vqkd) against the programs they describe.

As in tests/test_flops.py, the reference is the op-by-op count of every
dot_general and convolution of the lowered, unrolled (no scan, no remat)
train step (`flops.hlo_matmul_flops` over task.value_and_grad): the
closed forms never see that program, so a head, an expert, the frozen
tokenizer's codebook search or a resize they miss or double-count shows
up as a difference. Both counts agree exactly.

Neither task needs weights for this: the frozen networks (BEiT-3's VQ-KD
tokenizer, VQ-KD's teacher) are a config.json each, their params abstract.
Both resolutions differ from the frozen network's, so the resize of the
pixels is part of the count.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import beit3 as beit3_configs
from configs import vqkd as vqkd_configs
from florax import restore
from florax.models import flops, vit
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_mdm
from florax.tasks import vq_tokenizer
from florax.tasks.vqkd import VQKDTask


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _cost(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _mesh_rules(cfg):
  return (mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]),
          sharding_lib.rules_from_config(cfg.sharding.rules))


def _train_program(task, batch):
  """task.value_and_grad (the train step's FLOP content: the optimizer
  update is elementwise) on one abstract global batch, lowered, with the
  task's abstract frozen variables."""
  params = _abstract(nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))
  frozen = _abstract(nn.unbox(task.frozen_spec()))

  def step(p, b, f):
    ctx = base.StepContext(step=jnp.int32(0), frozen=f)
    return task.value_and_grad(p, b, jax.random.key(1), ctx)
  return jax.jit(step).lower(params, _abstract(batch), frozen)


def _check(name, task, batch, global_batch):
  analytic = task.step_flops(base.DEFAULT_KIND, global_batch)
  lowered = _train_program(task, batch)
  counted = flops.hlo_matmul_flops(lowered)
  assert analytic == pytest.approx(counted, rel=1e-9), (analytic, counted)
  # XLA's own total adds the elementwise work (norms, softmax, the loss).
  aggregate = _cost(lowered)
  assert aggregate >= analytic, (aggregate, analytic)
  print(f"\n{name}: analytic {analytic:.6g}, HLO dots/convs {counted:.6g} "
        f"({analytic / counted - 1:+.1e}), XLA aggregate {aggregate:.6g} "
        f"({aggregate / analytic:.3f}x analytic)")
  return analytic


# -- vqkd -----------------------------------------------------------------------

VQKD_BATCH = 4


def _vit_teacher_export(path, image_size=16):
  """A tiny ViT teacher 'export' (16 px, patch 8: a 2x2 grid, one block):
  its config only (the FLOP count and the abstract frozen params need no
  weights)."""
  image = dict(vars(vit.config_for("tiny/8", image_size)), depth=1)
  config = {"model": {"image": {"arch": "vit", **image}, "dtype": "float32",
                      "embed_dim": 0},
            "data": {"name": "digits", "image_size": image_size}}
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  (path / "params.safetensors").write_bytes(b"")
  return str(path)


@pytest.fixture(scope="module")
def vqkd_task(tmp_path_factory):
  # 32 px, patch 8 (a 4x4 grid); the teacher sees 16 px (a resize) and its
  # 2x2 grid is repeated onto the tokenizer's patches.
  tmp = tmp_path_factory.mktemp("vqkd")
  cfg = vqkd_configs.get_config("tiny")
  with cfg.unlocked():
    cfg.teacher.path = _vit_teacher_export(tmp / "teacher")
    cfg.model.image.depth = 1
    cfg.model.codebook_size = 64
    cfg.model.code_dim = 8
    cfg.model.decoder.update(dict(depth=1, width=32, num_heads=2,
                                  mlp_dim=64))
  assert cfg.model.image.remat == "none" and not cfg.model.image.scan
  task = VQKDTask(cfg, str(tmp / "work"), *_mesh_rules(cfg))
  task.validate()
  return task


def test_vqkd_step_flops_equal_the_programs_matmuls(vqkd_task):
  batch = vqkd_task.batch_spec(VQKD_BATCH)
  analytic = _check("vqkd", vqkd_task, batch, VQKD_BATCH)
  # By hand: the trained tokenizer 3x (its patch conv on pixels 2x), the
  # two codebook searches 1x, the teacher (and the 32 -> 16 px resize) 1x.
  m = vqkd_task.model_config
  n = m.grid ** 2
  encoder = flops.vit_forward(m.encoder)
  decoder = flops.vit_forward(m.decoder, in_channels=m.code_dim)
  heads = (flops.dense(n, 64, 64) + flops.dense(n, 64, 8)
           + flops.dense(n, 32, 32) + flops.dense(n, 32, m.target_width))
  search = 2.0 * n * 8 * 64
  teacher = (flops.vit_forward(vqkd_task.teacher.image_cfg).flops
             + flops.resize_flops(32, 16))
  want = (3 * (encoder.flops + decoder.flops + heads) - encoder.input_layer
          + 2 * search + teacher)
  assert analytic == pytest.approx(VQKD_BATCH * want, rel=1e-12)


# -- beit3_mdm ------------------------------------------------------------------


def _tokenizer_workdir(path):
  """A tiny VQ-KD run's config.json (16 px, patch 4: the Multiway's 4x4
  grid at half its resolution; 32 codes of dim 8); no checkpoint."""
  cfg = vqkd_configs.get_config("tiny")
  with cfg.unlocked():
    cfg.data.image_size = cfg.model.image.image_size = 16
    cfg.model.image.patch_size = 4
    cfg.model.image.depth = 1
    cfg.model.codebook_size = 32
    cfg.model.code_dim = 8
  path.mkdir()
  (path / "config.json").write_text(cfg.to_json_best_effort())
  return str(path)


@pytest.fixture(scope="module")
def mdm_task(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("beit3")
  cfg = beit3_configs.get_config("tiny")
  with cfg.unlocked():
    cfg.tokenizer.path = _tokenizer_workdir(tmp / "vqkd")
    # 1 image, 2 texts and 1 pair per row, 8 rows.
    cfg.data.composition.update(dict(image=8, text=16, pair=8))
    # two layers, the top one with the VL expert
    cfg.model.multiway.update(dict(depth=2, width=32, mlp_dim=64))
  mw = cfg.model.multiway
  assert mw.remat == "none" and mw.num_vl_layers == 1
  task = beit3_mdm.BEiT3MDMTask(cfg, str(tmp / "work"), *_mesh_rules(cfg))
  # The frozen tokenizer reads its config only: stand in for the
  # checkpoint its constructor looks for.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(restore, "available_steps", lambda path: [0])
    tok = task.visual_tokenizer
  assert isinstance(tok, vq_tokenizer.FrozenVQTokenizer)
  assert (tok.grid, tok.image_size, tok.num_codes) == (4, 16, 32)
  return task


def test_beit3_mdm_step_flops_equal_the_programs_matmuls(mdm_task):
  batch = mdm_task.batch_kinds()[base.DEFAULT_KIND]
  rows = jax.tree.leaves(batch)[0].shape[0]  # the trainer's global batch
  assert rows == 8
  analytic = _check("beit3_mdm", mdm_task, batch, rows)
  # By hand, per row: Multiway + heads 3x (patch conv 2x) over 1 image,
  # 2 texts, 1 pair; the frozen tokenizer (and its 32 -> 16 px resize)
  # over the 2 images.
  mw = mdm_task.backbone
  n, length = mw.grid ** 2, mdm_task.config.data.max_len
  image = flops.multiway_forward(mw, images=True)
  text = flops.multiway_forward(mw, images=False, text_len=length)
  pair = flops.multiway_forward(mw, images=True, text_len=length)
  mim, mlm = flops.dense(n, 32, 32), flops.dense(length, 32, mw.vocab_size)
  trained = (3 * (image.flops + 2 * text.flops + pair.flops
                  + 2 * mim + 3 * mlm)
             - image.input_layer - pair.input_layer)
  vq = mdm_task.visual_tokenizer.model_config
  tokenizer = (flops.vq_codes_forward(vq) + flops.resize_flops(32, 16))
  assert analytic == pytest.approx(rows * (trained + 2 * tokenizer),
                                   rel=1e-12)


def test_beit3_mdm_flops_are_unknown_with_a_stand_in_tokenizer(mdm_task):
  class StandIn:
    num_codes, image_size, grid = 32, 16, 4
  task = beit3_mdm.BEiT3MDMTask(mdm_task.config, mdm_task.workdir,
                                mdm_task.mesh, mdm_task.rules)
  task._vq = StandIn()  # pylint: disable=protected-access
  assert task.step_flops(base.DEFAULT_KIND, 8) is None
