"""Test-suite setup: 8 emulated CPU devices and parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, which is why this
lives in conftest (imported first by pytest).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain reads absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
