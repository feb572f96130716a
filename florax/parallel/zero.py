"""ZeRO stages as shardings of the train state (Rajbhandari et al. 2020).

Stage 0 keeps every replica's full copy of parameters, gradients and
optimizer state (plain data parallelism). Each further stage shards one more
of them over the data-parallel axes (`data`, `fsdp`):
  1  optimizer state,
  2  + gradients (reduce-scattered instead of all-reduced),
  3  + parameters (XLA all-gathers each layer's weights where it is used).

A leaf is split along its largest dimension that the data-parallel size
divides, on top of whatever the logical rules already shard (e.g. `tensor`).
The stacked `layers` dimension of scanned blocks is never chosen: splitting
it would make every device gather the whole stack at once instead of one
layer per scan step. Leaves with no divisible dimension stay replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from florax.parallel.mesh import DATA_AXES

STAGES = (0, 1, 2, 3)
_NEVER_SPLIT = ("layers",)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Target shardings of everything the train step keeps per parameter."""
  params: Any
  grads: Any
  opt_state: Any
  # Where params are sharded like the optimizer state (the update runs on
  # these local slices before parameters return to `params`' sharding).
  sharded_params: Any


def _spec_axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def shard_over_data(shape: Sequence[int], spec: P, mesh: Mesh,
                    logical_names: Sequence[str | None] | None = None) -> P:
  """`spec` with the data-parallel axes added to one dimension of `shape`.

  Args:
    shape: the array's global shape.
    spec: its sharding from the logical rules.
    mesh: the mesh.
    logical_names: the logical name of every dimension (to skip `layers`).
  Returns:
    A PartitionSpec; `spec` unchanged when no dimension can be split.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in _spec_axes(e)}
  free = [a for a in DATA_AXES
          if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
  # Try all free data axes first, then the largest single one.
  for axes in ([tuple(free)] + sorted(([(a,) for a in free] if len(free) > 1
                                       else []),
                                      key=lambda t: -mesh.shape[t[0]])):
    if not axes:
      continue
    n = int(np.prod([mesh.shape[a] for a in axes]))
    local = []
    for d, size in enumerate(shape):
      already = int(np.prod([mesh.shape[a] for a in _spec_axes(entries[d])]))
      if logical_names and d < len(logical_names) and (
          logical_names[d] in _NEVER_SPLIT):
        continue
      if size % already == 0 and (size // already) % n == 0:
        local.append((size // already, d))
    if local:
      _, d = max(local)
      entries[d] = _spec_axes(entries[d]) + axes
      entries[d] = entries[d][0] if len(entries[d]) == 1 else entries[d]
      return P(*entries)
  return spec


def _logical_names(boxed_params: Any) -> Any:
  return jax.tree.map(
      lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned)
      else None, boxed_params,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def shard_tree_over_data(boxed: Any, shardings: Any, mesh: Mesh) -> Any:
  """`shardings` of a boxed tree with every leaf also split over the data
  axes (`shard_over_data`): ZeRO-3's parameters, and a ZeRO-3 run's frozen
  teacher, which is only ever all-gathered layer by layer like them."""
  abstract = nn.unbox(boxed)
  flat_abs, treedef = jax.tree.flatten(abstract)
  flat_names = treedef.flatten_up_to(_logical_names(boxed))
  flat_shard = treedef.flatten_up_to(shardings)
  return treedef.unflatten([
      NamedSharding(mesh, shard_over_data(a.shape, s.spec, mesh, n))
      for a, n, s in zip(flat_abs, flat_names, flat_shard)])


def state_layout(boxed_params: Any, param_shardings: Any, tx:
                 optax.GradientTransformation, mesh: Mesh,
                 stage: int) -> StateLayout:
  """Shardings of params, grads and optimizer state for a ZeRO stage.

  Args:
    boxed_params: abstract params with logical-axis boxes (from eval_shape).
    param_shardings: their NamedShardings under the logical rules.
    tx: the optimizer (its state is laid out like the params it mirrors).
    mesh: the mesh.
    stage: 0, 1, 2 or 3.
  Returns:
    A StateLayout.
  """
  if stage not in STAGES:
    raise ValueError(f"sharding.zero_stage must be one of {STAGES}, got "
                     f"{stage!r}")
  abstract = nn.unbox(boxed_params)
  sharded = shard_tree_over_data(boxed_params, param_shardings, mesh)
  full = param_shardings
  repl = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract)

  def opt_like(shardings):
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, shardings,
                                 transform_non_params=lambda _: repl)

  params = sharded if stage >= 3 else full
  grads = sharded if stage >= 2 else full
  opt_state = opt_like(sharded if stage >= 1 else full)
  return StateLayout(params=params, grads=grads, opt_state=opt_state,
                     sharded_params=sharded if stage >= 1 else full)


def bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of `abstract` laid out by `shardings` (the
  largest shard, which is what the worst-loaded device holds)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def ideal_bytes(num_params: int, num_shards: int, stage: int) -> dict:
  """Per-device bytes of fp32 Adam state for a ZeRO stage, from the paper:
  4 bytes of params, 4 of gradients, 8 of moments per parameter, each divided
  by N once its stage shards it."""
  psi, n = num_params, num_shards
  return {"params": 4 * psi / (n if stage >= 3 else 1),
          "grads": 4 * psi / (n if stage >= 2 else 1),
          "opt_state": 8 * psi / (n if stage >= 1 else 1)}
