"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018).

fp16 gradients of small magnitude underflow to zero. The loss is multiplied
by a large scale before differentiation and the gradients divided by it
afterwards. The scale doubles after `growth_interval` consecutive finite
steps and halves when a gradient is non-finite; that step's update is
skipped, leaving parameters and optimizer state untouched.

The scale state is a plain dict of arrays so it lives in the train state and
is checkpointed with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

LOSS_SCALE_MODES = ("none", "dynamic", "auto")


def loss_scaling_enabled(config: ml_collections.ConfigDict) -> bool:
  """'auto' turns dynamic scaling on exactly when the model computes in fp16."""
  cfg = config.get("precision")
  mode = "auto" if cfg is None else cfg.loss_scale
  if mode not in LOSS_SCALE_MODES:
    raise ValueError(f"precision.loss_scale {mode!r} is not one of "
                     f"{LOSS_SCALE_MODES}")
  if mode == "auto":
    model = config.get("model")
    return bool(model is not None and model.get("dtype") == "float16")
  return mode == "dynamic"


def check_config(cfg: ml_collections.ConfigDict):
  """Raises ValueError naming a bad `precision` field."""
  loss_scaling_enabled(ml_collections.ConfigDict({"precision": cfg}))
  if not cfg.init_scale > 0:
    raise ValueError(f"precision.init_scale must be > 0, got {cfg.init_scale}")
  if not (isinstance(cfg.growth_interval, int) and cfg.growth_interval > 0):
    raise ValueError("precision.growth_interval must be a positive integer, "
                     f"got {cfg.growth_interval!r}")
  if not cfg.growth_factor > 1:
    raise ValueError(f"precision.growth_factor must be > 1, got "
                     f"{cfg.growth_factor}")
  if not 0 < cfg.backoff_factor < 1:
    raise ValueError(f"precision.backoff_factor must be in (0, 1), got "
                     f"{cfg.backoff_factor}")


def init_state(init_scale: float) -> dict[str, jax.Array]:
  """scale, finite steps since the last change, total skipped steps."""
  return {"scale": jnp.asarray(init_scale, jnp.float32),
          "good_steps": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def all_finite(tree: Any) -> jax.Array:
  """True iff every element of every leaf is finite (one scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def unscale(grads: Any, state: dict) -> Any:
  """Gradients of the scaled loss -> gradients of the loss (in fp32)."""
  inv = 1.0 / state["scale"]
  return jax.tree.map(lambda g: g.astype(jnp.float32) * inv, grads)


def update_state(state: dict, finite: jax.Array, *, growth_interval: int,
                 growth_factor: float, backoff_factor: float) -> dict:
  """Next scale after a step whose gradients were (not) finite."""
  good = jnp.where(finite, state["good_steps"] + 1, 0)
  grow = good >= growth_interval
  scale = jnp.where(finite,
                    jnp.where(grow, state["scale"] * growth_factor,
                              state["scale"]),
                    state["scale"] * backoff_factor)
  # Never let the scale collapse to 0 (or overflow to inf) after a long run
  # of bad or good steps.
  scale = jnp.clip(scale, 1.0, 2.0 ** 24)
  return {"scale": scale.astype(jnp.float32),
          "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
          "skipped": state["skipped"] + jnp.where(finite, 0, 1).astype(
              jnp.int32)}


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `pred ? on_true : on_false` (the skipped-update switch)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
