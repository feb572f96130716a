"""Evaluate a checkpoint of a training workdir with the task's evaluators.

Only the params are read from the checkpoint (no optimizer state, no train
step compiled). They are placed on the mesh and logical shardings training
used, and evaluated under the same mesh context as `Trainer.evaluate`, so a
re-evaluation reproduces what training logged for that step.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from florax import config_checks, restore
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.train import logging as log_lib


def restore_for_eval(config, workdir: str, step: int | None = None,
                     task: base.Task | None = None) -> tuple:
  """Builds the task (unless given) and restores one checkpoint's params.

  Returns:
    (params on the training mesh, step, task, mesh, logical rules).
  """
  config_checks.check_config(config)
  if task is None:
    task = base.build(config, workdir)
    task.validate()
  mesh = mesh_lib.make_mesh(dict(config.mesh.axes))
  rules = sharding_lib.rules_from_config(config.sharding.rules)
  boxed = jax.eval_shape(task.init, jax.random.key(0))
  shardings = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
  params, step = restore.restore_params(workdir, nn.unbox(boxed), step,
                                        shardings)
  return params, step, task, mesh, rules


def evaluate_workdir(config, workdir: str, step: int | None = None,
                     write: bool = True, task: base.Task | None = None
                     ) -> tuple[int, dict[str, float]]:
  """Restores one checkpoint's params and runs `task.evaluate`.

  Args:
    config: the config the workdir was trained with (eval fields may differ).
    workdir: the training workdir.
    step: checkpoint step; None takes the latest.
    write: append the metrics to the workdir's sinks (metrics.jsonl,
      TensorBoard) at the checkpoint's step.
    task: an already built task to reuse (its compiled encoders).

  Returns:
    (step, metrics).
  """
  params, step, task, mesh, rules = restore_for_eval(config, workdir, step,
                                                     task)
  with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
    metrics = {k: float(v) for k, v in task.evaluate(params).items()}
  if write:
    writer = log_lib.MetricWriter(workdir)
    writer.write(step, metrics)
    writer.flush()
    writer.close()
  return step, metrics
