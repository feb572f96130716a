"""One tiny trained workdir (and its exports) shared by the export,
inference, evaluate-CLI and notebook tests: trained once per test process.

The run: the tiny preset at 16 px, batch 16, for 4 steps, a checkpoint and
a zero-shot evaluation every 2 steps, trained by `python -m launch.train` on
one CPU device. `config()` is the same run's config for in-process use.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# `config()` from the command line: only image_size changes a shape.
CLI_OVERRIDES = ("--config.data.image_size=16", "--config.train.batch_size=16")
NOTEBOOK_OVERRIDES = {"data.image_size": 16, "train.batch_size": 16,
                      "train.steps": STEPS}


def config(**overrides):
  from tests import helpers  # pylint: disable=g-import-not-at-top
  fields = {"train.steps": STEPS, "train.eval_every": 2,
            "train.checkpoint_every": 2, "train.log_every": 2,
            "model.image.drop_path_rate": 0.0}
  fields.update(overrides)
  return helpers.tiny_config(**fields)


@functools.lru_cache(maxsize=None)
def workdir() -> str:
  """Trains the tiny run once with `launch.train`; returns its workdir."""
  path = os.path.join(tempfile.mkdtemp(prefix="florax-tiny-"), "run")
  run_cli("launch.train", "--config", "configs/florence.py:tiny",
          *CLI_OVERRIDES, f"--config.train.steps={STEPS}",
          "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
          "--config.train.log_every=2", "--config.optimizer.warmup_steps=2",
          "--workdir", path)
  return path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module args` from the repo root on ONE CPU device (faster
  to compile than the suite's 8, and how a user runs it); raises with its
  output on failure."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  if proc.returncode:
    raise AssertionError(f"{module} failed ({proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
  return proc


@functools.lru_cache(maxsize=None)
def export_dir(dtype: str = "float32") -> str:
  """The workdir's latest checkpoint exported (fp32 through the CLI)."""
  out = os.path.join(os.path.dirname(workdir()), f"export-{dtype}")
  if dtype == "float32":
    run_cli("launch.export", "--config", "configs/florence.py:tiny",
            *CLI_OVERRIDES, "--workdir", workdir(), "--out", out)
  else:
    from florax import export  # pylint: disable=g-import-not-at-top
    export.export_workdir(config(), workdir(), out, dtype=dtype)
  return out


@functools.lru_cache(maxsize=None)
def model(dtype: str = "float32"):
  """The export loaded with florax.inference (its compiled buckets shared
  by every test in the process)."""
  from florax import inference  # pylint: disable=g-import-not-at-top
  return inference.load(export_dir(dtype))
