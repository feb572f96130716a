"""Benchmark of window attention implementations.

  python -m kernels.bench_window_attention            # full shapes (GPU)
  python -m kernels.bench_window_attention --json     # machine-readable
  python -m kernels.bench_window_attention --small    # tiny shapes, any host

For each shape and each implementation available on the device (xla, pallas,
cudnn on GPU with bf16, tokamax when importable) it reports the median time
of the forward and of forward+backward, the achieved bandwidth counted over
the minimum bytes (forward: q, k, v, o; forward+backward: 12 such tensors)
and the percentage of the bandwidth floor (floor time = minimum bytes / peak
HBM bandwidth of the device; 100% means at the floor). Timings: compiled with
jax.jit, 2 warmup calls, then the median of --repeats timed calls, each ended
by block_until_ready.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import window_attention as wa
from kernels import window_attention_pallas as wap

# Peak HBM bandwidth (bytes/s) by device kind substring (vendor specs).
_PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One attention layer: tokens and windows are (T, H, W) or (H, W)."""
  name: str
  batch: int
  tokens: tuple
  window: tuple
  channels: int
  heads: int
  shifted: bool = True

  @property
  def n(self) -> int:
    return math.prod(self.window)

  @property
  def windows(self) -> int:
    return math.prod(t // w for t, w in zip(self.tokens, self.window))

  @property
  def q_shape(self) -> tuple:
    return (self.batch * self.windows, self.n, self.heads,
            self.channels // self.heads)


FULL_SHAPES = (
    Shape("swin-t stage1", 128, (56, 56), (7, 7), 96, 3),
    Shape("swin-t stage2", 128, (28, 28), (7, 7), 192, 6),
    Shape("swin-t stage3", 128, (14, 14), (7, 7), 384, 12),
    Shape("swin-b stage1", 128, (56, 56), (7, 7), 128, 4),
    Shape("swin-b stage2", 128, (28, 28), (7, 7), 256, 8),
    Shape("swin-b stage3", 128, (14, 14), (7, 7), 512, 16),
    Shape("swin-b stage4", 128, (7, 7), (7, 7), 1024, 32, shifted=False),
    Shape("video-b 2x7x7", 8, (16, 56, 56), (2, 7, 7), 128, 4),
    Shape("video-b 8x7x7", 8, (16, 56, 56), (8, 7, 7), 128, 4),
)
SMALL_SHAPES = (
    Shape("small 7x7", 2, (14, 14), (7, 7), 32, 2),
    Shape("small 2x7x7", 1, (2, 14, 14), (2, 7, 7), 32, 2),
)


def shift_mask(shape: Shape, neg: float = -100.0) -> np.ndarray:
  """(windows, N, N) additive mask of a cyclic shift by half a window."""
  grids = np.meshgrid(*(np.arange(t) for t in shape.tokens), indexing="ij")
  label = np.zeros(shape.tokens, np.int64)
  for axis, (g, t, w) in enumerate(zip(grids, shape.tokens, shape.window)):
    s = w // 2
    region = np.where(g < t - w, 0, np.where(g < t - s, 1, 2))
    label += region * 3 ** axis
  # (T/w0, w0, H/w1, w1, ...) -> (windows, N)
  split = [x for t, w in zip(shape.tokens, shape.window) for x in (t // w, w)]
  nd = len(shape.tokens)
  label = label.reshape(split).transpose(
      [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])
  label = label.reshape(shape.windows, shape.n)
  return np.where(label[:, :, None] == label[:, None, :], 0.0, neg).astype(
      np.float32)


def _full_bias(bias, mask, bw):
  """(BW, heads, N, N) bias + mask, for peers that want one dense bias."""
  h, n, _ = bias.shape
  if mask is None:
    return bias[None]
  nw = mask.shape[0]
  full = bias[None, None] + mask[None, :, None]
  return jnp.broadcast_to(full, (bw // nw, nw, h, n, n)).reshape(bw, h, n, n)


def _tokamax():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except Exception:  # any import failure just means: no peer to compare
    return None
  return tokamax


def implementations(dtype) -> dict:
  """name -> f(q, k, v, bias, mask) for what this device can run."""
  impls = {name: functools.partial(wa.window_attention, implementation=name)
           for name in ("xla", "pallas")}
  gpu = jax.default_backend() == "gpu"
  if gpu and dtype in (jnp.bfloat16, jnp.float16):
    impls["cudnn"] = functools.partial(wa.window_attention,
                                       implementation="cudnn")
  tokamax = _tokamax()
  if tokamax is not None and gpu:
    def via_tokamax(q, k, v, bias, mask):
      b = _full_bias(bias.astype(jnp.float32), mask, q.shape[0])
      return tokamax.dot_product_attention(q, k, v, bias=b.astype(q.dtype))
    impls["tokamax"] = via_tokamax
  return impls


def _time(f, args, repeats: int) -> float:
  """Median wall seconds of f(*args) after compilation and warmup."""
  for _ in range(2):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_shape(shape: Shape, impls: dict, dtype, repeats: int,
                peak: float | None) -> list:
  """Times every implementation on one shape; returns result rows."""
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  qs = shape.q_shape
  q, k, v, do = (jax.random.normal(kk, qs, jnp.float32).astype(dtype)
                 for kk in keys[:4])
  bias = jax.random.normal(keys[4], (shape.heads, shape.n, shape.n),
                           jnp.float32)
  mask = jnp.asarray(shift_mask(shape)) if shape.shifted else None
  itemsize = jnp.dtype(dtype).itemsize
  rows = []
  for name, f in impls.items():
    fwd = jax.jit(lambda q, k, v, bias, f=f: f(q, k, v, bias, mask))

    @jax.jit
    def fwd_bwd(q, k, v, bias, do, f=f):
      out, vjp = jax.vjp(lambda *a: f(*a, mask), q, k, v, bias)
      return out, vjp(do)

    row = {"shape": shape.name, "impl": name, "q_shape": list(qs),
           "n": shape.n, "dtype": jnp.dtype(dtype).name}
    try:
      for key, fn, args, backward in (
          ("fwd", fwd, (q, k, v, bias), False),
          ("fwd_bwd", fwd_bwd, (q, k, v, bias, do), True)):
        t = _time(fn, args, repeats)
        floor = wap.bandwidth_floor_bytes(qs, itemsize, backward)
        row[f"{key}_ms"] = t * 1e3
        row[f"{key}_gbps"] = floor / t / 1e9
        row[f"{key}_pct_floor"] = (100 * floor / peak / t) if peak else None
    except Exception as e:  # report, keep benchmarking the others
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows.append(row)
  base = {r["impl"]: r for r in rows}.get("xla", {})
  for r in rows:
    if "fwd_bwd_ms" in r and "fwd_bwd_ms" in base:
      r["fwd_bwd_speedup_vs_xla"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
      r["fwd_speedup_vs_xla"] = base["fwd_ms"] / r["fwd_ms"]
  return rows


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def print_table(rows: list, header: dict) -> None:
  print(f"# window attention, {header['device']} ({header['backend']}), "
        f"jax {header['jax']}, {header['date']}, peak "
        f"{_fmt(header['peak_gbps'], '.0f')} GB/s")
  cols = ("shape", "impl", "fwd ms", "GB/s", "%floor", "fwd+bwd ms", "GB/s",
          "%floor", "x xla")
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    if "error" in r:
      print(f"| {r['shape']} | {r['impl']} | {r['error']} |" + " |" * 7)
      continue
    print("| " + " | ".join([
        r["shape"], r["impl"], _fmt(r["fwd_ms"], ".3f"),
        _fmt(r["fwd_gbps"], ".1f"), _fmt(r["fwd_pct_floor"], ".0f"),
        _fmt(r["fwd_bwd_ms"], ".3f"), _fmt(r["fwd_bwd_gbps"], ".1f"),
        _fmt(r["fwd_bwd_pct_floor"], ".0f"),
        _fmt(r.get("fwd_bwd_speedup_vs_xla"), ".2f")]) + " |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print JSON only")
  p.add_argument("--small", action="store_true",
                 help="tiny shapes (runs on CPU through the interpreter)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16",
                                                         "float32"))
  p.add_argument("--repeats", type=int, default=None,
                 help="timed calls per measurement (default 20, small 3)")
  p.add_argument("--impls", default=None,
                 help="comma-separated subset, e.g. xla,pallas")
  p.add_argument("--shapes", default=None,
                 help="substring filter on shape names, e.g. 'swin-b'")
  p.add_argument("--peak-gbps", type=float, default=None,
                 help="peak HBM bandwidth; default from the device kind")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if backend == "cpu" and not args.small:
    p.error("full shapes need an accelerator (the Pallas kernel is "
            "interpreted on CPU); pass --small")
  dtype = jnp.dtype(args.dtype).type
  device = jax.devices()[0].device_kind
  peak = args.peak_gbps * 1e9 if args.peak_gbps else next(
      (bw for kind, bw in _PEAK_BANDWIDTH.items() if kind in device), None)
  impls = implementations(dtype)
  if args.impls:
    wanted = args.impls.split(",")
    unknown = set(wanted) - set(impls)
    if unknown:
      p.error(f"not available here: {sorted(unknown)}; have {sorted(impls)}")
    impls = {k: impls[k] for k in wanted}
  shapes = SMALL_SHAPES if args.small else FULL_SHAPES
  if args.shapes:
    shapes = [s for s in shapes if args.shapes in s.name]
  repeats = args.repeats or (3 if args.small else 20)
  header = {"device": device, "backend": backend, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "peak_gbps": peak / 1e9 if peak else None, "repeats": repeats}
  rows = list(itertools.chain.from_iterable(
      bench_shape(s, impls, dtype, repeats, peak) for s in shapes))
  if args.json:
    print(json.dumps({"header": header, "rows": rows}, indent=1))
  else:
    print_table(rows, header)
  return 0


if __name__ == "__main__":
  sys.exit(main())
