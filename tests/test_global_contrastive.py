"""The sharded (global) contrastive loss on 8 devices against single-device
and numpy references on the gathered batch."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from florax.losses import contrastive  # noqa: E402
from florax.losses import global_contrastive as gc  # noqa: E402
from florax.parallel import mesh as mesh_lib  # noqa: E402

B, D = 32, 6  # 8 devices x 4 rows


def _mesh():
  return mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


def _inputs(labels_kind, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(B, D)).astype(np.float32)
  v = rng.normal(size=(B, D)).astype(np.float32)
  if labels_kind == "clip":
    y = np.arange(B)
  else:  # classes shared across devices, one class spanning most of them
    y = rng.integers(0, 5, size=B)
  return u, v, y.astype(np.int32)


def numpy_unicl(u, v, y, tau):
  """Eqs. 1-3 of Florence written out with loops, divided by the batch."""
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  s = tau * (u.astype(np.float64) @ v.T.astype(np.float64))
  total = 0.0
  for i in range(len(y)):
    pos = np.flatnonzero(y == y[i])
    row = s[i] - np.log(np.sum(np.exp(s[i])))
    col = s[:, i] - np.log(np.sum(np.exp(s[:, i])))
    total -= row[pos].mean() + col[pos].mean()
  return total / len(y)


def _sharded_value_and_grad(u, v, y, tau, **kwargs):
  mesh = _mesh()
  shard = NamedSharding(mesh, P(("data", "fsdp")))

  def f(u, v, y, tau):
    def loss(u, v, tau):
      return gc.global_unicl_loss(u, v, y, tau, mesh=mesh, **kwargs)
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(u, v, tau)
  args = [jax.device_put(a, shard) for a in (u, v, y)]
  with mesh_lib.use_mesh(mesh):
    return jax.jit(f)(*args, jnp.float32(tau))


@pytest.mark.parametrize("labels_kind,row_block", [("clip", None),
                                                   ("unicl", 2)])
def test_sharded_loss_and_gradient_equal_gathered_reference(labels_kind,
                                                            row_block):
  u, v, y = _inputs(labels_kind)
  (loss, metrics), grads = _sharded_value_and_grad(u, v, y, 4.0,
                                                   row_block=row_block)
  np.testing.assert_allclose(float(loss), numpy_unicl(u, v, y, 4.0),
                             rtol=1e-5)

  # Single device, the whole gathered batch at once.
  one = lambda x: jax.device_put(x, jax.devices()[0])
  ref_fn = jax.jit(jax.value_and_grad(
      lambda a, b, t: contrastive.unicl_loss(a, b, jnp.asarray(y), t),
      argnums=(0, 1, 2), has_aux=True))
  (ref_loss, ref_metrics), ref_grads = ref_fn(one(u), one(v),
                                              one(jnp.float32(4.0)))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for k in ("loss_i2t", "loss_t2i", "i2t_acc"):
    np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]),
                               rtol=1e-5, err_msg=k)
  for got, want in zip(grads, ref_grads):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


def test_clip_loss_is_cross_entropy_both_ways():
  u, v, _ = _inputs("clip", seed=3)
  mesh = _mesh()
  shard = NamedSharding(mesh, P(("data", "fsdp")))
  with mesh_lib.use_mesh(mesh):
    got, _ = jax.jit(lambda a, b: gc.global_clip_loss(a, b, 10.0))(
        jax.device_put(u, shard), jax.device_put(v, shard))
  un = u / np.linalg.norm(u, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  logits = 10.0 * un.astype(np.float64) @ vn.T

  def ce(x):
    x = x - x.max(1, keepdims=True)
    return -np.mean(np.diag(x - np.log(np.exp(x).sum(1, keepdims=True))))
  np.testing.assert_allclose(float(got), ce(logits) + ce(logits.T), rtol=1e-5)


def test_local_backprop_stops_gradients_at_other_devices():
  """global_backprop=False: each device differentiates its own rows' terms
  with the other devices' embeddings held constant."""
  u, v, y = _inputs("unicl", seed=1)
  _, (gu, gv, _) = _sharded_value_and_grad(u, v, y, 3.0, global_backprop=False)
  shards, local = 8, B // 8

  def own_terms(u, v, k):
    mine = np.arange(B) // local == k
    ue = jnp.where(mine[:, None], u, jax.lax.stop_gradient(u))
    ve = jnp.where(mine[:, None], v, jax.lax.stop_gradient(v))
    un, vn = contrastive.l2_normalize(ue), contrastive.l2_normalize(ve)
    s = 3.0 * un @ vn.T
    pos = (y[:, None] == y[None, :]).astype(np.float32)
    nll = lambda lg: -jnp.sum(pos * jax.nn.log_softmax(lg, -1), -1) / pos.sum(1)
    return jnp.sum(jnp.where(mine, nll(s) + nll(s.T), 0.0)) / B

  grad_k = jax.jit(jax.grad(own_terms, argnums=(0, 1)))
  ref = [grad_k(u, v, k) for k in range(shards)]
  np.testing.assert_allclose(np.asarray(gu), sum(r[0] for r in ref),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gv), sum(r[1] for r in ref),
                             rtol=1e-5, atol=1e-7)
  # ... which is not the gradient of the global loss.
  _, (gu_global, _, _) = _sharded_value_and_grad(u, v, y, 3.0)
  assert np.abs(np.asarray(gu_global) - np.asarray(gu)).max() > 1e-3


def test_each_device_holds_only_its_rows_of_the_logits():
  """Memory O(B_local x B_global): no (B, B) array in the compiled step."""
  mesh = _mesh()
  shard = NamedSharding(mesh, P(("data", "fsdp")))
  spec = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=shard)
  labels = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=shard)

  def f(u, v, y):
    return jax.grad(lambda a, b: gc.global_unicl_loss(
        a, b, y, 2.0, mesh=mesh)[0], argnums=(0, 1))(u, v)
  with mesh_lib.use_mesh(mesh):
    hlo = jax.jit(f).lower(spec, spec, labels).compile().as_text()
  assert f"f32[{B // 8},{B}]" in hlo
  assert f"f32[{B},{B}]" not in hlo


def test_batch_not_divisible_by_shards_is_refused():
  mesh = _mesh()
  with pytest.raises(ValueError, match="not divisible by the 8"):
    gc.global_unicl_loss(jnp.zeros((12, 4)), jnp.zeros((12, 4)),
                         jnp.zeros((12,), jnp.int32), 1.0, mesh=mesh)
  with pytest.raises(ValueError, match="row_block 3"):
    gc.global_unicl_loss(jnp.zeros((32, 4)), jnp.zeros((32, 4)),
                         jnp.zeros((32,), jnp.int32), 1.0, mesh=mesh,
                         row_block=3)
