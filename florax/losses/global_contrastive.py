"""Contrastive losses over a batch sharded across data-parallel devices.

Every device holds B_local rows of the image and text embeddings. It
all-gathers both (B_global rows each), then scores only its own rows against
all global columns: image rows against every text (image-to-text) and text
rows against every image (text-to-image). Memory is O(B_local x B_global)
per device instead of O(B_global^2), and the per-row terms summed over all
devices are exactly the terms of the single-device loss over the gathered
batch (see `florax.losses.contrastive` for the UniCL formula).

Gradients ("global backprop", FLAVA §3.2): the transpose of `all_gather` is
a reduce-scatter, so each device receives the gradient that every other
device's rows put on its embeddings, and the gradient is that of the global
loss. With `global_backprop=False` the gathered copies are constants except
for the device's own slot (what OpenCLIP does without `gather_with_grad`):
cheaper on communication but not the gradient of the global loss.

Rows can be processed in blocks of `row_block` under `jax.checkpoint`, so
the loss keeps only (row_block x B_global) logits alive in the backward pass
as well: with the gradient cache this keeps the loss from dominating memory
at large batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from florax.losses import contrastive
from florax.parallel.mesh import current_mesh, data_axes, data_size


def global_unicl_loss(image_emb, text_emb, labels, logit_scale, *, mesh=None,
                      axes=None, global_backprop: bool = True,
                      row_block: int | None = None):
  """UniCL over the global batch, computed shard by shard.

  Args:
    image_emb: (B, D) image embeddings, B the global batch, its leading dim
      sharded over the data axes (any sharding works; it is resharded).
    text_emb: (B, D) text embeddings.
    labels: (B,) int labels; equal labels anywhere in the global batch are
      positives of each other.
    logit_scale: scalar τ (replicated).
    mesh: a Mesh or AbstractMesh; default the one set by `jax.set_mesh`.
      Without a mesh (or with no data axis) this is `contrastive.unicl_loss`.
    axes: the mesh axes the batch is split over (default DATA_AXES present).
    global_backprop: gradients flow through the all-gather (exact gradient of
      the global loss); False treats other devices' embeddings as constants.
    row_block: score this many local rows at a time (rematerialised in the
      backward pass); must divide the per-device batch. None: all at once.
  Returns:
    (loss, metrics) as `contrastive.unicl_loss`: loss_i2t, loss_t2i, i2t_acc.
  """
  mesh = current_mesh(mesh)
  names = data_axes(mesh, axes)
  b = image_emb.shape[0]
  if text_emb.shape[0] != b or labels.shape != (b,):
    raise ValueError(f"batch mismatch: image_emb {image_emb.shape}, text_emb "
                     f"{text_emb.shape}, labels {labels.shape}")
  n = data_size(mesh, axes) if names else 1
  if b % n:
    raise ValueError(f"global batch {b} is not divisible by the {n} "
                     f"data-parallel shards of mesh axes {names}")
  local = b // n
  if row_block is not None and (row_block <= 0 or local % row_block):
    raise ValueError(f"row_block {row_block} must be a positive divisor of the "
                     f"per-device batch {local}")
  scale = jnp.asarray(logit_scale, jnp.float32)
  if not names:
    if row_block is None or row_block == b:
      return contrastive.unicl_loss(image_emb, text_emb, labels, scale)
    return _local_rows_loss(image_emb, text_emb, labels, scale, (),
                            global_backprop, row_block)

  def shard_fn(u, v, y, s):
    return _local_rows_loss(u, v, y, s, names, global_backprop, row_block)

  spec = P(names)
  return jax.shard_map(
      shard_fn, mesh=mesh, in_specs=(spec, spec, spec, P()),
      out_specs=(P(), {"loss_i2t": P(), "loss_t2i": P(), "i2t_acc": P()}),
  )(image_emb, text_emb, labels, scale)


def global_clip_loss(image_emb, text_emb, logit_scale, **kwargs):
  """CLIP's symmetric InfoNCE over the global batch: every pair its own class.

  Keyword arguments are those of `global_unicl_loss`.
  """
  labels = jnp.arange(image_emb.shape[0], dtype=jnp.int32)
  return global_unicl_loss(image_emb, text_emb, labels, logit_scale, **kwargs)


def _local_rows_loss(image_emb, text_emb, labels, scale, names,
                     global_backprop, row_block):
  """One device's share: its rows against the gathered columns, summed over
  devices and divided by the global batch."""
  u = contrastive.l2_normalize(image_emb)
  v = contrastive.l2_normalize(text_emb)
  u_all, v_all, y_all = (_gather(x, names, global_backprop) for x in
                         (u, v, labels))
  local = u.shape[0]
  block = local if row_block is None else row_block

  def block_terms(u_rows, v_rows, y_rows):
    positives = (y_rows[:, None] == y_all[None, :]).astype(jnp.float32)
    i2t_logits = scale * (u_rows @ v_all.T)                 # (block, B)
    t2i_logits = scale * (v_rows @ u_all.T)                 # (block, B)
    hit = jnp.take_along_axis(positives,
                              jnp.argmax(i2t_logits, 1)[:, None], 1)
    return (_nll_sum(i2t_logits, positives), _nll_sum(t2i_logits, positives),
            jax.lax.stop_gradient(jnp.sum(hit)))

  if block == local:
    i2t, t2i, hits = block_terms(u, v, labels)
  else:
    # Rematerialised blocks: the backward pass holds one block's logits.
    body = jax.checkpoint(block_terms, prevent_cse=False)
    split = lambda x: x.reshape((local // block, block) + x.shape[1:])

    # Per-block sums come out as scan outputs (a carry would need its
    # varying-ness over the mesh axes declared).
    _, terms = jax.lax.scan(lambda _, rows: (None, body(*rows)), None,
                            (split(u), split(v), split(labels)))
    i2t, t2i, hits = (jnp.sum(x) for x in terms)
  if names:
    i2t, t2i, hits = jax.lax.psum((i2t, t2i, hits), names)
  total = u_all.shape[0]
  i2t, t2i = i2t / total, t2i / total
  return i2t + t2i, {"loss_i2t": i2t, "loss_t2i": t2i,
                     "i2t_acc": hits / total}


def _gather(x, names, global_backprop):
  """All rows of x from every device, in device order along `names`."""
  if not names:
    return x
  gathered = jax.lax.all_gather(x, names, tiled=True)
  if global_backprop:
    return gathered
  # Only this device's own slot keeps its gradient path.
  start = jax.lax.axis_index(names) * x.shape[0]
  return jax.lax.dynamic_update_slice_in_dim(
      jax.lax.stop_gradient(gathered), x, start, axis=0)


def _nll_sum(logits, positives):
  """Σ_rows -(1/|P(row)|) Σ_{k∈P(row)} log softmax(row)[k]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(-jnp.sum(positives * log_probs, -1) / jnp.sum(positives, -1))
