"""launch.plot on a synthetic metrics.jsonl: files, contents, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from launch import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_metrics(workdir):
  lines = []
  for step in range(0, 200, 10):
    rec = {"step": step, "train/loss": 3.0 * math.exp(-step / 50)}
    if step % 50 == 0:
      rec["eval/zeroshot_top1"] = step / 200
      rec["note"] = "not a number"  # skipped: not numeric
      rec["flag"] = True  # skipped: bools are not metrics
    lines.append(json.dumps(rec))
  text = "\n".join(lines) + '\n{"step": 200, "train/lo'  # run still writing
  (workdir / "metrics.jsonl").write_text(text)


def test_read_metrics_series(tmp_path):
  _write_metrics(tmp_path)
  with pytest.warns(UserWarning, match="truncated last line"):
    series = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert sorted(series) == ["eval/zeroshot_top1", "train/loss"]
  steps, values = series["eval/zeroshot_top1"]
  assert steps == [0, 50, 100, 150] and values == [0.0, 0.25, 0.5, 0.75]
  steps, values = series["train/loss"]
  assert steps == list(range(0, 200, 10))
  np.testing.assert_allclose(values, 3.0 * np.exp(-np.array(steps) / 50))


def _nonwhite_fraction(path):
  with Image.open(path) as im:
    im.verify()  # a real, complete PNG
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (600, 400)
    rgb = np.asarray(im.convert("RGB"))
  return np.mean(rgb.min(axis=2) < 200)


def test_cli_writes_one_png_per_metric(tmp_path):
  _write_metrics(tmp_path)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.plot", "--workdir", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "plots"
  assert sorted(os.listdir(out)) == ["eval_zeroshot_top1.png",
                                     "train_loss.png"]
  assert proc.stdout.split() == [str(out / "eval_zeroshot_top1.png"),
                                 str(out / "train_loss.png")]
  for name in os.listdir(out):
    # Axes, labels and the curve draw ink; a blank figure would be ~0.
    assert _nonwhite_fraction(out / name) > 0.01


def test_selected_metrics_and_out_dir(tmp_path):
  _write_metrics(tmp_path)
  dest = tmp_path / "elsewhere"
  with pytest.warns(UserWarning):
    paths = plot.plot_metrics(str(tmp_path), ["train/loss"], str(dest))
  assert paths == [str(dest / "train_loss.png")]
  assert os.listdir(dest) == ["train_loss.png"]
  assert not (tmp_path / "plots").exists()


def test_errors_are_clear(tmp_path, capsys):
  _write_metrics(tmp_path)
  with pytest.warns(UserWarning):
    code = plot.main(["--workdir", str(tmp_path), "--metrics", "eval/nope"])
  assert code == 2
  err = capsys.readouterr().err
  assert "eval/nope" in err and "available" in err and "train/loss" in err

  assert plot.main(["--workdir", str(tmp_path / "missing")]) == 2
  assert "no metrics file" in capsys.readouterr().err

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n'
                                     '{"step": 2, "a": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
    plot.read_metrics(str(bad / "metrics.jsonl"))
  (bad / "metrics.jsonl").write_text('{"a": 1}\n')
  with pytest.raises(ValueError, match="'step'"):
    plot.read_metrics(str(bad / "metrics.jsonl"))


def test_compare_draws_every_run_into_one_plot(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  _write_metrics(a)
  (b / "metrics.jsonl").write_text("\n".join(
      json.dumps({"step": s, "eval/zeroshot_top1": 1 - s / 400})
      for s in range(0, 200, 50)))
  with pytest.warns(UserWarning):
    one = plot.plot_metrics(str(a), ["eval/zeroshot_top1"],
                            str(tmp_path / "one"))
  with pytest.warns(UserWarning):
    both = plot.plot_metrics(str(a), None, str(tmp_path / "both"),
                             compare=[str(b)], labels=["pre", "rand"])
  # Only the metric both runs have; the second curve (and legend) add ink.
  assert [os.path.basename(p) for p in both] == ["eval_zeroshot_top1.png"]
  assert _nonwhite_fraction(both[0]) > _nonwhite_fraction(one[0]) + 0.002
  with pytest.raises(ValueError, match="2 labels for 3 runs"):
    plot.plot_metrics(str(a), None, compare=[str(b), str(b)],
                      labels=["x", "y"])
  with pytest.raises(ValueError, match="train/loss.*not found in .*b"):
    with pytest.warns(UserWarning):
      plot.plot_metrics(str(a), ["train/loss"], compare=[str(b)])
