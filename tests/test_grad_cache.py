"""The gradient cache on 8 devices: exact full-batch gradients (stochastic
depth on), refusal of bad chunk sizes, memory and FLOPs from XLA's analyses,
and the Florence task wired to it."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from florax import tasks  # noqa: E402
from florax.losses import contrastive  # noqa: E402
from florax.losses import global_contrastive as gc  # noqa: E402
from florax.parallel import mesh as mesh_lib  # noqa: E402
from florax.parallel import sharding as sharding_lib  # noqa: E402
from florax.train import grad_cache  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

SHARDS = 8
AXES = ("data", "fsdp")


def _mesh():
  return mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


# -- two small towers with stochastic depth -----------------------------------

def _init(seed=0, tokens=4, feat=8, hidden=16, depth=2, vocab=11, dim=8):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  normal = lambda *s: 0.3 * jax.random.normal(next(keys), s)
  return {
      "image": {"w_in": normal(feat, hidden),
                "blocks": [{"w1": normal(hidden, 2 * hidden),
                            "w2": normal(2 * hidden, hidden)}
                           for _ in range(depth)],
                "w_out": normal(hidden, dim)},
      "text": {"table": normal(vocab, hidden), "w_out": normal(hidden, dim)},
      "log_scale": jnp.float32(np.log(5.0)),
  }


def _image_tower(drop_rate):
  def tower(p, x, key):  # x: (n, tokens, feat)
    h = x @ p["image"]["w_in"]
    for b, blk in enumerate(p["image"]["blocks"]):
      y = jax.nn.gelu(h @ blk["w1"]) @ blk["w2"]
      if drop_rate:  # stochastic depth: drop the branch per example
        keep = jax.random.bernoulli(jax.random.fold_in(key, b),
                                    1 - drop_rate, (h.shape[0], 1, 1))
        y = jnp.where(keep, y / (1 - drop_rate), 0.0)
      h = h + y
    return jnp.mean(h, 1) @ p["image"]["w_out"]
  return tower


def _text_tower(drop_rate):
  def tower(p, ids, key):  # ids: (n, length)
    h = jnp.mean(jnp.tanh(p["text"]["table"][ids]), 1)
    if drop_rate:  # dropout on the pooled feature
      keep = jax.random.bernoulli(key, 1 - drop_rate, h.shape)
      h = jnp.where(keep, h / (1 - drop_rate), 0.0)
    return h @ p["text"]["w_out"]
  return tower


def _batch(global_batch, labels_kind, seed=1, tokens=4, feat=8, length=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(global_batch, tokens, feat)).astype(np.float32)
  ids = rng.integers(0, 11, size=(global_batch, length)).astype(np.int32)
  y = (np.arange(global_batch) if labels_kind == "clip"
       else rng.integers(0, 4, size=global_batch)).astype(np.int32)
  return x, ids, y


def _cached_fn(mesh, chunk, drop_rate, unroll=1):
  towers = (_image_tower(drop_rate), _text_tower(drop_rate))

  def f(params, x, ids, y, rng):
    def loss_fn(p, emb):
      return gc.global_unicl_loss(emb[0], emb[1], y, jnp.exp(p["log_scale"]),
                                  mesh=mesh, row_block=chunk)
    return grad_cache.cached_value_and_grad(
        towers, loss_fn, params, (x, ids), rng, chunk_size=chunk, mesh=mesh,
        unroll=unroll)
  return f


def _uncached_fn(mesh, drop_rate):
  """The ordinary full-batch step: towers on the whole batch, autodiff."""
  towers = (_image_tower(drop_rate), _text_tower(drop_rate))

  def f(params, x, ids, y, rng):
    def loss(p):
      emb = [t(p, a, jax.random.fold_in(rng, i))
             for i, (t, a) in enumerate(zip(towers, (x, ids)))]
      return gc.global_unicl_loss(emb[0], emb[1], y, jnp.exp(p["log_scale"]),
                                  mesh=mesh)
    return jax.value_and_grad(loss, has_aux=True)(params)
  return f


def _reference_fn(global_batch, chunk, drop_rate):
  """(params, x, ids, y, rng) -> ((loss, aux), grads) on a single device: rows of chunk i gathered with numpy fancy indexing (rows
  i*c..(i+1)*c of every shard), towers run on them with the documented key
  chunk_rng(rng, tower, i), embeddings scattered back, UniCL on the whole
  batch, plain autodiff through all of it."""
  towers = (_image_tower(drop_rate), _text_tower(drop_rate))
  b = global_batch
  local = b // SHARDS
  chunks = [np.concatenate([s * local + i * chunk + np.arange(chunk)
                            for s in range(SHARDS)])
            for i in range(local // chunk)]

  def loss(p, x, ids, y, rng):
    emb = []
    for t, (tower, data) in enumerate(zip(towers, (x, ids))):
      out = jnp.zeros((b, 8), jnp.float32)
      for i, rows in enumerate(chunks):
        out = out.at[rows].set(tower(p, data[rows],
                                     grad_cache.chunk_rng(rng, t, i)))
      emb.append(out)
    return contrastive.unicl_loss(emb[0], emb[1], y, jnp.exp(p["log_scale"]))
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run_sharded(fn, mesh, params, x, ids, y, rng):
  shard = NamedSharding(mesh, P(AXES))
  args = [jax.device_put(a, shard) for a in (x, ids, y)]
  with mesh_lib.use_mesh(mesh):
    return jax.jit(fn)(params, *args, rng)


def _assert_trees_close(got, want, rtol=1e-5):
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want),
                        jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(),
                               err_msg=jax.tree_util.keystr(path[0]))


# -- exactness ----------------------------------------------------------------

def test_cached_gradient_equals_full_batch_gradient():
  """CLIP and UniCL labels; 4 rows per device in chunks of 1 (4 chunks)."""
  mesh, params, chunk = _mesh(), _init(), 1
  cached = _cached_fn(mesh, chunk, 0.3)
  reference = _reference_fn(SHARDS * 4, chunk, 0.3)
  rng = jax.random.key(7)
  for labels_kind in ("clip", "unicl"):
    x, ids, y = _batch(SHARDS * 4, labels_kind)
    (loss, aux), grads = _run_sharded(cached, mesh, params, x, ids, y, rng)
    (ref_loss, ref_aux), ref_grads = reference(params, x, ids, y, rng)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(float(aux["i2t_acc"]),
                               float(ref_aux["i2t_acc"]))
    _assert_trees_close(grads, ref_grads)
  # Stochastic depth really is on: another key gives another gradient, so
  # the match above needs pass 1 and pass 3 to draw the same masks.
  _, other = reference(params, x, ids, y, jax.random.key(8))
  w = np.asarray(ref_grads["image"]["w_in"])
  assert np.abs(np.asarray(other["image"]["w_in"]) - w).max() > 1e-3 * np.abs(
      w).max()


def test_without_stochastic_layers_equals_unchunked_autodiff():
  mesh, params = _mesh(), _init(seed=3)
  x, ids, y = _batch(SHARDS * 4, "unicl", seed=4)
  rng = jax.random.key(0)
  (loss, _), grads = _run_sharded(_cached_fn(mesh, 2, 0.0), mesh, params, x,
                                  ids, y, rng)
  (ref_loss, _), ref_grads = _run_sharded(_uncached_fn(mesh, 0.0), mesh,
                                          params, x, ids, y, rng)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  _assert_trees_close(grads, ref_grads)


def test_chunk_that_does_not_divide_the_per_device_batch_is_refused():
  mesh, params = _mesh(), _init()
  x, ids, y = _batch(SHARDS * 4, "clip")
  fn = _cached_fn(mesh, 3, 0.0)
  # Raised while tracing, before anything compiles.
  with pytest.raises(ValueError, match="chunk_size 3 does not divide the "
                     "per-device batch 4"):
    with mesh_lib.use_mesh(mesh):
      jax.eval_shape(fn, params, x, ids, y, jax.random.key(0))
  with pytest.raises(ValueError, match="positive integer"):
    grad_cache.check_chunk_size(4, 0)


# -- memory and FLOPs (XLA analyses of compiled steps, nothing runs) ----------

def _compiled(fn, mesh, params, global_batch, tokens, feat):
  shard = NamedSharding(mesh, P(AXES))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
  args = (sds((global_batch, tokens, feat), jnp.float32),
          sds((global_batch, 5), jnp.int32), sds((global_batch,), jnp.int32))
  with mesh_lib.use_mesh(mesh):
    return jax.jit(fn).lower(params, *args, jax.random.key(0)).compile()


def test_cached_memory_stays_at_one_chunk_and_uncached_grows():
  # Wide activations per example (64 tokens x 256), small embeddings: the
  # regime the cache is for.
  mesh = _mesh()
  params = _init(tokens=64, feat=16, hidden=256, depth=2)
  temp = lambda fn, per_device: _compiled(
      fn, mesh, params, SHARDS * per_device, 64, 16).memory_analysis(
          ).temp_size_in_bytes
  uncached_32 = temp(_uncached_fn(mesh, 0.1), 32)
  uncached_256 = temp(_uncached_fn(mesh, 0.1), 256)
  cached = _compiled(_cached_fn(mesh, 32, 0.1), mesh, params, SHARDS * 2048,
                     64, 16)
  cached_2048 = cached.memory_analysis().temp_size_in_bytes
  assert cached_2048 <= 1.5 * uncached_32, (cached_2048, uncached_32)
  assert uncached_256 > 4 * uncached_32, (uncached_256, uncached_32)
  # Chunks are taken where the rows live: no batch data crosses devices.
  hlo = cached.as_text()
  assert "all-to-all" not in hlo and "collective-permute" not in hlo


def test_cached_step_costs_one_extra_forward():
  mesh = _mesh()
  params = _init(tokens=16, feat=16, hidden=64, depth=2)
  flops = lambda fn: _compiled(fn, mesh, params, SHARDS * 32, 16, 16
                               ).cost_analysis()["flops"]
  # Unrolled chunk loops so the cost analysis counts every chunk.
  cached = flops(_cached_fn(mesh, 16, 0.1, unroll=True))
  uncached = flops(_uncached_fn(mesh, 0.1))
  assert 1.15 * uncached <= cached <= 1.4 * uncached, cached / uncached


def test_auto_chunk_is_the_largest_that_fits_the_budget():
  mesh = _mesh()
  params = _init(tokens=16, feat=16, hidden=64, depth=1)
  peaks = {}

  def peak(chunk):
    if chunk not in peaks:
      peaks[chunk] = grad_cache.compiled_peak_bytes(_compiled(
          _cached_fn(mesh, chunk, 0.0), mesh, params, SHARDS * 8, 16, 16))
    return peaks[chunk]
  budget = (peak(2) + peak(4)) / 2
  assert peak(2) < budget < peak(4)
  assert grad_cache.auto_chunk_size(8, peak, budget) == 2
  assert set(peaks) == {2, 4}  # a binary search over the divisors 1, 2, 4, 8
  with pytest.raises(ValueError, match="no gradient-cache chunk fits"):
    grad_cache.auto_chunk_size(8, lambda chunk: 2.0**40, 2.0**30)


# -- the Florence task ----------------------------------------------------------

def _florence_task(tmp_path, chunk):
  cfg = tiny_config(**{"contrastive.chunk_size": chunk,
                       "train.batch_size": 16,
                       "model.image.depths": [1, 1],
                       "model.text.depth": 1,
                       "model.text.drop_path_rate": 0.2,
                       "model.text.dropout": 0.1})
  assert cfg.model.image.drop_path_rate > 0
  return tasks.build(cfg, str(tmp_path))


def test_florence_task_cached_gradient_is_exact(tmp_path):
  task = _florence_task(tmp_path, 1)
  mesh = _mesh()
  task.mesh = mesh
  rules = sharding_lib.rules_from_config(task.config.sharding.rules)
  params = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  b, s, length = 16, task.config.data.image_size, task.config.data.max_len
  batch = {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
           "text": rng.integers(1, 100, size=(b, length)).astype(np.int32),
           "label": rng.integers(0, 6, size=b).astype(np.int32)}
  key = jax.random.key(3)
  shard = NamedSharding(mesh, P(AXES))
  with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
    (loss, _), grads = jax.jit(task.value_and_grad)(
        params, jax.device_put(batch, shard), key)

  # Independent single-device reference with the documented chunk keys:
  # chunk i = rows i*c..(i+1)*c of every shard, picked by numpy indexing.
  model = task.model
  local, chunk = b // SHARDS, 1
  rows = np.stack([np.concatenate([d * local + i * chunk + np.arange(chunk)
                                   for d in range(SHARDS)])
                   for i in range(local // chunk)])

  def ref_loss(p):
    emb = []
    for t, (method, data) in enumerate(((model.encode_image, batch["image"]),
                                        (model.encode_text, batch["text"]))):
      def encode(i, method=method, data=data, t=t):
        return model.apply({"params": p}, jnp.asarray(data)[jnp.asarray(rows)[i]],
                           deterministic=False, method=method,
                           rngs={"dropout": grad_cache.chunk_rng(key, t, i)})
      out = jax.lax.map(encode, jnp.arange(len(rows)))   # (chunks, rows, D)
      emb.append(jnp.zeros((b, out.shape[-1])).at[rows.reshape(-1)].set(
          out.reshape(b, -1)))
    scale = model.apply({"params": p}, method=model.logit_scale)
    return contrastive.unicl_loss(emb[0], emb[1], batch["label"], scale)[0]
  want_loss, want = jax.jit(jax.value_and_grad(ref_loss))(params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, want)


def test_florence_task_refuses_bad_chunk_before_compiling(tmp_path):
  # 16 rows over 8 devices: 2 per device; refused when the task is built.
  with pytest.raises(ValueError, match="chunk_size 3 does not divide the "
                     "per-device batch 2"):
    _florence_task(tmp_path, 3)
