"""SIGKILL after the first checkpoint, then the same command again: the run
resumes (metrics continue past the kill point, no restart from step 0)."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir):
  return [sys.executable, "-m", "launch.train",
          "--config", "configs/florence.py:tiny", "--workdir", str(workdir),
          "--config.data.image_size=16", "--config.train.batch_size=16",
          "--config.train.steps=80", "--config.train.checkpoint_every=5",
          "--config.train.log_every=1", "--config.train.eval_every=0"]


def test_sigkill_then_rerun_resumes(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "",
         "JAX_PLATFORMS": "cpu"}
  ckpt = tmp_path / "checkpoints"
  proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  try:
    # A finalised checkpoint is a plain step directory (Orbax writes into a
    # *.orbax-checkpoint-tmp directory and renames it when complete).
    while time.time() < deadline:
      if ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()):
        break
      assert proc.poll() is None, proc.stdout.read().decode()
      time.sleep(0.2)
    else:
      raise AssertionError("no checkpoint within the deadline")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_steps = [json.loads(l)["step"]
                  for l in open(tmp_path / "metrics.jsonl")]
  assert killed_steps, "the killed run logged nothing"

  assert max(killed_steps) < 80, "the run ended before it was killed"
  out = subprocess.run(_command(tmp_path), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from checkpoint step" in out.stdout
  resumed_at = int(out.stdout.split("resumed from checkpoint step ")[1]
                   .split()[0])
  assert resumed_at >= 5
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == list(range(1, 81)), (steps, out.stdout[-2000:])
