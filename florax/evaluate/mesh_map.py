"""Running a function over host data in batches, fed over the mesh.

Every process holds the same host array (an evaluation split), builds each
global batch from its addressable rows (`make_array_from_callback`) and
receives the result replicated: no process ever fetches an array that spans
devices it cannot address (which is what crashed multi-process evaluation).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class MeshMap:
  """fn(params, x_batch) over x in fixed-size batches (one compile).

  Args:
    fn: (params, batch) -> array; jitted here with a replicated output.
    batch_sharding: the sharding of a batch's leading dimension.
    batch_size: rows per call, rounded up to a multiple of the shards.

  x is one host array or a pytree (a dict) of host arrays of the same
  length, cut into batches together (a fusion model's images and texts).
  """

  def __init__(self, fn: Callable, batch_sharding: NamedSharding,
               batch_size: int):
    mesh = batch_sharding.mesh
    shards = mesh.size // batch_sharding.shard_shape((mesh.size,))[0]
    self.batch_size = -(-batch_size // shards) * shards
    self.sharding = batch_sharding
    self.fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))

  def _batch(self, chunk: np.ndarray) -> jax.Array:
    bs = self.batch_size
    if len(chunk) < bs:  # zero rows: one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),)
                                              + chunk.shape[1:], chunk.dtype)])
    return jax.make_array_from_callback(chunk.shape, self.sharding,
                                        lambda idx, c=chunk: c[idx])

  def __call__(self, params, x) -> np.ndarray:
    bs = self.batch_size
    lengths = {len(a) for a in jax.tree.leaves(x)}
    if len(lengths) != 1:
      raise ValueError(f"MeshMap inputs of different lengths {sorted(lengths)}")
    n, = lengths
    out = []
    for start in range(0, n, bs):
      batch = jax.tree.map(lambda a: self._batch(a[start:start + bs]), x)
      out.append(np.asarray(self.fn(params, batch))[:n - start])
    return np.concatenate(out) if out else np.zeros((0,))
