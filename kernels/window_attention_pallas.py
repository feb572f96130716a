"""Fused window attention in Pallas: forward and backward kernels.

Layouts are those of `kernels.window_attention` (q, k, v by window:
(batch*windows, N, heads, head_dim); bias (heads, N, N); additive mask
(windows, N, N) or None). `window_attention_pallas` computes

  o = softmax(scale * q k^T + bias + mask) v        (softmax in fp32)

in one kernel and differentiates it with a second one (`jax.custom_vjp`).

Design
  * One program owns a block of `windows_per_block` windows of one head (and,
    in the forward, one block of `block_q` query rows). It loops over its
    windows, so the bias tile and the program launch are amortized over the
    block. Each window's score rows live on-chip in fp32 against *all* of its
    keys: a window holds at most a few hundred tokens, so no flash-style
    online softmax over key blocks is needed. Queries are tiled so that one
    fp32 score tile stays within `_TILE_BUDGET` elements: N <= 128 gives a
    single query block (Swin 7x7 windows, video 2x7x7); N = 144 uses 4 blocks
    of 64 rows and N = 392 (video 8x7x7) 16 blocks of 32 rows, each still
    against all 512 padded keys, so the softmax stays exact in one pass.
  * Token counts that are not tile sizes (49, 98, 144, 392) and head dims
    below 16 are handled inside the kernel: blocks are padded up to powers of
    two (Triton needs those), every load outside the array is a masked load
    that yields 0, out-of-range keys get -inf before the softmax and every
    store is masked. Nothing is padded in HBM.
  * The forward saves the log-sum-exp per query row (fp32, (heads, BW, N)).
    The backward recomputes p = exp(s - lse) per window and produces dq, dk, dv
    and the bias gradient. delta = rowsum(do * o) is computed in the kernel,
    so o and do are read once. The bias gradient is summed over the windows of
    a program on-chip; the per-program partials (BW / windows_per_block, heads,
    N, N) in fp32 are summed by XLA, which also sums over the batch, so the
    gradient flows into the relative-position table through the gather
    outside. With several query blocks (N > 128) the per-window dbias rows are
    added to the program's own partial with `atomic_add` (no other program
    touches that block, so this is race-free and deterministic). The mask
    gets no gradient.

GPU lowering: Triton (`jax.experimental.pallas.triton`), chosen deliberately.
  Mosaic GPU is the maintained Pallas GPU path from jax 0.11 on, but its API
  (warpgroup matmuls, explicit SMEM/TMA pipelining, layout annotations) still
  changes between jax 0.10 and 0.11, and florax must run on both (CI is jax
  0.10.2, the GPU machines 0.11.2). The Triton lowering is deprecated but
  present and stable in both, takes the plain BlockSpec + masked load/store
  model this kernel needs, and Triton itself emits Hopper wgmma for the small
  (<=128)x(<=512)x(16..128) dots here. This kernel is memory-bound, so the
  Hopper-specific features Mosaic GPU exposes (TMA multicast, warp
  specialization) buy little. Revisit (port the two kernel bodies, which use
  only loads, stores, 2-D dots, exp/max/sum) when the Triton lowering is
  removed.

TPU: the kernel runs where Mosaic's block rules hold: q/k/v are viewed as
  (BW, N, heads*head_dim) and a head is a lane block, so head_dim must be a
  multiple of 128 (or heads == 1); blocks are unpadded (N is a full dim) and
  the window block must be a multiple of 8 (or all windows). Otherwise the
  dispatcher logs the reason and runs the XLA reference. Not yet run on a TPU.

CPU: the same kernels run with `interpret=True` (selected automatically) using
  the GPU plan (same padding and masked loads), which is what the tests check.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# fp32 elements of one score tile (block_q x padded N) held by a program.
_TILE_BUDGET = 16384
# Triton dots need every dimension >= 16.
_MIN_DIM = 16
_DEFAULT_WINDOWS_PER_BLOCK = 8


class UnsupportedShape(ValueError):
  """The kernel cannot run this shape on this backend; the message says why."""


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _largest_divisor_at_most(n: int, cap: int, multiple_of: int = 1) -> int:
  for w in range(min(n, cap), 0, -1):
    if n % w == 0 and w % multiple_of == 0:
      return w
  return 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling of one window-attention call.

  Attributes:
    platform: 'gpu', 'tpu' or 'cpu' (cpu runs the gpu plan interpreted).
    interpret: run through the Pallas interpreter.
    batch_windows, n, heads, head_dim: the problem (BW, N, H, D).
    n_pad, d_pad: block extents for tokens and head dim.
    block_q: query rows per forward program / backward step.
    windows_per_block: windows a program loops over.
    mask_windows: windows of the mask (0 without a mask).
    flat_heads: view q/k/v as (BW, N, H*D) with a head as a lane block (TPU).
  """
  platform: str
  interpret: bool
  batch_windows: int
  n: int
  heads: int
  head_dim: int
  n_pad: int
  d_pad: int
  block_q: int
  windows_per_block: int
  mask_windows: int
  flat_heads: bool

  @property
  def padded(self) -> bool:
    return self.n_pad != self.n or self.d_pad != self.head_dim

  @property
  def num_q_blocks(self) -> int:
    return self.n_pad // self.block_q

  @property
  def num_window_blocks(self) -> int:
    return self.batch_windows // self.windows_per_block


def make_plan(q_shape, mask_windows: int = 0, *, platform: str | None = None,
              interpret: bool | None = None,
              windows_per_block: int | None = None,
              block_q: int | None = None) -> Plan:
  """Chooses block sizes for q of shape (BW, N, H, D).

  Args:
    q_shape: (batch*windows, N, heads, head_dim).
    mask_windows: leading size of the mask, 0 when there is none.
    platform: 'gpu', 'tpu' or 'cpu'; jax.default_backend() when None.
    interpret: force the Pallas interpreter; default: only on cpu.
    windows_per_block: target windows per program (a divisor is used).
    block_q: query rows per tile (power of two, divides the padded N).
  Returns:
    A `Plan`.
  Raises:
    UnsupportedShape: the kernel's block rules do not hold (message says why).
  """
  bw, n, h, d = q_shape
  platform = platform or jax.default_backend()
  if platform not in ("gpu", "tpu", "cpu"):
    raise UnsupportedShape(f"no Pallas plan for platform {platform!r}")
  interpret = (platform == "cpu") if interpret is None else interpret
  target = windows_per_block or _DEFAULT_WINDOWS_PER_BLOCK
  # The mask is indexed per block, so a block must not straddle mask periods.
  period = mask_windows if mask_windows else bw
  if platform == "tpu":
    if d % 128 and h != 1:
      raise UnsupportedShape(
          f"TPU kernel needs head_dim % 128 == 0 (a head is one lane block of "
          f"(BW, N, heads*head_dim)) or heads == 1; got head_dim={d}, "
          f"heads={h}")
    wb = _largest_divisor_at_most(period, max(target, 8), multiple_of=8)
    if not wb:
      if period == bw:
        wb = bw
      else:
        raise UnsupportedShape(
            f"TPU kernel needs a window block that is a multiple of 8 and "
            f"divides the mask's {mask_windows} windows")
    return Plan(platform, interpret, bw, n, h, d, n_pad=n, d_pad=d, block_q=n,
                windows_per_block=wb, mask_windows=mask_windows,
                flat_heads=True)
  n_pad = max(_MIN_DIM, _next_pow2(n))
  d_pad = max(_MIN_DIM, _next_pow2(d))
  if block_q is None:
    block_q = min(n_pad, max(_MIN_DIM, _TILE_BUDGET // n_pad))
  if block_q < _MIN_DIM or n_pad % block_q or block_q & (block_q - 1):
    raise UnsupportedShape(
        f"block_q={block_q} must be a power of two >= {_MIN_DIM} dividing "
        f"the padded token count {n_pad}")
  wb = _largest_divisor_at_most(period, target)
  return Plan(platform, interpret, bw, n, h, d, n_pad=n_pad, d_pad=d_pad,
              block_q=block_q, windows_per_block=wb,
              mask_windows=mask_windows, flat_heads=False)


# ----------------------------------------------------------------- helpers --

def _load(ref, valid):
  """Reads a block; where `valid` is False, reads nothing and yields 0."""
  if valid is None:
    return ref[...]
  return plgpu.load(ref, mask=valid, other=jnp.zeros((), ref.dtype))


def _store(ref, value, valid):
  if valid is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=valid)


def _precision(dtype):
  # fp32 inputs: exact fp32 dots (IEEE on Triton), to match the XLA reference.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, *, trans_a=False, trans_b=False):
  """2-D dot with fp32 accumulation (Triton lowers only 2-D dots)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_precision(a.dtype),
                             preferred_element_type=jnp.float32)


class _Valid:
  """In-range masks of one tile (None everywhere when nothing is padded)."""

  def __init__(self, plan: Plan, row0):
    self.plan = plan
    bq, np_, dp = plan.block_q, plan.n_pad, plan.d_pad
    self.rows = (row0 + jnp.arange(bq)) < plan.n
    self.keys = jnp.arange(np_) < plan.n
    cols = jnp.arange(dp) < plan.head_dim
    if plan.padded:
      self.q = self.rows[:, None] & cols[None, :]
      self.kv = self.keys[:, None] & cols[None, :]
      self.s = self.rows[:, None] & self.keys[None, :]
      self.row = self.rows
    else:
      self.q = self.kv = self.s = self.row = None


def _scores(q, k, bias, mask, valid: _Valid, scale):
  """fp32 logits of one tile, -inf on keys beyond N."""
  s = _dot(q, k, trans_b=True) * scale
  if bias is not None:
    s = s + bias
  if mask is not None:
    s = s + mask
  if valid.plan.n_pad != valid.plan.n:
    s = jnp.where(valid.keys[None, :], s, -jnp.inf)
  return s


# ----------------------------------------------------------------- forward --

def _fwd_kernel(*refs, plan: Plan, scale: float, has_bias: bool,
                has_mask: bool):
  q_ref, k_ref, v_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  mask_ref = rest.pop(0) if has_mask else None
  o_ref, lse_ref = rest
  valid = _Valid(plan, pl.program_id(2) * plan.block_q)
  bias = (_load(bias_ref, valid.s).astype(jnp.float32) if has_bias else None)

  def window(j, carry):
    q = _load(q_ref.at[j], valid.q)
    k = _load(k_ref.at[j], valid.kv)
    v = _load(v_ref.at[j], valid.kv)
    mask = (_load(mask_ref.at[j], valid.s).astype(jnp.float32)
            if has_mask else None)
    s = _scores(q, k, bias, mask, valid, scale)
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - m[:, None])
    l = jnp.sum(p, axis=1)
    # Normalize before the cast to v's dtype, as the reference does.
    p = p * (1.0 / l)[:, None]
    o = _dot(p.astype(v.dtype), v)
    _store(o_ref.at[j], o.astype(o_ref.dtype), valid.q)
    _store(lse_ref.at[j], m + jnp.log(l), valid.row)
    return carry

  jax.lax.fori_loop(0, plan.windows_per_block, window, 0)


def _qkv_specs(plan: Plan, rows: int, index):
  """BlockSpec of a (BW, N, H, D) tensor: `index(grid) -> (win, row, head)`."""
  if plan.flat_heads:
    return pl.BlockSpec((plan.windows_per_block, plan.n, plan.head_dim),
                        lambda *g: index(*g))
  return pl.BlockSpec(
      (plan.windows_per_block, rows, pl.Squeezed(), plan.d_pad),
      lambda *g: (*index(*g), 0))


def _as_kernel_layout(plan: Plan, x):
  return x.reshape(x.shape[0], x.shape[1], -1) if plan.flat_heads else x


def _mask_block_index(plan: Plan, i):
  return i % (plan.mask_windows // plan.windows_per_block)


def _compiler_params(plan: Plan, backward: bool):
  if plan.platform == "gpu" and not plan.interpret:
    tile = plan.block_q * plan.n_pad
    warps = 8 if (backward or tile > 4096) else 4
    return plgpu.CompilerParams(num_warps=warps, num_stages=1)
  return None


def _forward(q, k, v, bias, mask, scale, plan: Plan):
  bw, n, h, d = q.shape
  wb, bq = plan.windows_per_block, plan.block_q
  grid = (plan.num_window_blocks, h, plan.num_q_blocks)
  in_specs = [_qkv_specs(plan, bq, lambda i, hh, qi: (i, qi, hh)),
              _qkv_specs(plan, plan.n_pad, lambda i, hh, qi: (i, 0, hh)),
              _qkv_specs(plan, plan.n_pad, lambda i, hh, qi: (i, 0, hh))]
  args = [_as_kernel_layout(plan, x) for x in (q, k, v)]
  if bias is not None:
    in_specs.append(pl.BlockSpec((pl.Squeezed(), bq, plan.n_pad),
                                 lambda i, hh, qi: (hh, qi, 0)))
    args.append(bias)
  if mask is not None:
    in_specs.append(pl.BlockSpec(
        (wb, bq, plan.n_pad),
        lambda i, hh, qi: (_mask_block_index(plan, i), qi, 0)))
    args.append(mask)
  out_specs = [_qkv_specs(plan, bq, lambda i, hh, qi: (i, qi, hh)),
               pl.BlockSpec((pl.Squeezed(), wb, bq),
                            lambda i, hh, qi: (hh, i, qi))]
  out_shape = [jax.ShapeDtypeStruct(args[0].shape, q.dtype),
               jax.ShapeDtypeStruct((h, bw, n), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, plan=plan, scale=scale,
                             has_bias=bias is not None,
                             has_mask=mask is not None)
  o, lse = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=out_specs, interpret=plan.interpret,
      compiler_params=_compiler_params(plan, backward=False),
      name="window_attention_fwd")(*args)
  return o.reshape(q.shape), lse


# ---------------------------------------------------------------- backward --

def _bwd_kernel(*refs, plan: Plan, scale: float, has_bias: bool,
                has_mask: bool):
  q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  mask_ref = rest.pop(0) if has_mask else None
  if has_bias and plan.num_q_blocks > 1:
    rest.pop(0)  # zero-initialized dbias partials, aliased to the output
  dq_ref, dk_ref, dv_ref, *dbias_ref = rest
  dbias_ref = dbias_ref[0] if has_bias else None
  bq, np_, dp = plan.block_q, plan.n_pad, plan.d_pad
  single = plan.num_q_blocks == 1
  all_valid = _Valid(plan, 0)

  def q_block(j, qi, k, v, dk, dv, bias):
    """Gradients of query rows [qi*bq, qi*bq+bq) of window j."""
    valid = all_valid if single else _Valid(plan, qi * bq)
    rows = pl.ds(qi * bq, bq)
    q = _load(q_ref.at[j, rows, :], valid.q)
    o = _load(o_ref.at[j, rows, :], valid.q)
    do = _load(do_ref.at[j, rows, :], valid.q)
    lse = _load(lse_ref.at[j, rows], valid.row)
    if has_bias and bias is None:
      bias = _load(bias_ref.at[rows, :], valid.s).astype(jnp.float32)
    mask = (_load(mask_ref.at[j, rows, :], valid.s).astype(jnp.float32)
            if has_mask else None)
    s = _scores(q, k, bias, mask, valid, scale)
    p = jnp.exp(s - lse[:, None])
    if plan.padded:
      p = jnp.where(valid.rows[:, None], p, 0.0)  # padded rows have no lse
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=1)
    dp_ = _dot(do, v, trans_b=True)
    ds = p * (dp_ - delta[:, None])
    dq = _dot(ds.astype(k.dtype), k) * scale
    _store(dq_ref.at[j, rows, :], dq.astype(dq_ref.dtype), valid.q)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True) * scale
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    if has_bias and not single:
      # ds is exactly 0 outside the valid tile. The interpreter's atomic add
      # takes no mask but writes into a padded copy, so it needs none.
      plgpu.atomic_add(dbias_ref, (rows, slice(None)), ds,
                       mask=None if plan.interpret else valid.s)
    return dk, dv, ds

  bias_all = (_load(bias_ref, all_valid.s).astype(jnp.float32)
              if has_bias and single else None)

  def window(j, dbias_acc):
    k = _load(k_ref.at[j], all_valid.kv)
    v = _load(v_ref.at[j], all_valid.kv)
    zeros = jnp.zeros((np_, dp), jnp.float32)
    if single:
      dk, dv, ds = q_block(j, 0, k, v, zeros, zeros, bias_all)
      if has_bias:
        dbias_acc = dbias_acc + ds
    else:
      def step(qi, acc):
        dk, dv, _ = q_block(j, qi, k, v, *acc, None)
        return dk, dv
      dk, dv = jax.lax.fori_loop(0, plan.num_q_blocks, step, (zeros, zeros))
    _store(dk_ref.at[j], dk.astype(dk_ref.dtype), all_valid.kv)
    _store(dv_ref.at[j], dv.astype(dv_ref.dtype), all_valid.kv)
    return dbias_acc

  acc0 = jnp.zeros((np_, np_) if (has_bias and single) else (), jnp.float32)
  acc = jax.lax.fori_loop(0, plan.windows_per_block, window, acc0)
  if has_bias and single:
    _store(dbias_ref, acc, all_valid.s)


def _backward(q, k, v, bias, mask, o, lse, do, scale, plan: Plan):
  bw, n, h, d = q.shape
  wb, np_ = plan.windows_per_block, plan.n_pad
  nwb = plan.num_window_blocks
  rows_all = lambda i, hh: (i, 0, hh)
  tensor_spec = _qkv_specs(plan, np_, rows_all)
  in_specs = [tensor_spec] * 5 + [
      pl.BlockSpec((pl.Squeezed(), wb, np_), lambda i, hh: (hh, i, 0))]
  args = [_as_kernel_layout(plan, x) for x in (q, k, v, o, do)] + [lse]
  dbias_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), np_, np_),
                            lambda i, hh: (i, hh, 0, 0))
  dbias_shape = jax.ShapeDtypeStruct((nwb, h, n, n), jnp.float32)
  if bias is not None:
    in_specs.append(pl.BlockSpec((pl.Squeezed(), np_, np_),
                                 lambda i, hh: (hh, 0, 0)))
    args.append(bias)
  if mask is not None:
    in_specs.append(pl.BlockSpec(
        (wb, np_, np_), lambda i, hh: (_mask_block_index(plan, i), 0, 0)))
    args.append(mask)
  aliases = {}
  if bias is not None and plan.num_q_blocks > 1:
    # Partials are accumulated with atomic adds, so they must start at zero.
    aliases = {len(args): 3}
    in_specs.append(dbias_spec)
    args.append(jnp.zeros(dbias_shape.shape, jnp.float32))
  out_specs = [tensor_spec] * 3
  out_shape = [jax.ShapeDtypeStruct(args[0].shape, x.dtype) for x in (q, k, v)]
  if bias is not None:
    out_specs.append(dbias_spec)
    out_shape.append(dbias_shape)
  kernel = functools.partial(_bwd_kernel, plan=plan, scale=scale,
                             has_bias=bias is not None,
                             has_mask=mask is not None)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(nwb, h), in_specs=in_specs,
      out_specs=out_specs, input_output_aliases=aliases,
      interpret=plan.interpret,
      compiler_params=_compiler_params(plan, backward=True),
      name="window_attention_bwd")(*args)
  dq, dk, dv = (x.reshape(q.shape) for x in outs[:3])
  dbias = outs[3].sum(axis=0).astype(bias.dtype) if bias is not None else None
  return dq, dk, dv, dbias


# ---------------------------------------------------------- differentiable --

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, bias, mask, scale, plan):
  return _forward(q, k, v, bias, mask, scale, plan)[0]


def _attention_fwd(q, k, v, bias, mask, scale, plan):
  o, lse = _forward(q, k, v, bias, mask, scale, plan)
  return o, (q, k, v, bias, mask, o, lse)


def _attention_bwd(scale, plan, res, do):
  q, k, v, bias, mask, o, lse = res
  dq, dk, dv, dbias = _backward(q, k, v, bias, mask, o, lse, do, scale, plan)
  # The mask is a constant of the shift pattern: no gradient.
  dmask = None if mask is None else jnp.zeros_like(mask)
  return dq, dk, dv, dbias, dmask


_attention.defvjp(_attention_fwd, _attention_bwd)


def window_attention_pallas(q, k, v, bias=None, mask=None, *, scale=None,
                            plan: Plan | None = None, **plan_kwargs):
  """Fused window attention (forward and custom backward).

  Args:
    q, k, v: (batch*windows, N, heads, head_dim).
    bias: (heads, N, N) or None; receives a gradient.
    mask: (windows, N, N) additive or None; receives no gradient.
    scale: logit scale; head_dim**-0.5 when None.
    plan: a `Plan` from `make_plan`; built from the shapes when None.
    **plan_kwargs: passed to `make_plan` (platform, interpret,
      windows_per_block, block_q).
  Returns:
    (batch*windows, N, heads, head_dim) in q's dtype.
  Raises:
    UnsupportedShape: the kernel cannot run this shape on this backend.
  """
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)
  if plan is None:
    plan = make_plan(q.shape, 0 if mask is None else mask.shape[0],
                     **plan_kwargs)
  return _attention(q, k, v, bias, mask, scale, plan)


def bandwidth_floor_bytes(q_shape, itemsize: int, backward: bool) -> int:
  """Minimum HBM bytes: q, k, v, o (+ do, dq, dk, dv and o, q, k, v again)."""
  tensors = 4 + (8 if backward else 0)
  return tensors * math.prod(q_shape) * itemsize
