"""BEiT-3 image captioning (Wang et al. 2022, §3.1), fine-tuned from the
pretrained Multiway checkpoint (task `beit3_caption`).

Training (the paper's, after UniLM / s2s-ft; unilm's BEiT3ForCaptioning):
the image and its caption run as one fused sequence under the seq2seq mask
(`multiway.seq2seq_mask`: image tokens attend bidirectionally among
themselves, caption tokens to the image, to earlier caption tokens and to
themselves). A fraction `caption.mask_ratio` of the caption's tokens (every
token after [BOS], the closing [EOS] included: "we also mask the special
boundary token [SEP] to help the model learn to terminate") is chosen, the
chosen ones corrupted as BERT does (80% [MASK], 10% random, 10% kept), and
the loss is the cross-entropy of the `mlm_head` logits at the chosen
positions only (`caption_loss`; label smoothing optional, unilm uses 0.1).
The masked count is round(ratio * maskable) clipped to [1, maskable]
(unilm's `_masking_word`). Default ratio: 0.6 for the tiny demo, 0.7 in
the base recipe (unilm's --captioning_mask_prob for COCO).

Inference: [MASK] mode of florax.models.decoding.CaptionDecoder: a [MASK]
follows the caption so far and its logits give the next token, greedy or
beam search, one compiled program per length bucket, with a KV cache.

Evaluation on the held-out digits (`evaluate`): greedy captions of every
held-out image; eval/caption_names_digit = the fraction whose caption names
the image's digit and no other (`digits_named`: class words "seven" or
numerals "7" as words), eval/caption_exact = the fraction equal to one of
that digit's training descriptions; with caption.beam_size > 0 the same two
for beam search (eval/caption_beam_*).

Params are CaptionModel's: `multiway/...` and `mlm_head/...`, the MDM
task's names, so `init_from.prefixes=[["multiway", "multiway"], ["mlm_head",
"mlm_head"]]` starts from a `beit3_mdm` workdir; without init_from.path the
same model trains from random init. The text tokenizer is the pretrained
run's (`text_tokenizer`): ids must mean what they meant in pre-training.
"""

from __future__ import annotations

import dataclasses
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import digits
from florax.data import digits_images
from florax.data import masking
from florax.data import pipeline
from florax.data import tokenizer as tok_lib
from florax.models import decoding, multiway, two_tower
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks.registry import register



# -- the objective (pure) ---------------------------------------------------------

def caption_loss(logits, targets, mask, label_smoothing: float = 0.0):
  """(mean over the chosen positions of the (smoothed) CE, accuracy there,
  chosen count). logits (B, L, V); targets (B, L); mask (B, L) bool.
  Unchosen positions get exactly zero gradient (a `where`)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, -1)
  count = jnp.sum(mask.astype(jnp.float32))
  denom = jnp.maximum(count, 1.0)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / denom
  hit = jnp.argmax(logits, -1) == targets
  acc = jnp.sum(jnp.where(mask, hit, False).astype(jnp.float32)) / denom
  return loss, acc, count


def choose_caption_tokens(ids, rng, *, ratio, mask_id, vocab_size,
                          pad_id, bos_id, mask_prob=0.8, random_prob=0.1,
                          special_ids=masking.DEFAULT_SPECIAL_IDS):
  """unilm's captioning masking of one caption (L,): round(ratio * n)
  of the n tokens after [BOS] ([EOS] included), clipped to [1, n], chosen
  uniformly; 80% become [MASK], 10% a random piece, 10% stay.
  Returns (corrupted ids, chosen (L,) bool)."""
  ids = np.asarray(ids, np.int32)
  maskable = np.flatnonzero((ids != pad_id) & (ids != bos_id))
  n = len(maskable)
  chosen = np.zeros(ids.shape, bool)
  out = ids.copy()
  if n == 0:
    return out, chosen
  k = int(np.clip(int(ratio * n + 0.5), 1, n))
  pos = rng.choice(maskable, size=k, replace=False)
  chosen[pos] = True
  u = rng.random(k)
  out[pos[u < mask_prob]] = mask_id
  rand = pos[(u >= mask_prob) & (u < mask_prob + random_prob)]
  out[rand] = masking.random_tokens(rng, len(rand), vocab_size,
                                   (*special_ids, mask_id))
  return out, chosen


_WORDS = {w: i for i, w in enumerate(digits.CLASS_WORDS)}
_WORDS.update({str(i): i for i in range(10)})


def digits_named(text: str) -> set[int]:
  """The digits a caption names: class words and numerals as whole words."""
  return {_WORDS[w] for w in re.findall(r"[a-z0-9]+", text.lower())
          if w in _WORDS}


def names_digit(text: str, label: int) -> bool:
  """The caption names digit `label` and no other."""
  return digits_named(text) == {int(label)}


def caption_metrics(texts, labels, prefix="") -> dict[str, float]:
  """{prefix names_digit, prefix exact} over decoded captions."""
  refs = [{digits.describe(c, t) for t in digits.TEMPLATES}
          for c in range(len(digits.CLASS_WORDS))]
  named = [names_digit(t, int(y)) for t, y in zip(texts, labels)]
  exact = [t.strip() in refs[int(y)] for t, y in zip(texts, labels)]
  return {f"{prefix}names_digit": float(np.mean(named)),
          f"{prefix}exact": float(np.mean(exact))}


# -- data --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MakeCaption(grain.transforms.RandomMap):
  """{'image', 'label'} -> + a random description of its digit, masked."""
  tokenizer: tok_lib.TextTokenizer
  max_len: int
  ratio: float
  mask_id: int

  def random_map(self, element, rng: np.random.Generator):
    tok = self.tokenizer
    label = int(element["label"])
    template = digits.TEMPLATES[rng.integers(len(digits.TEMPLATES))]
    ids = tok.encode(digits.describe(label, template), self.max_len)
    out, chosen = choose_caption_tokens(
        ids, rng, ratio=self.ratio, mask_id=self.mask_id,
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
        special_ids=tok.special_ids)
    return {"images": element["image"], "ids": out, "targets": ids,
            "mask": chosen, "label": np.int32(label)}


# -- the task ------------------------------------------------------------------------

@register("beit3_caption")
class BEiT3CaptionTask(base.Task):
  example_unit = "captions"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tok = None
    self._decoder = None
    self._holdout = None

  def validate(self):
    common.validate_common(self, needs_mask=True)
    c = self.config.caption
    if not 0 < c.mask_ratio <= 1:
      raise ValueError(f"caption.mask_ratio must be in (0, 1], got "
                       f"{c.mask_ratio!r}")
    if not 0 <= c.label_smoothing < 1:
      raise ValueError(f"caption.label_smoothing must be in [0, 1), got "
                       f"{c.label_smoothing!r}")
    if not common.is_int(c.beam_size) or c.beam_size < 0:
      raise ValueError(f"caption.beam_size must be an integer >= 0 (0: no "
                       f"beam-search evaluator), got {c.beam_size!r}")
    mw = self.backbone
    if not common.is_int(c.max_decode_len) or c.max_decode_len < 1:
      raise ValueError(f"caption.max_decode_len must be a positive integer, "
                       f"got {c.max_decode_len!r}")
    # [BOS] prompt + the decoded tokens + the step's [MASK] slot.
    if c.max_decode_len + 2 > mw.max_text_len:
      raise ValueError(
          f"caption.max_decode_len {c.max_decode_len} + the [BOS] prompt "
          f"and the [MASK] slot exceed model.multiway.max_text_len "
          f"{mw.max_text_len}; at most {mw.max_text_len - 2}")
    if self.config.get("evals"):
      raise ValueError("beit3_caption's evaluators are configured under "
                       "config.caption (config.evals must be empty)")

  @property
  def backbone(self):
    return common.backbone(self.config)

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def text_tokenizer(self):
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  @property
  def mask_id(self):
    return common.mask_id_of(self.text_tokenizer)

  @property
  def model(self):
    return multiway.CaptionModel(self.backbone, self.dtype)

  def batch_spec(self, global_batch_size):
    s, length = self.config.data.image_size, self.config.data.max_len
    b = global_batch_size
    i32 = jnp.int32
    return {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "ids": jax.ShapeDtypeStruct((b, length), i32),
            "targets": jax.ShapeDtypeStruct((b, length), i32),
            "mask": jax.ShapeDtypeStruct((b, length), jnp.bool_),
            "label": jax.ShapeDtypeStruct((b,), i32)}

  def init(self, rng):
    s, length = self.config.data.image_size, self.config.data.max_len
    return self.model.init({"params": rng}, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, length), jnp.int32))["params"]

  def train_iterators(self, process_index, process_count):
    common.record_tokenizer(self)
    d = self.config.data
    return {base.DEFAULT_KIND: iter(digits_images.digits_image_dataset(
        image_size=d.image_size,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.get("random_shift", 0),
        train_examples=d.get("train_examples", -1),
        transforms=[MakeCaption(self.text_tokenizer, d.max_len,
                                float(self.config.caption.mask_ratio),
                                self.mask_id)]))}

  def loss(self, params, batch, rng, ctx=None):
    logits = self.model.apply({"params": params}, batch["images"],
                              batch["ids"], deterministic=False,
                              rngs={"dropout": rng})
    loss, acc, count = caption_loss(
        logits, batch["targets"], batch["mask"],
        float(self.config.caption.label_smoothing))
    return loss, {"masked_accuracy": acc, "masked_tokens": count}

  # -- evaluation ----------------------------------------------------------------

  def decoder(self) -> decoding.CaptionDecoder:
    if self._decoder is None:
      tok = self.text_tokenizer
      n = self.config.caption.max_decode_len
      self._decoder = decoding.CaptionDecoder(
          self.model, eos_id=tok.eos_id, bos_id=tok.bos_id,
          mask_id=self.mask_id, pad_id=tok.pad_id, buckets=(n,))
    return self._decoder

  def serving(self):
    """Greedy captions of images (caption.max_decode_len tokens, [MASK]
    mode, the KV cache): the evaluation's decoding, one program."""
    dec = self.decoder()
    n = int(self.config.caption.max_decode_len)
    s = self.config.data.image_size

    def caption(params, images):
      tokens, _ = dec.greedy_tokens({"params": params}, images, n)
      return tokens
    return {"caption": serving.Function(
        caption, (serving.Input("images", "image", (s, s, 3)),), "tokens")}

  def serving_tokenizer(self):
    return self.text_tokenizer

  def holdout(self):
    if self._holdout is None:
      self._holdout = pipeline.holdout_arrays(self.config.data.image_size)
    return self._holdout

  def caption_images(self, params, images, beam_size: int = 0) -> list[str]:
    """Decoded captions, in fixed-size chunks (one compile per bucket)."""
    dec, tok = self.decoder(), self.text_tokenizer
    n = self.config.caption.max_decode_len
    bs = int(self.config.get("eval_batch_size", 128))
    variables = {"params": params}
    out = []
    for start in range(0, len(images), bs):
      chunk = images[start:start + bs]
      k = len(chunk)
      if k < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:],
                                                chunk.dtype)])
      if beam_size:
        tokens, _ = dec.beam_search(variables, chunk, n, beam_size=beam_size)
        tokens = tokens[:, 0]
      else:
        tokens, _ = dec.greedy(variables, chunk, n)
      out += [tok.decode(row) for row in np.asarray(tokens)[:k]]
    return out

  def evaluate(self, params, frozen=None, step=None):
    images, labels = self.holdout()
    out = {}
    texts = self.caption_images(params, images)
    out.update(caption_metrics(texts, labels, "eval/caption_"))
    beam = int(self.config.caption.beam_size)
    if beam:
      texts = self.caption_images(params, images, beam)
      out.update(caption_metrics(texts, labels, "eval/caption_beam_"))
    return out
