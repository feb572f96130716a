"""Device mesh from config: named axes, one size may be -1 ("the rest")."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Axes over which the batch is split (data parallelism, incl. FSDP/ZeRO).
DATA_AXES = ("data", "fsdp")


def resolve_axis_sizes(axes: Mapping[str, int], num_devices: int
                       ) -> dict[str, int]:
  """Replaces a single -1 by what is left of `num_devices`; checks the product."""
  sizes = dict(axes)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free}")
  for k, v in sizes.items():
    if v != -1 and v < 1:
      raise ValueError(f"mesh axis {k!r} has size {v}; sizes are >= 1 or -1")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {dict(axes)}: {num_devices} devices are not divisible by the "
          f"fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} "
                     f"devices but {num_devices} are available")
  return sizes


def make_mesh(axes: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (GSPMD propagates shardings, see ENV-NOTES).

  Uses `jax.make_mesh` for a topology-aware device order when all devices
  are used, so the innermost axes map to the fastest links.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes(axes, len(devices))
  names = tuple(sizes)
  shape = tuple(sizes[n] for n in names)
  auto = (AxisType.Auto,) * len(names)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, names, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


def current_mesh(mesh=None):
  """`mesh` if given, else the mesh set by `jax.set_mesh` (None if none)."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is None or abstract.empty:
    return None
  return abstract


def data_axes(mesh, axes=None) -> tuple[str, ...]:
  """The data-parallel axes of `mesh` (those of `axes`, default DATA_AXES)."""
  if mesh is None:
    return ()
  names = DATA_AXES if axes is None else tuple(axes)
  return tuple(a for a in names if a in mesh.shape)


def data_size(mesh, axes=None) -> int:
  """Number of data-parallel shards the batch is split into."""
  return int(np.prod([mesh.shape[a] for a in data_axes(mesh, axes)] or [1]))


def use_mesh(mesh: Mesh):
  """Context making `mesh` current (`jax.set_mesh`; the `with mesh:` form is
  deprecated)."""
  set_mesh = getattr(jax, "set_mesh", None)
  return set_mesh(mesh) if set_mesh is not None else mesh
