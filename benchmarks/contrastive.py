"""Memory and FLOPs of a Florence gradient step with and without the gradient
cache, on 8 emulated devices (data parallel, global UniCL loss).

For each per-device batch the gradient step (`task.value_and_grad`: both
towers, the global loss and the parameter gradient; no optimizer update) is
compiled for abstract inputs and XLA's analyses give the peak temporary
memory per device and the FLOPs per device. Nothing that big is allocated;
steps are only run (timed) for per-device batches up to --run-max-batch.

XLA's cost analysis counts a while loop's body once, so for the cached step
the FLOPs are corrected to count every chunk:
  flops(B) = reported(B) + (chunks - 1) * (reported(c) - loss(c)),
with reported(c) the cached step at one chunk per device and loss(c) the
global loss's own gradient at that batch.

  python -m benchmarks.contrastive [--preset t] [--batches 32,128,512,2048]
      [--chunk 32] [--run-max-batch 32] [--steps 2] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _setup(preset: str, image_size: int | None):
  from configs import florence  # pylint: disable=g-import-not-at-top
  from florax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from florax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from florax import tasks  # pylint: disable=g-import-not-at-top
  cfg = florence.get_config(preset)
  with cfg.unlocked():
    if image_size:
      cfg.data.image_size = image_size
    cfg.contrastive.global_loss = True
  mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  task = tasks.build(cfg, tempfile.mkdtemp(prefix="florax_bench_"), mesh=mesh)
  rules = sharding_lib.rules_from_config(cfg.sharding.rules)
  boxed = jax.eval_shape(task.init, jax.random.key(0))
  shardings = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed), shardings)
  return task, mesh, rules, params, shardings, sharding_lib.batch_sharding(mesh)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--batches", default="32,128,512,2048")
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--run-max-batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()

  from florax.losses import global_contrastive  # pylint: disable=g-import-not-at-top
  from florax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  task, mesh, rules, params, shardings, batch_sharding = _setup(
      args.preset, args.image_size)
  shards = jax.device_count()
  rng = jax.eval_shape(lambda: jax.random.key(0))
  embed = task.config.model.embed_dim

  def compile_step(per_device, chunk):
    with task.config.unlocked():
      task.config.contrastive.chunk_size = chunk
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in task.batch_spec(per_device * shards).items()}
    t0 = time.perf_counter()
    with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
      compiled = jax.jit(task.value_and_grad).lower(params, batch, rng
                                                    ).compile()
    return compiled, time.perf_counter() - t0

  def loss_flops(per_device, row_block):
    emb = jax.ShapeDtypeStruct((per_device * shards, embed), jnp.float32,
                               sharding=batch_sharding)
    labels = jax.ShapeDtypeStruct((per_device * shards,), jnp.int32,
                                  sharding=batch_sharding)
    fn = jax.grad(lambda u, v, y: global_contrastive.global_unicl_loss(
        u, v, y, 10.0, mesh=mesh, row_block=row_block)[0], argnums=(0, 1))
    with mesh_lib.use_mesh(mesh):
      return _flops(jax.jit(fn).lower(emb, emb, labels).compile())

  def wall_time(compiled, per_device):
    spec = task.batch_spec(per_device * shards)
    r = np.random.default_rng(0)
    batch = {
        "image": r.normal(size=spec["image"].shape).astype(np.float32),
        "text": r.integers(1, 100, size=spec["text"].shape).astype(np.int32),
        "label": r.integers(0, 1000, size=spec["label"].shape).astype(np.int32)}
    batch = jax.device_put(batch, batch_sharding)
    with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
      p = jax.jit(lambda k: nn.unbox(task.init(k)), out_shardings=shardings)(
          jax.random.key(0))
    key = jax.random.key(1)
    jax.block_until_ready(compiled(p, batch, key))  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
      out = compiled(p, batch, key)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / args.steps

  rows = []
  one_chunk_body = None  # reported(c) - loss(c): both towers, fwd + replay
  for per_device in [int(b) for b in args.batches.split(",")]:
    for chunk in (0, args.chunk):
      if chunk and per_device % chunk:
        continue
      compiled, compile_s = compile_step(per_device, chunk)
      mem = compiled.memory_analysis()
      flops = _flops(compiled)
      chunks = per_device // chunk if chunk else 1
      if chunk:
        if one_chunk_body is None:
          base_compiled = compiled if per_device == chunk else compile_step(
              chunk, chunk)[0]
          one_chunk_body = _flops(base_compiled) - loss_flops(chunk, chunk)
        flops += (chunks - 1) * one_chunk_body
      row = {"per_device_batch": per_device, "chunk": chunk or None,
             "temp_gib": mem.temp_size_in_bytes / 2**30,
             "args_gib": mem.argument_size_in_bytes / 2**30,
             "tflops_per_device": flops / 1e12, "compile_s": compile_s,
             "step_s": None}
      if per_device <= args.run_max_batch:
        row["step_s"] = wall_time(compiled, per_device)
      rows.append(row)
      if not args.json:
        print(_format(row), flush=True)

  by_batch = {}
  for r in rows:
    by_batch.setdefault(r["per_device_batch"], {})[r["chunk"] is not None] = r
  for b, pair in by_batch.items():
    if True in pair and False in pair:
      pair[True]["flops_vs_uncached"] = (pair[True]["tflops_per_device"]
                                         / pair[False]["tflops_per_device"])
  ref = by_batch.get(args.chunk, {}).get(False)
  if ref:
    for r in rows:
      r["temp_vs_uncached_at_chunk"] = r["temp_gib"] / ref["temp_gib"]
  meta = {"preset": args.preset,
          "image_size": task.config.data.image_size,
          "devices": f"{shards} x {jax.devices()[0].platform}",
          "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores",
          "jax": jax.__version__,
          "date": datetime.date.today().isoformat()}
  if args.json:
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return
  print()
  print(f"Florence {args.preset} at {meta['image_size']} px, {meta['devices']}"
        f" devices, {meta['machine']}, jax {meta['jax']}, {meta['date']}")
  print("| per-device batch | cache | peak temp / device | vs uncached@"
        f"{args.chunk} | TFLOPs / device | vs uncached | step (s) |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['per_device_batch']} | "
          f"{'chunk %d' % r['chunk'] if r['chunk'] else 'off'} | "
          f"{r['temp_gib']:.2f} GiB | "
          f"{r.get('temp_vs_uncached_at_chunk', float('nan')):.2f}x | "
          f"{r['tflops_per_device']:.2f} | "
          + (f"{r['flops_vs_uncached']:.2f}x" if "flops_vs_uncached" in r
             else "-")
          + f" | {'%.1f' % r['step_s'] if r['step_s'] else '-'} |")


def _format(row):
  return (f"batch {row['per_device_batch']:5d} chunk {row['chunk'] or '-':>4}:"
          f" temp {row['temp_gib']:.3f} GiB, {row['tflops_per_device']:.3f} "
          f"TFLOPs/device, compile {row['compile_s']:.1f}s, step "
          f"{row['step_s'] if row['step_s'] is None else round(row['step_s'], 2)}")


if __name__ == "__main__":
  main()
