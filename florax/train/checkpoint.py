"""Orbax checkpoints of the train state and the data iterator position.

A checkpoint holds params, optimizer state, step and RNG ('state') and the
Grain iterator state ('data'), written together so a resumed run continues
the same data stream. Orbax writes into a temporary directory and renames it
when complete, so a killed job never corrupts a checkpoint it already wrote;
old checkpoints are deleted only after a newer one is finalised.

A workdir remembers the parameter shapes of its model (`model_spec.json`);
a run whose model differs is refused before anything is restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

SPEC_FILE = "model_spec.json"


def param_spec(params: Any) -> dict[str, list[int]]:
  """{'path/to/param': shape} of a (possibly abstract) params tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
          for path, leaf in flat}


def check_model_spec(workdir: str, params: Any):
  """Writes the spec on first use; raises if the workdir's model differs."""
  path = os.path.join(workdir, SPEC_FILE)
  spec = param_spec(params)
  if not os.path.exists(path):
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(spec, f, indent=0, sort_keys=True)
      os.replace(path + ".tmp", path)
    return
  with open(path) as f:
    saved = json.load(f)
  if saved == spec:
    return
  missing = sorted(set(saved) - set(spec))
  extra = sorted(set(spec) - set(saved))
  changed = sorted(k for k in set(saved) & set(spec) if saved[k] != spec[k])
  details = []
  if changed:
    k = changed[0]
    details.append(f"{len(changed)} parameters changed shape (e.g. {k}: "
                   f"{saved[k]} in the workdir, {spec[k]} now)")
  if missing:
    details.append(f"{len(missing)} parameters of the workdir's model are "
                   f"missing now (e.g. {missing[0]})")
  if extra:
    details.append(f"{len(extra)} parameters are new (e.g. {extra[0]})")
  raise ValueError(
      f"workdir {workdir} holds a checkpoint of a different model: "
      + "; ".join(details) + ". Use a new --workdir or the matching config.")


LAYOUT_FILE = "data_layout.json"


def check_data_layout(workdir: str, layout: dict, restore_data: bool):
  """A data iterator's position only means something for the process count
  and batch size it was saved with: refuse a resume that changed them,
  unless the data stream is to start afresh."""
  path = os.path.join(workdir, LAYOUT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != layout and restore_data:
      raise ValueError(
          f"workdir {workdir} was trained with data layout {saved}, this run "
          f"has {layout}: the saved data position cannot be continued. Use "
          "the original layout, or --config.train.restore_data_state=False "
          "to resume the model with a fresh data stream.")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(layout, f)
    os.replace(path + ".tmp", path)


class Checkpointer:
  """CheckpointManager for {'state': pytree, 'data': grain iterator}."""

  def __init__(self, workdir: str, keep: int, every: int):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, force: bool = False):
    return self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator,
              restore_data: bool = True):
    """Restores onto the shardings carried by `abstract_state`'s leaves.

    With `restore_data=False` the data iterator keeps its fresh position
    (e.g. after changing the process count, which changes the data order).
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if restore_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # name the checkpoint; keep the cause attached
      raise RuntimeError(
          f"could not restore checkpoint step {step} from "
          f"{self.manager.directory}: {type(e).__name__}: {e}") from e
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
