"""ZeRO stages as shardings of the train state (Rajbhandari et al. 2020).

Stage 0 keeps every replica's full copy of parameters, gradients and
optimizer state (plain data parallelism). Each further stage shards one more
of them over the data-parallel axes (`data`, `fsdp`):
  1  optimizer state,
  2  + gradients (reduce-scattered instead of all-reduced),
  3  + parameters (XLA all-gathers each layer's weights where it is used).

A leaf is split along its largest dimension that the data-parallel size
divides, on top of whatever the logical rules already shard (e.g. `tensor`).
When no single dimension takes all of it (CoSwin-H's width 352 = 2^5 * 11
on 64 devices), the data-parallel axes are spread over several dimensions,
cut into factors where needed, as far as the shape divides them (see
`shard_over_data`): a leaf left replicated costs 16 bytes per parameter on
every device at stage 3, and at 64 devices Florence-H's 65 such leaves
were 9% over the ideal 16Ψ/N. The stacked `layers` dimension of scanned
blocks is never chosen: splitting it would make every device gather the
whole stack at once instead of one layer per scan step.
"""

from __future__ import annotations

import dataclasses
import itertools
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


def _prime_factors(n: int) -> dict[int, int]:
  out, p = {}, 2
  while p * p <= n:
    while n % p == 0:
      out[p] = out.get(p, 0) + 1
      n //= p
    p += 1
  if n > 1:
    out[n] = out.get(n, 0) + 1
  return out


def _multiplicity(n: int, p: int) -> int:
  k = 0
  while n % p == 0:
    n //= p
    k += 1
  return k


def _whole_axes(free: Sequence[str], sizes: Sequence[int],
                room: Sequence[int]) -> tuple[int, dict[str, int]]:
  """The best placement of whole free axes on dimensions: (shards, {axis:
  dim}). Most shards first, then fewest dimensions, then the largest local
  dimensions (the original rule: all axes on the largest divisible one)."""
  best_key, best = None, {}
  for dims in itertools.product(range(-1, len(room)), repeat=len(free)):
    on = {}
    for size, d in zip(sizes, dims):
      if d >= 0:
        on[d] = on.get(d, 1) * size
    if any(room[d] % n for d, n in on.items()):
      continue
    key = (int(np.prod(list(on.values()) or [1])), -len(on),
           sorted(((room[d], d) for d in on), reverse=True))
    if best_key is None or key > best_key:
      best_key = key
      best = {a: d for a, d in zip(free, dims) if d >= 0}
  return best_key[0], best


def _split_axes(free: Sequence[str], sizes: Sequence[int],
                room: Sequence[int]) -> list[dict[int, int]]:
  """Splits the free axes' sizes into factors per dimension, prime by prime
  (each prime's placements are independent of the others'): for every axis
  in turn, as much as fits on the roomiest dimension first. Reaches the most
  shards any split can. Returns, per axis, {dim: factor}."""
  room = list(room)
  out = []
  for size in sizes:
    place: dict[int, int] = {}
    for p, e in sorted(_prime_factors(size).items()):
      for d in sorted(range(len(room)), key=lambda d: (-room[d], d)):
        take = min(e, _multiplicity(room[d], p))
        if take:
          place[d] = place.get(d, 1) * p ** take
          room[d] //= p ** take
          e -= take
    out.append(place)
  return out


def _view_name(mesh: Mesh, axis: str, k: int) -> str:
  name = f"{axis}_{k}"
  while name in mesh.axis_names:
    name += "_"
  return name


def shard_over_data(shape: Sequence[int], spec: P, mesh: Mesh,
                    logical_names: Sequence[str | None] | None = None
                    ) -> NamedSharding:
  """`spec` with as much of the free data-parallel axes added as `shape`
  divides.

  Whole axes come first: all on the largest divisible dimension when one
  takes them all, else different axes on different dimensions (a (352,
  1056) kernel on data=8 x fsdp=8: fsdp on one, data on the other). When no
  placement of whole axes reaches the most shards the shape allows (data=64
  alone: 352 = 2^5*11 and 1056 = 2^5*33 each take 32), an axis is split
  into factors over a finer view of the same device grid (data=64 as
  data_0=32 x data_1=2, one factor per dimension); what no dimension divides
  (the 11 of a width 352 vector on 64 devices) stays replicated over that
  factor only. The view mesh reshapes `mesh.devices` in place, so a device
  keeps its position; jit accepts shardings on such views next to the
  mesh's own (the device order is the same).

  Args:
    shape: the array's global shape.
    spec: its sharding from the logical rules.
    mesh: the mesh.
    logical_names: the logical name of every dimension (to skip `layers`).
  Returns:
    A NamedSharding on `mesh` or on a view of it.
  """
  entries = [_spec_axes(e) for e in spec]
  entries += [()] * (len(shape) - len(entries))
  used = {a for e in entries for a in e}
  free = [a for a in DATA_AXES
          if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
  room = []
  for d, size in enumerate(shape):
    already = int(np.prod([mesh.shape[a] for a in entries[d]]))
    skip = logical_names and d < len(logical_names) and (
        logical_names[d] in _NEVER_SPLIT)
    room.append(1 if skip or size % already else size // already)
  sizes = [mesh.shape[a] for a in free]

  def sharding(m, es):
    return NamedSharding(m, P(*[e[0] if len(e) == 1 else (e or None)
                                for e in es]))

  if not free:
    return NamedSharding(mesh, spec)
  # The most shards any placement reaches: per prime, the fewer of what the
  # axes hold and what the dimensions take.
  bound = 1
  for p in set().union(*(_prime_factors(s) for s in sizes)):
    have = sum(_multiplicity(s, p) for s in sizes)
    take = sum(_multiplicity(r, p) for r in room)
    bound *= p ** min(have, take)
  if bound == 1:
    return NamedSharding(mesh, spec)
  shards, whole = _whole_axes(free, sizes, room)
  if shards == bound:
    for a in free:
      if a in whole:
        entries[whole[a]] += (a,)
    return sharding(mesh, entries)
  # Split axes over a view: `axis` -> (factor on dim d1, on d2, ..., rest).
  places = dict(zip(free, _split_axes(free, sizes, room)))
  names, view_shape, types = [], [], []
  for a, kind in zip(mesh.axis_names, mesh.axis_types):
    parts = sorted(places.get(a, {}).items())
    rest = mesh.shape[a] // int(np.prod([f for _, f in parts] or [1]))
    if len(parts) <= 1 and rest in (1, mesh.shape[a]):  # whole or unplaced
      names.append(a)
      view_shape.append(mesh.shape[a])
      types.append(kind)
      for d, _ in parts:
        entries[d] += (a,)
      continue
    for k, (d, f) in enumerate(parts + ([(None, rest)] if rest > 1 else [])):
      names.append(_view_name(mesh, a, k))
      view_shape.append(f)
      types.append(kind)
      if d is not None:
        entries[d] += (names[-1],)
  view = Mesh(mesh.devices.reshape(view_shape), tuple(names),
              axis_types=tuple(types))
  return sharding(view, entries)


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
      shard_over_data(a.shape, s.spec, mesh, n)
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


def ideal_bytes(num_params: int, num_shards: int, stage: int,
                tensor_shards: int = 1) -> dict:
  """Per-device bytes of fp32 Adam state for a ZeRO stage, from the paper:
  4 bytes of params, 4 of gradients, 8 of moments per parameter, each divided
  by N (`num_shards`, the data-parallel size) once its stage shards it, and
  all of it by the tensor-parallel size (the logical rules split parameters
  over `tensor` at every stage)."""
  psi, n, t = num_params, num_shards, tensor_shards
  return {"params": 4 * psi / (n if stage >= 3 else 1) / t,
          "grads": 4 * psi / (n if stage >= 2 else 1) / t,
          "opt_state": 8 * psi / (n if stage >= 1 else 1) / t}
