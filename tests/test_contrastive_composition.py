"""The gradient cache and the global loss compose with ZeRO-3 on a 2-D mesh,
full remat and bf16: the Florence task's training trajectory equals the
plain data-parallel one (fp32, no stochastic layers, so both compute the same
full-batch gradient), and bf16 stays close."""

import json

import jax
import numpy as np

from florax import tasks
from florax.train import trainer as trainer_lib
from helpers import tiny_config

COMMON = {"train.steps": 2, "train.checkpoint_every": 100,
          "model.image.drop_path_rate": 0.0}


def _losses(workdir):
  return [json.loads(l)["train/loss"] for l in open(workdir / "metrics.jsonl")
          if "train/loss" in l]


def test_grad_cache_with_zero3_remat_and_bf16(tmp_path):
  plain = trainer_lib.Trainer(tasks.build(tiny_config(**COMMON), str(tmp_path / "plain")))
  plain.train()
  composed_cfg = tiny_config(**COMMON, **{
      "mesh.axes.data": 4, "mesh.axes.fsdp": 2, "sharding.zero_stage": 3,
      "contrastive.chunk_size": 1, "model.image.remat": "full",
      "model.text.remat": "full"})
  composed = trainer_lib.Trainer(tasks.build(composed_cfg, str(tmp_path / "composed")))
  composed.train()
  np.testing.assert_allclose(_losses(tmp_path / "composed"),
                             _losses(tmp_path / "plain"), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               jax.device_get(composed.state["params"]),
               jax.device_get(plain.state["params"]))

  bf16 = trainer_lib.Trainer(tasks.build(
      tiny_config(**COMMON, **{"model.dtype": "bfloat16",
                               "sharding.zero_stage": 2,
                               "contrastive.chunk_size": 1}),
      str(tmp_path / "bf16")))
  bf16.train()
  assert bf16.state["params"]["logit_scale"].dtype == np.float32  # fp32 masters
  np.testing.assert_allclose(_losses(tmp_path / "bf16"),
                             _losses(tmp_path / "plain"), rtol=5e-2)
