"""Orbax checkpoints of the train state and the data iterator position.

A checkpoint holds params, optimizer state, step and RNG ('state') and the
position of each Grain iterator (one item per data name), written together
so a resumed run continues the same data streams. Orbax writes into a
temporary directory and renames it when complete, so a killed job never
corrupts a checkpoint it already wrote; old checkpoints are deleted only
after a newer one is finalised. A checkpoint damaged later (a file lost or
cut short) is skipped on resume for the newest intact one, with a warning.

A workdir remembers the parameter shapes of its model (`model_spec.json`);
a run whose model differs is refused before anything is restored.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Mapping, Sequence

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


def _first_line(error: BaseException, limit: int = 200) -> str:
  """The first non-empty line of an exception's message, cut to `limit`."""
  text = (str(error.args[0]) if isinstance(error, KeyError) and error.args
          else str(error))
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  line = lines[0] if lines else "(no message)"
  return line if len(line) <= limit else line[:limit - 3] + "..."


def describe_error(error: BaseException) -> str:
  """'ValueError: first line of the message', of the innermost explicit
  cause: Orbax wraps TensorStore's precise error ('NOT_FOUND: Error reading
  "params.w/0.0" ...') in a generic one."""
  for _ in range(10):
    if error.__cause__ is None:
      break
    error = error.__cause__
  return f"{type(error).__name__}: {_first_line(error)}"


def damaged_warning(step: int, directory: Any, error: BaseException,
                    previous: int) -> str:
  """The one line printed when a damaged step is skipped."""
  return (f"florax: checkpoint step {step} in {directory} is damaged "
          f"({describe_error(error)}); falling back to step {previous}")


def no_intact_error(directory: Any, errors: Mapping[int, BaseException],
                    what: str = "checkpoint") -> RuntimeError:
  """Every step is damaged: starting over silently would throw the run
  away, so name each step and its problem instead."""
  listed = "; ".join(f"step {s}: {describe_error(e)}"
                     for s, e in sorted(errors.items(), reverse=True))
  return RuntimeError(
      f"no intact {what} in {directory}: every step failed to restore "
      f"({listed}). Move the damaged step directories away to start from "
      "scratch, or use a new --workdir.")


def all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process, so that all processes settle on
  the same checkpoint step even if a file is damaged for one of them only."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.min(flags))


def print0(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


class Checkpointer:
  """CheckpointManager for {'state': pytree, <data name>: grain iterator...}.

  One Orbax item per data iterator: `data_names` are their item names (one
  Grain iterator per named batch kind). A call may pass a single iterator
  instead of a mapping when there is one data name.

  Old checkpoints are deleted by Orbax (`max_to_keep`) only after a newer
  step is finalised: its finalize thread waits for the new step's writes
  and its rename out of the temporary directory, and a write that fails
  stops it before any deletion (tests/test_checkpoint_recovery.py checks
  this, for a failing write, a SIGKILL and a slow write).
  """

  def __init__(self, workdir: str, keep: int | None, every: int,
               data_names: Sequence[str] = ("data",)):
    self.every = every
    self.data_names = tuple(data_names)
    if len(set(self.data_names)) != len(self.data_names) or (
        "state" in self.data_names):
      raise ValueError(f"data_names {self.data_names} must be distinct and "
                       "must not include 'state'")
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_names=("state", *self.data_names),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=True))

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def _iterators(self, data_iterators) -> dict[str, Any]:
    """{name: iterator}, checked against `data_names`."""
    if data_iterators is None:
      data_iterators = {}
    elif not isinstance(data_iterators, Mapping):
      if len(self.data_names) != 1:
        raise ValueError(
            f"a single data iterator was given, but this checkpointer saves "
            f"{len(self.data_names)} ({self.data_names}): pass a mapping")
      data_iterators = {self.data_names[0]: data_iterators}
    if set(data_iterators) != set(self.data_names):
      raise ValueError(
          f"data iterators {sorted(data_iterators)} do not match the "
          f"checkpointer's data names {sorted(self.data_names)}")
    return dict(data_iterators)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the finalised checkpoints on disk, ascending."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any,
           data_iterators: Mapping[str, Any] | Any, force: bool = False):
    iterators = self._iterators(data_iterators)
    items = {"state": ocp.args.StandardSave(state)}
    items.update({name: grain.checkpoint.CheckpointSave(it)
                  for name, it in iterators.items()})
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def _restore_step(self, step: int, abstract_state: Any,
                    iterators: Mapping[str, Any], restore_data: bool):
    """State first, then the data positions; a failure leaves every
    iterator where it was before the call (so a damaged step never leaves
    them at a mix of two steps' positions)."""
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    if restore_data and iterators:
      before = {name: copy.deepcopy(it.get_state())
                for name, it in iterators.items()}
      try:
        self.manager.restore(step, args=ocp.args.Composite(**{
            name: grain.checkpoint.CheckpointRestore(it)
            for name, it in iterators.items()}))
      except BaseException:
        for name, it in iterators.items():
          it.set_state(before[name])
        raise
    return state

  def restore(self, step: int, abstract_state: Any,
              data_iterators: Mapping[str, Any] | Any = None,
              restore_data: bool = True):
    """Restores onto the shardings carried by `abstract_state`'s leaves.

    With `restore_data=False` the data iterators keep their fresh position
    (e.g. after changing the process count, which changes the data order).
    """
    iterators = self._iterators(data_iterators) if restore_data else {}
    try:
      return self._restore_step(step, abstract_state, iterators, restore_data)
    except Exception as e:  # name the checkpoint; keep the cause attached
      raise RuntimeError(
          f"could not restore checkpoint step {step} from "
          f"{self.manager.directory}: {describe_error(e)}") from e

  def restore_latest(self, abstract_state: Any,
                     data_iterators: Mapping[str, Any] | Any = None,
                     restore_data: bool = True
                     ) -> tuple[int | None, Any]:
    """Restores the newest intact checkpoint: (step, state).

    A step that fails to restore (a file missing or truncated, an item
    missing) is skipped with one warning line, and the next older step is
    tried; the iterators end at the position of the step whose state is
    returned. The skipped steps are renamed `<step>.damaged-<time>` (kept
    for inspection; Orbax ignores them), so that the resumed run can save
    those steps again. Returns (None, None) when there is no checkpoint;
    raises a RuntimeError naming every step's problem when none is intact
    (and renames nothing).
    """
    iterators = self._iterators(data_iterators) if restore_data else {}
    steps = self.all_steps()[::-1]
    errors: dict[int, BaseException] = {}
    for i, step in enumerate(steps):
      error = None
      try:
        state = self._restore_step(step, abstract_state, iterators,
                                   restore_data)
      except Exception as e:  # a damaged step, whatever Orbax raised
        error, state = e, None
      if not all_processes_ok(error is None):
        errors[step] = error or RuntimeError(
            "the restore failed on another process")
        if i + 1 < len(steps):
          print0(damaged_warning(step, self.directory, errors[step],
                                 steps[i + 1]))
        continue
      self._set_aside(sorted(errors))
      return step, state
    if errors:
      raise no_intact_error(self.directory, errors) from errors[steps[0]]
    return None, None

  def _set_aside(self, steps: Sequence[int]):
    """Renames damaged step directories out of Orbax's sight: it refuses to
    save a step whose directory exists."""
    if not steps:
      return
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.damaged-{stamp}", 1
        while os.path.exists(dst):
          dst, n = f"{src}.damaged-{stamp}-{n}", n + 1
        os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("florax_checkpoint_set_aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
