"""Memory planner: will this config fit N devices of M GiB, at which ZeRO stage?

  python -m launch.plan --config configs/florence.py:b --devices 64 \
      --memory_gb 80 [--config.train.batch_size=4096] [--stages 0,3] [--json]
  python -m launch.plan --workdir W --devices 64 --memory_gb 80   # W's config

Compiles the real train step for the target mesh with abstract inputs
(nothing is allocated) and reads XLA's memory and cost analyses. A mesh
larger than this machine is emulated with that many host CPU devices, so
the plan comes from the same SPMD partitioning the cluster will run; CPU
and accelerator backends fuse differently, so temp (activation) bytes are
an estimate, while params / gradients / optimizer state are exact layouts.

Per device, per stage:
  params, grads, opt_state  bytes of the sharded layouts (the ZeRO stage)
  ideal                     the ZeRO paper's 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N
  frozen                    a teacher's / visual tokenizer's params (fp32,
                            sharded like params; never optimised)
  temp                      XLA's temporary buffers (gradients + activations)
  total                     arguments + temp + non-aliased outputs
  flops                     one step per device (XLA cost analysis; loops
                            such as scanned layers are counted once)
"""

from __future__ import annotations

import os
import sys


def _early_devices(argv) -> int | None:
  """--devices must act before jax is imported (it sizes the CPU backend)."""
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


if __name__ == "__main__":
  _n = _early_devices(sys.argv)
  if _n:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n}")
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "config file[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "plan the config of this "
                               "training workdir (its config.json)")
_DEVICES = flags.DEFINE_integer("devices", None, "devices to plan for "
                                "(emulated on the host CPU); default: all")
_MEMORY = flags.DEFINE_float("memory_gb", None, "memory per device in GiB")
_STAGES = flags.DEFINE_list("stages", ["0", "1", "2", "3"], "ZeRO stages")
_JSON = flags.DEFINE_bool("json", False, "print JSON instead of a table")
flags.mark_flags_as_required(["config"])

GIB = 2 ** 30


def plan_stage(config, stage: int) -> dict:
  """Compiles the step of `config` at ZeRO `stage`; returns per-device bytes.

  Args:
    config: a florax config (not modified).
    stage: 0..3.
  Returns:
    A dict of byte counts, FLOPs and the parameter count.
  """
  import jax
  from florax.parallel import zero
  from florax import tasks
  from florax.train import trainer as trainer_lib

  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.sharding.zero_stage = stage
  workdir = tempfile.mkdtemp(prefix="florax_plan_")
  try:
    t = trainer_lib.Trainer(tasks.build(cfg, workdir))
    compiled = t.compile_step()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  state_in = compiled.input_shardings[0][0]  # what XLA compiled against
  abstract = t.abstract_state
  params = zero.bytes_per_device(abstract["params"], state_in["params"])
  opt = zero.bytes_per_device(abstract["opt_state"], state_in["opt_state"])
  grads = zero.bytes_per_device(abstract["params"], t.layout.grads)
  # A teacher / visual tokenizer: an input of every step, never optimised.
  frozen = zero.bytes_per_device(t.abstract_frozen, t.frozen_shardings)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  n = 1
  for a in ("data", "fsdp"):
    n *= t.mesh.shape.get(a, 1)
  ideal = zero.ideal_bytes(t.num_params, n, stage)
  total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
           + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  return {
      "stage": stage, "num_params": t.num_params,
      "num_frozen": t.num_frozen, "frozen": frozen,
      "mesh": dict(t.mesh.shape), "data_parallel": n,
      "params": params, "grads": grads, "opt_state": opt,
      "state_total": params + grads + opt,
      "ideal_state_total": sum(ideal.values()),
      "temp": mem.temp_size_in_bytes,
      "activations_estimate": max(mem.temp_size_in_bytes - grads, 0),
      "arguments": mem.argument_size_in_bytes,
      "total": total,
      "flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
  }


def verdict(rows: list[dict], memory_gb: float | None) -> str:
  if memory_gb is None:
    return ""
  fits = [r["stage"] for r in rows if r["total"] <= memory_gb * GIB]
  if fits:
    return (f"FITS in {memory_gb:g} GiB per device at ZeRO stage "
            f"{', '.join(map(str, fits))} (lowest: {min(fits)})")
  best = min(rows, key=lambda r: r["total"])
  return (f"DOES NOT FIT in {memory_gb:g} GiB per device at any stage "
          f"planned; the smallest, stage {best['stage']}, needs "
          f"{best['total'] / GIB:.4g} GiB. Use more devices, a smaller "
          "batch (or train.grad_accum_steps / contrastive.chunk_size), "
          "remat, or bfloat16.")


def table(rows: list[dict]) -> str:
  head = ("stage", "params", "grads", "opt_state", "state", "ideal",
          "frozen", "temp", "total", "TFLOP/dev")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    mib = lambda b: f"{b / 2 ** 20:,.1f} MiB"
    flops = r["flops_per_device"]
    lines.append("| " + " | ".join([
        str(r["stage"]), mib(r["params"]), mib(r["grads"]),
        mib(r["opt_state"]), mib(r["state_total"]),
        mib(r["ideal_state_total"]), mib(r["frozen"]), mib(r["temp"]),
        mib(r["total"]),
        "n/a" if flops is None else f"{flops / 1e12:.3f}"]) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax
  if _DEVICES.value and jax.device_count() != _DEVICES.value:
    raise app.UsageError(
        f"--devices={_DEVICES.value} but jax sees {jax.device_count()} "
        "devices (run as `python -m launch.plan` so the emulated host "
        "devices are set before jax starts)")
  stages = [int(s) for s in _STAGES.value]
  bad = [s for s in stages if s not in (0, 1, 2, 3)]
  if bad:
    raise app.UsageError(f"--stages: {bad} are not ZeRO stages (0-3)")
  rows = [plan_stage(_CONFIG.value, s) for s in stages]
  message = verdict(rows, _MEMORY.value)
  if _JSON.value:
    print(json.dumps({"devices": jax.device_count(),
                      "memory_gb": _MEMORY.value, "stages": rows,
                      "fits_stages": [r["stage"] for r in rows
                                      if _MEMORY.value is not None
                                      and r["total"] <= _MEMORY.value * GIB],
                      "verdict": message}, indent=1))
  else:
    r = rows[0]
    frozen = (f" + {r['num_frozen'] / 1e6:.1f}M frozen (teacher/tokenizer)"
              if r["num_frozen"] else "")
    print(f"florax plan: {r['num_params'] / 1e6:.1f}M params{frozen} on "
          f"{jax.device_count()} devices, mesh {r['mesh']}, batch "
          f"{_CONFIG.value.train.batch_size}")
    print(table(rows))
    if message:
      print(message)


if __name__ == "__main__":
  cli.run(main, workdir_config=True)
