"""A user's mistake on the command line prints one `florax: error:` line and
exits 2, before anything compiles: no traceback to read through."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("args,message", [
    (("--config.train.stepz=5",),
     "florax: error: 'stepz' Did you mean \"steps\" instead of \"stepz\"?"),
    (("--config.data.image_size=0",),
     "florax: error: data.image_size must be a positive integer, got 0"),
])
def test_train_config_mistakes(tmp_path, args, message):
  out = _run("launch.train", "--config", "configs/florence.py:tiny",
             "--workdir", str(tmp_path / "w"), *args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [message]


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "f").write_text("x")
  out = _run("launch.train", "--config", "configs/florence.py:tiny",
             "--workdir", str(tmp_path / "f"))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"florax: error: --workdir {tmp_path / 'f'} is a file, not a directory"]


def test_evaluate_a_workdir_that_was_never_trained(tmp_path):
  out = _run("launch.evaluate", "--workdir", str(tmp_path / "nothing"))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"florax: error: --workdir {tmp_path / 'nothing'} does not exist"]
