"""Evaluate a checkpoint of a training workdir with the task's evaluators.

Only the params are read from the checkpoint (no optimizer state, no train
step compiled). They are placed on the mesh and logical shardings training
used, and evaluated under the same mesh context as `Trainer.evaluate`, so a
re-evaluation reproduces what training logged for that step.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from florax import restore, tasks
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
  if task is None:
    task = tasks.build(config, workdir)
  mesh, rules = task.mesh, task.rules
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
    write: write the metrics to the workdir's sinks (metrics.jsonl,
      TensorBoard) at the checkpoint's step, replacing in metrics.jsonl the
      values an earlier evaluation of that step logged.
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
    writer.replace(step, metrics)
    writer.flush()
    writer.close()
  return step, metrics
