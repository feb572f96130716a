"""One benchmark for every family's train step, on whatever device runs it.

  python -m benchmarks.suite [--json] [--small] [--only NAME[,NAME]]
      [--steps N] [--batch_per_device B] [--readme README.md] [--no_kernels]

For each registered family preset at a benchmark size (`--small`: toy sizes,
so CI proves the suite works on a CPU in well under 3 minutes) it builds the
task and the trainer exactly as `launch.train` does (real data pipeline,
real sharded state, the compiled train step with its optimizer), then:

  compile_s       lowering + XLA compile of the train step
  step_ms         median wall time of a warm step (dispatch to
                  block_until_ready; --steps timed after 2 warm-up steps)
  examples/s      global batch / step time
  TFLOP/s/dev     the task's analytic model FLOPs of one step
                  (`Task.step_flops`, closed forms in florax/models/flops.py:
                  matmuls and convolutions, 3x forward for trained weights,
                  1x for frozen networks, remat recompute not counted) /
                  devices / step time
  MFU measured    TFLOP/s/dev / a matmul peak measured in the same run on the
                  same device and dtype (florax.train.hardware)
  MFU spec        TFLOP/s/dev / the vendor's dense peak (none for CPUs)
  memory          peak bytes in use on the device (accelerators: the
                  allocator's peak, each entry in its own process so peaks
                  do not carry over); XLA's static estimate of the compiled
                  step (arguments + temporaries + outputs - aliased) always
  data wait       fraction of the loop spent waiting for the next batch
                  from the input pipeline (this loop blocks on every step,
                  so it is the pipeline's share when nothing overlaps)

and the window-attention kernel table (kernels/bench_window_attention.py:
xla / pallas / cudnn / tokamax where available; on CPU the Pallas kernel is
interpreted, so its CPU times say nothing about its speed).

`--readme PATH` rewrites the block between
`<!-- benchmarks.suite:PLATFORM begin -->` and `... end -->` of PATH with
this run's tables, device, versions and date (PLATFORM: cpu, gpu or tpu);
a missing block is appended under a "Performance" heading.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  """A family preset at benchmark size.

  `config(small, accelerator, tmpdir)` returns the config with everything
  but the batch size set; the suite sets the global batch from
  --batch_per_device (or the entry's default per-device batch).
  """
  name: str
  describe: str
  config: Callable[[bool, bool, str], ml_collections.ConfigDict]
  batch_per_device: int
  small_batch_per_device: int = 8


def _bench_common(c, small: bool, accelerator: bool):
  """Fields every benchmark config shares: no evaluation, no checkpoint
  churn, low-precision compute on accelerators."""
  c.train.eval_every = 0
  c.train.checkpoint_every = 1_000_000
  c.train.log_every = 1_000_000
  c.train.steps = 1_000
  c.evals = ml_collections.ConfigDict()
  c.model.dtype = "bfloat16" if accelerator else "float32"
  if small:
    c.optimizer.warmup_steps = 1
  return c


def _clip_vit_b16(small, accelerator, tmpdir):
  from configs import eva, florence  # pylint: disable=g-import-not-at-top
  c = florence.get_config("tiny" if small else "b")
  with c.unlocked():
    c.model.image = eva.image_config("tiny/8" if small else "B/16",
                                     32 if small else 224)
  if not small:
    c.model.text = florence._text_config("B")  # pylint: disable=protected-access
    c.data.max_len = c.model.text.max_len
  c.model.embed_dim = 64 if small else 512
  c.data.image_size = 32 if small else 224
  return _bench_common(c, small, accelerator)


def _florence_b(small, accelerator, tmpdir):
  from configs import florence  # pylint: disable=g-import-not-at-top
  c = florence.get_config("tiny" if small else "b")
  return _bench_common(c, small, accelerator)


def _teacher_export(tmpdir: str, preset: str, size: int) -> str:
  """A random-init ViT image tower written as an export: the frozen
  teacher of the EVA benchmark (its weights do not change the FLOPs)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import imported  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  from florax.data import preprocess  # pylint: disable=g-import-not-at-top
  from florax.models import two_tower, vit  # pylint: disable=g-import-not-at-top
  out = os.path.join(tmpdir, f"teacher_{preset.replace('/', '_')}")
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  image = dict(arch="vit", **vars(vit.config_for(preset, size)))
  model_cfg = dict(image=image, embed_dim=0, dtype="float32", num_classes=0)
  spec = preprocess.resize_center_crop_spec(size, size, (0.48, 0.46, 0.41),
                                            (0.27, 0.26, 0.28))
  config = imported.config(model_cfg, size, None, spec)
  model = two_tower.from_config(config.model)
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3))))(
      jax.random.key(0))["params"]
  export.write_export(out, config, nn.unbox(params), None, step=0,
                      platforms=(), preprocess=spec)
  return out


def _eva_b16(small, accelerator, tmpdir):
  from configs import eva  # pylint: disable=g-import-not-at-top
  c = eva.get_config("tiny" if small else "b16")
  with c.unlocked():
    c.teacher.path = _teacher_export(tmpdir, "tiny/8" if small else "B/16",
                                     32 if small else 224)
  return _bench_common(c, small, accelerator)


def _classify_vit_b16(small, accelerator, tmpdir):
  from configs import finetune  # pylint: disable=g-import-not-at-top
  c = finetune.get_config("tiny" if small else "vit_b16")
  return _bench_common(c, small, accelerator)


def _tokenizer_workdir(tmpdir: str, preset: str) -> str:
  """A random-init VQ-KD tokenizer run (configs/vqkd.py:`preset`): its
  config.json and one checkpoint of the encoder and codebook, all a
  consumer reads; the frozen tokenizer of the BEiT-3 benchmark (its
  weights do not change the FLOPs)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import vqkd  # pylint: disable=g-import-not-at-top
  from florax import config_io  # pylint: disable=g-import-not-at-top
  from florax.models import vqkd as vqkd_lib  # pylint: disable=g-import-not-at-top
  from florax.tasks import vqkd as vqkd_task  # pylint: disable=g-import-not-at-top
  from florax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  out = os.path.join(tmpdir, f"vqkd_{preset}")
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  cfg = vqkd.get_config(preset)
  # The target width only shapes the decoder, which a consumer never reads.
  model = vqkd_lib.VQKD(vqkd_task.model_config(cfg.model, 1))
  size = cfg.data.image_size
  params = jax.jit(lambda r: model.init(
      r, jnp.zeros((1, size, size, 3)), method=model.encode))(
          jax.random.key(0))["params"]
  config_io.save(out, cfg)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1, every=1, data_names=())
  checkpointer.save(0, {"params": nn.unbox(params)}, {}, force=True)
  checkpointer.wait()
  checkpointer.close()
  return out


def _beit3_base(small, accelerator, tmpdir):
  from configs import beit3  # pylint: disable=g-import-not-at-top
  c = beit3.get_config("tiny" if small else "base")
  with c.unlocked():
    c.tokenizer.path = _tokenizer_workdir(tmpdir, "tiny" if small else "b16")
    # The suite sets train.batch_size: a third each of images, texts and
    # pairs (it must be a multiple of 3).
    del c.train["batch_size"]
    c.train.batch_size = 3
    for part in ("image", "text", "pair"):
      c.data.composition[part] = c.train.get_ref("batch_size") // 3
    # A SentencePiece of the digits' texts (no 64k-piece file at hand);
    # the model keeps BEiT-3's 64k vocabulary and MLM head.
    c.data.text_tokenizer_vocab_size = 127
    if small:  # two layers (the top one with the VL expert): compile time
      c.model.multiway.depth = 2
  return _bench_common(c, small, accelerator)


def _flava_full(small, accelerator, tmpdir):
  from configs import flava  # pylint: disable=g-import-not-at-top
  c = flava.get_config("tiny" if small else "full")
  with c.unlocked():
    c.tokenizer.path = _tokenizer_workdir(tmpdir, "tiny" if small else "b16")
    # The suite times one batch kind: the pair kind only (contrastive on
    # the unmasked pair, then the masked image + text + multimodal pass
    # with ITM and MMM: the costliest kind, every encoder and head), at
    # the suite's batch.
    c.train.mixture = ml_collections.ConfigDict(
        dict(image=0.0, text=0.0, pair=1.0))
    del c.train["batch_size"]
    c.train.batch_size = 8
    for kind in ("image", "text", "pair"):
      c.data.batch_sizes[kind] = c.train.get_ref("batch_size")
    # A SentencePiece of the digits' texts (no 30k-piece file at hand);
    # the model keeps FLAVA's 30522-piece vocabulary and MLM/MMM heads.
    c.data.text_tokenizer_vocab_size = 127
  return _bench_common(c, small, accelerator)


ENTRIES = {e.name: e for e in (
    Entry("clip_vit_b16", "CLIP two-tower: ViT-B/16 + 12x512 text, UniCL "
          "global loss, 224 px", _clip_vit_b16, 256),
    Entry("florence_b", "Florence-B: CoSwin-B + 12x768 text, UniCL global "
          "loss, 224 px", _florence_b, 128),
    Entry("eva_b16", "EVA MIM: ViT-B/16 student, frozen ViT-B/16 teacher, "
          "40% block masks, 224 px", _eva_b16, 256),
    Entry("classify_vit_b16", "Fine-tuning: ViT-B/16 mean-pool classifier, "
          "1000 classes, 224 px", _classify_vit_b16, 256),
    Entry("beit3_base", "BEiT-3 MDM: Multiway-B (12x768, 2 VL layers), "
          "MLM + MIM + MVLM, frozen VQ-KD B/16 tokenizer, 224 px, text 64; "
          "batch = images + texts + pairs in thirds (global batch counts "
          "rows: 1 of each)", _beit3_base, 192, small_batch_per_device=6),
    Entry("flava_full", "FLAVA-full (241M: ViT-B/16 image, 12x768 text, "
          "6x768 multimodal), the pair kind: global contrastive + ITM + "
          "MMM (image and text), frozen VQ-KD B/16 tokenizer, 224 px, text "
          "77", _flava_full, 64),
)}


def _peak_memory(device) -> int | None:
  stats = getattr(device, "memory_stats", lambda: None)()
  return int(stats["peak_bytes_in_use"]) if stats and (
      "peak_bytes_in_use" in stats) else None


def _xla_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes
               + m.output_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # some backends have no memory analysis
    return None


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


def _step_flops(task, kind: str, global_batch: int) -> float | None:
  """The task's analytic FLOPs of one train step (the whole global batch)."""
  fn = getattr(task, "step_flops", None)
  if fn is not None:
    return fn(kind, global_batch)
  per = task.flops_per_example()
  return None if per is None else per * global_batch


def run_entry(entry: Entry, small: bool, steps: int,
              batch_per_device: int | None, peaks: dict) -> dict:
  """Builds, compiles and times one entry in this process. What the task
  and the trainer print goes to stderr: stdout carries --json's result."""
  with contextlib.redirect_stdout(sys.stderr):
    return _run_entry(entry, small, steps, batch_per_device, peaks)


def _run_entry(entry: Entry, small: bool, steps: int,
               batch_per_device: int | None, peaks: dict) -> dict:
  from florax import tasks  # pylint: disable=g-import-not-at-top
  from florax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  accelerator = jax.default_backend() != "cpu"
  devices = jax.device_count()
  with tempfile.TemporaryDirectory(prefix="florax_suite_") as tmp:
    cfg = entry.config(small, accelerator, tmp)
    per_device = batch_per_device or (entry.small_batch_per_device if small
                                      else entry.batch_per_device)
    cfg.train.batch_size = per_device * devices
    t = trainer_lib.Trainer(tasks.build(cfg, os.path.join(tmp, "work")))
    kind = next(iter(t.kind_weights))
    state = t.init_state()
    frozen = t.load_frozen()
    it = t.task.train_iterators(jax.process_index(),
                                jax.process_count())[kind]
    t0 = time.perf_counter()
    compiled = t.compile_step(kind)
    compile_s = time.perf_counter() - t0
    data_s, step_s = [], []
    for i in range(steps + 2):
      t0 = time.perf_counter()
      batch = t.global_batch(next(it))
      t1 = time.perf_counter()
      state, metrics = compiled(state, batch, frozen)
      jax.block_until_ready((state, metrics))
      t2 = time.perf_counter()
      if i >= 2:  # the first calls pay for allocation and autotuning
        data_s.append(t1 - t0)
        step_s.append(t2 - t1)
    loss = float(metrics["train/loss"])
    getattr(it, "close", lambda: None)()
    global_batch = t.batch_size(kind)
    flops = _step_flops(t.task, kind, global_batch)
    dtype = cfg.model.dtype
    num_params, num_frozen = t.num_params, t.num_frozen
  step = statistics.median(step_s)
  tflops = flops / devices / step / 1e12 if flops else None
  measured = peaks.get(dtype)
  spec = peaks.get("spec")
  return {
      "name": entry.name, "describe": entry.describe, "dtype": dtype,
      "devices": devices, "global_batch": global_batch,
      "params_m": num_params / 1e6, "frozen_m": num_frozen / 1e6,
      "compile_s": compile_s, "step_ms": step * 1e3,
      "examples_per_s": global_batch / step,
      "analytic_tflop_per_step_per_device": (flops / devices / 1e12
                                             if flops else None),
      "xla_tflop_per_step_per_device": (
          (_xla_flops(compiled) or 0.0) / 1e12) or None,
      "tflops_per_device": tflops,
      "mfu_measured_peak": (tflops * 1e12 / measured
                            if tflops and measured else None),
      "mfu_spec_peak": tflops * 1e12 / spec if tflops and spec else None,
      "peak_memory_gib": (_peak_memory(jax.devices()[0]) or 0) / 2**30 or None,
      "xla_memory_gib": (_xla_memory(compiled) or 0) / 2**30 or None,
      "data_wait_fraction": sum(data_s) / (sum(data_s) + sum(step_s)),
      "final_loss": loss,
  }


def measure_peaks(dtypes, small: bool) -> dict:
  """{dtype: measured matmul FLOP/s, 'spec': vendor peak or None}."""
  from florax.train import hardware  # pylint: disable=g-import-not-at-top
  out = {"spec": hardware.peak_flops_per_device()}
  for dtype in sorted(set(dtypes)):
    n = 1024 if small or jax.default_backend() == "cpu" else 8192
    # The best of three: a peak is what the device reaches at its best
    # (each call is already a median over warm repeats).
    out[dtype] = max(hardware.measure_matmul_peak(jnp.dtype(dtype), n=n)
                     for _ in range(3))
  return out


def kernel_rows(small: bool) -> list[dict]:
  from kernels import bench_window_attention as bwa  # pylint: disable=g-import-not-at-top
  accelerator = jax.default_backend() != "cpu"
  dtype = jnp.bfloat16 if accelerator else jnp.float32
  shapes = bwa.SMALL_SHAPES if small or not accelerator else bwa.FULL_SHAPES
  device = jax.devices()[0].device_kind
  peak = next((bw for k, bw in bwa._PEAK_BANDWIDTH.items()  # pylint: disable=protected-access
               if k in device), None)
  impls = bwa.implementations(dtype)
  rows = []
  for s in shapes[:1] if small else shapes:
    rows.extend(bwa.bench_shape(s, impls, dtype, 3 if small else 20, peak))
  return rows


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def header() -> dict:
  d = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  return {"device": d.device_kind, "platform": d.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "flax": flax.__version__, "python": platform.python_version(),
          "host": f"{platform.machine()}, {os.cpu_count()} cores",
          "date": datetime.date.today().isoformat()}


def markdown(result: dict) -> str:
  h = result["header"]
  peaks = result["peaks"]
  measured = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in
                       peaks.items() if k != "spec" and v)
  lines = [
      f"{h['device']} x{h['devices']} ({h['platform']}, {h['host']}), jax "
      f"{h['jax']}, flax {h['flax']}, {h['date']}"
      + (" — `--small` toy sizes" if result["small"] else "")
      + f". Measured matmul peak: {measured}; spec peak: "
      + (f"{peaks['spec'] / 1e12:.0f} TFLOP/s" if peaks.get("spec")
         else "none (CPU)") + ".",
      "",
      "| family | dtype | batch | params | compile s | step ms | examples/s "
      "| TFLOP/s/dev | MFU (measured peak) | MFU (spec) | memory GiB "
      "(peak / XLA) | data wait |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["entries"]:
    if "error" in r:
      lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 10)
      continue
    mem = f"{_fmt(r['peak_memory_gib'], '.2f')} / " \
          f"{_fmt(r['xla_memory_gib'], '.2f')}"
    lines.append("| " + " | ".join([
        r["name"], r["dtype"], str(r["global_batch"]),
        f"{r['params_m']:.1f}M" + (f" + {r['frozen_m']:.1f}M frozen"
                                   if r["frozen_m"] else ""),
        f"{r['compile_s']:.1f}", f"{r['step_ms']:.1f}",
        f"{r['examples_per_s']:.1f}", _fmt(r["tflops_per_device"], ".3g"),
        _fmt(r["mfu_measured_peak"] and 100 * r["mfu_measured_peak"], ".1f")
        + ("%" if r["mfu_measured_peak"] else ""),
        _fmt(r["mfu_spec_peak"] and 100 * r["mfu_spec_peak"], ".1f")
        + ("%" if r["mfu_spec_peak"] else ""), mem,
        f"{100 * r['data_wait_fraction']:.0f}%"]) + " |")
  if result.get("kernels"):
    lines += ["", "| window attention | impl | fwd ms | fwd %floor | fwd+bwd "
              "ms | fwd+bwd %floor | x xla |", "|---|---|---:|---:|---:|---:"
              "|---:|"]
    for r in result["kernels"]:
      if "error" in r:
        lines.append(f"| {r['shape']} | {r['impl']} | {r['error']} |"
                     + " |" * 4)
        continue
      lines.append("| " + " | ".join([
          r["shape"], r["impl"], _fmt(r["fwd_ms"], ".3f"),
          _fmt(r["fwd_pct_floor"], ".0f"), _fmt(r["fwd_bwd_ms"], ".3f"),
          _fmt(r["fwd_bwd_pct_floor"], ".0f"),
          _fmt(r.get("fwd_bwd_speedup_vs_xla"), ".2f")]) + " |")
  return "\n".join(lines)


def write_readme(path: str, result: dict) -> None:
  """Replaces this platform's block of the README with `result`'s tables."""
  key = result["header"]["platform"]
  begin = f"<!-- benchmarks.suite:{key} begin -->"
  end = f"<!-- benchmarks.suite:{key} end -->"
  with open(path) as f:
    text = f.read()
  block = f"{begin}\n{markdown(result)}\n{end}"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + f"\n\n## Performance\n\n{block}\n"
  with open(path, "w") as f:
    f.write(text)


def _run_isolated(name: str, args) -> dict:
  """One entry in a fresh process: the allocator's peak is its own."""
  cmd = [sys.executable, "-m", "benchmarks.suite", "--_entry", name,
         "--steps", str(args.steps)] + (["--small"] if args.small else []) + (
             ["--batch_per_device", str(args.batch_per_device)]
             if args.batch_per_device else [])
  p = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if p.returncode:
    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
    return {"name": name, "error": tail[:200]}
  return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print JSON only")
  p.add_argument("--small", action="store_true",
                 help="toy sizes (any host; what CI runs)")
  p.add_argument("--only", default=None,
                 help=f"comma-separated subset of {sorted(ENTRIES)}")
  p.add_argument("--steps", type=int, default=None,
                 help="timed warm steps per entry (default 10, small 3)")
  p.add_argument("--batch_per_device", type=int, default=None)
  p.add_argument("--readme", default=None,
                 help="rewrite this platform's tables in this file")
  p.add_argument("--no_kernels", action="store_true",
                 help="skip the window-attention kernel table")
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="each entry in its own process (auto: on accelerators,"
                 " where the allocator's peak memory is per process)")
  p.add_argument("--_entry", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps = args.steps or (3 if args.small else 10)
  names = args.only.split(",") if args.only else list(ENTRIES)
  unknown = [n for n in names if n not in ENTRIES]
  if unknown:
    p.error(f"--only: unknown {unknown}; choose from {sorted(ENTRIES)}")
  accelerator = jax.default_backend() != "cpu"
  if not accelerator and not args.small and not args.batch_per_device:
    print("benchmarks.suite: the full-size models at their accelerator "
          "batches take hours per step on a CPU; pass --small (toy sizes) "
          "or a small --batch_per_device (e.g. 2)", file=sys.stderr)
    return 2
  dtype = "bfloat16" if accelerator else "float32"
  peaks = measure_peaks([dtype], args.small)
  if args._entry:  # a child of an isolated run: one JSON line
    print(json.dumps(run_entry(ENTRIES[args._entry], args.small, args.steps,
                               args.batch_per_device, peaks)))
    return 0
  isolate = args.isolate == "yes" or (args.isolate == "auto" and accelerator)
  entries = []
  for name in names:
    if not args.json:
      print(f"benchmarks.suite: {name} ...", file=sys.stderr, flush=True)
    if isolate:
      entries.append(_run_isolated(name, args))
      continue
    try:
      entries.append(run_entry(ENTRIES[name], args.small, args.steps,
                               args.batch_per_device, peaks))
    except Exception as e:  # report it, keep measuring the others
      entries.append({"name": name,
                      "error": f"{type(e).__name__}: {str(e)[:200]}"})
  result = {"header": header(), "small": args.small, "peaks": peaks,
            "entries": entries,
            "kernels": [] if args.no_kernels else kernel_rows(args.small)}
  if args.readme:
    write_readme(args.readme, result)
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(markdown(result))
  return 1 if any("error" in e for e in entries) else 0


if __name__ == "__main__":
  with contextlib.suppress(KeyboardInterrupt):
    sys.exit(main())
