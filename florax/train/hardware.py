"""Peak FLOP/s of a device, for MFU: the spec sheet, or measured.

`peak_flops_per_device` gives the vendors' dense (no sparsity) bf16 peak
per device (one GPU, one TPU chip); fp16 peaks are the same on these parts.
Unknown kinds (and CPUs) get no MFU rather than a guess. The trainer
divides per-device step FLOPs (the task's analytic count over the mesh's
devices, florax.models.flops) by step time and by this peak.

`measure_matmul_peak` times a large square matmul instead: what this
device reaches on the best case of the work a model does, so that a
benchmark can report MFU against a peak measured in the same run (clocks,
power limits and a shared machine included), next to the spec-sheet one.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H100": 989e12,        # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # Trillium
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None


def measure_matmul_peak(dtype=jnp.bfloat16, n: int | None = None,
                        device: jax.Device | None = None, repeats: int = 5,
                        iters: int | None = None) -> float:
  """Measured FLOP/s of a jitted n x n x n matmul on `device`.

  One jitted call runs `iters` chained matmuls (x <- x @ b, a loop XLA
  cannot fold) so that dispatch overhead vanishes on fast devices; the
  result is 2·n³·iters over the median wall time of `repeats` warm calls
  (after a compile-and-warm call), each waited for with block_until_ready.

  Args:
    dtype: the matmul dtype (jax's default precision for it).
    n: matrix side; None picks 8192 on accelerators and 256 on a CPU (a
      few milliseconds there).
    device: default the first device.
    repeats: timed calls; their median is used.
    iters: matmuls per call; None: 16 on accelerators, 1 on a CPU.
  """
  device = device or jax.devices()[0]
  cpu = device.platform == "cpu"
  n = n or (256 if cpu else 8192)
  iters = iters or (1 if cpu else 16)
  if n < 1 or iters < 1 or repeats < 1:
    raise ValueError(f"measure_matmul_peak: n={n}, iters={iters} and "
                     f"repeats={repeats} must be positive")
  ka, kb = jax.random.split(jax.random.key(0))
  # Entries of scale 1/sqrt(n): a chain of products neither grows nor
  # shrinks, so no inf/denormal slows a step down.
  a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(
      dtype), device)
  b = jax.device_put((jax.random.normal(kb, (n, n), jnp.float32)
                      * n ** -0.5).astype(dtype), device)

  @jax.jit
  def chain(x, w):
    return jax.lax.fori_loop(0, iters, lambda _, y: y @ w, x)

  chain(a, b).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 * iters / statistics.median(times)
