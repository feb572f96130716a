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
  """Builds the task (unless given) and restores one checkpoint's params
  (the EMA of the weights for a run with optimizer.ema_decay > 0, which is
  what training evaluated).

  Returns:
    (params on the training mesh, step, task, mesh, logical rules).
  """
  if task is None:
    task = tasks.build(config, workdir)
  mesh, rules = task.mesh, task.rules
  boxed = jax.eval_shape(task.init, jax.random.key(0))
  shardings = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
  if config.optimizer.get("ema_decay", 0.0):
    # Training evaluated the EMA of the weights: so does a re-evaluation.
    from florax.train import ema  # pylint: disable=g-import-not-at-top
    params, step = ema.restore_ema_params(workdir, nn.unbox(boxed), step,
                                          shardings)
  else:
    params, step = restore.restore_params(workdir, nn.unbox(boxed), step,
                                          shardings)
  return params, step, task, mesh, rules


def initial_params(config, workdir: str) -> tuple:
  """The params a run of `config` starts from, placed as training places
  them: the seed's random init with `init_from` applied. Nothing trains,
  no step compiles: the baseline of a pre-training comparison (a linear
  probe of a random-init tower, evaluated by the same evaluators).

  Returns:
    (params, task, mesh, logical rules).
  """
  from florax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  task = tasks.build(config, workdir)
  params = trainer_lib.Trainer(task).init_state()["params"]
  return params, task, task.mesh, task.rules


def evaluate_workdir(config, workdir: str, step: int | None = None,
                     write: bool = True, task: base.Task | None = None,
                     initial: bool = False
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
    initial: evaluate the params training starts from (`initial_params`)
      instead of a checkpoint; logged at step 0.

  Returns:
    (step, metrics).
  """
  if initial:
    params, task, mesh, rules = initial_params(config, workdir)
    step = 0
  else:
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
