"""The benchmark suite runs end to end on this CPU at toy sizes (what CI
proves), its figures are consistent with each other, and it rewrites only
its own platform's block of a README."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_run():
  p = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--small",
                      "--json"], cwd=REPO, capture_output=True, text=True,
                     check=False, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout)


def test_every_family_is_measured(small_run):
  names = [e["name"] for e in small_run["entries"]]
  assert names == list(suite.ENTRIES)
  for e in small_run["entries"]:
    assert "error" not in e, e
    assert e["compile_s"] > 0 and e["step_ms"] > 0
    # examples/s is the global batch over the median step time.
    assert e["examples_per_s"] == pytest.approx(
        e["global_batch"] / (e["step_ms"] / 1e3), rel=1e-9)
    assert 0.0 <= e["data_wait_fraction"] < 1.0
    assert e["xla_memory_gib"] > 0


def test_throughput_and_mfu_follow_from_the_analytic_flops(small_run):
  measured = small_run["peaks"]["float32"]
  assert measured > 0
  assert small_run["peaks"]["spec"] is None  # no vendor peak for a CPU
  for e in small_run["entries"]:
    per_dev = e["analytic_tflop_per_step_per_device"]
    assert per_dev > 0, e["name"]
    assert e["tflops_per_device"] == pytest.approx(
        per_dev / (e["step_ms"] / 1e3), rel=1e-9)
    assert e["mfu_measured_peak"] == pytest.approx(
        e["tflops_per_device"] * 1e12 / measured, rel=1e-9)
    # Not bounded above here: on a shared CPU the peak and the steps may be
    # timed under different loads.
    assert e["mfu_measured_peak"] > 0
    assert e["mfu_spec_peak"] is None
    # XLA counts elementwise work and the optimizer too, never less than
    # the matmuls (no scanned layers in the small presets).
    assert e["xla_tflop_per_step_per_device"] >= 0.99 * per_dev


def test_kernel_table_has_the_reference_and_the_kernel(small_run):
  impls = {r["impl"] for r in small_run["kernels"]}
  assert {"xla", "pallas"} <= impls
  for r in small_run["kernels"]:
    assert "error" not in r, r
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0


def test_readme_block_is_replaced_in_place(tmp_path, small_run):
  path = tmp_path / "README.md"
  path.write_text("# x\n\n<!-- benchmarks.suite:gpu begin -->\nGPU rows\n"
                  "<!-- benchmarks.suite:gpu end -->\n\ntail\n")
  suite.write_readme(str(path), small_run)  # appends the cpu block
  first = path.read_text()
  assert "GPU rows" in first and first.count("## Performance") == 1
  suite.write_readme(str(path), small_run)  # replaces it, nothing else
  assert path.read_text() == first
  table = suite.markdown(small_run)
  assert table in first
  for name in suite.ENTRIES:
    assert f"| {name} | float32 |" in table
