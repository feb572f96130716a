"""The memory planner on an emulated 64-device mesh (8 more than the suite's
devices, in a subprocess): per-device state bytes equal the ZeRO paper's
formulas for the planned parameter count, and a too-small memory size is
reported as not fitting."""

import json
import os
import subprocess
import sys

from launch import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_64_devices_json_and_does_not_fit():
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}"}
  cmd = [sys.executable, "-m", "launch.plan", "--config",
         "tests/scale_config.py", "--devices", "64", "--memory_gb", "0.0001",
         "--stages", "0,1,3", "--json", "--config.train.batch_size=128",
         "--config.model.dim=64", "--config.model.hidden=256",
         "--config.model.out=64"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert result["devices"] == 64
  rows = {r["stage"]: r for r in result["stages"]}
  psi = 64 * 256 + 256 + 256 * 64 + 64  # the MLP, counted by hand
  n = 64
  for r in rows.values():
    assert r["num_params"] == psi and r["data_parallel"] == n
    assert r["mesh"] == {"data": 64, "fsdp": 1, "tensor": 1}
  # Adam's two moments + a few scalar counters in the optimizer state.
  assert rows[0]["params"] == 4 * psi and rows[0]["grads"] == 4 * psi
  assert 8 * psi <= rows[0]["opt_state"] <= 8 * psi + 64
  assert rows[1]["params"] == 4 * psi and rows[1]["grads"] == 4 * psi
  assert 8 * psi / n <= rows[1]["opt_state"] <= 8 * psi / n + 64
  assert rows[3]["params"] == 4 * psi / n and rows[3]["grads"] == 4 * psi / n
  assert rows[0]["total"] > rows[3]["total"] > 0
  assert rows[3]["flops_per_device"] > 0
  assert result["fits_stages"] == []
  assert "DOES NOT FIT in 0.0001 GiB" in result["verdict"]
  # The same rows against a roomy device: every stage fits, lowest first.
  assert plan.verdict(result["stages"], 80.0).startswith(
      "FITS in 80 GiB per device at ZeRO stage 0, 1, 3 (lowest: 0)")
