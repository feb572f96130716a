"""PNG plots of the metrics in a workdir's metrics.jsonl.

  python -m launch.plot --workdir W [--metrics train/loss,eval/zeroshot_top1]
                        [--out DIR] [--compare W2,W3 --labels a,b,c]

metrics.jsonl holds one JSON object per line, each with a "step" and any
number of metrics ("train/loss", "eval/zeroshot_top1", ...); not every line
has every metric. One PNG per metric is written to DIR (default W/plots),
named after the metric with every character outside [A-Za-z0-9._-] replaced
by "_" ("train/loss" -> "train_loss.png"). Without --metrics every metric
with a numeric value is plotted. --compare draws the same metrics of other
runs into the same axes (e.g. a pre-trained init against random init), one
labelled line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

METRICS_FILE = "metrics.jsonl"


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: str) -> dict[str, tuple[list[float], list[float]]]:
  """Reads a metrics.jsonl file into per-metric series.

  A final line that is cut off (a run still writing) is skipped with a
  warning; any other malformed line is an error.

  Args:
    path: the metrics.jsonl file.

  Returns:
    {metric name: (steps, values)} for every numeric metric, in file order.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file at {path}")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  while lines and not lines[-1].strip():
    lines.pop()
  series: dict[str, tuple[list[float], list[float]]] = {}
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        warnings.warn(f"{path}:{number}: skipping truncated last line")
        continue
      raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object")
    step = record.get("step")
    if not _is_number(step):
      raise ValueError(f"{path}:{number}: missing or non-numeric 'step'")
    for name, value in record.items():
      if name != "step" and _is_number(value):
        steps, values = series.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
  return series


def _filename(metric: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", metric) + ".png"


def plot_metrics(workdir: str, metrics: Sequence[str] | None = None,
                 out_dir: str | None = None, compare: Sequence[str] = (),
                 labels: Sequence[str] | None = None) -> list[str]:
  """Writes one PNG per metric.

  Args:
    workdir: directory holding metrics.jsonl.
    metrics: names to plot; None plots every numeric metric.
    out_dir: where the PNGs go; default workdir/plots.
    compare: more workdirs whose same metrics share each plot.
    labels: a legend label per run (workdir first); default their paths.

  Returns:
    The paths written, in the order of `metrics` (or sorted by name).
  """
  runs = [workdir, *compare]
  labels = list(labels) if labels else runs
  if len(labels) != len(runs):
    raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
  all_series = [read_metrics(os.path.join(w, METRICS_FILE)) for w in runs]
  series = all_series[0]
  if metrics is None:
    metrics = sorted(set(series).intersection(*all_series[1:]))
    if not metrics:
      raise ValueError(f"{workdir}/{METRICS_FILE} has no numeric metrics"
                       + (" shared by every run" if compare else ""))
  for w, run_series in zip(runs, all_series):
    missing = [m for m in metrics if m not in run_series]
    if missing:
      raise ValueError(
          f"metrics {missing} not found in {w}/{METRICS_FILE}; "
          f"available: {sorted(run_series)}")
  names = {}
  for m in metrics:
    clash = names.setdefault(_filename(m), m)
    if clash != m:
      raise ValueError(
          f"metrics {clash!r} and {m!r} would both be written to "
          f"{_filename(m)}")
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for m in metrics:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    values = []
    for label, run_series in zip(labels, all_series):
      steps, run_values = run_series[m]
      order = sorted(range(len(steps)), key=steps.__getitem__)
      ax.plot([steps[i] for i in order], [run_values[i] for i in order],
              marker="." if len(steps) < 50 else None, label=label)
      values += run_values
    if compare:
      ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(m)
    ax.set_title(m)
    ax.grid(True, alpha=0.3)
    finite = [v for v in values if math.isfinite(v)]
    if m.endswith("loss") and finite and min(finite) > 0 and (
        max(finite) / min(finite) > 100):
      ax.set_yscale("log")  # losses spanning decades read better on log axes
    fig.tight_layout()
    path = os.path.join(out_dir, _filename(m))
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m launch.plot", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="directory holding metrics.jsonl")
  parser.add_argument("--metrics", default=None,
                      help="comma-separated metric names (default: all)")
  parser.add_argument("--out", default=None,
                      help="output directory (default: WORKDIR/plots)")
  parser.add_argument("--compare", default="",
                      help="comma-separated workdirs drawn into the same plots")
  parser.add_argument("--labels", default="",
                      help="comma-separated legend labels, WORKDIR's first")
  args = parser.parse_args(argv)
  split = lambda v: [x.strip() for x in v.split(",") if x.strip()]
  metrics = split(args.metrics) if args.metrics else None
  try:
    paths = plot_metrics(args.workdir, metrics, args.out,
                         split(args.compare), split(args.labels) or None)
  except (FileNotFoundError, ValueError) as e:
    print(f"launch.plot: error: {e}", file=sys.stderr)
    return 2
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
