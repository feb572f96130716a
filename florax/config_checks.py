"""Checks of the generic config sections, run before anything compiles."""

from __future__ import annotations

import ml_collections

_POSITIVE_INTS = ("train.steps", "train.batch_size", "train.log_every",
                  "train.checkpoint_every", "train.keep_checkpoints")
_NON_NEGATIVE_INTS = ("train.eval_every", "optimizer.warmup_steps")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ValueError(f"config is missing the field {dotted!r}")
    node = node[part]
  return node


def check_config(config: ml_collections.ConfigDict):
  for name in ("task", "seed", "train", "optimizer", "mesh", "sharding"):
    _get(config, name)
  for name in _POSITIVE_INTS:
    v = _get(config, name)
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {v!r}")
  for name in _NON_NEGATIVE_INTS:
    v = _get(config, name)
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"config.{name} must be a non-negative integer, got {v!r}")
  stage = config.sharding.get("zero_stage", 0)
  if stage not in (0, 1, 2, 3):
    raise ValueError(f"config.sharding.zero_stage must be 0, 1, 2 or 3, got "
                     f"{stage!r}")
  accum = config.train.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum <= 0:
    raise ValueError("config.train.grad_accum_steps must be a positive "
                     f"integer, got {accum!r}")
  lr = _get(config, "optimizer.learning_rate")
  if not lr > 0:
    raise ValueError(f"config.optimizer.learning_rate must be > 0, got {lr!r}")
  from florax.train import layer_decay  # pylint: disable=g-import-not-at-top
  layer_decay.check_value(config.optimizer.get("layer_decay", 1.0))
  from florax.train import ema  # pylint: disable=g-import-not-at-top
  ema.check_decay(config.optimizer.get("ema_decay", 0.0))
