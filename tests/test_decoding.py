"""Image captioning on the Multiway model (florax.models.multiway's seq2seq
mask, KV cache and CaptionModel) and florax.models.decoding: the mask
against a numpy construction and through the model's outputs, the cached
decoding logits against full recomputes, greedy against a naive Python loop,
beam search against greedy (beam 1) and exhaustive enumeration, EOS
handling, and the one-compile-per-length-bucket cache.

References are independent of the code under test: full recomputes run the
whole pair through CaptionModel.__call__ (no cache) on a fixed-length
buffer whose tail is padding (padding is never a key, so a token's logits
are those of its prefix), and the decoding references are Python loops."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.models import decoding, multiway, transformer

PAD, BOS, EOS, MASK = 0, 2, 3, 7
VOCAB = 8
# Full-recompute buffer: prompt + generated + [MASK] fit in it.
BUF = 8


def _config(**kw):
  kw = {"num_vl_layers": 1, "depth": 2, **kw}
  return multiway.config_for(
      "tiny", width=32, num_heads=2, mlp_dim=64, vocab_size=VOCAB,
      max_text_len=16, image_size=16, patch_size=8, **kw)


def _random_variables(model, seed, *inputs):
  """Random params of the model's shapes, drawn in numpy: compiling the
  model's init (threefry per param) costs ~10-20 s on a loaded CI core.
  Kernels ~ N(0, 1/fan_in) (the head x3, so logits are far from ties),
  LayerNorms near identity, everything else O(0.5)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
    shape = nn.meta.unbox(leaf).shape
    noise = rng.standard_normal(shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(shape[:-1]) if names[-1] == "embed" else shape[0]
      scale = (3.0 if "mlm_head" in str(path) else 1.0) / np.sqrt(fan_in)
      return jnp.asarray(noise * scale)
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray((0.1 if name == "bias" else 0.5) * noise)

  return jax.tree_util.tree_map_with_path(
      draw, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.fixture(scope="module")
def setup():
  cfg = _config()
  model = multiway.CaptionModel(cfg)
  images = jnp.asarray(np.random.default_rng(1).standard_normal(
      (2, 16, 16, 3)), jnp.float32)
  variables = _random_variables(model, 0, images,
                                jnp.zeros((2, BUF), jnp.int32))
  # (variables, images, text) -> (caption logits (no cache), the seq2seq
  # tokens): one program (the two share the backbone pass).
  both = jax.jit(lambda v, i, t: model.apply(
      v, i, t, method=lambda m, i, t: (m(i, t),
                                       m.multiway.encode_caption(i, t)[0])))
  return cfg, model, variables, images, both


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_logits(setup, prefix, mask_id):
  """Full-recompute logits (B, V) for the token after `prefix` (B, n):
  next-token (logits at prefix[-1]) or BEiT-3's (at a [MASK] after it)."""
  _, _, variables, images, full = setup
  b, n = prefix.shape
  buf = np.full((b, BUF), PAD, np.int32)
  buf[:, :n] = prefix
  if mask_id is not None:
    buf[:, n] = mask_id
    n += 1
  return np.array(full(variables, images, jnp.asarray(buf))[0])[:, n - 1]


# -- (1) the seq2seq mask -------------------------------------------------------

def test_seq2seq_mask_matches_numpy():
  n_img, length = 3, 4
  text_valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  got = np.asarray(multiway.seq2seq_mask(n_img, text_valid))
  total = n_img + length
  want = np.zeros((2, 1, total, total), bool)
  for b in range(2):
    for q in range(total):
      for k in range(total):
        key_ok = k < n_img or text_valid[b, k - n_img]
        if q < n_img:
          want[b, 0, q, k] = k < n_img          # image: image only
        else:
          want[b, 0, q, k] = key_ok and (k < n_img or k <= q)
  np.testing.assert_array_equal(got, want)


def test_mask_through_the_model(setup):
  cfg, model, variables, images, both = setup
  n = cfg.num_image_tokens

  def encode(v, i, t):
    return both(v, i, t)[1]

  rng = np.random.default_rng(0)
  a = rng.integers(4, 7, (2, BUF)).astype(np.int32)
  b = a.copy()
  b[:, 5] = np.where(a[:, 5] == 6, 4, 6)      # differs from position 5 on
  b[:, 6:] = rng.integers(4, 7, (2, BUF - 6))
  ta, tb = np.asarray(encode(variables, images, a)), np.asarray(
      encode(variables, images, b))
  # Image tokens never see the caption (and see each other: they differ).
  np.testing.assert_allclose(ta[:, :n], tb[:, :n], atol=1e-6)
  # Caption tokens before the first change are causal-invariant ...
  np.testing.assert_allclose(ta[:, n:n + 5], tb[:, n:n + 5], atol=1e-6)
  # ... and the changed ones do change; the caption sees the image.
  assert np.abs(ta[:, n + 5:] - tb[:, n + 5:]).max() > 1e-3
  other = np.asarray(encode(variables, images[::-1], a))
  assert np.abs(other[:, n:] - ta[:, n:]).max() > 1e-3


# -- (2) cached decoding == full recompute -------------------------------------

def _teacher_forced(dec, prompt):
  """Cached logits of every step (B, steps + 1, V) when the decoder is fed
  `forced` (B, prompt + steps): the prefill's, then one per step."""

  @jax.jit
  def run(v, images, forced):
    logits, cache, step = dec._start(v, images, forced[:, :prompt], 4)

    def body(cache, x):
      i, tok = x
      logits, cache = step(cache, tok, i)
      return cache, logits

    steps = jnp.arange(forced.shape[1] - prompt)
    _, out = jax.lax.scan(body, cache, (steps, forced[:, prompt:].T))
    return jnp.concatenate([logits[:, None], jnp.moveaxis(out, 0, 1)], 1)
  return run


def test_cached_logits_equal_full_recompute(setup):
  """BEiT-3's [MASK] steps (each step feeds the last token and a [MASK]),
  paper-style shared attention with a VL layer: against a full recompute of
  each prefix + [MASK]."""
  cfg, model, variables, images, _ = setup
  dec = decoding.CaptionDecoder(model, mask_id=MASK)
  forced = np.array([[BOS, 4, 6, 5, 4], [BOS, 6, 4, 4, 5]], np.int32)
  prompt = 2   # prefill two tokens, then step one at a time
  got = np.asarray(_teacher_forced(dec, prompt)(variables, images, forced))
  for j in range(got.shape[1]):
    want = _ref_logits(setup, forced[:, :prompt + j], MASK)
    np.testing.assert_allclose(got[:, j], want, atol=1e-5, rtol=0)


def test_cached_next_token_logits_torchscale_attention():
  """Next-token steps (mask_id=None) on torchscale's per-modality attention
  copies: step t's logits are the full pass's logits at caption token t."""
  cfg = _config(multiway_attention=True, num_vl_layers=0, depth=1)
  model = multiway.CaptionModel(cfg)
  images = jnp.asarray(np.random.default_rng(3).standard_normal(
      (2, 16, 16, 3)), jnp.float32)
  forced = jnp.array([[BOS, 5, 4, 6], [BOS, 4, 4, 5]], jnp.int32)
  variables = _random_variables(model, 1, images, forced)
  got = _teacher_forced(decoding.CaptionDecoder(model), 1)(
      variables, images, forced)
  want = jax.jit(model.apply)(variables, images, forced)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# -- (3) greedy == naive loop ----------------------------------------------------

def _naive_greedy(setup, max_len, mask_id, eos):
  banned = [PAD] + ([mask_id] if mask_id is not None else [])
  seq = np.full((2, 1), BOS, np.int32)
  out = np.full((2, max_len), PAD, np.int32)
  done = np.zeros(2, bool)
  for i in range(max_len):
    logits = _ref_logits(setup, seq, mask_id)
    logits[:, banned] = -np.inf
    tok = logits.argmax(-1).astype(np.int32)
    for b in range(2):
      if not done[b]:
        out[b, i] = tok[b]
        done[b] = tok[b] == eos
    seq = np.concatenate([seq, tok[:, None]], 1)
  return out


@pytest.fixture(scope="module")
def dec(setup):
  """BEiT-3's [MASK] decoder shared by the greedy/beam tests (one compile
  each). EOS: the token the naive greedy path emits third for example 0
  (from a run whose EOS never occurs), so stopping and padding happen."""
  plain = _naive_greedy(setup, 3, MASK, eos=-1)
  return decoding.CaptionDecoder(setup[1], mask_id=MASK,
                                 eos_id=int(plain[0, 2]))


def test_greedy_equals_naive_loop(setup, dec):
  cfg, model, variables, images, _ = setup
  max_len = 6
  want = _naive_greedy(setup, max_len, MASK, eos=dec.eos_id)
  got, _ = dec.greedy(variables, images, max_len)
  np.testing.assert_array_equal(np.asarray(got), want)
  first = int(np.argmax(want[0] == dec.eos_id))
  assert want[0, first] == dec.eos_id and first <= 2
  assert (want[0, first + 1:] == PAD).all()


# -- (4) beam search ----------------------------------------------------------------

def _toy_model(vocab=6, states=97, seed=0):
  """A toy autoregressive model for the loops alone: the state hashes the
  history, the logits are a random table row of it."""
  table = jnp.asarray(3 * np.random.default_rng(seed).standard_normal(
      (states, vocab)), jnp.float32)

  def step_fn(state, tok, i):
    state = (state * 7 + tok + i) % states
    return table[state], state
  return table, step_fn


def test_beam_size_one_is_greedy():
  table, step_fn = _toy_model()
  state = jnp.arange(4, dtype=jnp.int32) * 11        # 4 examples
  eos, alpha = 3, 0.7
  kw = dict(max_len=6, length=8, eos_id=eos, pad_id=0, banned=(0,))
  greedy, lp = jax.jit(lambda s: decoding.greedy(step_fn, table[s], s,
                                                 **kw))(state)
  beam, scores = jax.jit(lambda s: decoding.beam_search(
      step_fn, table[s], s, beam_size=1, length_penalty=alpha, **kw))(state)
  greedy, beam = np.asarray(greedy), np.asarray(beam)
  np.testing.assert_array_equal(beam[:, 0], greedy)
  assert (greedy == eos).any()          # some example stops early
  lengths = (greedy != 0).sum(1)
  np.testing.assert_allclose(np.asarray(scores[:, 0]),
                             np.asarray(lp) / lengths ** alpha, rtol=1e-5)
  # And greedy is the naive argmax loop.
  for b in range(4):
    s, out = int(state[b]), []
    logits = np.array(table[s])
    for i in range(6):
      logits[0] = -np.inf
      tok = int(np.argmax(logits))
      out.append(tok)
      if tok == eos:
        break
      s = (s * 7 + tok + i) % 97
      logits = np.array(table[s])
    np.testing.assert_array_equal(greedy[b, :len(out)], out)
    assert (greedy[b, len(out):] == 0).all()


def test_beam_search_is_exhaustive_on_a_tiny_space(setup, dec):
  cfg, model, variables, images, _ = setup
  max_len, alpha, eos = 3, 1.0, dec.eos_id
  words = [t for t in range(VOCAB) if t not in (PAD, MASK, eos)]
  # Every hypothesis: EOS-terminated of length 1..max_len, or max_len
  # without EOS. Beam size = every expansion of the live prefixes before
  # the last position, so nothing is pruned there; at the last position
  # all lengths are equal and the top K by log-prob hold the best.
  beam_size = len(words) * (len(words) + 1)
  hyps = [list(p) + [eos] for n in range(max_len)
          for p in itertools.product(words, repeat=n)]
  hyps += [list(p) for p in itertools.product(words, repeat=max_len)]
  tokens, scores = dec.beam_search(variables, images, max_len,
                                   beam_size=beam_size, length_penalty=alpha)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  # Log-probs of each prefix's next token: one full recompute per prefix.
  table = {}
  for n in range(max_len):
    for p in itertools.product(words, repeat=n):
      logits = _ref_logits(setup, np.array([[BOS, *p]] * 2, np.int32), MASK)
      logits[:, [PAD, MASK]] = -np.inf
      table[p] = _log_softmax(logits)
  for b in range(2):
    def score(h):
      return sum(table[tuple(h[:j])][b, h[j]] for j in range(len(h))
                 ) / len(h) ** alpha
    best = max(hyps, key=score)
    np.testing.assert_allclose(scores[b, 0], score(best), rtol=1e-5)
    # Every returned hypothesis is scored as the naive loop scores it,
    # ends at its EOS (padding after it), and they come best first.
    assert np.all(np.diff(scores[b]) <= 1e-6)
    real = scores[b] > decoding.NEG / 2
    assert real.sum() == beam_size
    for k in np.flatnonzero(real):
      row = list(tokens[b, k])
      n = row.index(eos) + 1 if eos in row else max_len
      assert all(t == PAD for t in row[n:]), row
      assert all(t not in (PAD, MASK) for t in row[:n]), row
      np.testing.assert_allclose(scores[b, k], score(row[:n]), rtol=1e-5)


def test_finished_beams_stay_finished():
  """A hand-made step function: EOS is the best first token for example 0
  (that hypothesis must survive unchanged), example 1 never emits EOS."""
  vocab, k, length = 4, 2, 6
  eos = 3
  # Token log-probs depend only on the example: ex 0 prefers EOS at step 0
  # only (a 'state' counter), ex 1 always prefers token 1.
  def step_fn(state, tok, i):
    del tok
    return _logits(state + 1), state + 1

  def _logits(step):  # rows b*k + beam; step: tokens fed so far
    example = jnp.arange(2 * k)[:, None] // k
    ex0 = jnp.where(step[:, None] == 0, jnp.log(jnp.array([.05, .25, .1, .6])),
                    jnp.log(jnp.array([.05, .6, .3, .05])))
    ex1 = jnp.log(jnp.array([.05, .7, .2, .05]))
    return jnp.where(example == 0, ex0, ex1)

  state = jnp.zeros((2 * k,), jnp.int32)
  logits = _logits(state)
  tokens, scores = jax.jit(lambda l, s: decoding.beam_search(
      step_fn, l, s, beam_size=k, max_len=5, length=length, eos_id=eos,
      pad_id=0, length_penalty=0.0))(logits, state)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  # ex 0: [EOS] (p .6) beats every continuation (at most .25 * .6 ...).
  np.testing.assert_array_equal(tokens[0, 0], [eos, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(scores[0, 0], np.log(.6), rtol=1e-6)
  # ex 1: no EOS ranks in the top 2 until max_len; best is 1 1 1 1 1.
  np.testing.assert_array_equal(tokens[1, 0], [1, 1, 1, 1, 1, 0])
  np.testing.assert_allclose(scores[1, 0], 5 * np.log(.7), rtol=1e-5)


# -- (5) one compile per length bucket -------------------------------------------

def test_bucket_rule():
  assert [decoding.bucket_length(n) for n in (1, 8, 9, 16, 17, 100)] == [
      8, 8, 16, 16, 32, 128]
  assert decoding.bucket_length(5, (4, 12, 6)) == 6
  assert decoding.bucket_length(7, (4, 12, 6)) == 12
  with pytest.raises(ValueError, match="largest length bucket 12"):
    decoding.bucket_length(13, (4, 12, 6))
  with pytest.raises(ValueError, match="max_len"):
    decoding.bucket_length(0)


def test_one_compile_per_bucket(setup, dec):
  cfg, model, variables, images, _ = setup
  # The shared decoder's greedy program is bucket 8 (default buckets):
  # lengths 3 and 7 both run it, traced and compiled at most once.
  before = dec.traces
  short, _ = dec.greedy(variables, images, 3)
  long, _ = dec.greedy(variables, images, 7)
  assert dec.traces <= before + 1 and dec._greedy._cache_size() == 1
  assert short.shape == (2, 3) and long.shape == (2, 7)
  # Greedy is prefix-consistent: the shorter run is the longer's prefix.
  np.testing.assert_array_equal(np.asarray(short), np.asarray(long)[:, :3])
  with pytest.raises(ValueError, match="max_text_len"):
    decoding.CaptionDecoder(model, buckets=(16,)).greedy(variables, images,
                                                         10)


def test_errors_name_the_option(setup):
  cfg, model, variables, images, _ = setup
  with pytest.raises(ValueError, match="mask_id=99"):
    decoding.CaptionDecoder(model, mask_id=99)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.CaptionDecoder(model).beam_search(variables, images, 3,
                                               beam_size=0)
  with pytest.raises(ValueError, match="seq2seq"):
    model.apply(variables, images, method=lambda m, i: m.multiway(
        images=i, seq2seq=True))
  with pytest.raises(ValueError, match="max_text_len"):
    multiway.init_cache(cfg, 1, cfg.max_text_len + 1)
  with pytest.raises(ValueError, match="kv_cache"):
    transformer.update_kv_cache({"k": jnp.zeros((1, 2, 2, 4))},
                                jnp.zeros((1, 1, 2, 4)),
                                jnp.zeros((1, 1, 2, 4)), 0)
