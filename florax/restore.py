"""Restore only the model params from a training workdir's checkpoint.

Evaluation and export need the params, not the optimizer state (2x the
params for AdamW) nor the data-iterator position. Orbax's partial restore
reads just the `state/params` subtree of a checkpoint written by
`florax.train.checkpoint.Checkpointer`, onto whatever shardings the caller
asks for, without building the optimizer or compiling the train step.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from florax.train import checkpoint as ckpt_lib


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


def checkpoint_state_metadata(workdir: str, step: int) -> Any:
  """The tree metadata (shapes, dtypes) of a checkpoint's train state."""
  path = os.path.join(checkpoint_dir(workdir), str(step), "state")
  return ocp.PyTreeCheckpointer().metadata(path).item_metadata


def checkpoint_params_spec(workdir: str, step: int) -> Any:
  """ShapeDtypeStructs of a checkpoint's params, read from its metadata
  (for restoring a run whose model code is not at hand, e.g. init_from)."""
  tree = checkpoint_state_metadata(workdir, step)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                      dict(tree["params"]))


def _check_spec(workdir: str, abstract: Any):
  """A config mismatch is not a damaged checkpoint: compare the requested
  params with the workdir's `model_spec.json` (written by training) before
  reading any step. A subset of the params is fine."""
  path = os.path.join(workdir, ckpt_lib.SPEC_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  spec = ckpt_lib.param_spec(abstract)
  missing = sorted(k for k in spec if k not in saved)
  changed = sorted(k for k in spec if k in saved and saved[k] != spec[k])
  details = []
  if changed:
    k = changed[0]
    details.append(f"{len(changed)} parameters differ in shape (e.g. {k}: "
                   f"{saved[k]} in the checkpoint, {spec[k]} requested)")
  if missing:
    details.append(f"{len(missing)} requested parameters are not in the "
                   f"checkpoint (e.g. {missing[0]})")
  if details:
    raise ValueError(
        f"the checkpoints in {workdir} hold a different model: "
        + "; ".join(details) + ". Use the config the run was trained with.")


def _read_params(workdir: str, step: int, item: Any, restore_args: Any):
  with ocp.CheckpointManager(checkpoint_dir(workdir),
                             item_names=("state",)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, restore_args={"params": restore_args},
            partial_restore=True)))
  return restored["state"]["params"]


def restore_params(workdir: str, abstract: Any, step: int | None = None,
                   shardings: Any = None) -> tuple[Any, int]:
  """Reads the params of one checkpoint.

  With `step=None` the newest checkpoint whose params restore is used: a
  damaged step (a file missing or truncated) is skipped with one warning
  line. An explicit step that cannot be read raises.

  Args:
    workdir: a training workdir (holds checkpoints/<step>/state).
    abstract: pytree of ShapeDtypeStructs with the params' structure.
    step: checkpoint step; None takes the latest intact one.
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
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir}; "
                     f"available steps: {steps}")
  _check_spec(workdir, abstract)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  restore_args = jax.tree.map(
      lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape,
                                        dtype=a.dtype), abstract, shardings)
  item = {"params": abstract}
  if step is not None:
    try:
      return _read_params(workdir, step, item, restore_args), step
    except Exception as e:  # name the checkpoint; keep the cause attached
      raise RuntimeError(
          f"could not read the params of checkpoint step {step} in "
          f"{checkpoint_dir(workdir)} (damaged, or written by a different "
          f"config): {ckpt_lib.describe_error(e)}") from e
  candidates = steps[::-1]
  errors: dict[int, BaseException] = {}
  for i, s in enumerate(candidates):
    error = None
    try:
      params = _read_params(workdir, s, item, restore_args)
    except Exception as e:  # a damaged step, whatever Orbax raised
      error = e
    if ckpt_lib.all_processes_ok(error is None):
      return params, s
    errors[s] = error or RuntimeError("the restore failed on another process")
    if i + 1 < len(candidates):
      ckpt_lib.print0(ckpt_lib.damaged_warning(
          s, checkpoint_dir(workdir), errors[s], candidates[i + 1]))
  raise ckpt_lib.no_intact_error(checkpoint_dir(workdir), errors,
                                 what="checkpoint params") from errors[steps[-1]]
