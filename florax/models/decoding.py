"""Autoregressive decoding (greedy and beam search) with a KV cache, the whole
loop inside one jitted program, compiled once per length bucket.

Why this shape. A Python loop of jitted steps pays a dispatch and a
host round-trip per token, and a loop whose shapes follow the requested
length recompiles for every new length. Here the loop is a
`lax.while_loop` over static buffers: the output buffer and the cache hold
`bucket_length(max_len)` tokens, while the requested `max_len` is a traced
scalar the loop stops at. Every length in one bucket (powers of two from 8
by default, or a configured list) runs the same compiled program.

The loops are generic over a step function

  step_fn(state, tokens (B,), i) -> (logits (B, V), state)

which feeds generated token i and returns the logits of token i + 1; the
loop starts from the logits of token 0 (a prefill's) and the state it
produced (a KV cache: any pytree whose leaves lead with the batch dim).
`CaptionDecoder` builds them for `multiway.CaptionModel`.

Conventions (fairseq's):
  * Tokens after EOS, and from max_len on, are `pad_id`; `banned` ids (pad,
    [MASK]) are never generated.
  * A hypothesis is y_1..y_n ending in EOS (n <= max_len, EOS counted in n)
    or of length max_len without EOS; its beam score is
    sum log p(y_i | y_<i) / n ** length_penalty.
  * Beam search ranks the K x V expansions of its K live beams by
    cumulative log-prob; an EOS expansion becomes a finished hypothesis when
    it ranks among the top K (so beam_size=1 is greedy), the live beams are
    the top K non-EOS expansions, and an example stops when it holds K
    finished hypotheses (or at max_len, where every expansion finishes).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from florax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from florax.models import multiway

# Finite "minus infinity": -inf would turn -inf - -inf into NaN in the
# score arithmetic; anything below NEG / 2 is "no hypothesis".
NEG = -1e9
MIN_BUCKET = 8


def bucket_length(n: int, buckets: Optional[Sequence[int]] = None) -> int:
  """The static buffer length decoding `n` tokens compiles for: the
  smallest of `buckets` >= n, or by default the next power of two, at least
  MIN_BUCKET. Lengths in one bucket share one compiled program."""
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"decoding max_len must be a positive int, got {n!r}")
  if buckets is None:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())
  fits = [b for b in buckets if b >= n]
  if not fits:
    raise ValueError(f"decoding max_len {n} exceeds the largest length "
                     f"bucket {max(buckets)}")
  return min(fits)


def _check_buckets(buckets):
  if buckets is None:
    return None
  buckets = tuple(buckets)
  if not buckets or not all(isinstance(b, int) and not isinstance(b, bool)
                            and b > 0 for b in buckets):
    raise ValueError(f"decoding buckets must be positive ints, got "
                     f"{buckets!r}")
  return tuple(sorted(set(buckets)))


def _ban(logits, banned):
  for i in banned:
    logits = logits.at[..., i].set(NEG)
  return logits


def _set_column(tokens, i, values):
  """tokens[..., i] = values for a traced i."""
  return jax.lax.dynamic_update_slice_in_dim(
      tokens, values[..., None].astype(tokens.dtype), i, axis=-1)


def greedy(step_fn: Callable, logits, state, *, max_len, length: int,
           eos_id: int, pad_id: int, banned: Sequence[int] = ()):
  """Greedy decoding (call inside jit). logits (B, V): of token 0; max_len:
  int or traced scalar <= `length` (the static buffer). Returns (tokens
  (B, length) int32, log-prob (B,) of the tokens up to and with EOS)."""
  b = logits.shape[0]

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, tokens, logits, state, done, score = carry
    logp = jax.nn.log_softmax(_ban(logits.astype(jnp.float32), banned))
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    score = score + jnp.where(
        done, 0.0, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0])
    tok = jnp.where(done, pad_id, tok)
    tokens = _set_column(tokens, i, tok)
    done = done | (tok == eos_id)
    logits, state = step_fn(state, tok, i)
    return i + 1, tokens, logits, state, done, score

  carry = (jnp.int32(0), jnp.full((b, length), pad_id, jnp.int32), logits,
           state, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
  _, tokens, _, _, _, score = jax.lax.while_loop(cond, body, carry)
  return tokens, score


def beam_search(step_fn: Callable, logits, state, *, beam_size: int,
                max_len, length: int, eos_id: int, pad_id: int,
                length_penalty: float = 1.0, banned: Sequence[int] = ()):
  """Beam search (call inside jit; module docstring for the rules).

  logits (B*K, V) and the state's leaves: K identical rows per example,
  batch-major (row b*K + k). Returns (tokens (B, K, length) int32, scores
  (B, K)), the K finished hypotheses best first (scores NEG where fewer
  than K exist)."""
  k = beam_size
  bk, vocab = logits.shape
  if bk % k:
    raise ValueError(f"beam_search: {bk} rows are not a multiple of "
                     f"beam_size {k}")
  b = bk // k
  rows = jnp.arange(b)[:, None]

  def norm(n):
    return jnp.asarray(n, jnp.float32) ** length_penalty

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, logits, state, live_tok, live_lp, fin_tok, fin_score, done = carry
    logp = jax.nn.log_softmax(_ban(logits.astype(jnp.float32), banned))
    cand = (live_lp[..., None] + logp.reshape(b, k, vocab)).reshape(b, -1)
    last = i + 1 >= max_len

    # Finished: EOS expansions ranked in the top K (every expansion at the
    # last position), length-normalised, merged into the K best so far.
    top_lp, top_idx = jax.lax.top_k(cand, k)
    top_beam, top_word = top_idx // vocab, top_idx % vocab
    final = ((top_word == eos_id) | last) & (top_lp > NEG / 2) & (
        ~done[:, None])
    new_score = jnp.where(final, top_lp / norm(i + 1), NEG)
    new_tok = _set_column(live_tok[rows, top_beam], i, top_word)
    all_score = jnp.concatenate([fin_score, new_score], axis=1)
    all_tok = jnp.concatenate([fin_tok, new_tok], axis=1)
    fin_score, keep = jax.lax.top_k(all_score, k)
    fin_tok = all_tok[rows, keep]

    # Live: the top K non-EOS expansions; the state follows its beams.
    is_eos = (jnp.arange(cand.shape[1]) % vocab) == eos_id
    live_lp, idx = jax.lax.top_k(jnp.where(is_eos, NEG, cand), k)
    beam, word = idx // vocab, (idx % vocab).astype(jnp.int32)
    live_tok = _set_column(live_tok[rows, beam], i, word)
    flat = (rows * k + beam).reshape(-1)
    state = jax.tree_util.tree_map(lambda a: a[flat], state)
    logits, state = step_fn(state, word.reshape(-1), i)
    done = done | last | (jnp.sum(fin_score > NEG / 2, axis=1) >= k)
    return i + 1, logits, state, live_tok, live_lp, fin_tok, fin_score, done

  live_lp = jnp.where(jnp.arange(k) == 0, 0.0, NEG)
  carry = (jnp.int32(0), logits, state,
           jnp.full((b, k, length), pad_id, jnp.int32),
           jnp.broadcast_to(live_lp, (b, k)).astype(jnp.float32),
           jnp.full((b, k, length), pad_id, jnp.int32),
           jnp.full((b, k), NEG, jnp.float32), jnp.zeros((b,), bool))
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[5], carry[6]


class CaptionDecoder:
  """Greedy and beam-search captioning with a `multiway.CaptionModel`.

  Two step formulations:
    mask_id=None   next-token: the logits of caption token t predict t + 1
                   (a step feeds the last token).
    mask_id=[MASK] BEiT-3's (unilm BEiT3ForCaptioning): a [MASK] follows
                   the caption and its logits predict the token in its
                   place (a step feeds the last token and a new [MASK]);
                   matches the MLM captioning fine-tuning objective.
  The prompt (default: [BOS]) is prefilled with the image in one call.

  One jitted program per (bucket, beam size, input shapes); `traces` counts
  how many times the loops were traced (the compile-cache check)."""

  def __init__(self, model: multiway.CaptionModel, *, eos_id: int = EOS_ID,
               bos_id: int = BOS_ID, mask_id: Optional[int] = None,
               pad_id: Optional[int] = None,
               buckets: Optional[Sequence[int]] = None):
    cfg = model.config
    self.model = model
    self.pad_id = (cfg.pad_id if cfg.pad_id is not None else PAD_ID
                   ) if pad_id is None else pad_id
    for name, value in (("eos_id", eos_id), ("bos_id", bos_id),
                        ("mask_id", mask_id), ("pad_id", self.pad_id)):
      if value is not None and not 0 <= value < cfg.vocab_size:
        raise ValueError(f"CaptionDecoder {name}={value} is outside the "
                         f"vocabulary of {cfg.vocab_size}")
    self.eos_id, self.bos_id, self.mask_id = eos_id, bos_id, mask_id
    self.banned = tuple(sorted(({self.pad_id} | (
        {mask_id} if mask_id is not None else set())) - {eos_id}))
    self.buckets = _check_buckets(buckets)
    self.traces = 0
    self._greedy = jax.jit(self._greedy_impl, static_argnames=("length",))
    self._beam = jax.jit(self._beam_impl,
                         static_argnames=("length", "beam_size",
                                          "length_penalty"))

  def bucket(self, max_len: int) -> int:
    return bucket_length(max_len, self.buckets)

  # -- the model's prefill and step -------------------------------------------

  def _with_mask(self, text):
    if self.mask_id is None:
      return text
    return jnp.concatenate(
        [text, jnp.full((text.shape[0], 1), self.mask_id, text.dtype)], 1)

  def _start(self, variables, images, prompt, length):
    """Prefill -> (logits of generated token 0, cache, step_fn)."""
    model, cfg = self.model, self.model.config
    p = prompt.shape[1]
    # Slots: the prompt, `length` generated tokens, the step's [MASK].
    cache = multiway.init_cache(cfg, images.shape[0], p + length + 1,
                                self.model.dtype)
    logits, cache = model.apply(variables, images, self._with_mask(prompt),
                                cache, method=multiway.CaptionModel.prefill)

    def step_fn(cache, tok, i):
      return model.apply(variables, self._with_mask(tok[:, None]), cache,
                         p + i, method=multiway.CaptionModel.step)
    return logits, cache, step_fn

  def _greedy_impl(self, variables, images, prompt, max_len, *, length):
    self.traces += 1
    logits, cache, step_fn = self._start(variables, images, prompt, length)
    return greedy(step_fn, logits, cache, max_len=max_len, length=length,
                  eos_id=self.eos_id, pad_id=self.pad_id,
                  banned=self.banned)

  def _beam_impl(self, variables, images, prompt, max_len, *, length,
                 beam_size, length_penalty):
    self.traces += 1
    logits, cache, step_fn = self._start(variables, images, prompt, length)
    # One prefill per image; its cache is copied into the K beams.
    repeat = lambda a: jnp.repeat(a, beam_size, axis=0)
    return beam_search(step_fn, repeat(logits),
                       jax.tree_util.tree_map(repeat, cache),
                       beam_size=beam_size, max_len=max_len, length=length,
                       eos_id=self.eos_id, pad_id=self.pad_id,
                       length_penalty=length_penalty, banned=self.banned)

  # -- public -------------------------------------------------------------------

  def _inputs(self, images, prompt, max_len):
    cfg = self.model.config
    length = self.bucket(max_len)
    images = jnp.asarray(images)
    if prompt is None:
      prompt = jnp.full((images.shape[0], 1), self.bos_id, jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[0] != images.shape[0] or (
        prompt.shape[1] < 1):
      raise ValueError(f"CaptionDecoder prompt of shape {prompt.shape}: "
                       f"expected ({images.shape[0]}, >= 1)")
    need = prompt.shape[1] + length + 1
    if need > cfg.max_text_len:
      raise ValueError(
          f"CaptionDecoder: a {prompt.shape[1]}-token prompt, max_len "
          f"{max_len} (bucket {length}) and the step slot need {need} "
          f"caption positions, more than max_text_len {cfg.max_text_len}")
    return images, prompt, length

  def greedy_tokens(self, variables: Any, images, max_len: int):
    """Traceable greedy decoding from [BOS] (inside jit or jax.export; the
    batch may be symbolic): tokens (B, max_len) int32, log-prob (B,)."""
    length = self.bucket(max_len)
    prompt = jnp.full((images.shape[0], 1), self.bos_id, jnp.int32)
    tokens, score = self._greedy_impl(variables, images, prompt,
                                      jnp.int32(max_len), length=length)
    return tokens[:, :max_len], score

  def greedy(self, variables: Any, images, max_len: int, prompt=None):
    """(tokens (B, max_len) int32, log-prob (B,)): pad after EOS."""
    images, prompt, length = self._inputs(images, prompt, max_len)
    tokens, score = self._greedy(variables, images, prompt,
                                 jnp.int32(max_len), length=length)
    return tokens[:, :max_len], score

  def beam_search(self, variables: Any, images, max_len: int,
                  beam_size: int = 4, length_penalty: float = 1.0,
                  prompt=None):
    """(tokens (B, K, max_len), scores (B, K)), best first (module
    docstring for the score)."""
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or (
        beam_size < 1):
      raise ValueError(f"beam_size must be a positive int, got "
                       f"{beam_size!r}")
    images, prompt, length = self._inputs(images, prompt, max_len)
    tokens, scores = self._beam(variables, images, prompt,
                                jnp.int32(max_len), length=length,
                                beam_size=beam_size,
                                length_penalty=float(length_penalty))
    return tokens[..., :max_len], scores
