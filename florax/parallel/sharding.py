"""Logical axis names -> mesh shardings, from the rules table in config.

Models annotate parameters and activations with logical names only; this is
the one place that turns them into `NamedSharding`s.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import numpy as np

from florax.parallel.mesh import data_axes


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple:
  """Config rules are [[logical, mesh_axis_or_list_or_None], ...]."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding rule {rule!r} must be [logical_name, mesh_axes]")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned (abstract) leaves."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_axes(mesh: Mesh, rules=None) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over: the `batch` rule of
  the config's logical-axis table (axes absent from the mesh dropped).
  Without rules, the default data-parallel axes present in the mesh."""
  if rules is None:
    return data_axes(mesh)
  for name, axes in rules:
    if name == "batch":
      axes = () if axes is None else (
          (axes,) if isinstance(axes, str) else tuple(axes))
      return tuple(a for a in axes if a in mesh.shape)
  return ()


def batch_size_divisor(mesh: Mesh, rules=None) -> int:
  """How many shards the batch is split into."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)] or [1]))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Leading (batch) dimension split over `batch_axes(mesh, rules)`."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batches -> one global jax.Array per leaf."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
