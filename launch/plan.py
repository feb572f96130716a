"""Memory planner: will this config fit N devices of M GiB, at which ZeRO stage?

  python -m launch.plan --config configs/florence.py:b --devices 64 \
      --memory_gb 80 [--config.train.batch_size=4096] [--stages 0,3] [--json]
  python -m launch.plan --workdir W --devices 64 --memory_gb 80   # W's config
  python -m launch.plan ... --no_compile      # exact state bytes only

A mesh larger than this machine is emulated with that many host CPU devices
(nothing is allocated: every array is abstract). Two kinds of figures:

Exact, from shapes and shardings (no compile; the Trainer is built as far
as its layout for every stage, the model's init traced once):
  params, grads, opt_state  bytes of the sharded layouts (the ZeRO stage)
  state                     their sum
  ideal                     the ZeRO paper's 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N
                            over N = data x fsdp, divided by the tensor axis
                            (the logical rules split params over it too;
                            leaves they do not split, e.g. norms, stay
                            replicated over it: Florence-B at tensor=2 is
                            3.4% over at every stage)
  vs ideal                  state / ideal - 1
  frozen                    a teacher's / visual tokenizer's params (fp32,
                            sharded like params; never optimised)
  model TFLOP/dev           the task's analytic model FLOPs of one step per
                            device (florax.models.flops; the trainer's MFU)

From the compiler (marked *; the real train step compiled ONCE, at stage
`--compile_stage`, default the highest planned, with scanned layers so that
compile time stays flat in depth, remat as configured; `--no_compile`
skips it):
  temp                      XLA's temporary buffers (gradients + activations)
  total                     arguments + temp + non-aliased outputs
  flops                     one step per device (XLA cost analysis; loops
                            such as scanned layers are counted once)
Every other stage s is derived from that one compile c and the exact bytes:
  activations = temp_c - grads_c        (what is not the gradient buffer)
  batch       = arguments_c - params_c - opt_state_c - frozen_c
                                        (with the step counter and rng)
  temp_s      = grads_s + activations
  total_s     = params_s + opt_state_s + frozen_s + batch + temp_s
                + (outputs_c - aliased_c)
which is the compiled total itself at s = c (the batch is the same at every
stage; donated state outputs alias their inputs). On Florence-B, 8 devices,
each stage's total derived from a stage-3 compile is within 1.5% of that
stage's own compile (stage 2 the farthest: a stage-3 compile also holds
each layer's all-gathered weights, one layer at a time when scanned). CPU
and accelerator backends fuse differently, so temp and total are estimates,
and an unscanned run may schedule its buffers differently from the scanned
compile; params, grads and optimizer state are the exact layouts.
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


# Only buffer assignment matters here, not the speed of the CPU code: the
# legacy fusion emitters and no LLVM optimisation compile the step ~3x
# faster (Florence-B, 8 devices, stage 3 scanned: trace + compile 47 -> 27 s
# of CPU) for temp bytes within 0.6%. Set by `python -m launch.plan` only.
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false "
                      "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

if __name__ == "__main__":
  _n = _early_devices(sys.argv)
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS]
      + ([f"--xla_force_host_platform_device_count={_n}"] if _n else []))
  if _n:
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
_NO_COMPILE = flags.DEFINE_bool("no_compile", False, "exact state bytes only "
                                "(seconds): no activation estimate")
_COMPILE_STAGE = flags.DEFINE_integer("compile_stage", None, "the one stage "
                                      "compiled (default: the highest "
                                      "planned)")
_SCAN = flags.DEFINE_bool("scan", True, "compile with scanned layers "
                          "(compile time flat in depth); --noscan compiles "
                          "the layers as configured")
flags.mark_flags_as_required(["config"])

GIB = 2 ** 30
# Which row fields are exact and which come from the (one) compile.
EXACT = ("num_params", "num_frozen", "frozen", "params", "grads", "opt_state",
         "state_total", "ideal_state_total", "state_vs_ideal",
         "model_flops_per_device")
FROM_COMPILER = ("temp", "activations_estimate", "arguments", "total",
                 "flops_per_device")


def _with(config, **fields):
  """A resolved, unlocked copy of `config` with dotted `fields` set."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    for key, value in fields.items():
      *path, last = key.split(".")
      parent = cfg
      for part in path:
        parent = parent[part]
      parent[last] = value
  return cfg


def _scanned(config):
  """`config` with every model tower's `scan` on (compile time flat in
  depth, the same per-layer activations), or None when it has none."""
  model = config.get("model")
  if model is None:
    return None
  fields = {}
  for name in sorted(model.keys()):
    node = model[name]
    if hasattr(node, "keys") and "scan" in node and not node.scan:
      fields[f"model.{name}.scan"] = True
  return _with(config, **fields) if fields else None


def _trainer(config, stage: int, boxed: list):
  """The Trainer of `config` at `stage`, built as far as its layout (no
  compile, nothing allocated).

  `boxed` carries the model's abstract params (with their logical-axis
  boxes) between stages: an empty list is filled by this Trainer's trace of
  the model's init; a filled one is replayed as zeros of the same shapes and
  names instead of tracing the model again (seconds for a big unscanned
  model; the shapes do not depend on the stage).
  """
  import jax
  import jax.numpy as jnp
  from florax import tasks
  from florax.train import trainer as trainer_lib
  workdir = tempfile.mkdtemp(prefix="florax_plan_")
  try:
    task = tasks.build(_with(config, **{"sharding.zero_stage": stage}),
                       workdir)
    init = task.init
    if boxed:
      task.init = lambda rng: jax.tree.map(
          lambda a: jnp.zeros(a.shape, a.dtype), boxed[0])
    else:
      def recording_init(rng):
        params = init(rng)
        boxed.append(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
        return params
      task.init = recording_init
    t = trainer_lib.Trainer(task)
    task.init = init
    return t
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _parallel_sizes(mesh) -> tuple[int, int]:
  n = 1
  for a in ("data", "fsdp"):
    n *= mesh.shape.get(a, 1)
  return n, mesh.shape.get("tensor", 1)


def exact_stages(config, stages) -> list[dict]:
  """Per-device bytes of the state at each ZeRO stage, exact from the layout
  (one Trainer per stage, built as far as its layout; no compile).

  Args:
    config: a florax config (not modified).
    stages: ZeRO stages, 0..3.
  Returns:
    One row per stage with the EXACT fields (the compiler's are None).
  """
  boxed = []
  return [_exact_row(_trainer(config, stage, boxed), stage)
          for stage in stages]


def exact_stage(config, stage: int) -> dict:
  """`exact_stages` of one stage."""
  return exact_stages(config, [stage])[0]


def _exact_row(t, stage: int) -> dict:
  from florax.parallel import zero
  abstract = t.abstract_state
  params = zero.bytes_per_device(abstract["params"], t.layout.params)
  opt = zero.bytes_per_device(abstract["opt_state"], t.layout.opt_state)
  grads = zero.bytes_per_device(abstract["params"], t.layout.grads)
  # A teacher / visual tokenizer: an input of every step, never optimised.
  frozen = zero.bytes_per_device(t.abstract_frozen, t.frozen_shardings)
  n, tensor = _parallel_sizes(t.mesh)
  ideal = sum(zero.ideal_bytes(t.num_params, n, stage,
                               tensor_shards=tensor).values())
  state = params + grads + opt
  row = {"stage": stage, "num_params": t.num_params,
         "num_frozen": t.num_frozen, "frozen": frozen,
         "mesh": dict(t.mesh.shape), "data_parallel": n,
         "tensor_parallel": tensor,
         "params": params, "grads": grads, "opt_state": opt,
         "state_total": state, "ideal_state_total": ideal,
         "state_vs_ideal": state / ideal if ideal else None,
         "model_flops_per_device": _model_flops(t)}
  row.update({k: None for k in FROM_COMPILER})
  return row


def _model_flops(t) -> float | None:
  """The task's analytic model FLOPs of one step per device (what the
  trainer's MFU uses; florax.models.flops), None if it has none."""
  kind = next(iter(t.kind_weights))
  try:
    flops = t.task.step_flops(kind, t.batch_size(kind))
  except Exception:  # a plan never fails for want of a FLOP count
    return None
  return None if flops is None else float(flops) / t.mesh.devices.size


def compile_stage(config, stage: int, scan: bool = True) -> dict:
  """Compiles the train step once at `stage` (scanned layers if `scan` and
  the model has a scan option); returns XLA's figures and the compiled
  layout's own exact state bytes (to subtract them)."""
  cfg = (_scanned(config) if scan else None) or config
  try:
    t = _trainer(cfg, stage, [])
  except ValueError:  # a model that cannot scan (e.g. an odd depth)
    if cfg is config:
      raise
    cfg = config
    t = _trainer(cfg, stage, [])
  compiled = t.compile_step()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  exact = _exact_row(t, stage)
  return {
      "stage": stage, "scanned": cfg is not config,
      "params": exact["params"], "opt_state": exact["opt_state"],
      "grads": exact["grads"], "frozen": exact["frozen"],
      "arguments": mem.argument_size_in_bytes,
      "temp": mem.temp_size_in_bytes,
      "outputs_not_aliased": (mem.output_size_in_bytes
                              - mem.alias_size_in_bytes),
      "total": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                + mem.output_size_in_bytes - mem.alias_size_in_bytes),
      "flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
  }


def derive(row: dict, compiled: dict) -> dict:
  """`row` (exact) with the compiler's fields, derived from one compile
  (see the module docstring): exact at the compiled stage."""
  activations = max(compiled["temp"] - compiled["grads"], 0)
  # The batch, step and rng: every argument that is not state or frozen.
  other_args = max(compiled["arguments"] - compiled["params"]
                   - compiled["opt_state"] - compiled["frozen"], 0)
  temp = row["grads"] + activations
  arguments = row["params"] + row["opt_state"] + row["frozen"] + other_args
  return dict(row, temp=temp, activations_estimate=activations,
              arguments=arguments,
              total=arguments + temp + compiled["outputs_not_aliased"],
              flops_per_device=compiled["flops_per_device"],
              compiled_stage=compiled["stage"],
              compiled_scanned=compiled["scanned"])


def plan(config, stages, compile_at: int | None = None,
         scan: bool = True) -> list[dict]:
  """One row per stage: exact state bytes for each, the compiler's figures
  from a single compile at `compile_at` (default: the highest stage; None
  figures when `compile_at` is -1)."""
  rows = exact_stages(config, stages)
  if compile_at == -1:
    return rows
  c = max(stages) if compile_at is None else compile_at
  compiled = compile_stage(config, c, scan=scan)
  return [derive(r, compiled) for r in rows]


def plan_stage(config, stage: int) -> dict:
  """One stage's row, compiled at that stage.

  Args:
    config: a florax config (not modified).
    stage: 0..3.
  Returns:
    A dict of byte counts, FLOPs and the parameter count.
  """
  return derive(exact_stage(config, stage), compile_stage(config, stage))


def verdict(rows: list[dict], memory_gb: float | None) -> str:
  if memory_gb is None:
    return ""
  if any(r["total"] is None for r in rows):  # --no_compile: state only
    need = {r["stage"]: r["state_total"] + r["frozen"] for r in rows}
    over = [s for s, b in need.items() if b > memory_gb * GIB]
    if len(over) == len(need):
      return (f"DOES NOT FIT in {memory_gb:g} GiB per device at any stage "
              f"planned: the state alone needs at least "
              f"{min(need.values()) / GIB:.4g} GiB (stage "
              f"{min(need, key=need.get)}), before any activation")
    return (f"the state alone fits in {memory_gb:g} GiB at ZeRO stage "
            f"{', '.join(str(s) for s in need if s not in over)}; "
            "activations unknown (--no_compile)")
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
  """Markdown table; exact columns first, then the compiler's (marked *)."""
  head = ("stage", "params", "grads", "opt_state", "state", "ideal",
          "vs ideal", "frozen", "model TFLOP/dev", "temp*", "total*",
          "TFLOP/dev*")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:,.1f} MiB"
  for r in rows:
    flops = r["flops_per_device"]
    ratio = r.get("state_vs_ideal")
    lines.append("| " + " | ".join([
        str(r["stage"]), mib(r["params"]), mib(r["grads"]),
        mib(r["opt_state"]), mib(r["state_total"]),
        mib(r["ideal_state_total"]),
        "n/a" if ratio is None else f"{100 * (ratio - 1):+.2f}%",
        mib(r["frozen"]),
        "n/a" if r.get("model_flops_per_device") is None else
        f"{r['model_flops_per_device'] / 1e12:.3f}",
        mib(r["temp"]), mib(r["total"]),
        "n/a" if flops is None else f"{flops / 1e12:.3f}"]) + " |")
  compiled = rows[0].get("compiled_stage")
  lines.append(
      "exact (shapes x shardings, no compile): params .. frozen; model "
      "TFLOP/dev: the task's analytic FLOPs (florax.models.flops, what the "
      "trainer's MFU uses); * from XLA "
      + ("(not compiled: --no_compile)" if compiled is None else
         f"(one CPU compile at stage {compiled}"
         + (", scanned layers: FLOPs count each scanned body once"
            if rows[0].get("compiled_scanned") else "")
         + "; other stages: their exact state + grads + the compiled "
         "activations), an estimate"))
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
  stages = sorted({int(s) for s in _STAGES.value})
  bad = [s for s in stages if s not in (0, 1, 2, 3)]
  if bad:
    raise app.UsageError(f"--stages: {bad} are not ZeRO stages (0-3)")
  if not stages:
    raise app.UsageError("--stages: name at least one ZeRO stage (0-3)")
  at = _COMPILE_STAGE.value
  if at is not None and at not in (0, 1, 2, 3):
    raise app.UsageError(f"--compile_stage={at} is not a ZeRO stage (0-3)")
  rows = plan(_CONFIG.value, stages,
              compile_at=-1 if _NO_COMPILE.value else at,
              scan=_SCAN.value)
  message = verdict(rows, _MEMORY.value)
  if _JSON.value:
    print(json.dumps({"devices": jax.device_count(),
                      "memory_gb": _MEMORY.value, "stages": rows,
                      "exact_fields": list(EXACT),
                      "compiler_fields": list(FROM_COMPILER),
                      "fits_stages": [r["stage"] for r in rows
                                      if _MEMORY.value is not None
                                      and r["total"] is not None
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
