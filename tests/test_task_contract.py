"""The trainer/task contract on a synthetic task that uses all of it:
a frozen teacher, two batch kinds of different shapes (one nested), the
step reaching the loss, exact resume of the kind sequence, init_from."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import contract_task
from florax import restore, tasks
from florax.data import mixtures
from florax.train import trainer as trainer_lib


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if "train/loss" in l]


def _kinds(rows):
  """The kind of every logged step (log_every=1)."""
  return [next(k for k in ("vec", "seq") if row[f"data/{k}/steps"] == 1)
          for row in rows]


def _train(workdir, max_steps=None, **overrides):
  t = trainer_lib.Trainer(tasks.build(
      contract_task.synthetic_config(**overrides), str(workdir)))
  compiles = []
  original = t.compile_step
  t.compile_step = lambda kind=None: compiles.append(kind) or original(kind)
  t.train(max_steps=max_steps)
  return t, compiles


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  t, compiles = _train(workdir)
  return workdir, t, compiles


def test_one_compile_per_kind_and_the_mixture(straight):
  workdir, t, compiles = straight
  assert sorted(compiles) == ["seq", "vec"]
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 9))
  # The kind of step s is the mixture's pure function of (seed, s).
  expected = mixtures.round_robin_choices({"vec": 1.0, "seq": 1.0}, 0,
                                          np.arange(8))
  assert _kinds(rows) == [["vec", "seq"][i] for i in expected]
  assert {"vec", "seq"} <= set(_kinds(rows))  # both kinds were trained
  # Each kind's latest metrics are logged under train/<kind>/...
  assert any("train/seq/loss" in r for r in rows)
  # The loss saw the global step (0-based, before the update).
  assert [r["train/step_seen"] for r in rows] == list(range(8))


def test_frozen_teacher_is_untouched_and_never_saved(straight):
  workdir, t, _ = straight
  fresh = nn.unbox(contract_task._Teacher().init(
      jax.random.key(7), np.zeros((1, 8)))["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(t.frozen),
               jax.device_get(fresh))
  assert np.any(jax.device_get(fresh["proj"]["kernel"]))
  # Not in the optimizer state, not in the checkpoint.
  opt_leaves = jax.tree.leaves(t.state["opt_state"])
  opt_shapes = sorted(tuple(x.shape) for x in opt_leaves if x.ndim == 2)
  param_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(
      t.state["params"]) if x.ndim == 2)
  assert opt_shapes == sorted(param_shapes * 2)  # AdamW mu, nu: params only
  saved = restore.checkpoint_state_metadata(str(workdir), 8)
  assert set(saved.keys()) == {"step", "params", "opt_state", "rng"}
  assert set(saved["params"].keys()) == {"fc1", "fc2"}
  assert os.path.exists(os.path.join(workdir, "frozen.json"))


def test_resume_replays_the_kind_sequence_exactly(straight, tmp_path):
  workdir, t, _ = straight
  _train(tmp_path, max_steps=3)   # stops after step 3 with a checkpoint
  resumed, compiles = _train(tmp_path)
  assert sorted(compiles) == ["seq", "vec"]
  assert _kinds(_rows(tmp_path)) == _kinds(_rows(workdir))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               jax.device_get(t.state["params"]),
               jax.device_get(resumed.state["params"]))


def test_resume_with_another_teacher_is_refused(straight, tmp_path):
  _train(tmp_path, max_steps=2)
  t = trainer_lib.Trainer(tasks.build(
      contract_task.synthetic_config(teacher_seed=8), str(tmp_path)))
  with pytest.raises(ValueError, match="another frozen variables"):
    t.train()


def test_unknown_kind_in_the_mixture_is_refused(tmp_path):
  cfg = contract_task.synthetic_config(**{"train.mixture": {"vec": 1.0,
                                                              "pair": 1.0}})
  with pytest.raises(ValueError, match=r"unknown batch kinds \['pair'\]"):
    trainer_lib.Trainer(tasks.build(cfg, str(tmp_path)))


def test_init_from_another_run_with_a_prefix_map(straight, tmp_path, capsys):
  workdir, t, _ = straight
  source = jax.device_get(t.state["params"])
  # Only the first layer is seeded; the second stays freshly initialised.
  new = trainer_lib.Trainer(tasks.build(contract_task.synthetic_config(**{
      "init_from.path": str(workdir),
      "init_from.prefixes": (("fc1", "fc1"),)}), str(tmp_path)))
  state = new.init_state()
  got = jax.device_get(state["params"])
  fresh = jax.device_get(trainer_lib.Trainer(tasks.build(
      contract_task.synthetic_config(), str(tmp_path / "fresh"))
                                             ).init_state()["params"])
  jax.tree.map(np.testing.assert_array_equal, got["fc1"], source["fc1"])
  jax.tree.map(np.testing.assert_array_equal, got["fc2"], fresh["fc2"])
  assert not np.allclose(fresh["fc1"]["kernel"], source["fc1"]["kernel"])
  # A fresh optimizer: AdamW's first moments are all zero.
  mu = [x for x in jax.tree.leaves(jax.device_get(state["opt_state"]))]
  assert all(not np.any(np.asarray(x)) for x in mu if np.ndim(x) == 2)
  out = capsys.readouterr().out
  assert "loaded 2 params, skipped 0, freshly initialised 2" in out


def test_a_finished_run_says_so_without_compiling(straight, capsys):
  workdir, _, _ = straight
  again, compiles = _train(workdir)
  assert compiles == []
  assert f"{workdir} already finished at step 8 (train.steps=8)" in (
      capsys.readouterr().out)
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 9))


def test_no_evaluators_is_said_once(tmp_path, capsys):
  _train(tmp_path, **{"train.eval_every": 2, "train.steps": 6})
  out = capsys.readouterr().out
  assert out.count("no evaluators are configured") == 1
  assert "eval at step" not in out
