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
  """

  def __init__(self, fn: Callable, batch_sharding: NamedSharding,
               batch_size: int):
    mesh = batch_sharding.mesh
    shards = mesh.size // batch_sharding.shard_shape((mesh.size,))[0]
    self.batch_size = -(-batch_size // shards) * shards
    self.sharding = batch_sharding
    self.fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, params, x: np.ndarray) -> np.ndarray:
    bs, n = self.batch_size, len(x)
    out = []
    for start in range(0, n, bs):
      chunk = x[start:start + bs]
      if len(chunk) < bs:  # zero rows: one compiled shape for every chunk
        chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),)
                                                + chunk.shape[1:], chunk.dtype)])
      batch = jax.make_array_from_callback(chunk.shape, self.sharding,
                                           lambda idx, c=chunk: c[idx])
      out.append(np.asarray(self.fn(params, batch))[:n - start])
    return np.concatenate(out) if out else np.zeros((0,))
