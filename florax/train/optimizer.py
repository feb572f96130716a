"""AdamW with decoupled weight decay, warmup + cosine, gradient clipping;
optionally layer-wise lr decay, per-param lr multipliers, frozen params and
an EMA of the weights.

The learning rate is a function of the run's own step (a Florence stage
started with init_from counts from 0, so each stage has its own warmup and
cosine). When a run is resumed with another `train.steps`, the schedule
neither restarts nor jumps: from the step it resumes at, the cosine
continues from the learning rate it had reached there and anneals to the
end value at the new `train.steps` (`schedule_segments`).

Why continue rather than refuse: changing the length of a running job is a
real need (a budget cut, a run extended, a preempted "run forever" job
finished with a few more steps — tests/test_preemption.py does exactly that),
and the two naive answers are both wrong: recomputing the cosine for the new
total jumps the lr (up when extending, down when cutting), and refusing
leaves no way to do it. The one case refused is extending a run whose
schedule had already ended: its lr is at the end value, so "continuing"
would train at it; the next stage (a new workdir with init_from.path) is
what was meant. Changes of learning_rate / warmup_steps on resume are taken
as deliberate and apply as given.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from florax.train import ema as ema_lib
from florax.train import layer_decay as layer_decay_lib

SCHEDULE_FILE = "schedule.json"


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """Linear warmup to `cfg.learning_rate`, then cosine to lr * min_lr_ratio."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _continuation(cfg: ml_collections.ConfigDict, start: int, lr0: float,
                  total: int):
  """The lr for steps >= `start` of a schedule whose total became `total`
  there, `lr0` being the lr reached at `start`: still in a warmup that ends
  before the new total, the ramp goes on to the peak, then the cosine of the
  new total; otherwise (past warmup, or cut shorter than it) a cosine from
  lr0 at `start` to the end value at `total`. Continuous at `start` either
  way: a warmup squeezed into the few steps left would jump to the peak."""
  peak = cfg.learning_rate
  end = peak * cfg.min_lr_ratio
  warm_end = cfg.warmup_steps
  ramp = start < warm_end < total
  cos_start, cos_lr0 = (warm_end, peak) if ramp else (start, lr0)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((s - cos_start) / max(total - cos_start, 1), 0.0, 1.0)
    lr = end + (cos_lr0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if ramp:
      lr = jnp.where(s < warm_end,
                     lr0 + (peak - lr0) * (s - start) / (warm_end - start), lr)
    return lr
  return schedule


def segmented_schedule(cfg: ml_collections.ConfigDict, segments):
  """The schedule of a run whose train.steps changed along the way.

  Args:
    segments: [(start step, total steps)], the first starting at 0: from
      each start on, the run was (is) trained towards that total.
  """
  (_, first_total), *rest = [tuple(map(int, seg)) for seg in segments]
  schedule = learning_rate_schedule(cfg, first_total)
  for start, total in rest:
    lr0 = float(schedule(start))  # where the previous piece had got to
    piece = _continuation(cfg, start, lr0, total)
    schedule = (lambda step, before=schedule, after=piece, at=start:
                jnp.where(step >= at, after(step), before(step)))
  return schedule


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def schedule_segments(workdir: str, total_steps: int,
                      resume_step: int | None) -> list[tuple[int, int]]:
  """The schedule segments of a run to `total_steps` that resumes from the
  checkpoint at `resume_step` (None: a fresh start), recorded in
  WORKDIR/schedule.json. Called by the trainer before it restores.

  Raises:
    ValueError: the run is extended although its schedule had ended.
  """
  segments = [(0, total_steps)]
  if resume_step is not None:
    saved = _read_json(os.path.join(workdir, SCHEDULE_FILE))
    if saved is not None:
      recorded = [tuple(seg) for seg in saved["segments"]]
    else:  # a workdir from before schedule.json: its last config says
      config = _read_json(os.path.join(workdir, "config.json")) or {}
      recorded = [(0, config.get("train", {}).get("steps", total_steps))]
    # A change recorded at or after the resume point never ran: replace it.
    segments = [seg for seg in recorded if seg[0] == 0 or seg[0] < resume_step]
    last_total = segments[-1][1]
    if last_total != total_steps:
      if resume_step >= last_total:
        raise ValueError(
            f"workdir {workdir} finished its learning-rate schedule at step "
            f"{last_total} (train.steps={last_total}); resuming it to "
            f"train.steps={total_steps} would train at the schedule's end "
            "value. Train the next stage instead: a new --workdir with "
            f"--config.init_from.path={workdir} (its own warmup and cosine), "
            f"or keep --config.train.steps={last_total}.")
      segments.append((resume_step, total_steps))
      if jax.process_index() == 0:
        print(f"florax: train.steps changed from {last_total} to "
              f"{total_steps} at step {resume_step}: the learning rate "
              f"continues from its value there and anneals to its end value "
              f"at step {total_steps} (no restart, no jump)", flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, SCHEDULE_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"segments": [list(seg) for seg in segments]}, f)
    os.replace(path + ".tmp", path)
  return segments


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


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any | None:
  """True where a param is frozen: its flat name matches one of `patterns`
  (`optimizer.freeze`, regular expressions searched in names such as
  'image_encoder/encoder/block0/attn/qkv/kernel'); None when nothing is.

  Raises:
    ValueError: a pattern is not a valid regular expression, or matches no
      param (a typo would otherwise silently train what was meant frozen).
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for p in patterns or ():
    try:
      compiled.append(re.compile(p))
    except (re.error, TypeError) as e:
      raise ValueError(f"config.optimizer.freeze: {p!r} is not a regular "
                       f"expression ({e})") from None
  if not compiled:
    return None
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in leaves]
  for c in compiled:
    if not any(c.search(n) for n in names):
      raise ValueError(
          f"config.optimizer.freeze: {c.pattern!r} matches no parameter "
          f"(names look like {names[0]!r})")
  return treedef.unflatten([any(c.search(n) for c in compiled)
                            for n in names])


def freeze_updates(mask: Any) -> optax.GradientTransformation:
  """Zeroes the updates (or gradients) where `mask` is True, exactly;
  stateless. Frozen params keep their Adam moments (zeros), so every
  params-shaped tree of the optimizer state stays whole, as ZeRO's layout
  (optax.tree_map_params) needs; optax.masked would drop them. The price:
  a linear probe of a large tower still allocates its moments."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: jnp.zeros_like(u) if m else u,
                        updates, mask), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(),
                                      update_fn)


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps,
                    params: Any) -> tuple[optax.GradientTransformation, Any]:
  """Returns (optimizer, schedule). `params` may be abstract (shapes only).
  `total_steps`: the run's train.steps, or its `schedule_segments`.

  With `cfg.layer_decay` < 1 every update is scaled by its layer's lr
  multiplier (florax/train/layer_decay.py), after adamw so that weight decay
  is scaled too; the optimizer state is the same either way.

  Optional fields (a config without them gets the plain optimizer and the
  same state tree):
    lr_multipliers: ((regex, factor), ...) over flat param names; a param's
      lr, weight decay included, is multiplied by the factor of the first
      pattern that matches it, times its layer-decay multiplier (a task
      head at x20: unilm's BEiT-3 VQA). Applied by the same update scaling
      as the layer decay, so the state tree does not change either.
    freeze: regular expressions over flat param names; a matching param is
      never updated (no step, no weight decay): a linear probe's tower,
      LiT's locked image tower.
    ema_decay: > 0 keeps an EMA of the weights in the optimizer state
      (florax/train/ema.py; `ema.ema_params(opt_state)` reads it).

  Raises:
    ValueError: unknown optimizer, layer_decay outside (0, 1], or < 1 for a
      model without encoder layers, ema_decay outside [0, 1), a bad freeze
      pattern, a malformed lr_multipliers entry or one of its patterns that
      sets no param (called before anything compiles).
  """
  if cfg.name != "adamw":
    raise ValueError(f"unknown optimizer {cfg.name!r}; supported: 'adamw'")
  # A config from before the field existed means no decay.
  decay = layer_decay_lib.check_value(cfg.get("layer_decay", 1.0))
  ema_decay = ema_lib.check_decay(cfg.get("ema_decay", 0.0))
  frozen = frozen_mask(params, cfg.get("freeze", ()))
  # One scale per param, layer decay times lr_multipliers' factor (an older
  # run's config.json has no lr_multipliers: none).
  scales = layer_decay_lib.lr_scales(params, decay,
                                     cfg.get("lr_multipliers", ()))
  schedule = (learning_rate_schedule(cfg, total_steps)
              if isinstance(total_steps, int)
              else segmented_schedule(cfg, total_steps))
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm
      else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay,
                  mask=decay_mask(params, cfg.no_decay_patterns)),
  )
  if any(s is not None for s in scales):
    tx = layer_decay_lib.scale_updates(tx, scales)
  if frozen is not None:
    # Zeroed on the way in too, so that gradient clipping and the moments
    # see a frozen param's gradient as 0 whether or not the loss stops it.
    tx = optax.chain(freeze_updates(frozen), tx, freeze_updates(frozen))
  if ema_decay > 0.0:  # last: it averages the params after the final update
    tx = optax.chain(tx, ema_lib.ema(ema_decay))
  return tx, schedule
