"""What a workdir remembers about its run, and refusing to mix runs.

A resumed run must be the same run: the same frozen networks (teacher,
visual tokenizer), the same tokenizer. Each is recorded in the workdir as a
small JSON file at the first run and compared on every later one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _write_json(path: str, value: Any):
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def record_or_check(workdir: str, filename: str, value: dict, what: str,
                    hint: str):
  """Writes `value` to workdir/filename on first use; raises ValueError
  naming `what` and `hint` if a different value was recorded."""
  path = os.path.join(workdir, filename)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != value:
      changed = sorted(k for k in set(saved) | set(value)
                       if saved.get(k) != value.get(k))
      raise ValueError(
          f"workdir {workdir} was trained with another {what}: "
          + "; ".join(f"{k}: {saved.get(k)!r} then, {value.get(k)!r} now"
                      for k in changed)
          + f". {hint}")
    return
  _write_json(path, value)


@jax.jit
def _leaf_fingerprint(x):
  """Two uint32 sums over the bits of `x`: integer sums wrap exactly, so the
  result does not depend on how `x` is sharded or reduced."""
  if x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  bits = bits.reshape(-1)
  position = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * (position | 1), dtype=jnp.uint32)])


def fingerprint(tree: Any) -> str:
  """A checksum of a pytree of (possibly sharded, multi-host) arrays: the
  same values give the same string on any mesh."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  sums = [np.asarray(jax.device_get(_leaf_fingerprint(x))).tolist()
          for x in leaves]
  shapes = [list(np.shape(x)) + [str(x.dtype)] for x in leaves]
  return hashlib.sha256(json.dumps([str(treedef), shapes, sums]).encode()
                        ).hexdigest()
