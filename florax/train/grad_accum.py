"""Gradient accumulation: one optimizer step over several micro-batches.

For an objective that is a mean over examples (MIM, MLM, classification),
the mean of equal-sized micro-batch gradients is exactly the large-batch
gradient. A contrastive loss is not such a mean: every example's loss depends
on the whole batch (its negatives), so accumulating it changes the objective.
Tasks say so with `supports_grad_accumulation = False` and are refused; the
exact way to fit a huge contrastive batch is a gradient cache.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def split_micro_batches(batch: Any, steps: int,
                        batch_sharding: NamedSharding | None = None) -> Any:
  """(B, ...) leaves -> (steps, B/steps, ...), micro-batch i = rows i::steps.

  Strided rather than contiguous so that every device's local rows are
  spread over all micro-batches: each micro-batch stays split over all
  data-parallel devices and no data moves between them.
  """
  def split(x):
    b = x.shape[0]
    if b % steps:
      raise ValueError(f"batch dimension {b} is not divisible by "
                       f"train.grad_accum_steps={steps}")
    y = jnp.swapaxes(x.reshape((b // steps, steps) + x.shape[1:]), 0, 1)
    if batch_sharding is not None:
      spec = P(None, *batch_sharding.spec)
      y = jax.lax.with_sharding_constraint(
          y, NamedSharding(batch_sharding.mesh, spec))
    return y
  return jax.tree.map(split, batch)


def accumulate(value_and_grad: Callable, params: Any, batch: Any,
               rng: jax.Array, steps: int, *,
               batch_sharding: NamedSharding | None = None,
               grad_shardings: Any = None):
  """Mean loss, metrics and gradient over `steps` micro-batches.

  Args:
    value_and_grad: (params, batch, rng) -> ((loss, metrics), grads).
    params: the parameters.
    batch: the full batch (leading dimension = batch).
    rng: micro-batch i uses fold_in(rng, i).
    steps: number of micro-batches; 1 calls `value_and_grad` once.
    batch_sharding: the batch's sharding, kept on every micro-batch.
    grad_shardings: sharding of the gradient accumulator (ZeRO-2/3 keep it
      sharded, so each micro-batch's gradient is reduce-scattered into it).
  Returns:
    ((loss, metrics), grads) averaged over the micro-batches.
  """
  if steps == 1:
    return value_and_grad(params, batch, rng)
  micro = split_micro_batches(batch, steps, batch_sharding)

  def constrain(g):
    if grad_shardings is None:
      return g
    return jax.lax.with_sharding_constraint(g, grad_shardings)

  first = jax.tree.map(lambda x: x[0], micro)
  out_shape = jax.eval_shape(value_and_grad, params, first, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shape)
  zeros = (zeros[0], constrain(zeros[1]))

  def body(carry, xs):
    i, mb = xs
    (loss, metrics), grads = value_and_grad(params, mb,
                                            jax.random.fold_in(rng, i))
    out = ((loss, metrics), constrain(grads))
    return jax.tree.map(lambda c, o: c + o.astype(jnp.float32), carry,
                        out), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
  (loss, metrics), grads = jax.tree.map(lambda x: x / steps, total)
  grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, out_shape[1])
  return (loss, metrics), grads
