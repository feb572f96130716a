"""Checkpoints that go bad after they were written, and writes that never
finish: resume falls back to the newest intact step (with one warning), old
steps are deleted only once their successor is finalised, and a re-run
evaluation replaces its metrics row.

Small pytrees and tiny Grain iterators; no model is trained.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from florax import restore as restore_lib
from florax.train import checkpoint as ckpt_lib
from florax.train import logging as log_lib

# A failed restore leaves Orbax's pending reads of the other arrays to be
# garbage-collected, which pytest reports as unraisable exceptions.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("data_a", "data_b")
WARNING = re.compile(
    r"^florax: checkpoint step (\d+) in (\S+) is damaged \((\w+): (.+)\); "
    r"falling back to step (\d+)$")


def _state(s):
  """A train-state-like tree whose every value depends on the step."""
  return {"params": {"w": jnp.arange(64 * 64, dtype=jnp.float32)
                          .reshape(64, 64) * s,
                     "b": {"c": jnp.arange(3, dtype=jnp.int32) + s}},
          "step": jnp.int32(s)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      jax.eval_shape(lambda: tree))


ABSTRACT = _abstract(_state(0))
ABSTRACT_PARAMS = _abstract(_state(0)["params"])


def _iterators():
  """Two data streams; after step s, a has yielded s batches and b 2s."""
  return {"data_a": iter(grain.MapDataset.range(100).batch(4)),
          "data_b": iter(grain.MapDataset.range(1000, 1100).batch(2))}


def _check_position(iterators, s):
  """The iterators continue exactly where they were after step s."""
  np.testing.assert_array_equal(next(iterators["data_a"]),
                                np.arange(4 * s, 4 * s + 4))
  np.testing.assert_array_equal(next(iterators["data_b"]),
                                1000 + np.arange(4 * s, 4 * s + 2))


def _check_state(state, s, want=None):
  want = _state(s) if want is None else want
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, w in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))


def _check_params(params, s):
  _check_state(params, s, _state(s)["params"])


def _save_steps(workdir, steps=(1, 2, 3), keep=3):
  ck = ckpt_lib.Checkpointer(workdir, keep, 1, data_names=NAMES)
  its = _iterators()
  for s in steps:
    next(its["data_a"])
    next(its["data_b"]), next(its["data_b"])
    ck.save(s, _state(s), its, force=True)
  ck.wait()
  ck.close()
  return os.path.join(str(workdir), "checkpoints")


def _finalised(ckpt_dir):
  return sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())


def _warnings(out):
  lines = [l for l in out.splitlines() if l.startswith("florax:")]
  return [WARNING.match(l) for l in lines], lines


# -- ways of damaging a written step -----------------------------------------


def _delete_array_file(step_dir):
  """The largest OCDBT data file: it holds the (64, 64) array's bytes."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                    recursive=True)
  os.remove(max(files, key=os.path.getsize))


def _delete(step_dir, *parts):
  path = os.path.join(step_dir, *parts)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_metadata(step_dir):
  _truncate(os.path.join(step_dir, "state", "_METADATA"))


def _truncate_data_position(step_dir):
  _truncate(os.path.join(step_dir, "data_b", "process_0-of-1.json"))


DAMAGES = {
    "array_file_deleted": (_delete_array_file, "ValueError"),
    "metadata_truncated": (_truncate_metadata, "JSONDecodeError"),
    "ocdbt_manifest_deleted": (
        lambda d: _delete(d, "state", "manifest.ocdbt"), "ValueError"),
    "ocdbt_manifest_truncated": (
        lambda d: _truncate(os.path.join(d, "state", "manifest.ocdbt")),
        "ValueError"),
    "state_dir_missing": (lambda d: _delete(d, "state"), "KeyError"),
    "data_item_dir_missing": (lambda d: _delete(d, "data_b"), "KeyError"),
    "data_position_truncated": (_truncate_data_position, "JSONDecodeError"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_latest_falls_back_past_a_damaged_step(tmp_path, capsys,
                                                       damage):
  ckpt_dir = _save_steps(tmp_path)
  damage_fn, error_type = DAMAGES[damage]
  damage_fn(os.path.join(ckpt_dir, "3"))
  capsys.readouterr()

  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  its = _iterators()
  step, state = ck.restore_latest(ABSTRACT, its)

  assert step == 2
  _check_state(state, 2)
  _check_position(its, 2)
  matches, lines = _warnings(capsys.readouterr().out)
  assert len(lines) == 1 and matches[0], lines
  assert matches[0].group(1) == "3" and matches[0].group(5) == "2"
  assert matches[0].group(2) == ckpt_dir
  assert matches[0].group(3) == error_type, lines
  assert len(matches[0].group(4)) <= 200

  # The damaged step is set aside (kept), so the resumed run can save step
  # 3 again; Orbax refuses to save over an existing step directory.
  assert _finalised(ckpt_dir) == [1, 2]
  assert len(glob.glob(os.path.join(ckpt_dir, "3.damaged-*"))) == 1
  ck.save(3, _state(3), its, force=True)
  ck.wait()
  ck.close()
  assert _finalised(ckpt_dir) == [1, 2, 3]
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  step, state = ck.restore_latest(ABSTRACT, _iterators())
  ck.close()
  assert step == 3
  _check_state(state, 3)
  assert "florax:" not in capsys.readouterr().out


def test_damaged_data_position_is_ignored_without_restore_data(tmp_path,
                                                               capsys):
  """restore_data=False reads no data item: step 3's state is intact, so it
  is used, and the iterators stay at their fresh position."""
  ckpt_dir = _save_steps(tmp_path)
  _delete(os.path.join(ckpt_dir, "3"), "data_b")
  capsys.readouterr()
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  its = _iterators()
  step, state = ck.restore_latest(ABSTRACT, its, restore_data=False)
  ck.close()
  assert step == 3
  _check_state(state, 3)
  _check_position(its, 0)
  assert "florax:" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["pytree_metadata_deleted",
                                    "checkpoint_metadata_deleted",
                                    "checkpoint_metadata_truncated"])
def test_metadata_that_restore_does_not_need(tmp_path, capsys, damage):
  """Not every lost file is damage: with the abstract tree (and its
  shardings) at hand, Orbax restores without state/_METADATA (OCDBT holds
  each array's own metadata), and its step-level _CHECKPOINT_METADATA
  (timestamps, handler names) is optional. Such a step restores exactly and
  is not skipped."""
  ckpt_dir = _save_steps(tmp_path)
  step_dir = os.path.join(ckpt_dir, "3")
  if damage == "pytree_metadata_deleted":
    _delete(step_dir, "state", "_METADATA")
  elif damage == "checkpoint_metadata_deleted":
    _delete(step_dir, "_CHECKPOINT_METADATA")
  else:
    _truncate(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  capsys.readouterr()
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  its = _iterators()
  step, state = ck.restore_latest(ABSTRACT, its)
  ck.close()
  assert step == 3
  _check_state(state, 3)
  _check_position(its, 3)
  params, step = restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS)
  assert step == 3
  _check_params(params, 3)
  assert "florax:" not in capsys.readouterr().out


def test_failed_step_leaves_iterators_where_they_were(tmp_path):
  """Step 3's state restores but one of its data positions does not: no
  iterator may keep step 3's position (explicit restore raises; fallback
  continues from step 2's positions, not a mix)."""
  ckpt_dir = _save_steps(tmp_path)
  _truncate_data_position(os.path.join(ckpt_dir, "3"))
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  its = _iterators()
  with pytest.raises(RuntimeError, match="step 3"):
    ck.restore(3, ABSTRACT, its)
  _check_position(its, 0)  # neither data_a nor data_b moved

  # Every step's data_b position damaged: nothing to fall back to, and the
  # iterators are back at their fresh position, not at step 3's data_a.
  for s in (1, 2):
    _truncate_data_position(os.path.join(ckpt_dir, str(s)))
  its = _iterators()
  with pytest.raises(RuntimeError):
    ck.restore_latest(ABSTRACT, its)
  _check_position(its, 0)
  ck.close()


def test_all_damaged_raises_naming_every_step(tmp_path, capsys):
  ckpt_dir = _save_steps(tmp_path)
  _delete_array_file(os.path.join(ckpt_dir, "3"))
  _truncate_metadata(os.path.join(ckpt_dir, "2"))
  _delete(os.path.join(ckpt_dir, "1"), "data_b")
  capsys.readouterr()
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  with pytest.raises(RuntimeError) as info:
    ck.restore_latest(ABSTRACT, _iterators())
  ck.close()
  message = str(info.value)
  assert "no intact checkpoint" in message and ckpt_dir in message
  for s, kind in ((3, "ValueError"), (2, "JSONDecodeError"),
                  (1, "KeyError")):
    assert f"step {s}: {kind}: " in message, message
  matches, lines = _warnings(capsys.readouterr().out)
  assert [(m.group(1), m.group(5)) for m in matches] == [("3", "2"),
                                                         ("2", "1")], lines
  assert _finalised(ckpt_dir) == [1, 2, 3]  # nothing renamed


def test_no_checkpoint_returns_none(tmp_path, capsys):
  ck = ckpt_lib.Checkpointer(tmp_path, 3, 1, data_names=NAMES)
  its = _iterators()
  assert ck.restore_latest(ABSTRACT, its) == (None, None)
  ck.close()
  _check_position(its, 0)
  assert "florax:" not in capsys.readouterr().out


def test_single_iterator_call_forms(tmp_path):
  """The one-iterator call forms of the earlier API still work."""
  ck = ckpt_lib.Checkpointer(tmp_path, 2, 1)
  it = iter(grain.MapDataset.range(100).batch(4))
  for s in (1, 2):
    next(it)
    ck.save(s, _state(s), it, force=True)
  ck.wait()
  assert sorted(os.listdir(tmp_path / "checkpoints" / "2")) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "data", "state"]
  it = iter(grain.MapDataset.range(100).batch(4))
  _check_state(ck.restore(1, ABSTRACT, it, restore_data=True), 1)
  np.testing.assert_array_equal(next(it), np.arange(4, 8))
  it = iter(grain.MapDataset.range(100).batch(4))
  step, state = ck.restore_latest(ABSTRACT, it)
  assert step == 2
  _check_state(state, 2)
  np.testing.assert_array_equal(next(it), np.arange(8, 12))
  with pytest.raises(ValueError, match="data names"):
    ck.save(3, _state(3), {"other": it})
  ck.close()
  ck = ckpt_lib.Checkpointer(tmp_path, 2, 1, data_names=NAMES)
  with pytest.raises(ValueError, match="single data iterator"):
    ck.save(3, _state(3), it)
  ck.close()


# -- deletion of old steps ---------------------------------------------------


def test_old_steps_survive_until_the_new_one_is_finalised(tmp_path,
                                                          monkeypatch):
  """keep=2: while step 3 is being written, steps 1 and 2 stay intact and
  restorable; step 1 goes only once step 3 is finalised."""
  ckpt_dir = _save_steps(tmp_path, (1, 2), keep=2)
  release = threading.Event()
  commit = async_checkpointer._background_wait_for_commit_futures

  def slow_commit(*args, **kwargs):
    assert release.wait(120), "the test never released the write"
    return commit(*args, **kwargs)

  monkeypatch.setattr(async_checkpointer,
                      "_background_wait_for_commit_futures", slow_commit)
  ck = ckpt_lib.Checkpointer(tmp_path, 2, 1, data_names=NAMES)
  its = _iterators()
  try:
    ck.save(3, _state(3), its, force=True)
    assert _finalised(ckpt_dir) == [1, 2]
    assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(ckpt_dir))
    for s in (1, 2):
      params, _ = restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS, s)
      _check_params(params, s)
  finally:
    release.set()
  ck.wait()
  ck.close()
  assert _finalised(ckpt_dir) == [2, 3]


def test_failed_write_deletes_nothing(tmp_path, monkeypatch):
  """A write that fails in the background (disk full) raises at `wait` and
  leaves the previous `keep` steps in place; a resume takes the newest."""
  ckpt_dir = _save_steps(tmp_path, (1, 2), keep=2)

  def failing_commit(*args, **kwargs):
    raise OSError(28, "No space left on device (simulated)")

  monkeypatch.setattr(async_checkpointer,
                      "_background_wait_for_commit_futures", failing_commit)
  ck = ckpt_lib.Checkpointer(tmp_path, 2, 1, data_names=NAMES)
  ck.save(3, _state(3), _iterators(), force=True)
  with pytest.raises(OSError, match="No space left"):
    ck.wait()
  ck.close()
  monkeypatch.undo()
  assert _finalised(ckpt_dir) == [1, 2]
  ck = ckpt_lib.Checkpointer(tmp_path, 2, 1, data_names=NAMES)
  its = _iterators()
  step, state = ck.restore_latest(ABSTRACT, its)
  ck.close()
  assert step == 2
  _check_state(state, 2)
  _check_position(its, 2)


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, {tests!r})
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    import test_checkpoint_recovery as t
    from florax.train import checkpoint as ckpt_lib
    t._save_steps({workdir!r}, (1, 2, 3), keep=2)
    # Step 4's write never completes before the kill.
    never = threading.Event()
    commit = async_checkpointer._background_wait_for_commit_futures
    async_checkpointer._background_wait_for_commit_futures = (
        lambda *a, **k: (never.wait(), commit(*a, **k)))
    ck = ckpt_lib.Checkpointer({workdir!r}, 2, 1, data_names=t.NAMES)
    ck.save(4, t._state(4), t._iterators(), force=True)
    print("saved", sorted(os.listdir(ck.directory)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_async_save_keeps_previous_steps(tmp_path):
  """SIGKILL after `save` returned, before the write finished: the two
  previous steps are intact, and a rerun resumes from and re-saves step 4."""
  workdir = str(tmp_path)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-c", _KILLED_CHILD.format(
          tests=os.path.join(ROOT, "tests"), workdir=workdir)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert "saved" in proc.stdout, proc.stderr[-3000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert _finalised(ckpt_dir) == [2, 3]
  for s in (2, 3):
    params, _ = restore_lib.restore_params(workdir, ABSTRACT_PARAMS, s)
    _check_params(params, s)

  ck = ckpt_lib.Checkpointer(workdir, 2, 1, data_names=NAMES)
  its = _iterators()
  step, state = ck.restore_latest(ABSTRACT, its)
  assert step == 3
  _check_state(state, 3)
  _check_position(its, 3)
  next(its["data_a"])
  next(its["data_b"]), next(its["data_b"])
  ck.save(4, _state(4), its, force=True)  # over the killed run's leftovers
  ck.wait()
  ck.close()
  assert _finalised(ckpt_dir) == [3, 4]
  params, step = restore_lib.restore_params(workdir, ABSTRACT_PARAMS)
  assert step == 4
  _check_params(params, 4)


# -- restore_params ----------------------------------------------------------


def test_restore_params_falls_back_and_names_an_explicit_damaged_step(
    tmp_path, capsys):
  ckpt_dir = _save_steps(tmp_path)
  _delete_array_file(os.path.join(ckpt_dir, "3"))
  capsys.readouterr()
  params, step = restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS)
  assert step == 2
  _check_params(params, 2)
  matches, lines = _warnings(capsys.readouterr().out)
  assert len(lines) == 1 and matches[0], lines
  assert (matches[0].group(1), matches[0].group(5)) == ("3", "2")

  with pytest.raises(RuntimeError, match=r"checkpoint step 3 .*ValueError: .*params\.w"):
    restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS, step=3)
  params, step = restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS, 1)
  assert step == 1
  _check_params(params, 1)

  for s in (1, 2):
    _truncate_metadata(os.path.join(ckpt_dir, str(s)))
  with pytest.raises(RuntimeError, match="no intact checkpoint params"):
    restore_lib.restore_params(tmp_path, ABSTRACT_PARAMS)
  assert restore_lib.available_steps(tmp_path) == [1, 2, 3]


def test_restore_params_reports_a_different_model_not_damage(tmp_path,
                                                             capsys):
  _save_steps(tmp_path, (1, 2))
  ckpt_lib.check_model_spec(str(tmp_path), ABSTRACT_PARAMS)
  other = dict(ABSTRACT_PARAMS,
               w=jax.ShapeDtypeStruct((32, 64), jnp.float32))
  capsys.readouterr()
  with pytest.raises(ValueError, match="different model.*w: \\[64, 64\\]"):
    restore_lib.restore_params(tmp_path, other)
  assert "damaged" not in capsys.readouterr().out
  # A subset of the params is a legitimate partial restore.
  params, step = restore_lib.restore_params(
      tmp_path, {"w": ABSTRACT_PARAMS["w"]})
  assert step == 2 and set(params) == {"w"}


# -- metrics.jsonl -----------------------------------------------------------


def test_metric_writer_replace_leaves_one_row_per_step_and_metric(tmp_path):
  writer = log_lib.MetricWriter(str(tmp_path))
  writer.write(2, {"train/loss": 1.0, "eval/a": 0.1})
  writer.write(2, {"eval/a": 0.2, "eval/b": 0.3})
  writer.write(4, {"eval/a": 0.4})
  writer.replace(2, {"eval/a": 0.5, "eval/b": 0.6})
  writer.replace(2, {"eval/a": 0.7})
  writer.replace(6, {"eval/a": 0.8})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert rows == [{"step": 2, "train/loss": 1.0},
                  {"step": 4, "eval/a": 0.4},
                  {"step": 2, "eval/b": 0.6},
                  {"step": 2, "eval/a": 0.7},
                  {"step": 6, "eval/a": 0.8}]
  pairs = [(r["step"], k) for r in rows for k in r if k != "step"]
  assert len(pairs) == len(set(pairs))
  assert not os.path.exists(str(tmp_path / "metrics.jsonl") + ".tmp")

  # Only process 0 (an enabled writer) touches the file.
  before = open(tmp_path / "metrics.jsonl").read()
  log_lib.MetricWriter(str(tmp_path), enabled=False).replace(2, {"eval/a": 1})
  assert open(tmp_path / "metrics.jsonl").read() == before
