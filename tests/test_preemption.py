"""SIGTERM mid-training: the run finishes its step, writes a checkpoint at
that (off-schedule) step and exits 0; the same command resumes there."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, steps):
  return [sys.executable, "-m", "launch.train",
          "--config", "tests/scale_config.py", "--workdir", str(workdir),
          f"--config.train.steps={steps}",
          "--config.train.checkpoint_every=100000"]


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["step"] for l in f if l.strip()]


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}"}
  proc = subprocess.Popen(_command(tmp_path, 10 ** 6), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  try:
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.1)
    else:
      raise AssertionError("the run logged nothing before the deadline")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  assert "checkpoint written at step" in out, out[-3000:]
  stopped = int(out.split("checkpoint written at step ")[1].split(",")[0])
  assert 3 <= stopped < 10 ** 5  # off the checkpoint schedule
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()
           if p.name.isdigit()]
  assert saved == [stopped]
  assert _steps(tmp_path)[-1] == stopped

  out = subprocess.run(_command(tmp_path, stopped + 2), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert f"resumed from checkpoint step {stopped}" in out.stdout
  assert _steps(tmp_path) == list(range(1, stopped + 3))
