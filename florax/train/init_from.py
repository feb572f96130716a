"""Seeding a new run's params from another run, an export or imported weights.

`config.init_from.path` names a training workdir (its checkpoint at
`init_from.step`, -1 = latest) or an export directory (params.safetensors).
`init_from.prefixes` maps source to target name prefixes (flat names such
as 'image_encoder/stage0_block0/attn/qkv/kernel'), so one tower of one run
can seed a tower of another: [["image_encoder", "image_encoder"]] loads
only the image tower. With no prefixes every name maps to itself.

Params whose mapped source is missing stay freshly initialised; a source of
another shape is skipped; both are reported. The one exception is a shape
that differs only because the resolution or window changed (Florence's
stage 3 at 384 px): CoSwin's relative position bias tables and learned
image position embeddings are interpolated to the target (`resize_to`) and
reported as resized. The optimizer starts fresh.
The workdir's own checkpoints always win: this runs only at step 0.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from florax.export import flatten_params, unflatten_params


def read_source(path: str, step: int = -1) -> tuple[dict[str, np.ndarray], str]:
  """Flat fp32 params of a workdir checkpoint or an export directory.

  Returns:
    ({flat name: array}, a description of what was read).
  """
  from florax import restore  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"init_from.path={path!r} is not a directory (a training workdir or "
        "an export directory)")
  if os.path.exists(os.path.join(path, "params.safetensors")):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    flat = load_file(os.path.join(path, "params.safetensors"))
    return ({k: np.asarray(v, np.float32) for k, v in flat.items()},
            f"export {path}")
  steps = restore.available_steps(path)
  if not steps:
    raise FileNotFoundError(
        f"init_from.path={path!r} holds neither a checkpoint nor an export "
        "(params.safetensors)")
  step = steps[-1] if step in (-1, None) else step
  abstract = restore.checkpoint_params_spec(path, step)
  params, step = restore.restore_params(path, abstract, step)
  flat = flatten_params(jax.device_get(params))
  return ({k: np.asarray(v) for k, v in flat.items()},
          f"checkpoint step {step} of {path}")


def _source_name(target: str, prefixes) -> str | None:
  if not prefixes:
    return target
  for src, dst in prefixes:
    dst = dst.strip("/")
    if target == dst or target.startswith(dst + "/") or not dst:
      rest = target[len(dst):].lstrip("/")
      src = src.strip("/")
      return f"{src}/{rest}" if src and rest else (src or rest)
  return None


def _resize_relative_bias(value, target_shape):
  """CoSwin's ((2w-1)^2, heads) tables (any leading layer axes)."""
  *lead, length, heads = value.shape
  *t_lead, t_length, t_heads = target_shape
  side = math.isqrt(t_length)
  if (lead != t_lead or heads != t_heads or side * side != t_length
      or side % 2 == 0 or not _odd_square(length)):
    return None
  from florax.models import coswin  # pylint: disable=g-import-not-at-top
  return coswin.resize_relative_position_bias(value, (side + 1) // 2)


def _odd_square(n: int) -> bool:
  return math.isqrt(n) ** 2 == n and n % 2 == 1


def _resize_position_grid(value, target_shape):
  """Learned absolute position embeddings of an image token grid, (..., P +
  s*s, D) with P leading class/register tokens kept as they are (ViT/timm's
  resize_pos_embed); the s x s grid is resized bicubically."""
  *lead, n, dim = value.shape
  *t_lead, t_n, t_dim = target_shape
  if lead != t_lead or dim != t_dim:
    return None
  for prefix in range(min(n, t_n, 9)):  # at most a few non-grid tokens
    s, t = math.isqrt(n - prefix), math.isqrt(t_n - prefix)
    if s * s == n - prefix and t * t == t_n - prefix and s > 1 and t > 1:
      grid = jnp.asarray(value[..., prefix:, :]).reshape(*lead, s, s, dim)
      grid = jax.image.resize(grid, (*lead, t, t, dim), "bicubic")
      return jnp.concatenate(
          [jnp.asarray(value[..., :prefix, :]),
           grid.reshape(*lead, t * t, dim)], axis=-2)
  return None


# (pattern over the flat target name, resizer). Only params whose shape
# follows the image resolution are listed: a text tower's pos_embed (max_len,
# width) is a sequence, not a grid, and stays a plain mismatch.
_RESIZERS = (
    (re.compile(r"(^|/)relative_position_bias$"), _resize_relative_bias),
    (re.compile(r"(^|/)(image|vision|visual)[^/]*/(.*/)?pos_embed$"),
     _resize_position_grid),
)


def resize_to(name: str, value: np.ndarray, target_shape) -> np.ndarray | None:
  """`value` interpolated to `target_shape` when `name` is a parameter whose
  shape follows the image resolution or window size (see _RESIZERS), else
  None (a mismatch of any other kind is not ours to guess at)."""
  target_shape = tuple(target_shape)
  for pattern, resizer in _RESIZERS:
    if pattern.search(name) and value.ndim == len(target_shape):
      out = resizer(np.asarray(value, np.float32), target_shape)
      if out is not None:
        return np.asarray(out, np.float32)
  return None


def load_matching(params: Any, source: Mapping[str, np.ndarray],
                  prefixes=()) -> tuple[Any, dict]:
  """Replaces the leaves of `params` (placed jax.Arrays) that have a source
  of the same shape, keeping their shardings.

  Returns:
    (new params, report) with report lists 'loaded', 'resized' (name, from
    shape -> to shape: interpolated by `resize_to`), 'skipped' (name, why)
    and 'fresh' (target names left as initialised).
  """
  flat = flatten_params(params)
  report = {"loaded": [], "resized": [], "skipped": [], "fresh": []}
  out = {}
  for name, leaf in flat.items():
    src = _source_name(name, prefixes)
    if src is None or src not in source:
      report["fresh"].append(name)
      out[name] = leaf
      continue
    value = source[src]
    resized = None
    if tuple(value.shape) != tuple(leaf.shape):
      resized = resize_to(name, value, leaf.shape)
    if resized is not None:
      report["resized"].append(
          (name, f"{tuple(value.shape)} -> {tuple(leaf.shape)}"))
      value = resized
    elif tuple(value.shape) != tuple(leaf.shape):
      report["skipped"].append(
          (name, f"{src} has shape {tuple(value.shape)}, the target "
                 f"{tuple(leaf.shape)}"))
      out[name] = leaf
      continue
    out[name] = jax.make_array_from_callback(
        leaf.shape, leaf.sharding,
        lambda idx, v=value.astype(leaf.dtype): v[idx])
    if resized is None:
      report["loaded"].append(name)
  return unflatten_params(out), report


def summary(report: dict, what: str) -> str:
  """One log paragraph: counts, and a few names of each kind."""
  def few(names):
    names = [n if isinstance(n, str) else f"{n[0]} ({n[1]})" for n in names]
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
  lines = [f"florax: init_from {what}: loaded {len(report['loaded'])} params, "
           f"skipped {len(report['skipped'])}, freshly initialised "
           f"{len(report['fresh'])}"
           + (f", resized {len(report['resized'])} to the new resolution"
              if report.get("resized") else "")]
  if report.get("resized"):
    lines.append(f"  resized (bicubic): {few(report['resized'])}")
  if report["skipped"]:
    lines.append(f"  skipped: {few(report['skipped'])}")
  if report["fresh"]:
    lines.append(f"  fresh: {few(report['fresh'])}")
  return "\n".join(lines)
