"""EVA's MIM objective: negative cosine similarity on masked patches only.

EVA (Fang et al. 2023, §2.2) regresses, at every masked patch, a frozen
teacher's feature with the student's (normed, linearly projected) output;
visible patches contribute nothing, not even through the normaliser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_negative_cosine(pred, target, mask, eps: float = 1e-6):
  """Mean over masked patches of -cos(pred, target).

  Args:
    pred: (B, N, C) student predictions.
    target: (B, N, C) teacher features (gradients are stopped here).
    mask: bool (B, N), True at masked patches.
    eps: floor of the vector norms (an all-zero vector has cosine 0).

  Returns:
    (loss scalar, mean cosine on the masked patches).
  """
  pred = pred.astype(jnp.float32)
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  unit = lambda v: v / jnp.maximum(
      jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
  cos = jnp.sum(unit(pred) * unit(target), axis=-1)
  weight = mask.astype(jnp.float32)
  # Where() keeps NaN/inf of a visible patch from leaking through 0 * x.
  mean_cos = (jnp.sum(jnp.where(mask, cos, 0.0))
              / jnp.maximum(jnp.sum(weight), 1.0))
  return -mean_cos, mean_cos
