"""An exponential moving average (EMA) of the weights, kept in the optimizer
state (`optimizer.ema_decay`; BEiT/EVA fine-tuning's --model_ema).

Why the optimizer state: it is then checkpointed and resumed with the rest
of the train state, skipped with it on a non-finite fp16 step, and laid out
by ZeRO like Adam's moments (`zero.state_layout` gives every params-shaped
tree of the optimizer state the optimizer-state sharding, via
`optax.tree_map_params`), with no change to the checkpoint code or the
trainer's step. With the decay off the transformation is not in the chain
at all, so the optimizer state of every existing run is unchanged.

After step t (params p_t, the params after its update):

  ema_t = ema_{t-1} + (1 - decay) * (p_t - ema_{t-1}),   ema_0 = p_0

which is timm's ModelEmaV2 (ema = decay * ema + (1 - decay) * p, what
BEiT/EVA use with decay 0.9999), written as an interpolation so that a param
that does not change (a frozen tower) keeps an EMA bit-equal to it. ema_0 is
the params the optimizer state was initialised with; a run seeded by
`init_from` resets it to the loaded weights (`with_ema_params`), so the
average starts from the pretrained model, not from the random init.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
  """The moving average: a tree like the params (same dtypes)."""
  ema: Any


def check_decay(decay) -> float:
  """`optimizer.ema_decay` as a float in [0, 1) (0 = off).

  Raises:
    ValueError: anything else, naming the field.
  """
  ok = (isinstance(decay, (int, float)) and not isinstance(decay, bool)
        and 0.0 <= float(decay) < 1.0)
  if not ok:
    raise ValueError(
        "config.optimizer.ema_decay must be a number in [0, 1) (0 = no EMA; "
        f"BEiT/EVA fine-tune with 0.9999), got {decay!r}")
  return float(decay)


def ema(decay: float) -> optax.GradientTransformation:
  """Keeps the EMA of the params after each update; updates pass through.

  Append it last in a chain, so the updates it sees are the final ones.
  """
  decay = check_decay(decay)
  if decay == 0.0:
    raise ValueError("ema(0.0): leave the EMA out of the chain instead")

  def init_fn(params):
    # A copy, not the params' own buffers (the train state donates both).
    return EmaState(ema=jax.tree.map(lambda p: jnp.array(p, copy=True),
                                     params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("the weight EMA needs the params: call "
                       "tx.update(updates, state, params)")

    def step(e, p, u):
      # The params after this update, exactly as optax.apply_updates makes
      # them.
      new = jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
      return (e + (1.0 - decay) * (new.astype(e.dtype) - e)).astype(e.dtype)

    return updates, EmaState(ema=jax.tree.map(step, state.ema, params,
                                              updates))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_state(x) -> bool:
  return isinstance(x, EmaState)


def has_ema(opt_state) -> bool:
  return any(_is_state(s) for s in jax.tree.leaves(opt_state,
                                                   is_leaf=_is_state))


def ema_params(opt_state) -> Any:
  """The EMA weights held in an optimizer state (built with ema_decay > 0).

  Raises:
    ValueError: the state holds no EMA (or more than one).
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state)
           if _is_state(s)]
  if len(found) != 1:
    raise ValueError(
        "this optimizer state holds no weight EMA: the run was trained with "
        "config.optimizer.ema_decay = 0" if not found else
        f"the optimizer state holds {len(found)} weight EMAs, expected one")
  return found[0].ema


def with_ema_params(opt_state, params) -> Any:
  """`opt_state` with its EMA replaced by a copy of `params`, placed on the
  EMA's own shardings (e.g. ZeRO's): restarting the average at `params`."""
  def swap(s):
    if not _is_state(s):
      return s
    shardings = jax.tree.map(lambda e: e.sharding, s.ema)
    # jnp.copy: jit forwards an output that is just its input (same buffer),
    # and the EMA must not share buffers with the (donated) params.
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=shardings)
    return EmaState(ema=copy(params))
  return jax.tree.map(swap, opt_state, is_leaf=_is_state)


# -- reading the EMA of a checkpoint (export --ema) ---------------------------

def _ema_path(node, path=()):
  """Path (keys / list indices) of the EMA inside a checkpoint's optimizer
  state metadata: the node whose only key is 'ema' (EmaState, as Orbax
  stores a NamedTuple), or None."""
  if hasattr(node, "keys"):
    if set(node.keys()) == {"ema"}:
      return path + ("ema",)
    for k in node.keys():
      if (found := _ema_path(node[k], path + (k,))) is not None:
        return found
  elif isinstance(node, (list, tuple)):
    for i, v in enumerate(node):
      if (found := _ema_path(v, path + (i,))) is not None:
        return found
  return None


def _template(node, path, target, at=()):
  """`node` (checkpoint metadata) with every leaf an Orbax placeholder
  (not read) except the subtree at `path`, which becomes `target`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if at == path:
    return target
  if hasattr(node, "keys"):
    return {k: _template(node[k], path, target, at + (k,))
            for k in node.keys()}
  if isinstance(node, (list, tuple)):
    return [_template(v, path, target, at + (i,)) for i, v in enumerate(node)]
  return None if node is None else ocp.PLACEHOLDER


def restore_ema_params(workdir: str, abstract: Any, step: int | None = None,
                       shardings: Any = None) -> tuple[Any, int]:
  """Reads only the EMA weights of one checkpoint (not the params, nor
  Adam's moments).

  Args:
    workdir: a training workdir trained with optimizer.ema_decay > 0.
    abstract: ShapeDtypeStructs of the params (`restore.abstract_params`).
    step: the checkpoint step; None: the latest.
    shardings: like `restore.restore_params` (None: the first local device).

  Returns:
    (EMA params, step).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  from florax import restore  # pylint: disable=g-import-not-at-top
  steps = restore.available_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint in {restore.checkpoint_dir(workdir)}")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir}; available "
                     f"steps: {steps}")
  meta = restore.checkpoint_state_metadata(workdir, step)
  path = _ema_path(meta["opt_state"], ("opt_state",))
  if path is None:
    raise ValueError(
        f"checkpoint step {step} of {workdir} holds no EMA of the weights: "
        "the run was trained with config.optimizer.ema_decay = 0")
  node = meta
  for k in path:
    node = node[k]
  saved = {k: tuple(v.shape) for k, v in export.flatten_params(node).items()}
  wanted = {k: tuple(v.shape)
            for k, v in export.flatten_params(abstract).items()}
  if saved != wanted:
    raise ValueError(f"the EMA in {workdir} (step {step}) does not match the "
                     "config's model: use the config the run was trained "
                     "with")
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  args = jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(
      sharding=s, global_shape=a.shape, dtype=a.dtype), abstract, shardings)
  with ocp.CheckpointManager(restore.checkpoint_dir(workdir),
                             item_names=("state",)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=_template(meta, path, abstract),
            restore_args=_template(meta, path, args))))
  out = restored["state"]
  for k in path:
    out = out[k]
  return out, step
