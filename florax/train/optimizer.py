"""AdamW with decoupled weight decay, warmup + cosine, gradient clipping."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """Linear warmup to `cfg.learning_rate`, then cosine to lr * min_lr_ratio."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params: Any, no_decay_patterns: Sequence[str]) -> Any:
  """True where weight decay applies: matrices/kernels whose path matches no
  pattern. Biases, norm scales, position tables and the temperature are
  excluded (by ndim < 2 or by name)."""
  compiled = [re.compile(p) for p in no_decay_patterns]

  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if getattr(leaf, "ndim", 0) < 2:
      return False
    return not any(c.search(name) for c in compiled)

  return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                    params: Any) -> tuple[optax.GradientTransformation, Any]:
  """Returns (optimizer, schedule). `params` may be abstract (shapes only)."""
  if cfg.name != "adamw":
    raise ValueError(f"unknown optimizer {cfg.name!r}; supported: 'adamw'")
  schedule = learning_rate_schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm
      else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay,
                  mask=decay_mask(params, cfg.no_decay_patterns)),
  )
  return tx, schedule
