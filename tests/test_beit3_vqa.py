"""BEiT-3 VQA and NLVR2 (florax.tasks.beit3_vqa, florax.data.digits_qa,
configs/beit3_vqa.py): the BCE-on-soft-scores loss and the VQA accuracy
against numpy transcriptions, the generator's soft scores and NLVR2 labels
against plain Python rules, one encoder for both NLVR2 pairs, config
refusals before compiling, and exact pipeline resumption."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import beit3_vqa as cfg_lib
from florax import tasks
from florax.data import digits, digits_qa
from florax.data import tokenizer as tok_lib
from florax.tasks import beit3_vqa


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_tokenizer(digits.all_descriptions(), 127)


def _config(name="tiny", **overrides):
  c = cfg_lib.get_config(name)
  c.unlock()
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


def _task(tmp_path, name="tiny", **overrides):
  return tasks.build(_config(name, **overrides), str(tmp_path))


# -- the objective ------------------------------------------------------------------

def _np_bce(logits, scores, reduction):
  x = np.asarray(logits, np.float64)
  y = np.asarray(scores, np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  return (per.sum(1) if reduction == "sum" else per.mean(1)).mean()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bce_on_soft_scores_matches_numpy(reduction):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 12)).astype(np.float32)
  scores = np.minimum(rng.integers(0, 5, (6, 12)) / 3.0, 1.0).astype(
      np.float32)
  got = float(beit3_vqa.vqa_bce(jnp.asarray(logits), jnp.asarray(scores),
                                reduction))
  np.testing.assert_allclose(got, _np_bce(logits, scores, reduction),
                             rtol=1e-5)
  if reduction == "sum":  # unilm's: BCE mean x number of answers
    np.testing.assert_allclose(
        got, _np_bce(logits, scores, "mean") * 12, rtol=1e-5)


def test_vqa_accuracy_is_min_humans_over_3_of_the_argmax():
  # 4 questions, 3 answers; hand-made annotator counts.
  counts = np.array([[10, 0, 0], [1, 2, 7], [4, 4, 2], [0, 1, 9]])
  scores = np.minimum(counts / 3.0, 1.0)
  logits = np.array([[5., 1, 0], [0, 3, 1], [0, 0, 9], [1, 0, np.nan]])
  want = [1.0, 2 / 3, 2 / 3, 0.0]  # the NaN row predicts nothing
  got = np.asarray(beit3_vqa.vqa_accuracy(logits, scores))
  np.testing.assert_allclose(got, want, rtol=1e-6)


# -- the generators ------------------------------------------------------------------

def test_soft_scores_are_min_count_over_3_of_the_annotators():
  rng = np.random.default_rng(1)
  for _ in range(300):
    ex = digits_qa.vqa_example(int(rng.integers(10)), rng, p_correct=0.7)
    assert len(ex["annotations"]) == 10
    count = collections.Counter(ex["annotations"])
    want = [min(count[a] / 3.0, 1.0) for a in digits_qa.ANSWERS]
    np.testing.assert_allclose(ex["scores"], want, rtol=1e-6)
  # answers follow plain rules
  for cls in range(10):
    r = np.random.default_rng(cls)
    assert digits_qa.question(cls, "what", r)[1] == digits.CLASS_WORDS[cls]
    assert digits_qa.question(cls, "even", r)[1] == (
        "yes" if cls % 2 == 0 else "no")
    text, ans = digits_qa.question(cls, "over", r)
    assert ans == ("yes" if cls > int(text.split()[-1]) else "no")
    text, ans = digits_qa.question(cls, "is_a", r)
    assert ans == ("yes" if text.split()[-1] == digits.CLASS_WORDS[cls]
                   else "no")


def _rule(text: str, a: int, b: int) -> bool:
  words = digits.CLASS_WORDS
  if text == "left is bigger":
    return a > b
  if text == "both are even":
    return a % 2 == 0 and b % 2 == 0
  if text == "both are odd":
    return a % 2 == 1 and b % 2 == 1
  if text == "they are equal":
    return a == b
  if text.startswith("one is a "):
    w = words.index(text.split()[-1])
    return w in (a, b)
  raise AssertionError(text)


def test_nlvr2_labels_follow_the_statement_and_are_balanced():
  rng = np.random.default_rng(2)
  labels = collections.defaultdict(list)
  for _ in range(2000):
    ex = digits_qa.nlvr2_classes(rng)
    assert ex["label"] == int(_rule(ex["statement"], ex["left"],
                                    ex["right"]))
    labels[ex["family"]].append(ex["label"])
  for fam, ls in labels.items():
    assert 0.4 < np.mean(ls) < 0.6, fam


def test_every_text_fits_the_tiny_text_table(tok):
  n, text = digits_qa.max_pieces(tok)
  assert n + 2 <= cfg_lib.get_config("tiny").data.max_len, text


# -- the models ----------------------------------------------------------------------

def test_nlvr2_runs_both_pairs_through_one_encoder(tmp_path):
  task = _task(tmp_path, "nlvr2_tiny", **{"model.head_init_scale": 1.0})
  params = jax.jit(task.init)(jax.random.key(0))
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        params, is_leaf=lambda x: hasattr(x, "value"))
  assert set(params) == {"multiway", "head"}  # one encoder param set
  s, length, b = 32, task.config.data.max_len, 3
  rng = np.random.default_rng(3)
  left = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  right = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  ids = np.array([task.text_tokenizer.encode(t, length) for t in
                  ["left is bigger", "both are odd", "one is a six"]])
  model = task.model
  apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b, ids))
  got = apply(params, left, right)
  # Reference: each pair encoded separately with the SAME multiway params.
  from florax.models import multiway
  mw = multiway.Multiway(task.backbone)
  split = task.backbone.num_image_tokens

  def rep(images):
    tokens, _ = jax.jit(lambda p, x: mw.apply({"params": p}, images=x,
                                              text=ids))(
        params["multiway"], images)
    return np.concatenate([tokens[:, 0], tokens[:, split]], -1)
  x = np.concatenate([rep(left), rep(right)], -1)
  want = beit3_vqa.TwoLayerMLP(2 * task.backbone.width, 2).apply(
      {"params": params["head"]}, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert not np.allclose(got, apply(params, right, left), atol=1e-6)


@pytest.mark.parametrize("head", ["unilm", "linear"])
def test_vqa_heads_read_the_first_token(tmp_path, head):
  """unilm: LayerNorm -> dense -> tanh of token 0, then dense -> LayerNorm ->
  exact GELU -> dense; linear: one dense on token 0 (numpy, from the
  backbone's tokens and the head's params)."""
  task = _task(tmp_path, **{"model.head": head})
  params = jax.jit(task.init)(jax.random.key(1))
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        params, is_leaf=lambda x: hasattr(x, "value"))
  want_keys = {"multiway", "head"} | ({"pooler"} if head == "unilm" else
                                      set())
  assert set(params) == want_keys
  rng = np.random.default_rng(4)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ids = np.array([task.text_tokenizer.encode(t, task.config.data.max_len)
                  for t in ["is it odd", "what digit is this"]])
  got = np.asarray(jax.jit(lambda p: task.model.apply({"params": p}, images,
                                                    ids))(params))
  from florax.models import multiway
  tokens, _ = jax.jit(lambda p: multiway.Multiway(task.backbone).apply(
      {"params": p}, images=images, text=ids))(params["multiway"])
  x = np.asarray(tokens[:, 0], np.float64)

  def ln(v, p, eps=1e-5):
    v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True)
                                                  + eps)
    return v * np.asarray(p["scale"]) + np.asarray(p["bias"])

  def dense(v, p):
    return v @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
  from scipy.special import erf
  if head == "linear":
    want = dense(x, params["head"])
  else:
    pooled = np.tanh(dense(ln(x, params["pooler"]["norm"]),
                           params["pooler"]["dense"]))
    h = ln(dense(pooled, params["head"]["dense1"]), params["head"]["norm2"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    want = dense(h, params["head"]["dense2"])
  assert got.shape == (2, len(digits_qa.ANSWERS))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- config ------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,match", [
    ("tiny", {"data.max_len": 8}, "data.max_len"),
    ("tiny", {"data.image_size": 48}, "data.image_size"),
    ("tiny", {"data.families": ("what", "why")}, "data.families"),
    ("tiny", {"vqa.loss_reduction": "max"}, "vqa.loss_reduction"),
    ("tiny", {"data.p_correct": 0.3}, "data.p_correct"),
    ("tiny", {"model.head": "mlp"}, "model.head"),
    ("tiny", {"model.multiway.vocab_size": 100}, "vocab_size"),
    ("nlvr2_tiny", {"data.holdout_examples": 0}, "data.holdout_examples"),
])
def test_bad_config_is_refused_before_compiling(tmp_path, name, overrides,
                                                match):
  with pytest.raises(ValueError, match=match):
    _task(tmp_path, name, **overrides)


def test_presets_build():
  for name in cfg_lib._PRESETS:  # pylint: disable=protected-access
    c = cfg_lib.get_config(name)
    assert c.init_from.prefixes == (("multiway", "multiway"),)
  with pytest.raises(ValueError, match="preset"):
    cfg_lib.get_config("huge")


# -- pipelines ----------------------------------------------------------------------

@pytest.mark.parametrize("use", ["vqa", "nlvr2"])
def test_pipeline_state_resumes_exactly(tok, use):
  make = (digits_qa.vqa_dataset if use == "vqa" else
          digits_qa.nlvr2_dataset)
  kw = dict(tokenizer=tok, image_size=16, max_len=16, batch_size=8, seed=5,
            random_shift=2)
  it = iter(make(**kw))
  next(it), next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = iter(make(**kw))
  again.set_state(state)
  for w in want:
    g = next(again)
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  # per-process shards are disjoint streams of the right size
  a = next(iter(make(**kw, process_index=0, process_count=2)))
  assert len(a["ids"]) == 8
