"""Image-text contrastive losses.

UniCL (Yang et al. 2022; Florence eqs. 1-3): with L2-normalised image
embeddings u, text embeddings v, a temperature τ (multiplying the logits) and
labels y (the hash key of each text's unique description),

  L_i2t = -Σ_i 1/|P(i)| Σ_{k∈P(i)} log softmax_j(τ u_i·v_j)[k],  P(i) = {k: y_k = y_i}
  L_t2i = -Σ_j 1/|Q(j)| Σ_{k∈Q(j)} log softmax_i(τ u_i·v_j)[k],  Q(j) = {k: y_k = y_j}

With all labels distinct it is CLIP's symmetric InfoNCE. Both terms are
divided by the batch size (the paper writes sums), so the loss does not grow
with the batch and learning rates transfer across batch sizes.
All arithmetic is fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x, eps: float = 1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                       eps * eps))


def unicl_loss(image_emb, text_emb, labels, logit_scale):
  """UniCL loss over one batch (all rows against all columns).

  Args:
    image_emb: (B, D) image embeddings (normalised here).
    text_emb: (B, D) text embeddings (normalised here).
    labels: (B,) int labels y; equal labels are positives of each other.
    logit_scale: scalar τ.
  Returns:
    (loss, metrics) with metrics holding both directions and the
    in-batch retrieval accuracy of the positives.
  """
  u, v = l2_normalize(image_emb), l2_normalize(text_emb)
  logits = logit_scale.astype(jnp.float32) * (u @ v.T)        # (B, B)
  positives = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  i2t = _supervised_nll(logits, positives)
  t2i = _supervised_nll(logits.T, positives.T)
  metrics = {
      "loss_i2t": i2t, "loss_t2i": t2i,
      "i2t_acc": jnp.mean(jnp.take_along_axis(
          positives, jnp.argmax(logits, 1)[:, None], 1)),
  }
  return i2t + t2i, metrics


def clip_loss(image_emb, text_emb, logit_scale):
  """CLIP's loss: UniCL with every sample its own class."""
  labels = jnp.arange(image_emb.shape[0])
  return unicl_loss(image_emb, text_emb, labels, logit_scale)


def _supervised_nll(logits, positives):
  """Mean over rows of -(1/|P(row)|) Σ_{k∈P(row)} log softmax(row)[k]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_row = -jnp.sum(positives * log_probs, -1) / jnp.sum(positives, -1)
  return jnp.mean(per_row)
