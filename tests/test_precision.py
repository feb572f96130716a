"""fp16 dynamic loss scaling.

The scale arithmetic against a hand-run sequence, and in the trainer: a
batch with an infinite input gives non-finite gradients, the step is skipped
(params and optimizer state bit-identical), the scale halves, the skip is
counted, and the next finite batch trains normally.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

from florax import tasks
from florax.parallel import sharding as sharding_lib
from florax.train import precision
from florax.train import trainer as trainer_lib
import scale_tasks


def test_scale_grows_after_interval_and_halves_on_overflow():
  state = precision.init_state(8.0)
  kw = dict(growth_interval=3, growth_factor=2.0, backoff_factor=0.5)
  seen = []
  for finite in [True, True, True, True, False, True]:
    state = precision.update_state(state, jnp.asarray(finite), **kw)
    seen.append((float(state["scale"]), int(state["good_steps"]),
                 int(state["skipped"])))
  # By hand: 3 finite steps double 8 -> 16, one more counts 1, an overflow
  # halves and resets, then counting restarts.
  assert seen == [(8, 1, 0), (8, 2, 0), (16, 0, 0), (16, 1, 0), (8, 0, 1),
                  (8, 1, 1)]
  assert bool(precision.all_finite({"a": jnp.ones(3)}))
  assert not bool(precision.all_finite({"a": jnp.array([1.0, jnp.inf])}))


def test_fp16_overflow_skips_the_update_and_training_continues(tmp_path):
  cfg = scale_tasks.regression_config(**{"model.dtype": "float16",
                                         "sharding.zero_stage": 1})
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path)))
  assert t.loss_scaling  # 'auto' turns it on for float16
  state = t.init_state()
  step = t.compile_step()
  it = t.task.train_iterator(cfg.train.batch_size, 0, 1)
  put = lambda b: sharding_lib.global_batch(b, t.batch_sharding)

  state, m = step(state, put(next(it)), {})
  assert float(m["train/loss_scale"]) == 2.0 ** 15
  before = jax.device_get(state)

  bad = next(it)
  bad["x"][3, 1] = np.inf
  state, m = step(state, put(bad), {})
  after = jax.device_get(state)
  assert not np.isfinite(float(m["train/grad_norm"]))
  jax.tree.map(np.testing.assert_array_equal, before["params"],
               after["params"])
  jax.tree.map(np.testing.assert_array_equal, before["opt_state"],
               after["opt_state"])
  assert float(after["loss_scale"]["scale"]) == 2.0 ** 14
  assert int(after["loss_scale"]["skipped"]) == 1
  assert int(after["step"]) == 2

  state, m = step(state, put(next(it)), {})
  final = jax.device_get(state)
  assert np.isfinite(float(m["train/loss"]))
  assert int(m["train/skipped_steps"]) == 1
  assert float(m["train/loss_scale"]) == 2.0 ** 14
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), after["params"],
      final["params"])))
  assert moved > 0
  # fp32 master params even though the model computes in fp16.
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(final["params"]))
