"""Test-suite setup: 8 emulated CPU devices and parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, which is why this
lives in conftest (imported first by pytest).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, inherited by the
# subprocesses tests start (kill/resume, two-process runs, CLIs): many tests
# compile the same tiny Florence step, and on 2 cores compiling dominates.
# Only compiles of >= 1 s are stored (jax's default threshold).
# Under pytest-xdist the workers inherit the controller's directory, and
# only the process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="florax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

from absl import flags  # noqa: E402

# Grain reads absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
