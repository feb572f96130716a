"""The gradient cache (Gao et al. 2021; Florence §2.5): an exact large-batch
contrastive gradient in the memory of one sub-batch.

A contrastive loss couples every example of the batch, so it cannot be split
into independent micro-batches. But it only touches the towers through their
embeddings, which are small. Three passes:

  1. run every tower forward chunk by chunk, keeping only the embeddings;
  2. compute the (global) loss and its gradient w.r.t. all embeddings, and
     w.r.t. the parameters the loss uses directly (the temperature);
  3. re-run each chunk's forward under `jax.vjp` and pull its slice of the
     embedding gradient back to the parameters, summing over chunks.

By the chain rule the sum is the gradient of the full-batch loss; only the
summation order differs. Passes 1 and 3 are `lax.scan`s, so one chunk's
activations are alive at a time; the price is one extra forward pass.

Chunks under data parallelism: the global batch (B, ...) is sharded over the
data axes, B_local rows per device. Chunk i is rows [i*c, (i+1)*c) of
*every* device: a global array of n_shards*c rows, still sharded over the
data axes, that the towers run on under GSPMD as they would on a full batch
(so parameter sharding, ZeRO gathers, remat and mixed precision inside the
towers are untouched). No batch data moves between devices.

Randomness (dropout, stochastic depth): tower t sees the key
`chunk_rng(rng, t, i)` for chunk i, in pass 1 and again in pass 3, so both
passes draw the same masks. The function this computes the gradient of is
therefore "each tower applied chunk by chunk with those keys, then the loss";
`chunked_embeddings` is that forward as one differentiable function (it
keeps all activations), the uncached reference with identical randomness.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from florax.parallel.mesh import current_mesh, data_axes, data_size

# tower(params, inputs_chunk, rng) -> (rows, D) embeddings
Tower = Callable[[Any, Any, jax.Array], jax.Array]
# loss_fn(params, embeddings: tuple, one per tower) -> (loss, aux)
LossFn = Callable[[Any, tuple], tuple[jax.Array, Any]]


def chunk_rng(rng: jax.Array, tower: int, chunk: int) -> jax.Array:
  """The key tower `tower` uses for chunk `chunk` (of every device)."""
  return jax.random.fold_in(jax.random.fold_in(rng, tower), chunk)


def check_chunk_size(per_device_batch: int, chunk_size: int) -> int:
  """Number of chunks; raises ValueError unless chunk_size divides the batch.

  Args:
    per_device_batch: rows of the batch on each data-parallel shard.
    chunk_size: rows per device in one chunk.
  Returns:
    per_device_batch // chunk_size.
  """
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or (
      chunk_size <= 0):
    raise ValueError(f"gradient cache chunk_size must be a positive integer, "
                     f"got {chunk_size!r}")
  if per_device_batch % chunk_size:
    raise ValueError(
        f"gradient cache chunk_size {chunk_size} does not divide the "
        f"per-device batch {per_device_batch}; choose a divisor of it "
        f"(e.g. {largest_divisor_at_most(per_device_batch, chunk_size)})")
  return per_device_batch // chunk_size


def largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


class _Chunker:
  """Takes device-local chunk i of a batch sharded over the data axes, and
  puts chunked results back in batch order."""

  def __init__(self, mesh, axes, global_batch: int, chunk_size: int):
    self.mesh = mesh
    self.names = data_axes(mesh, axes)
    self.shards = data_size(mesh, axes) if self.names else 1
    if global_batch % self.shards:
      raise ValueError(f"global batch {global_batch} is not divisible by the "
                       f"{self.shards} data-parallel shards {self.names}")
    self.local = global_batch // self.shards
    self.chunks = check_chunk_size(self.local, chunk_size)
    self.chunk = chunk_size

  def _constrain(self, x, spec):
    if not self.names:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def take(self, x, i):
    """(B, ...) -> (shards*chunk, ...): rows [i*c, (i+1)*c) of each shard."""
    rest = x.shape[1:]
    x = self._constrain(x.reshape((self.shards, self.local) + rest),
                        P(self.names))
    x = jax.lax.dynamic_slice_in_dim(x, i * self.chunk, self.chunk, axis=1)
    return self._constrain(x.reshape((self.shards * self.chunk,) + rest),
                           P(self.names))

  def merge(self, stacked):
    """(chunks, shards*chunk, ...) scan outputs -> (B, ...) in batch order."""
    rest = stacked.shape[2:]
    x = stacked.reshape((self.chunks, self.shards, self.chunk) + rest)
    x = self._constrain(x, P(None, self.names))
    x = jnp.swapaxes(x, 0, 1)
    return self._constrain(
        x.reshape((self.shards * self.local,) + rest), P(self.names))


def _global_batch(tower_inputs) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tower_inputs)}
  if len(sizes) != 1:
    raise ValueError(f"tower inputs disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


def cached_value_and_grad(towers: Sequence[Tower], loss_fn: LossFn, params,
                          tower_inputs: Sequence[Any], rng: jax.Array, *,
                          chunk_size: int, mesh=None, axes=None,
                          unroll: int | bool = 1):
  """Loss, aux and the exact full-batch parameter gradient, chunk by chunk.

  Call it inside `jit` with the batch sharded over the data axes of `mesh`.

  Args:
    towers: one function per tower, tower(params, inputs, rng) -> (rows, D).
      It is called on chunks of shards*chunk_size rows.
    loss_fn: loss_fn(params, embeddings) -> (loss, aux), embeddings a tuple
      of (B, D) arrays in batch order, one per tower (e.g. a global loss).
    params: the parameter tree (all towers' and the loss's).
    tower_inputs: one pytree per tower; every leaf's leading dim is the
      global batch B.
    rng: base key; see `chunk_rng`.
    chunk_size: rows per device per chunk; must divide the per-device batch.
    mesh: Mesh or AbstractMesh; default the one set by `jax.set_mesh`.
    axes: data-parallel mesh axes (default DATA_AXES present in the mesh).
    unroll: passed to the chunk scans (True unrolls them, which lets XLA's
      cost analysis count every chunk; it does not change the result).
  Returns:
    ((loss, aux), grads) like `jax.value_and_grad(..., has_aux=True)`.
  """
  if len(towers) != len(tower_inputs):
    raise ValueError(f"{len(towers)} towers but {len(tower_inputs)} inputs")
  mesh = current_mesh(mesh)
  chunker = _Chunker(mesh, axes, _global_batch(tower_inputs), chunk_size)
  steps = jnp.arange(chunker.chunks)

  # Pass 1: embeddings only; nothing is differentiated, nothing is kept.
  embeddings = []
  for t, (tower, inputs) in enumerate(zip(towers, tower_inputs)):
    def forward(_, i, tower=tower, inputs=inputs, t=t):
      x = jax.tree.map(lambda a: chunker.take(a, i), inputs)
      emb = tower(params, x, chunk_rng(rng, t, i))
      return None, chunker._constrain(emb, P(chunker.names))
    _, stacked = jax.lax.scan(forward, None, steps, unroll=unroll)
    embeddings.append(chunker.merge(stacked))
  embeddings = tuple(embeddings)

  # Pass 2: the loss couples the whole (global) batch, but only through
  # the embeddings.
  (loss, aux), (grads, emb_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, embeddings)

  # Pass 3: replay each chunk under vjp with the same key and pull back its
  # slice of the embedding gradient.
  for t, (tower, inputs) in enumerate(zip(towers, tower_inputs)):
    def backward(acc, i, tower=tower, inputs=inputs, t=t):
      x = jax.tree.map(lambda a: chunker.take(a, i), inputs)
      # Keeps XLA from merging this replay with pass 1's forward when the
      # scans are unrolled (that would keep every chunk's activations).
      p, x = jax.lax.optimization_barrier((params, x))
      emb, pullback = jax.vjp(lambda q: tower(q, x, chunk_rng(rng, t, i)), p)
      (g,) = pullback(chunker.take(emb_grads[t], i).astype(emb.dtype))
      return jax.tree.map(jnp.add, acc, g), None
    grads, _ = jax.lax.scan(backward, grads, steps, unroll=unroll)
  return (loss, aux), grads


def chunked_embeddings(towers: Sequence[Tower], params,
                       tower_inputs: Sequence[Any], rng: jax.Array, *,
                       chunk_size: int, mesh=None, axes=None) -> tuple:
  """The towers' embeddings with the cache's chunking and keys, as one
  ordinary differentiable function (keeps every chunk's activations).

  `jax.grad` of a loss on these is the uncached reference the cache must
  equal exactly, stochastic layers included.
  """
  mesh = current_mesh(mesh)
  chunker = _Chunker(mesh, axes, _global_batch(tower_inputs), chunk_size)
  out = []
  for t, (tower, inputs) in enumerate(zip(towers, tower_inputs)):
    parts = [tower(params, jax.tree.map(lambda a: chunker.take(a, i), inputs),
                   chunk_rng(rng, t, i)) for i in range(chunker.chunks)]
    out.append(chunker.merge(jnp.stack(parts)))
  return tuple(out)


def auto_chunk_size(per_device_batch: int, peak_bytes: Callable[[int], float],
                    budget_bytes: float) -> int:
  """The largest divisor of the per-device batch whose step fits the budget.

  Peak memory grows with the chunk, so this binary-searches the divisors,
  compiling O(log #divisors) candidate steps.

  Args:
    per_device_batch: rows per device.
    peak_bytes: chunk -> peak bytes per device of the compiled step (e.g.
      `compiled_peak_bytes`).
    budget_bytes: the per-device budget.
  Returns:
    The chunk size.
  Raises:
    ValueError: if even a chunk of 1 does not fit.
  """
  divisors = [d for d in range(1, per_device_batch + 1)
              if per_device_batch % d == 0]
  lo, hi, best = 0, len(divisors) - 1, None
  tried = {}
  while lo <= hi:
    mid = (lo + hi) // 2
    tried[divisors[mid]] = peak_bytes(divisors[mid])
    if tried[divisors[mid]] <= budget_bytes:
      best, lo = divisors[mid], mid + 1
    else:
      hi = mid - 1
  if best is None:
    raise ValueError(
        f"no gradient-cache chunk fits the memory budget of "
        f"{budget_bytes / 2**30:.2f} GiB per device: chunk 1 needs "
        f"{tried.get(1, float('nan')) / 2**30:.2f} GiB")
  return best


def compiled_peak_bytes(compiled) -> float:
  """Per-device bytes of a compiled computation: temporaries + arguments +
  outputs (XLA memory analysis; aliased outputs counted once)."""
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes
               + m.output_size_in_bytes - m.alias_size_in_bytes)
