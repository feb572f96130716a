"""Restore only the model params from a training workdir's checkpoint.

Evaluation and export need the params, not the optimizer state (2x the
params for AdamW) nor the data-iterator position. Orbax's partial restore
reads just the `state/params` subtree of a checkpoint written by
`florax.train.checkpoint.Checkpointer`, onto whatever shardings the caller
asks for, without building the optimizer or compiling the train step.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def available_steps(workdir: str) -> list[int]:
  """Steps of the finalised checkpoints in `workdir`, ascending."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
    return sorted(manager.all_steps())


def abstract_params(task) -> Any:
  """Unboxed ShapeDtypeStructs of the task's params (nothing allocated)."""
  return nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))


def restore_params(workdir: str, abstract: Any, step: int | None = None,
                   shardings: Any = None) -> tuple[Any, int]:
  """Reads the params of one checkpoint.

  Args:
    workdir: a training workdir (holds checkpoints/<step>/state).
    abstract: pytree of ShapeDtypeStructs with the params' structure.
    step: checkpoint step; None takes the latest.
    shardings: pytree of shardings matching `abstract` (or one sharding for
      every leaf); None puts everything on the first local device.

  Returns:
    (params, step).
  """
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint in {checkpoint_dir(workdir)}; train first "
        "(python -m launch.train --config ... --workdir ...)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir}; "
                     f"available steps: {steps}")
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  restore_args = jax.tree.map(
      lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape,
                                        dtype=a.dtype), abstract, shardings)
  item = {"params": abstract}
  try:
    with ocp.CheckpointManager(checkpoint_dir(workdir),
                               item_names=("state",)) as manager:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=item, restore_args={"params": restore_args},
              partial_restore=True)))
  except Exception as e:  # name the checkpoint; keep the cause attached
    raise RuntimeError(
        f"could not read the params of checkpoint step {step} in "
        f"{checkpoint_dir(workdir)} (does the config match the run that "
        f"wrote it?): {type(e).__name__}: {e}") from e
  return restored["state"]["params"], step
