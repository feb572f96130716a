"""FLAVA pre-training (Singh et al. 2022, §3.2-3.3): one model, five
objectives, over image-only, text-only and paired data picked round-robin
(task `flava`, configs/flava.py).

Every step is ONE batch kind, drawn by the trainer from `train.mixture` (a
pure function of (seed, step): a resume replays the sequence), and gets
that kind's losses; the trainer compiles one step per kind:

  image  MIM on the image encoder: block-masked patches ([MASK] embedding)
         -> `mim_head` on the image tokens -> the frozen visual tokenizer's
         codes of the unmasked image, CE at the masked patches.
  text   MLM on the text encoder: BERT-masked tokens -> `mlm_head` -> the
         original ids, CE at the masked positions.
  pair   global contrastive on the UNMASKED image and text (run separately
         from the masked pass, as the paper says): the normalised
         projections of h_CLS,I and h_CLS,T, logits scaled by exp(logit
         scale), florax's contrastive loss over the whole (global) batch --
         under jit the batch is the global array, so the gradient flows
         back through the gather to every device; `flava.positives`
         'instance' (CLIP's InfoNCE, each image its own text) or 'class'
         (UniCL: texts of the same class are positives; the digits repeat
         10 classes per batch).
         The masked pass: a fraction `flava.itm_negative_rate` of the pairs
         get another pair's (masked) text, drawn within the batch (a
         random derangement from the step's rng); the masked image and that
         text run through the multimodal encoder; ITM = CE of `itm_head` on
         the multimodal pooler (h_CLS,M) against matched/unmatched
         (`flava.itm_match` 'instance': only the pair's own text matches;
         'class': a text of the same class matches); MMM = CE of
         `mmm_image_head` on the multimodal image tokens (codes) and
         `mmm_text_head` on the multimodal text tokens (ids) at the masked
         positions of the MATCHED pairs only (HF FlavaForPreTraining: a
         mismatched text says nothing about its image).

The loss of a step is the weighted sum of its kind's terms
(`flava.loss_weights`); per-kind losses, accuracies and counts are logged
as train/<kind>/... by the trainer. Heads are dense -> GELU -> LayerNorm ->
dense (BERT's prediction head, HF's FlavaMaskedPredictionHead) and the ITM
head one dense on the pooler (HF's FlavaITMHead).

Params: `flava/...` (florax.models.flava.Flava: HF FlavaModel's layout, so
an imported FLAVA loads with init_from.prefixes [["", "flava"]]) and the
heads. Unimodal-then-joint (the paper's recipe): a first run with
`train.mixture` {image, text} only trains both encoders with MIM and MLM;
the joint run starts from it with init_from.prefixes [["flava", "flava"]]
(or per encoder: ["flava/image_encoder", ...]).

Data: the embedded digits (`flava_digits`: images, their descriptions,
(image, description) pairs with the class), or your own through
`data.records` (data.name records / captions / tfds: `beit3_records`'s
per-kind pipelines over the records' images, `data.text_corpus` or the
records' texts, and the records' (image, text) pairs; bad records skipped
and counted; no class, so instance positives and matches).

Evaluation (held-out digits): zero-shot top-1 from the contrastive
embeddings (prompt-ensembled class texts), and ITM accuracy on each held-out
image paired with a description of its own digit and with one of another
digit (eval/itm_accuracy, chance 0.5). A records run has no evaluator (its
train metrics report the five objectives' accuracies).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax.data import beit3_digits
from florax.data import beit3_records
from florax.data import digits
from florax.data import flava_digits
from florax.data import pipeline
from florax.data import tokenizer as tok_lib
from florax.evaluate import mesh_map
from florax.evaluate import zeroshot
from florax.losses import contrastive
from florax.models import flava as flava_lib
from florax.models import layers, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks import beit3_mdm
from florax.tasks import vq_tokenizer
from florax.tasks.registry import register

KINDS = flava_digits.KINDS
# The loss terms of each kind.
TERMS = {"image": ("mim",), "text": ("mlm",),
         "pair": ("contrastive", "itm", "mmm_image", "mmm_text")}
POSITIVES = ("instance", "class")
# data.name: the embedded digits, or your own data through data.records
# (florax.data.beit3_records: images, a text corpus, pairs).
DATA_SOURCES = ("digits", "records", "captions", "tfds")


# -- the objectives (pure) ------------------------------------------------------

def itm_pairs(rng, labels, negative_rate: float, match: str):
  """In-batch ITM negatives: (text index of each pair (B,), matched (B,)).

  round(negative_rate * B) pairs, chosen at random, take the text of
  another pair (a random derangement of the chosen ones among all pairs:
  pair i gets text perm[i] != i); the rest keep their own. `match`
  'instance': only a pair's own text matches; 'class': a text whose label
  equals the image's also does (a same-class negative is a positive)."""
  labels = jnp.asarray(labels)
  b = labels.shape[0]
  k_sel, k_perm = jax.random.split(rng)
  n_neg = int(round(negative_rate * b))
  order = jax.random.permutation(k_sel, b)
  chosen = jnp.zeros((b,), bool).at[order[:n_neg]].set(True)
  # A shift by 1..b-1 of a random permutation is a derangement.
  perm = jax.random.permutation(k_perm, b)
  shift = 1 + jax.random.randint(k_perm, (), 0, max(b - 1, 1))
  other = jnp.zeros((b,), jnp.int32).at[perm].set(perm[(jnp.arange(b) + shift)
                                                       % b])
  text_index = jnp.where(chosen, other, jnp.arange(b))
  if match == "class":
    matched = labels[text_index] == labels
  else:
    matched = text_index == jnp.arange(b)
  return text_index, matched


def itm_loss(logits, matched):
  """(mean CE over {unmatched, matched}, accuracy)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  target = matched.astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, target[:, None], -1)[:, 0]
  hit = jnp.argmax(logits, -1) == target
  return jnp.mean(nll), jnp.mean(hit.astype(jnp.float32))


def contrastive_loss(image_emb, text_emb, labels, scale, positives: str):
  """florax's contrastive loss (the sum of both directions; (loss,
  metrics)): 'instance' = CLIP's InfoNCE, 'class' = UniCL over `labels`."""
  if positives == "instance":
    labels = jnp.arange(image_emb.shape[0])
  return contrastive.unicl_loss(image_emb, text_emb, labels, scale)


# -- the model ------------------------------------------------------------------

class MaskedHead(nn.Module):
  """dense -> GELU -> LayerNorm -> dense(out): BERT's prediction head."""
  out: int
  norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(x.shape[-1], ("embed", "mlp"), dtype=self.dtype,
                     name="transform")(x)
    x = jax.nn.gelu(x, approximate=False)
    x = layers.layer_norm(name="norm", epsilon=self.norm_eps)(x)
    return layers.dense(self.out, ("embed", "vocab"), dtype=self.dtype,
                        name="decoder")(x).astype(jnp.float32)


class FlavaPretraining(nn.Module):
  """Flava + the five objectives' heads (module docstring)."""
  config: flava_lib.FlavaConfig
  num_codes: int
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.flava = flava_lib.Flava(cfg, self.dtype)
    vocab = cfg.text.vocab_size
    self.mim_head = MaskedHead(self.num_codes, cfg.image.norm_eps, self.dtype)
    self.mlm_head = MaskedHead(vocab, cfg.text.norm_eps, self.dtype)
    self.mmm_image_head = MaskedHead(self.num_codes,
                                     cfg.multimodal.norm_eps, self.dtype)
    self.mmm_text_head = MaskedHead(vocab, cfg.multimodal.norm_eps,
                                    self.dtype)
    self.itm_head = layers.dense(2, ("embed", "classes"), dtype=self.dtype)

  def mim(self, images, mask, deterministic=True):
    tokens, _ = self.flava.encode_image(images, mask, deterministic)
    return self.mim_head(tokens[:, 1:])  # the patches, not [CLS_I]

  def mlm(self, ids, valid, deterministic=True):
    tokens, _ = self.flava.encode_text(ids, valid,
                                       deterministic=deterministic)
    return self.mlm_head(tokens)

  def embeddings(self, images, ids, valid, deterministic=True):
    """Unmasked contrastive embeddings and the scale."""
    return (self.flava.image_embedding(images, deterministic),
            self.flava.text_embedding(ids, valid,
                                      deterministic=deterministic),
            self.flava.logit_scale())

  def image_embedding(self, images):
    return self.flava.image_embedding(images)

  def text_embedding(self, ids, valid):
    return self.flava.text_embedding(ids, valid)

  def multimodal(self, images, image_mask, ids, valid, deterministic=True):
    """(ITM logits (B, 2), MMM image logits (B, N, codes), MMM text logits
    (B, L, vocab)) of the (masked) pairs."""
    image, ai = self.flava.encode_image(images, image_mask, deterministic)
    _, at = self.flava.encode_text(ids, valid, deterministic=deterministic)
    tokens, am = self.flava.multimodal(ai["pre_norm_tokens"],
                                       at["pre_norm_tokens"], valid,
                                       deterministic)
    n_image = image.shape[1]  # [CLS_I] + patches
    # [CLS_M], [CLS_I], patches, text tokens
    return (self.itm_head(am["pooled"]).astype(jnp.float32),
            self.mmm_image_head(tokens[:, 2:1 + n_image]),
            self.mmm_text_head(tokens[:, 1 + n_image:]))

  def init_all(self, images, mask, ids, valid):
    """Creates every param."""
    return (self.mim(images, mask), self.mlm(ids, valid),
            self.embeddings(images, ids, valid),
            self.multimodal(images, mask, ids, valid))


# -- the task -------------------------------------------------------------------

@register("flava")
class FlavaTask(vq_tokenizer.VisualTokenizerMixin, base.Task):
  example_unit = "examples"
  # The pair kind's contrastive loss couples the batch.
  supports_grad_accumulation = False

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._vq = None
    self._tok = None
    self._maps = {}
    self._holdout = None

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg, d, f = self.config, self.config.data, self.config.flava
    if d.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {d.name!r}; data.name is one of "
                       f"{DATA_SOURCES}")
    fc = self.flava_config
    flava_lib.validate(fc, d.image_size)
    if cfg.model.dtype not in two_tower.DTYPES:
      raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    if not common.is_int(d.max_len) or not 3 <= d.max_len <= (
        fc.text.max_len):
      raise ValueError(f"data.max_len must be an integer in [3, model.flava."
                       f"text.max_len={fc.text.max_len}], got {d.max_len!r}")
    sizes = d.batch_sizes
    if set(sizes) != set(KINDS):
      raise ValueError(f"data.batch_sizes must name {list(KINDS)}, got "
                       f"{sorted(sizes)}")
    for k in KINDS:
      if not common.is_int(sizes[k]) or sizes[k] < 2:
        raise ValueError(f"data.batch_sizes.{k} must be an integer >= 2, got "
                         f"{sizes[k]!r}")
    w = f.loss_weights
    terms = [t for k in KINDS for t in TERMS[k]]
    if set(w) != set(terms):
      raise ValueError(f"flava.loss_weights must name {terms}, got "
                       f"{sorted(w)}")
    for t in terms:
      if not w[t] >= 0:
        raise ValueError(f"flava.loss_weights.{t} must be >= 0, got {w[t]!r}")
    if f.positives not in POSITIVES:
      raise ValueError(f"flava.positives must be one of {POSITIVES}, got "
                       f"{f.positives!r}")
    if f.itm_match not in POSITIVES:
      raise ValueError(f"flava.itm_match must be one of {POSITIVES}, got "
                       f"{f.itm_match!r}")
    if not 0 < f.itm_negative_rate < 1:
      raise ValueError(f"flava.itm_negative_rate must be in (0, 1), got "
                       f"{f.itm_negative_rate!r}")
    for name in ("mlm_rate", "mim_ratio", "mmm_text_rate"):
      if not 0 < f[name] < 1:
        raise ValueError(f"flava.{name} must be in (0, 1), got {f[name]!r}")
    if cfg.get("evals"):
      raise ValueError("flava evaluates on the held-out digits itself "
                       "(config.evals must be empty)")
    if d.name != "digits":
      beit3_records.validate(d)
      if "class" in (f.positives, f.itm_match):
        raise ValueError(
            f"data.name={d.name!r}: records carry no class of a pair, so "
            "flava.positives and flava.itm_match must be 'instance' (each "
            "image's own text)")
    tok = self.text_tokenizer
    if self.mask_id >= fc.text.vocab_size:
      raise ValueError(
          f"the text tokenizer has {tok.vocab_size} pieces and [MASK] id "
          f"{self.mask_id}, but model.flava.text.vocab_size is "
          f"{fc.text.vocab_size}; set it to at least {self.mask_id + 1}")
    self.check_visual_grid(fc.image.grid, "the image encoder")

  # -- pieces ---------------------------------------------------------------

  @property
  def flava_config(self) -> flava_lib.FlavaConfig:
    return flava_lib.from_dict(self.config.model.flava.to_dict())

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def text_tokenizer(self) -> tok_lib.TextTokenizer:
    """data.text_tokenizer_path, else init_from.path's tokenizer.model (a
    unimodal run's: ids keep their meaning), else a SentencePiece of the
    digits' descriptions cached in the workdir (beit3_common's rule)."""
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  @property
  def mask_id(self) -> int:
    return common.mask_id_of(self.text_tokenizer)

  @property
  def model(self) -> FlavaPretraining:
    return FlavaPretraining(self.flava_config,
                            self.visual_tokenizer.num_codes, self.dtype)

  def mask_settings(self) -> beit3_digits.MaskSettings:
    f, tok = self.config.flava, self.text_tokenizer
    return beit3_digits.MaskSettings(
        grid=self.flava_config.image.grid,
        vocab_size=tok.vocab_size, mask_id=self.mask_id,
        special_ids=tok.special_ids,
        mlm_rate=f.mlm_rate, mim_ratio=f.mim_ratio, min_block=f.min_block,
        mvlm_text_rate=f.mmm_text_rate, mvlm_mode="joint")

  def _valid(self, ids):
    return ids != self.text_tokenizer.pad_id

  # -- batches ----------------------------------------------------------------

  def batch_kinds(self):
    d = self.config.data
    s, length = d.image_size, d.max_len
    n = self.flava_config.image.grid ** 2

    def spec(b, *shape, dtype=jnp.int32):
      return jax.ShapeDtypeStruct((b,) + shape, dtype)

    def image(b):
      return {"images": spec(b, s, s, 3, dtype=jnp.float32),
              "image_mask": spec(b, n, dtype=jnp.bool_)}

    def text(b):
      return {"ids": spec(b, length), "targets": spec(b, length),
              "mlm_mask": spec(b, length, dtype=jnp.bool_)}

    b = d.batch_sizes
    pair = {**image(b.pair), **text(b.pair)}
    if d.name == "digits":  # the class (class-level positives / matches)
      pair["label"] = spec(b.pair)
    return {"image": image(b.image), "text": text(b.text), "pair": pair}

  def init(self, rng):
    d = self.config.data
    s, n = d.image_size, self.flava_config.image.grid ** 2
    ids = jnp.zeros((1, d.max_len), jnp.int32)
    return self.model.init(
        {"params": rng}, jnp.zeros((1, s, s, 3)), jnp.zeros((1, n), bool),
        ids, jnp.ones((1, d.max_len), bool),
        method=FlavaPretraining.init_all)["params"]

  def train_iterators(self, process_index, process_count):
    d = self.config.data
    common.record_tokenizer(self)  # a resume with another is refused
    kinds = [k for k, w in self.kind_weights().items() if w > 0]
    if d.name != "digits":
      return {k: beit3_records.part_dataset(
          k, records=beit3_records.with_source(d),
          text_corpus=d.get("text_corpus", ""),
          tokenizer=self.text_tokenizer, settings=self.mask_settings(),
          image_size=d.image_size, max_len=d.max_len,
          batch_size=d.batch_sizes[k] // process_count, rows=None,
          seed=self.config.seed, process_index=process_index,
          process_count=process_count) for k in kinds}
    return {k: iter(flava_digits.kind_dataset(
        k, tokenizer=self.text_tokenizer, settings=self.mask_settings(),
        image_size=d.image_size, max_len=d.max_len,
        batch_size=d.batch_sizes[k] // process_count, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        random_shift=d.random_shift, train_examples=d.train_examples))
            for k in kinds}

  # -- objective --------------------------------------------------------------

  def loss(self, params, batch, rng, ctx):
    model, f = self.model, self.config.flava
    w = dict(f.loss_weights)
    k_drop, k_itm = jax.random.split(rng)

    def apply(*args, method):
      return model.apply({"params": params}, *args, deterministic=False,
                         rngs={"dropout": k_drop}, method=method)
    terms = {}
    if ctx.kind == "image":
      logits = apply(batch["images"], batch["image_mask"],
                     method=FlavaPretraining.mim)
      codes = self.visual_codes(ctx.frozen, batch["images"])
      terms["mim"] = beit3_mdm.masked_cross_entropy(logits, codes,
                                                    batch["image_mask"])
    elif ctx.kind == "text":
      logits = apply(batch["ids"], self._valid(batch["ids"]),
                     method=FlavaPretraining.mlm)
      terms["mlm"] = beit3_mdm.masked_cross_entropy(
          logits, batch["targets"], batch["mlm_mask"])
    else:
      terms.update(self._pair_terms(apply, batch, ctx.frozen, k_itm))
    total, metrics = 0.0, {}
    for name, value in terms.items():
      loss, acc = value[0], value[1]
      total = total + w[name] * loss
      metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = loss, acc
      if len(value) > 2:
        metrics[f"{name}_masked"] = value[2]
    return total, metrics

  def _pair_terms(self, apply, batch, frozen, rng):
    f = self.config.flava
    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # indexed by tracers
    images, clean = batch["images"], batch["targets"]
    # Records pairs have no class: instance positives (validate()).
    labels = batch.get("label", jnp.arange(images.shape[0]))
    image_emb, text_emb, scale = apply(images, clean, self._valid(clean),
                                       method=FlavaPretraining.embeddings)
    loss, m = contrastive_loss(image_emb, text_emb, labels, scale,
                               f.positives)
    # i2t_acc: the in-batch image->text argmax is a positive.
    terms = {"contrastive": (loss, m["i2t_acc"])}
    text_index, matched = itm_pairs(rng, labels, f.itm_negative_rate,
                                    f.itm_match)
    ids = batch["ids"][text_index]
    itm_logits, mmm_image, mmm_text = apply(
        images, batch["image_mask"], ids, self._valid(ids),
        method=FlavaPretraining.multimodal)
    terms["itm"] = itm_loss(itm_logits, matched)
    codes = self.visual_codes(frozen, images)
    pos = matched[:, None]
    terms["mmm_image"] = beit3_mdm.masked_cross_entropy(
        mmm_image, codes, batch["image_mask"] & pos)
    terms["mmm_text"] = beit3_mdm.masked_cross_entropy(
        mmm_text, clean[text_index], batch["mlm_mask"][text_index] & pos)
    return terms

  # -- evaluation -------------------------------------------------------------

  def _map(self, name, fn):
    if name not in self._maps:
      self._maps[name] = mesh_map.MeshMap(
          fn, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps[name]

  def encode_images(self, params, images) -> np.ndarray:
    model = self.model
    return self._map("image", lambda p, x: model.apply(
        {"params": p}, x, method=FlavaPretraining.image_embedding))(
            params, images)

  def encode_texts(self, params, ids) -> np.ndarray:
    model = self.model
    return self._map("text", lambda p, x: model.apply(
        {"params": p}, x, self._valid(x),
        method=FlavaPretraining.text_embedding))(params, ids)

  def itm_logits(self, params, images, ids) -> np.ndarray:
    """ITM logits of unmasked (image, text) pairs, fed over the mesh."""
    model, n = self.model, self.flava_config.image.grid ** 2
    return self._map("itm", lambda p, b: model.apply(
        {"params": p}, b["images"], jnp.zeros((b["images"].shape[0], n), bool),
        b["ids"], self._valid(b["ids"]),
        method=FlavaPretraining.multimodal)[0])(
            params, {"images": images, "ids": ids})

  def holdout(self):
    """(images, labels, own-class ids, other-class ids): image i's own
    description (template i mod T) and one of digit (label + 1 + i mod 9)
    mod 10."""
    if self._holdout is None:
      d = self.config.data
      images, labels = pipeline.holdout_arrays(d.image_size)
      own, other = digits.matched_descriptions(labels)
      tok = self.text_tokenizer
      self._holdout = (images, labels, tok.encode_batch(own, d.max_len),
                       tok.encode_batch(other, d.max_len))
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    if self.config.data.name != "digits":
      # The digits' class texts mean nothing to a records run's tokenizer
      # and normalisation; its train metrics report the five objectives.
      return {}
    images, labels, own, other = self.holdout()
    tok, d = self.text_tokenizer, self.config.data
    templates = [x.replace("{word}", "{}") for x in digits.TEMPLATES
                 if "{word}" in x]
    class_emb = zeroshot.class_embeddings(
        lambda texts: self.encode_texts(params, tok.encode_batch(
            list(texts), d.max_len)), list(digits.CLASS_WORDS), templates)
    image_emb = self.encode_images(params, images)
    top1 = float(np.mean(np.argmax(image_emb @ class_emb.T, -1) == labels))
    pos = self.itm_logits(params, images, own)
    neg = self.itm_logits(params, images, other)
    # Pessimistic ties: an exact tie is a miss.
    itm = np.concatenate([pos[:, 1] > pos[:, 0], neg[:, 0] > neg[:, 1]])
    return {"eval/zeroshot_top1": top1,
            "eval/itm_accuracy": float(itm.mean())}

  def step_flops(self, kind, global_batch):
    """Analytic FLOPs of one step of batch kind `kind` over the global batch
    (florax.models.flops; Task.step_flops's contract).

    Per kind, not per example: each step is one kind (the trainer compiles
    one program per kind and asks for each kind's count, so a mixture's
    TFLOP/s and MFU sum the drawn kinds' counts step by step), and the
    pair kind's cost is not linear in the batch (its B x B contrastive
    logits), hence this override and no `flops_per_example` (None).

    Trained, forward + backward (3x; the patch conv on pixels 2x), per
    example (`flops.flava_pretraining_forward`): image = the image encoder
    + MIM head; text = the text encoder + MLM head (data.max_len tokens);
    pair = both encoders unmasked + the contrastive projections, both
    encoders again on the masked inputs + the multimodal pass + pooler,
    ITM and MMM heads; plus, for a pair step, the (B, B) logits of the
    whole global batch (`flops.contrastive_logits`). Frozen, forward only:
    the visual tokenizer's codes of every image of an image or pair step
    (a VQ-KD run: `flops.vq_codes_forward`; the DALL-E codebook:
    `flops.flava_codebook_forward`) and the resize of the pixels to its
    resolution when it differs. None for an unknown kind or another
    tokenizer (a test's stand-in): its cost is unknown.
    """
    from florax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
    from florax.models import vqkd as vqkd_lib  # pylint: disable=g-import-not-at-top
    from florax.models import flava_codebook  # pylint: disable=g-import-not-at-top
    vq = self.visual_tokenizer
    vq_cfg = getattr(vq, "model_config", None)
    if isinstance(vq_cfg, vqkd_lib.VQKDConfig):
      codes = flops_lib.vq_codes_forward(vq_cfg)
    elif isinstance(vq_cfg, flava_codebook.CodebookConfig):
      codes = flops_lib.flava_codebook_forward(vq_cfg)
    else:
      codes = None
    if kind not in KINDS or codes is None:
      return None
    fc, d = self.flava_config, self.config.data
    trained = global_batch * flops_lib.flava_pretraining_forward(
        fc, kind, d.max_len, vq.num_codes)
    if kind == "pair":
      trained += flops_lib.Forward(flops_lib.contrastive_logits(
          global_batch, fc.embed_dim))
    frozen = 0.0
    if kind in ("image", "pair"):  # one tokenizer call on the clean images
      frozen = global_batch * (
          codes + flops_lib.resize_flops(d.image_size, vq.image_size))
    return trained.train() + frozen

  def serving(self):
    """What an export serves: the contrastive unit embeddings
    (`encode_image`, `encode_text`: zero-shot retrieval and classification
    through florax.inference's `similarity`) and `match` (ITM on the
    multimodal pooler: does the text describe the image? no / yes), each
    the evaluator's own computation."""
    from florax import serving  # pylint: disable=g-import-not-at-top
    model, d = self.model, self.config.data
    n = self.flava_config.image.grid ** 2
    image = serving.Input("images", "image", (d.image_size, d.image_size, 3))
    text = serving.Input("text", "text", (d.max_len,), "int32")

    def encode_image(params, images):
      return model.apply({"params": params}, images,
                         method=FlavaPretraining.image_embedding)

    def encode_text(params, ids):
      return model.apply({"params": params}, ids, self._valid(ids),
                         method=FlavaPretraining.text_embedding)

    def match(params, images, ids):
      return model.apply(
          {"params": params}, images,
          jnp.zeros((images.shape[0], n), bool), ids, self._valid(ids),
          method=FlavaPretraining.multimodal)[0]
    return {"encode_image": serving.Function(encode_image, (image,),
                                             "embedding"),
            "encode_text": serving.Function(encode_text, (text,),
                                            "embedding"),
            "match": serving.Function(match, (image, text), "labels",
                                      ("no", "yes"))}

  def serving_tokenizer(self):
    return self.text_tokenizer

  def preprocess_spec(self) -> dict:
    """The images' normalisation (what the frozen tokenizer un-does): the
    digits' [-1, 1], or the records' mean/std."""
    from florax.data import preprocess  # pylint: disable=g-import-not-at-top
    d = self.config.data
    if d.name == "digits":
      return preprocess.resize_spec(d.image_size)
    return beit3_records.preprocess_spec(d)
