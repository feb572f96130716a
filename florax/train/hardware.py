"""Peak dense bf16 FLOP/s of common accelerators, for MFU.

Figures are the vendors' dense (no sparsity) bf16 peaks per device (one GPU,
one TPU chip); fp16 peaks are the same on these parts. Unknown kinds (and
CPUs) get no MFU rather than a guess. The trainer divides per-device step
FLOPs (XLA's cost analysis of the SPMD-partitioned program is per device)
by step time and by this peak.
"""

from __future__ import annotations

import jax

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
