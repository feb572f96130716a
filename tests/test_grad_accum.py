"""Gradient accumulation over 4 micro-batches equals one large batch (a
mean-over-examples loss), and the contrastive task refuses it."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest

from florax import tasks
from florax.train import trainer as trainer_lib
import scale_tasks
from helpers import tiny_config


def test_four_micro_batches_equal_the_large_batch(tmp_path):
  big = scale_tasks.regression_config(**{"train.batch_size": 64,
                                         "sharding.zero_stage": 2})
  t = trainer_lib.Trainer(tasks.build(big, str(tmp_path / "d")))
  it = t.task.train_iterator(64, 0, 1)
  batches = [next(it) for _ in range(2)]
  acc = scale_tasks.regression_config(**{"train.batch_size": 64,
                                         "sharding.zero_stage": 2,
                                         "train.grad_accum_steps": 4})
  ref_losses, ref_params, _ = scale_tasks.run_steps(big, tmp_path / "a", batches)
  losses, params, _ = scale_tasks.run_steps(acc, tmp_path / "b", batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)
  # The first step's loss is also the plain mean over the 64 rows computed
  # in numpy-free JAX at the initial parameters (independent of the split).
  init = trainer_lib.Trainer(tasks.build(big, str(tmp_path / "c"))).init_state()["params"]
  direct, _ = t.task.loss(jax.device_get(init), batches[0], None)
  np.testing.assert_allclose(losses[0], float(direct), rtol=1e-5)


def test_contrastive_task_refuses_accumulation(tmp_path):
  with pytest.raises(ValueError, match="grad_accum_steps"):
    trainer_lib.Trainer(tasks.build(
        tiny_config(**{"train.grad_accum_steps": 2}), str(tmp_path)))
