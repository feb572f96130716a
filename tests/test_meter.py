"""METER's co-attention fusion (florax.models.meter) and the METER tasks
(florax.tasks.meter): the layer and the two-stream fusion against a naive
numpy transcription, the ITM / MLM / VQA-BCE losses against numpy on a
fixed batch, the [MASK] embedding against an extended embedding table, the
UniCL towers' names, and config refusals."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import florence as florence_cfg
from configs import meter as meter_cfg
from florax import tasks
from florax.data import digits_qa
from florax.export import flatten_params
from florax.models import meter, text, two_tower
from florax.tasks import flava
from florax.tasks import meter as meter_task
from tests import helpers

CFG = meter.MeterConfig(width=8, depth=2, num_heads=2, mlp_dim=12,
                        norm_eps=1e-6, dropout=0.0)


def _random(init, seed):
  """Params of `init`'s shapes drawn in numpy (both sides read them)."""
  shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(
      s.dtype), shapes)


# -- numpy transcription -----------------------------------------------------------

def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _attend(q, k, v, key_valid):
  """q (N, h, d), k/v (M, h, d), key_valid (M,) -> (N, h, d), one loop
  over heads and queries."""
  n, h, d = q.shape
  out = np.zeros_like(q)
  for head in range(h):
    for i in range(n):
      s = k[:, head] @ q[i, head] / np.sqrt(d)
      s = np.where(key_valid, s, -np.inf)
      out[i, head] = _softmax(s) @ v[:, head]
  return out


def _dense(x, p, axes=1):
  k = np.asarray(p["kernel"], np.float64)
  out = np.tensordot(x, k, axes=axes)
  return out + p["bias"] if "bias" in p else out


def np_layer(p, x, other, self_valid, other_valid, eps):
  """One stream's METER layer, example by example."""
  outs = []
  for b in range(x.shape[0]):
    xb, ob = x[b], other[b]
    qkv = _dense(xb, p["self_attn"]["qkv"])                # (N, 3, h, d)
    a = _attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], self_valid[b])
    a = _dense(a, p["self_attn"]["proj"], axes=2)
    xb = _ln(xb + a, p["norm1"], eps)
    q = _dense(xb, p["cross_attn"]["query"])               # (N, h, d)
    kv = _dense(ob, p["cross_attn"]["key_value"])          # (M, 2, h, d)
    c = _attend(q, kv[:, 0], kv[:, 1], other_valid[b])
    c = _dense(c, p["cross_attn"]["proj"], axes=2)
    xb = _ln(xb + c, p["norm2"], eps)
    h = _dense(xb, p["mlp"]["fc1"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    xb = _ln(xb + _dense(h, p["mlp"]["fc2"]), p["norm3"], eps)
    outs.append(xb)
  return np.stack(outs)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_co_attention_layer_equals_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 8)).astype(np.float32)
  y = rng.standard_normal((2, 7, 8)).astype(np.float32)
  valid = np.ones((2, 5), bool)
  valid[1, 3:] = False  # padding keys of x
  layer = meter.CoAttentionLayer(CFG)
  from florax.models import transformer  # pylint: disable=g-import-not-at-top
  mask = transformer.padding_mask(valid)
  params = _random(lambda r: layer.init(r, x, y, mask), 1)["params"]
  got = jax.jit(layer.apply)({"params": params}, x, y, mask)
  want = np_layer(_f64(params), x.astype(np.float64), y.astype(np.float64),
                  valid, np.ones((2, 7), bool), CFG.norm_eps)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # The image stream's cross-attention never reads padded text keys.
  other = meter.CoAttentionLayer(CFG)
  p2 = _random(lambda r: other.init(r, y, x, None, mask), 2)["params"]
  got = jax.jit(other.apply)({"params": p2}, y, x, None, mask)
  want = np_layer(_f64(p2), y.astype(np.float64), x.astype(np.float64),
                  np.ones((2, 7), bool), valid, CFG.norm_eps)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_fusion_advances_both_streams_together():
  """Layer i of each stream reads layer i-1 of the other (not the other
  stream's layer i), then the poolers: [tanh(text token 0) ; tanh(mean of
  the image tokens)]."""
  rng = np.random.default_rng(3)
  t = rng.standard_normal((2, 4, 6)).astype(np.float32)
  v = rng.standard_normal((2, 5, 10)).astype(np.float32)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  fusion = meter.MeterFusion(CFG)
  params = _random(lambda r: fusion.init(r, t, valid, v), 4)["params"]
  ts, vs, pooled = jax.jit(fusion.apply)({"params": params}, t, valid, v)
  p = _f64(params)
  xt = _dense(t.astype(np.float64), p["text_proj"]) + p["type_embed"][0]
  xv = _dense(v.astype(np.float64), p["image_proj"]) + p["type_embed"][1]
  all_v = np.ones((2, 5), bool)
  for i in range(CFG.depth):
    xt, xv = (np_layer(p[f"text_layer{i}"], xt, xv, valid, all_v,
                       CFG.norm_eps),
              np_layer(p[f"image_layer{i}"], xv, xt, all_v, valid,
                       CFG.norm_eps))
  np.testing.assert_allclose(ts, xt, atol=5e-5, rtol=1e-4)
  np.testing.assert_allclose(vs, xv, atol=5e-5, rtol=1e-4)
  want = np.concatenate([np.tanh(_dense(xt[:, 0], p["text_pooler"])),
                         np.tanh(_dense(xv.mean(1), p["image_pooler"]))], -1)
  np.testing.assert_allclose(pooled, want, atol=5e-5, rtol=1e-4)
  # A causal text tower's summary: the token at text_pool_index (its
  # end-of-text), here positions 2 and 3.
  index = np.array([2, 3])
  _, _, pooled = jax.jit(fusion.apply)({"params": params}, t, valid, v,
                                       text_pool_index=index)
  want = np.concatenate([np.tanh(_dense(xt[[0, 1], index],
                                        p["text_pooler"])),
                         np.tanh(_dense(xv.mean(1), p["image_pooler"]))], -1)
  np.testing.assert_allclose(pooled, want, atol=5e-5, rtol=1e-4)


def test_mask_embedding_is_an_extra_table_row():
  """ids == mask_id embed as `mask_embed`: the same as a tower whose table
  has that vector as one more row."""
  cfg = text.TextConfig(vocab_size=20, width=8, depth=1, num_heads=2,
                        max_len=6)
  ids = np.array([[2, 5, 20, 7, 3, 0], [2, 20, 20, 3, 0, 0]], np.int32)
  tower = text.TextTransformer(cfg)
  params = _random(lambda r: tower.init(r, ids, mask_id=20), 5)["params"]
  _, got = jax.jit(lambda p, i: tower.apply({"params": p}, i, mask_id=20))(
      params, ids)
  wide = text.TextTransformer(text.TextConfig(**{**cfg.__dict__,
                                                 "vocab_size": 21}))
  p21 = dict(params)
  p21["token_embed"] = {"embedding": np.concatenate(
      [params["token_embed"]["embedding"], params["mask_embed"][None]])}
  del p21["mask_embed"]
  _, want = jax.jit(wide.apply)({"params": p21}, ids)
  np.testing.assert_allclose(got["hidden"], want["hidden"], atol=1e-6)


# -- the tasks -----------------------------------------------------------------------

def _config(preset, **overrides):
  c = meter_cfg.get_config(preset)
  with c.unlocked():
    c.model.meter.depth = 1
    c.train.batch_size = 8
    c.eval_batch_size = 8
    helpers.apply_overrides(c, overrides)
  return c


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
  task = tasks.build(_config("tiny_pretrain"),
                     str(tmp_path_factory.mktemp("meter_pre")))
  task.validate()
  return task, _random(task.init, 6)


def test_itm_and_mlm_losses_equal_numpy(pretrain):
  task, params = pretrain
  batch = next(task.train_iterators(0, 1)["train"])
  rng = jax.random.key(9)
  loss, m = jax.jit(task.loss)(params, batch, rng)
  model = task.model
  apply = jax.jit(model.apply, static_argnames=("method",))
  _, k_itm = jax.random.split(rng)
  index, matched = flava.itm_pairs(k_itm, batch["label"], 0.5, "class")
  index, matched = np.asarray(index), np.asarray(matched)
  # In-batch negatives: about half the pairs see another pair's image.
  assert (index != np.arange(8)).sum() == 4
  itm = np.asarray(apply({"params": params}, batch["images"][index],
                               batch["targets"],
                               method=meter_task.MeterModel.itm), np.float64)
  logp = itm - np.log(np.exp(itm).sum(-1, keepdims=True))
  want_itm = -np.mean(logp[np.arange(8), matched.astype(int)])
  mlm = np.asarray(apply({"params": params}, batch["images"],
                               batch["ids"], task.mask_id,
                               method=meter_task.MeterModel.mlm), np.float64)
  logp = mlm - np.log(np.exp(mlm).sum(-1, keepdims=True))
  rows, cols = np.nonzero(batch["mlm_mask"])
  assert len(rows) > 0
  # Masked positions hold [MASK] (80%), a random piece or the original.
  assert (batch["ids"][rows, cols] == task.mask_id).any()
  want_mlm = -np.mean(logp[rows, cols, batch["targets"][rows, cols]])
  assert float(m["itm_loss"]) == pytest.approx(want_itm, rel=1e-5)
  assert float(m["mlm_loss"]) == pytest.approx(want_mlm, rel=1e-5)
  assert float(loss) == pytest.approx(want_itm + want_mlm, rel=1e-5)


def test_vqa_bce_equals_numpy(tmp_path):
  task = tasks.build(_config("tiny_vqa"), str(tmp_path))
  task.validate()
  params = _random(task.init, 7)
  batch = next(task.train_iterators(0, 1)["train"])
  loss, _ = jax.jit(task.loss)(params, batch, jax.random.key(0))
  x = np.asarray(task.vqa_logits(params, batch["images"], batch["ids"]),
                 np.float64)
  y = batch["scores"].astype(np.float64)
  # -[y log s(x) + (1 - y) log(1 - s(x))], summed over answers.
  sig = 1 / (1 + np.exp(-x))
  want = np.mean(np.sum(-(y * np.log(sig) + (1 - y) * np.log(1 - sig)), -1))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # VQA-v2 soft scores: min(#annotators / 3, 1).
  assert set(np.unique(batch["scores"]).tolist()) <= set(
      np.float32([0, 1 / 3, 2 / 3, 1]).tolist())
  assert x.shape[1] == len(digits_qa.ANSWERS)


def test_the_unicl_towers_load_by_name(pretrain):
  """Every tower param of METER is a UniCL two-tower param of the same
  shape (so init_from's prefixes load them all), except the [MASK]
  embedding MLM adds."""
  task, _ = pretrain
  unicl = two_tower.from_config(florence_cfg.get_config("tiny").model)
  s = 32
  theirs = flatten_params(nn.unbox(jax.eval_shape(lambda r: unicl.init(
      r, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 16), jnp.int32)),
                                                  jax.random.key(0))))
  theirs = {k.removeprefix("params/"): v.shape for k, v in theirs.items()}
  ours = flatten_params(nn.unbox(jax.eval_shape(task.init,
                                                jax.random.key(0))))
  towers = {k: v.shape for k, v in ours.items()
            if k.startswith(("image_encoder/", "text_encoder/"))}
  assert set(towers) - set(theirs) == {"text_encoder/mask_embed"}
  assert all(theirs[k] == v for k, v in towers.items() if k in theirs)


@pytest.mark.parametrize("preset,override,message", [
    ("tiny_vqa", {"data.max_len": 4}, "data.max_len 4 cuts"),
    ("tiny_vqa", {"data.families": ("what", "colour")}, "data.families"),
    ("tiny_pretrain", {"meter.itm_match": "image"}, "meter.itm_match"),
    ("tiny_pretrain", {"meter.mlm_rate": 0.0}, "meter.mlm_rate"),
    ("tiny_vqa", {"model.text.vocab_size": 100}, "does not fit model.text"),
    ("tiny_vqa", {"model.meter.num_heads": 3}, "not divisible"),
])
def test_bad_config_is_named(preset, override, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    tasks.build(_config(preset, **override), str(tmp_path)).validate()
