"""Metric sinks: metrics.jsonl, TensorBoard event files, a console line.

TensorBoard files are written with tensorboardX (pure Python + protobuf), not
clu.metric_writers, which imports TensorFlow unconditionally (a 2.5 GB
install for every user). Only process 0 writes anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends {"step": s, name: value, ...} lines and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # logging must never stop a run
        print("florax: tensorboardX not installed; TensorBoard disabled",
              file=sys.stderr)

  def truncate_after(self, step: int):
    """Drops lines past `step`: after a restore they describe a trajectory
    that the resumed run discards and replays."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def _row(self, step: int, metrics: Mapping[str, float]) -> str:
    """The JSON line of `metrics` at `step`; also sent to TensorBoard."""
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None:
        self._tb.add_scalar(k, v, int(step))
    return json.dumps(row) + "\n"

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.enabled or not metrics:
      return
    line = self._row(step, metrics)
    with open(self.path, "a") as f:
      f.write(line)

  def replace(self, step: int, metrics: Mapping[str, float]):
    """Like `write`, but first removes these metric names at `step` from
    the earlier rows (a row left with only its step goes), so that a
    re-evaluation of a step replaces its values instead of adding a second
    row. metrics.jsonl is rewritten atomically (temp file + rename).
    TensorBoard events cannot be edited: there the new values are added."""
    if not self.enabled or not metrics:
      return
    names = set(metrics)
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except ValueError:  # e.g. a line cut by a kill: left as it was
            row = None
          if isinstance(row, dict) and row.get("step") == int(step) and (
              names & set(row)):
            row = {k: v for k, v in row.items() if k not in names}
            if set(row) == {"step"}:
              continue
            line = json.dumps(row) + "\n"
          kept.append(line if line.endswith("\n") else line + "\n")
    kept.append(self._row(step, metrics))
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, metrics: Mapping[str, float],
                  unit: str) -> str:
  """'step 120/300 | loss 1.234 | 1.42 steps/s | 182 images/s | ETA 2m05s'."""
  parts = [f"step {step}/{total}"]
  if "train/loss" in metrics:
    parts.append(f"loss {metrics['train/loss']:.4f}")
  if "perf/steps_per_sec" in metrics:
    sps = metrics["perf/steps_per_sec"]
    parts.append(f"{sps:.2f} steps/s")
    parts.append(f"{metrics.get(f'perf/{unit}_per_sec', 0):.0f} {unit}/s")
    if "perf/tflops_per_device" in metrics:
      parts.append(f"{metrics['perf/tflops_per_device']:.3g} TFLOP/s/dev")
    if "perf/mfu" in metrics:
      parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    if "data/wait_fraction" in metrics:
      parts.append(f"data {100 * metrics['data/wait_fraction']:.0f}%")
    if sps > 0:
      parts.append(f"ETA {format_duration((total - step) / sps)}")
  return " | ".join(parts)


class Timer:
  """Wall time of the steps between two log points, minus excluded spans."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start = time.perf_counter()
    self.excluded = 0.0
    self.data_wait = 0.0
    self.steps = 0

  def elapsed(self):
    return time.perf_counter() - self.start - self.excluded
