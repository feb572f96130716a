"""BEiT-3's captioning and dual-encoder retrieval uses (florax.tasks.
beit3_caption, beit3_retrieval, configs/beit3_uses.py): losses against numpy
transcriptions, the caption masking recipe, the "names the digit" metric
against a plain Python check, class-level recall against a naive loop,
modality routing seen by gradients, greedy captions through the evaluator,
and config refusals before anything compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import flax.linen as nn
from configs import beit3_uses
from florax import tasks
from florax.data import digits
from florax.tasks import beit3_caption, beit3_retrieval


def _build(name, workdir, **overrides):
  c = beit3_uses.get_config(name)
  with c.unlocked():
    c.train.batch_size = 8
    c.eval_batch_size = 4
    for k, v in overrides.items():
      node = c
      *path, leaf = k.split(".")
      for p in path:
        node = node[p]
      node[leaf] = v
  return tasks.build(c, str(workdir))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("beit3_uses")


@pytest.fixture(scope="module")
def cap(workdir):
  task = _build("caption_tiny", workdir / "cap")
  params = nn.unbox(task.init(jax.random.key(0)))
  return task, params


@pytest.fixture(scope="module")
def ret(workdir):
  task = _build("retrieval_tiny", workdir / "ret")
  params = nn.unbox(task.init(jax.random.key(1)))
  return task, params


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- captioning ----------------------------------------------------------------

def _caption_batch(task, rng):
  it = task.train_iterators(0, 1)["train"]
  batch = next(it)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_caption_loss_is_ce_over_masked_positions(cap):
  task, params = cap
  batch = _caption_batch(task, 0)
  loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(0))
  logits = np.asarray(task.model.apply({"params": params}, batch["images"],
                                       batch["ids"]))
  mask = np.asarray(batch["mask"])
  assert mask.any() and (~mask).any()
  logp = _np_log_softmax(logits)
  tgt = np.asarray(batch["targets"])
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[mask].mean(), rtol=1e-5)
  assert float(metrics["masked_tokens"]) == mask.sum()
  # label smoothing: (1 - s) nll - s mean_v log p, masked positions only
  rng = np.random.default_rng(0)
  lg = rng.normal(size=(3, 5, 7)).astype(np.float32)
  t = rng.integers(0, 7, (3, 5))
  m = rng.random((3, 5)) < 0.5
  lp = _np_log_softmax(lg)
  ref = (0.9 * -np.take_along_axis(lp, t[..., None], -1)[..., 0]
         - 0.1 * lp.mean(-1))[m].mean()
  got, _, _ = beit3_caption.caption_loss(jnp.asarray(lg), jnp.asarray(t),
                                         jnp.asarray(m), 0.1)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_caption_masking_recipe(cap):
  task, _ = cap
  tok = task.text_tokenizer
  ids = tok.encode("a photo of the digit seven.", 16)
  n = int(((ids != tok.pad_id) & (ids != tok.bos_id)).sum())
  rng = np.random.default_rng(0)
  eos_hits = 0
  for _ in range(200):
    out, chosen = beit3_caption.choose_caption_tokens(
        ids, rng, ratio=0.6, mask_id=task.mask_id, vocab_size=tok.vocab_size,
        pad_id=tok.pad_id, bos_id=tok.bos_id)
    assert chosen.sum() == int(np.clip(int(0.6 * n + 0.5), 1, n))
    assert not chosen[ids == tok.pad_id].any()
    assert not chosen[0]  # [BOS]
    assert (out[~chosen] == ids[~chosen]).all()
    eos_hits += chosen[ids == tok.eos_id].sum()
  assert eos_hits > 0  # the boundary token is masked too (§3.1)


def test_names_digit_matches_plain_python():
  cases = [("a photo of the digit seven.", 7), ("a handwritten 7.", 7),
           ("a handwritten 7.", 1), ("a photo of the digit seventy", 7),
           ("a one and a seven", 1), ("", 0), ("the digit 0, written", 0),
           ("a blurry photo of a nine.", 9), ("eight", 3)]

  def plain(text, label):
    words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
    named = set()
    for w in words:
      if w in digits.CLASS_WORDS:
        named.add(digits.CLASS_WORDS.index(w))
      elif w.isdigit() and len(w) == 1:
        named.add(int(w))
    return named == {label}
  for text, label in cases:
    assert beit3_caption.names_digit(text, label) == plain(text, label), text
  texts = [t for t, _ in cases]
  labels = [y for _, y in cases]
  m = beit3_caption.caption_metrics(texts, labels, "x_")
  assert m["x_names_digit"] == np.mean([plain(t, y) for t, y in cases])
  exact = [t in {digits.describe(y, tp) for tp in digits.TEMPLATES}
           for t, y in cases]
  assert m["x_exact"] == np.mean(exact)


def test_caption_evaluator_decodes(cap):
  task, params = cap
  images, labels = task.holdout()
  texts = task.caption_images(params, images[:3])
  assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
  # Greedy through the evaluator == the decoder called directly.
  tokens, _ = task.decoder().greedy({"params": params},
                                    np.concatenate([images[:3]] + [
                                        np.zeros_like(images[:1])]),
                                    task.config.caption.max_decode_len)
  assert texts == [task.text_tokenizer.decode(r) for r in
                   np.asarray(tokens)[:3]]


# -- retrieval -------------------------------------------------------------------

def test_retrieval_loss_is_symmetric_infonce():
  rng = np.random.default_rng(1)
  u = rng.normal(size=(6, 4)).astype(np.float32)
  v = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 1, 0, 2, 1, 3], np.int32)
  un = u / np.linalg.norm(u, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  logits = 10.0 * un.astype(np.float64) @ vn.T

  def ref(pos):
    li = _np_log_softmax(logits)
    lt = _np_log_softmax(logits.T)
    i2t = np.mean(-(pos * li).sum(1) / pos.sum(1))
    t2i = np.mean(-(pos.T * lt).sum(1) / pos.T.sum(1))
    return i2t + t2i
  got, _ = beit3_retrieval.retrieval_loss(u, v, labels, jnp.float32(10.0),
                                          "instance")
  np.testing.assert_allclose(float(got), ref(np.eye(6)), rtol=1e-5)
  got, _ = beit3_retrieval.retrieval_loss(u, v, labels, jnp.float32(10.0),
                                          "class")
  pos = (labels[:, None] == labels[None]).astype(np.float64)
  np.testing.assert_allclose(float(got), ref(pos), rtol=1e-5)


def test_class_recall_matches_naive_loop():
  rng = np.random.default_rng(2)
  img = rng.normal(size=(7, 3))
  txt = rng.normal(size=(9, 3))
  txt[4] = img[0]  # exact ties with wrong and right candidates
  txt[5] = img[0]
  il = np.array([0, 1, 2, 0, 1, 2, 0])
  tl = np.array([0, 1, 2, 1, 0, 2, 1, 0, 2])
  sims = img @ txt.T

  def naive(s, ql, cl, k):
    hits = []
    for q in range(s.shape[0]):
      best = max(s[q, c] for c in range(s.shape[1]) if cl[c] == ql[q])
      wrong = sum(1 for c in range(s.shape[1])
                  if cl[c] != ql[q] and s[q, c] >= best)
      hits.append(wrong < k)
    return float(np.mean(hits))
  got = beit3_retrieval.class_recall_at_k(img, txt, il, tl, ks=(1, 2))
  for k in (1, 2):
    assert got[f"i2t_r{k}"] == naive(sims, il, tl, k)
    assert got[f"t2i_r{k}"] == naive(sims.T, tl, il, k)


def _flat(tree):
  return {"/".join(k): v for k, v in
          traverse_util.flatten_dict(tree).items()}


def test_pooling_matches_a_loop():
  rng = np.random.default_rng(5)
  tokens = rng.normal(size=(3, 6, 4)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(
      beit3_retrieval.pool_tokens(tokens, valid, "cls"), tokens[:, 0])
  want = np.stack([tokens[i][valid[i]].mean(0) for i in range(3)])
  np.testing.assert_allclose(
      beit3_retrieval.pool_tokens(tokens, valid, "mean"), want, rtol=1e-6,
      atol=1e-6)


def test_text_encoding_never_touches_vision_experts(ret):
  task, params = ret
  model = task.model
  ids = jnp.asarray(task.text_tokenizer.encode_batch(
      ["a handwritten 7.", "a photo of the digit two."], 16))
  w = jax.random.normal(jax.random.key(2), (2, task.config.retrieval.embed_dim))

  def text_only(p):
    return jnp.sum(w * model.apply({"params": p}, ids,
                                   method=beit3_retrieval.DualEncoder.encode_text))
  g = _flat(jax.jit(jax.grad(text_only))(params))
  vision = [n for n in g if "_v/" in n or n.endswith("_v") or "norm_v" in n
            or "vision_embed" in n or n.startswith("image_proj")]
  language = [n for n in g if "mlp_l/" in n]
  assert vision and language
  for n in vision:
    assert not np.any(np.asarray(g[n])), n
  assert any(np.any(np.asarray(g[n])) for n in language)
  # The whole retrieval step: the vision-language experts are never run.
  it = task.train_iterators(0, 1)["train"]
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  grads = _flat(jax.jit(jax.grad(
      lambda p: task.loss(p, batch, jax.random.key(0))[0]))(params))
  vl = [n for n in grads if "_vl/" in n]
  assert vl and not any(np.any(np.asarray(grads[n])) for n in vl)
  assert np.any(np.asarray(grads["multiway/block0/mlp_v/fc1/kernel"]))


# -- config ------------------------------------------------------------------------

@pytest.mark.parametrize("name,key,value,match", [
    ("caption_tiny", "caption.mask_ratio", 0.0, "caption.mask_ratio"),
    ("caption_tiny", "caption.max_decode_len", 15, "max_decode_len"),
    ("caption_tiny", "caption.beam_size", -1, "caption.beam_size"),
    ("caption_tiny", "model.multiway.vocab_size", 100, "vocab_size"),
    ("caption_tiny", "data.image_size", 64, "data.image_size"),
    ("retrieval_tiny", "retrieval.positives", "pairs", "retrieval.positives"),
    ("retrieval_tiny", "retrieval.embed_dim", 0, "retrieval.embed_dim"),
    ("retrieval_tiny", "retrieval.pool", "max", "retrieval.pool"),
    ("retrieval_tiny", "data.name", "records", "data.name"),
])
def test_bad_config_refused_before_compile(workdir, name, key, value, match):
  with pytest.raises(ValueError, match=match):
    _build(name, workdir / "bad", **{key: value})


def test_presets():
  for name in ("caption_tiny", "retrieval_tiny", "caption_base",
               "retrieval_base"):
    c = beit3_uses.get_config(name)
    assert c.init_from.prefixes[0] == ("multiway", "multiway")
  assert beit3_uses.get_config("caption_tiny").init_from.prefixes[1] == (
      "mlm_head", "mlm_head")
  with pytest.raises(ValueError, match="unknown beit3_uses preset"):
    beit3_uses.get_config("nope")
