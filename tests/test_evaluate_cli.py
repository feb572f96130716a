"""launch.evaluate's library (florax.evaluate.checkpoint_eval) reproduces
training's eval; the task's evaluators match naive numpy references."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

from florax import tasks  # noqa: E402
from florax.data import digits  # noqa: E402
from florax.evaluate import checkpoint_eval  # noqa: E402
from tests import trained_tiny  # noqa: E402


def _logged(workdir):
  """{step: {metric: value}} of the eval rows training wrote."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval/zeroshot_top1" in row:
        rows.setdefault(row["step"], row)  # the first one: training's
  return rows


def _pad(x, n=128):
  """Rows padded to the eval batch (the task's one compiled shape)."""
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def _pessimistic_rank(scores, correct_index):
  """Naive loop: other entries scoring >= the right one."""
  right = scores[correct_index]
  return sum(1 for j, s in enumerate(scores)
             if j != correct_index and s >= right)


def test_launch_evaluate_reproduces_training_eval(tmp_path):
  # A copy, so that the rows appended here stay out of the shared workdir.
  wd = str(tmp_path / "run")
  shutil.copytree(trained_tiny.workdir(), wd)
  logged = _logged(wd)
  assert sorted(logged) == [2, 4]
  proc = trained_tiny.run_cli(
      "launch.evaluate", "--config", "configs/florence.py:tiny",
      *trained_tiny.CLI_OVERRIDES, "--workdir", wd, "--step", "2")
  assert "eval of" in proc.stdout and "at step 2" in proc.stdout, proc.stdout
  # Appended to the same sink at the checkpoint's step, equal to training's.
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  assert last["step"] == 2
  for k in ("eval/zeroshot_top1", "eval/zeroshot_top5"):
    assert last[k] == logged[2][k], (k, last[k], logged[2][k])


def test_task_evaluate_matches_numpy_reference():
  wd = trained_tiny.workdir()
  cfg = trained_tiny.config(**{"evals.retrieval.enabled": True})
  task = tasks.build(cfg, wd)
  step, metrics = checkpoint_eval.evaluate_workdir(cfg, wd, 2, write=False,
                                                   task=task)
  assert step == 2

  # Numpy reference from the task's raw encoders: CLIP's ensemble by hand,
  # pessimistic ranks by a naive loop, float64.
  params, _, _, _, _ = checkpoint_eval.restore_for_eval(cfg, wd, 2, task)
  encode_image, encode_text = task.encode_fns()
  holdout = task.evaluators.eval_set(cfg.evals.zeroshot.data)
  images, labels = holdout.images, holdout.labels

  def enc(fn, x):
    return np.concatenate([np.asarray(fn(params, _pad(x[i:i + 128])))[
        :len(x[i:i + 128])] for i in range(0, len(x), 128)]).astype(np.float64)

  img = enc(encode_image, images)
  n_t = len(digits.TEMPLATES)
  prompts = [digits.describe(c, t) for c in range(10) for t in digits.TEMPLATES]
  txt = enc(encode_text, task.tokenizer.encode_batch(prompts,
                                                     cfg.data.max_len))
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  cls = txt.reshape(10, n_t, -1).mean(1)
  cls /= np.linalg.norm(cls, axis=1, keepdims=True)
  ranks = np.array([_pessimistic_rank(img[i] @ cls.T, labels[i])
                    for i in range(len(labels))])
  # float32 vs float64 may flip a near-tie or two.
  slack = 2 / len(labels) + 1e-9
  assert abs(metrics["eval/zeroshot_top1"] - np.mean(ranks < 1)) <= slack
  assert abs(metrics["eval/zeroshot_top5"] - np.mean(ranks < 5)) <= slack

  # Retrieval: image i described by template i mod T of its class.
  caps = [digits.describe(int(c), digits.TEMPLATES[i % n_t])
          for i, c in enumerate(labels)]
  sims = img @ enc(encode_text, task.tokenizer.encode_batch(
      caps, cfg.data.max_len)).T
  i2t = np.array([_pessimistic_rank(sims[i], i) for i in range(len(caps))])
  t2i = np.array([_pessimistic_rank(sims[:, i], i) for i in range(len(caps))])
  for k in (1, 5, 10):
    assert abs(metrics[f"eval/retrieval_i2t_r{k}"] - np.mean(i2t < k)) <= slack
    assert abs(metrics[f"eval/retrieval_t2i_r{k}"] - np.mean(t2i < k)) <= slack


def test_evaluate_latest_step_by_default():
  # No compile: the restore alone, on the shared workdir.
  cfg = trained_tiny.config()
  params, step, _, _, _ = checkpoint_eval.restore_for_eval(
      cfg, trained_tiny.workdir())
  assert step == trained_tiny.STEPS
  assert "image_proj" in params and "logit_scale" in params
  try:
    checkpoint_eval.restore_for_eval(cfg, trained_tiny.workdir(), 3)
  except ValueError as e:
    assert "available steps: [2, 4]" in str(e)
  else:
    raise AssertionError("step 3 restored")
