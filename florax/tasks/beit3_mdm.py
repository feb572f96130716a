"""BEiT-3 masked data modeling (Wang et al. 2022, "Image as a Foreign
Language", §2.2): one mask-then-predict objective on images, texts and
image-text pairs, with a shared Multiway Transformer.

  MLM   text-only data: 15% of the tokens BERT-masked (80% [MASK], 10%
        random, 10% kept); predict the original tokens.
  MIM   image-only data: 40% of the patches block-masked (BEiT); predict
        the frozen visual tokenizer's (VQ-KD) codes of the masked patches.
  MVLM  pairs: 50% of the text tokens masked as in MLM, the image masked as
        in MIM; the paper's *separate* masking (Table 8b) masks one
        modality per pair, *joint* (an option) both; predict both kinds of
        masked token from the fused image+text sequence.

Every step holds all three (`florax.data.beit3_digits`: a FixedComposition
of three pipelines, 2048 + 2048 + 2048 in the paper), which the Multiway
model runs as three calls (image-only, text-only, pair): its experts are
routed by a static split, i.e. by the call's input kind. The loss is

  w_mlm CE_mlm + w_mim CE_mim + w_mvlm_text CE_mvlm_text
    + w_mvlm_image CE_mvlm_image,

each CE the mean over that part's masked tokens (`mdm_losses`; visible
tokens get exactly zero gradient). Heads: `mlm_head` (width -> text vocab,
not tied to the word embedding) on the text tokens and `mim_head` (width ->
the tokenizer's codes) on the image patch tokens, shared by the mono- and
multimodal parts. The targets of MIM and MVLM's image are computed inside
the step from the (unmasked) images by the frozen tokenizer, whose params
are the task's frozen variables (never trained, never checkpointed, their
source recorded in the workdir).

Everything configurable (composition, mask ratios, MVLM mode, loss
weights) reaches the trainer as data: one batch kind, one compiled step.

Params: `multiway/...` (the backbone, as florax.models.multiway names it),
`mlm_head/...`, `mim_head/...`; fine-tuning takes the backbone with
init_from.prefixes [["multiway", ...]].
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from florax.data import beit3_digits
from florax.data import beit3_records
from florax.data import preprocess
from florax.data import tokenizer as tok_lib
from florax.models import flops as flops_lib
from florax.models import layers, multiway, two_tower
from florax.models import vqkd as vqkd_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks import vq_tokenizer
from florax.tasks.registry import register

# digits: the embedded demo (florax.data.beit3_digits); the others read
# data.records (florax.data.beit3_records; data.text_corpus for the texts).
DATA_SOURCES = ("digits", "records", "captions", "tfds")
PARTS = ("mlm", "mim", "mvlm_text", "mvlm_image")


# -- the objective (pure) -------------------------------------------------------

def masked_cross_entropy(logits, targets, mask):
  """(mean CE over masked positions, accuracy there, masked count).

  Args:
    logits: (..., K) float.
    targets: (...) int in [0, K).
    mask: (...) bool: the positions that are predicted.

  Unmasked positions contribute nothing and get exactly zero gradient (a
  `where`, not a multiplication: a NaN/inf there cannot leak in).
  """
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]
  count = jnp.sum(mask.astype(jnp.float32))
  denom = jnp.maximum(count, 1.0)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / denom
  hit = jnp.argmax(logits, axis=-1) == targets
  accuracy = jnp.sum(jnp.where(mask, hit, False).astype(jnp.float32)) / denom
  return loss, accuracy, count


def mdm_losses(parts: Mapping[str, tuple], weights: Mapping[str, float]):
  """BEiT-3's loss from {part: (logits, targets, mask)}.

  Returns:
    (sum_p weights[p] * CE_p, metrics {p_loss, p_accuracy, p_masked}).
  """
  total, metrics = 0.0, {}
  for name, (logits, targets, mask) in parts.items():
    loss, acc, count = masked_cross_entropy(logits, targets, mask)
    total = total + weights[name] * loss
    metrics.update({f"{name}_loss": loss, f"{name}_accuracy": acc,
                    f"{name}_masked": count})
  return total, metrics


# -- the model ------------------------------------------------------------------

class MDMModel(nn.Module):
  """Multiway backbone + MLM head on text tokens + MIM head on patches."""
  config: multiway.MultiwayConfig
  num_codes: int
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.multiway = multiway.Multiway(cfg, self.dtype)
    self.mlm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"),
                                 dtype=self.dtype)
    self.mim_head = layers.dense(self.num_codes, ("embed", "vocab"),
                                 dtype=self.dtype)

  def __call__(self, images=None, image_mask=None, text=None,
               deterministic: bool = True):
    """{'image_logits': (B, patches, codes), 'text_logits': (B, L, vocab)}
    for the modalities given (one Multiway call: image-only, text-only or
    a fused pair)."""
    tokens, _ = self.multiway(images=images, text=text, image_mask=image_mask,
                              deterministic=deterministic)
    out = {}
    split = self.config.num_image_tokens if images is not None else 0
    if images is not None:
      out["image_logits"] = self.mim_head(tokens[:, 1:split]).astype(
          jnp.float32)  # the patches, not [cls]
    if text is not None:
      out["text_logits"] = self.mlm_head(tokens[:, split:]).astype(
          jnp.float32)
    return out


# -- the task -------------------------------------------------------------------

@register("beit3_mdm")
class BEiT3MDMTask(vq_tokenizer.VisualTokenizerMixin, base.Task):
  # One row of a global batch: composition / rows images, texts and pairs
  # (one of each with the paper's equal composition).
  example_unit = "rows"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._vq = None
    self._text_tok = None

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg = self.config
    d = cfg.data
    if d.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {d.name!r}; data.name is one of "
                       f"{DATA_SOURCES}")
    mw = self.backbone
    multiway.validate(mw)
    if cfg.model.dtype not in two_tower.DTYPES:
      raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    if d.image_size != mw.image_size:
      raise ValueError(f"data.image_size {d.image_size} differs from "
                       f"model.multiway.image_size {mw.image_size}")
    if not common.is_int(d.max_len) or not 3 <= d.max_len <= mw.max_text_len:
      raise ValueError(f"data.max_len must be an integer in [3, model."
                       f"multiway.max_text_len={mw.max_text_len}], got "
                       f"{d.max_len!r}")
    self._validate_composition()
    self._validate_masking()
    w = cfg.mdm.loss_weights
    if set(w) != set(PARTS):
      raise ValueError(f"mdm.loss_weights must name {list(PARTS)}, got "
                       f"{sorted(w)}")
    for k in PARTS:
      if not w[k] >= 0:
        raise ValueError(f"mdm.loss_weights.{k} must be >= 0, got {w[k]!r}")
    if not sum(w[k] for k in PARTS) > 0:
      raise ValueError("mdm.loss_weights are all 0: nothing to train")
    if cfg.get("evals"):
      raise ValueError("beit3_mdm has no evaluators (config.evals must be "
                       "empty): its train metrics report masked accuracy")
    if d.name != "digits":
      beit3_records.validate(d)
    self._validate_text_tokenizer()
    self._validate_visual_tokenizer()

  def _validate_composition(self):
    cfg = self.config
    comp = cfg.data.composition
    if set(comp) != set(beit3_digits.PARTS):
      raise ValueError(f"data.composition must name {list(beit3_digits.PARTS)}"
                       f", got {sorted(comp)}")
    for p in beit3_digits.PARTS:
      if not common.is_int(comp[p]) or comp[p] < 1:
        raise ValueError(f"data.composition.{p} must be a positive integer, "
                         f"got {comp[p]!r}")
    total = sum(comp[p] for p in beit3_digits.PARTS)
    if cfg.train.batch_size != total:
      raise ValueError(
          f"train.batch_size {cfg.train.batch_size} must be the step's "
          f"examples, data.composition's image + text + pair = {total}")
    rows = beit3_digits.rows_per_step(comp)
    shards = sharding_lib.batch_size_divisor(self.mesh, self.rules)
    need = shards * cfg.train.get("grad_accum_steps", 1)
    if rows % need or rows % jax.process_count():
      raise ValueError(
          f"data.composition {dict(comp)}: each part is split over the "
          f"{shards} data-parallel shards (x train.grad_accum_steps) and "
          f"{jax.process_count()} processes, so their common divisor {rows} "
          f"must be divisible by {need} and by {jax.process_count()}")

  def records_config(self) -> ml_collections.ConfigDict:
    """`data.records` with the task-owned fields (source) filled in."""
    return beit3_records.with_source(self.config.data)

  def _validate_masking(self):
    m = self.config.mdm
    for name in ("mlm_rate", "mim_ratio", "mvlm_text_rate"):
      if not 0 < m[name] < 1:
        raise ValueError(f"mdm.{name} must be in (0, 1), got {m[name]!r}")
    for name in ("mask_prob", "random_prob"):
      if not 0 <= m[name] <= 1:
        raise ValueError(f"mdm.{name} must be in [0, 1], got {m[name]!r}")
    if m.mask_prob + m.random_prob > 1:
      raise ValueError(f"mdm.mask_prob + mdm.random_prob = "
                       f"{m.mask_prob + m.random_prob} exceeds 1")
    if m.mvlm_mode not in beit3_digits.MVLM_MODES:
      raise ValueError(f"mdm.mvlm_mode must be one of "
                       f"{beit3_digits.MVLM_MODES}, got {m.mvlm_mode!r}")
    if not 0 < m.mvlm_text_prob < 1:
      raise ValueError(f"mdm.mvlm_text_prob must be in (0, 1), got "
                       f"{m.mvlm_text_prob!r}")
    if not common.is_int(m.min_block) or m.min_block < 1:
      raise ValueError(f"mdm.min_block must be a positive integer, got "
                       f"{m.min_block!r}")
    g = self.backbone.grid
    if math.floor(m.mim_ratio * g * g) < 1:
      raise ValueError(f"mdm.mim_ratio {m.mim_ratio} masks less than one "
                       f"patch of the {g}x{g} grid")

  def _validate_text_tokenizer(self):
    mw, tok = self.backbone, self.text_tokenizer
    if self.mask_id >= mw.vocab_size:
      raise ValueError(
          f"the text tokenizer has {tok.vocab_size} pieces and [MASK] id "
          f"{self.mask_id}, but model.multiway.vocab_size is "
          f"{mw.vocab_size}; set it to at least {self.mask_id + 1}")
    if mw.pad_id is not None and mw.pad_id != tok.pad_id:
      raise ValueError(f"the {tok.kind} text tokenizer pads with id "
                       f"{tok.pad_id}, model.multiway.pad_id is {mw.pad_id}")

  def _validate_visual_tokenizer(self):
    self.check_visual_grid(self.backbone.grid, "the model (model.multiway."
                           "image_size / patch_size)")

  # -- pieces ---------------------------------------------------------------

  @property
  def backbone(self) -> multiway.MultiwayConfig:
    fields = dict(self.config.model.multiway)
    return multiway.MultiwayConfig(**fields)

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def text_tokenizer(self) -> tok_lib.TextTokenizer:
    """data.text_tokenizer_path (BEiT-3's SentencePiece 64k, beit3.spm with
    data.text_tokenizer_kind='sentencepiece_fairseq', or a florax
    tokenizer.model), else a SentencePiece trained on the digits
    descriptions, cached in the workdir (beit3_common.load_text_tokenizer)."""
    if self._text_tok is None:
      self._text_tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._text_tok

  @property
  def mask_id(self) -> int:
    """[MASK]: the tokenizer's own (BEiT-3's <mask>), else one id past its
    vocabulary (an extra embedding row)."""
    return common.mask_id_of(self.text_tokenizer)

  @property
  def model(self) -> MDMModel:
    return MDMModel(self.backbone, self.visual_tokenizer.num_codes,
                    self.dtype)

  def mask_settings(self) -> beit3_digits.MaskSettings:
    m, tok = self.config.mdm, self.text_tokenizer
    return beit3_digits.MaskSettings(
        grid=self.backbone.grid,
        # random replacements: real pieces only (not [MASK])
        vocab_size=tok.vocab_size, mask_id=self.mask_id,
        special_ids=tok.special_ids,
        mlm_rate=m.mlm_rate, mask_prob=m.mask_prob,
        random_prob=m.random_prob, mim_ratio=m.mim_ratio,
        min_block=m.min_block, mvlm_text_rate=m.mvlm_text_rate,
        mvlm_mode=m.mvlm_mode, mvlm_text_prob=m.mvlm_text_prob)

  def chance_levels(self) -> dict[str, float]:
    """Accuracy of a uniform guess: 1 / classes of each head."""
    return {"mlm": 1.0 / self.backbone.vocab_size,
            "mim": 1.0 / self.visual_tokenizer.num_codes}

  # -- batches ----------------------------------------------------------------

  def batch_kinds(self):
    return {base.DEFAULT_KIND: self.batch_spec(None)}

  def batch_spec(self, global_batch_size=None):
    """{'image', 'text', 'pair'}, each part's n examples laid out as
    (rows, n // rows, ...) (`beit3_digits.group_rows`)."""
    comp = self.config.data.composition
    rows = beit3_digits.rows_per_step(comp)
    s, length = self.config.data.image_size, self.config.data.max_len
    n = self.backbone.grid ** 2

    def spec(k, *shape, dtype=jnp.int32):
      return jax.ShapeDtypeStruct((rows, k) + shape, dtype)

    def image(k):
      return {"images": spec(k, s, s, 3, dtype=jnp.float32),
              "image_mask": spec(k, n, dtype=jnp.bool_)}

    def text(k):
      return {"ids": spec(k, length), "targets": spec(k, length),
              "mlm_mask": spec(k, length, dtype=jnp.bool_)}

    k = {p: comp[p] // rows for p in beit3_digits.PARTS}
    return {"image": image(k["image"]), "text": text(k["text"]),
            "pair": {**image(k["pair"]), **text(k["pair"])}}

  def init(self, rng):
    s, length = self.config.data.image_size, self.config.data.max_len
    n = self.backbone.grid ** 2
    # A pair creates every param: all experts, both embeddings and heads.
    return self.model.init(
        {"params": rng}, jnp.zeros((1, s, s, 3), jnp.float32),
        jnp.zeros((1, n), bool), jnp.zeros((1, length), jnp.int32))["params"]

  # -- frozen visual tokenizer -------------------------------------------------

  # -- data -------------------------------------------------------------------

  def train_iterators(self, process_index, process_count):
    common.record_tokenizer(self)  # a resume with another is refused
    if process_index == 0:
      c = self.chance_levels()
      print(f"florax: BEiT-3 MDM, chance accuracy: MLM/MVLM-text "
            f"{c['mlm']:.4f} (1/{self.backbone.vocab_size} text ids), "
            f"MIM/MVLM-image {c['mim']:.4f} (1/"
            f"{self.visual_tokenizer.num_codes} visual codes)", flush=True)
    return {base.DEFAULT_KIND: self.train_iterator(process_index,
                                                   process_count)}

  def preprocess_spec(self) -> dict:
    """The images' normalisation (what the frozen tokenizer un-does): the
    digits' [-1, 1], or the records' mean/std."""
    d = self.config.data
    if d.name == "digits":
      return preprocess.resize_spec(d.image_size)
    return beit3_records.preprocess_spec(d)

  def train_iterator(self, process_index=0, process_count=1):
    d = self.config.data
    if d.name != "digits":
      return beit3_records.mdm_iterator(
          records=self.records_config(), text_corpus=d.get("text_corpus", ""),
          tokenizer=self.text_tokenizer, settings=self.mask_settings(),
          composition=dict(d.composition), image_size=d.image_size,
          max_len=d.max_len, seed=self.config.seed,
          process_index=process_index, process_count=process_count)
    return beit3_digits.mdm_iterator(
        tokenizer=self.text_tokenizer, settings=self.mask_settings(),
        composition=dict(d.composition), image_size=d.image_size,
        max_len=d.max_len, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        random_shift=d.random_shift, train_examples=d.train_examples)

  # -- objective --------------------------------------------------------------

  def forward(self, params, batch, rng=None):
    """The three Multiway calls: {'image', 'text', 'pair'} -> their logits
    (batch parts already ungrouped)."""
    model = self.model
    train = rng is not None
    keys = jax.random.split(rng, 3) if train else [None] * 3

    def apply(key, **inputs):
      return model.apply({"params": params}, **inputs,
                         deterministic=not train,
                         rngs={"dropout": key} if train else {})
    img, txt, pair = batch["image"], batch["text"], batch["pair"]
    return {
        "image": apply(keys[0], images=img["images"],
                       image_mask=img["image_mask"]),
        "text": apply(keys[1], text=txt["ids"]),
        "pair": apply(keys[2], images=pair["images"],
                      image_mask=pair["image_mask"], text=pair["ids"]),
    }

  def loss(self, params, batch, rng, ctx):
    batch = {p: beit3_digits.ungroup_rows(batch[p]) for p in batch}
    img, txt, pair = batch["image"], batch["text"], batch["pair"]
    n = img["images"].shape[0]
    # One tokenizer call for both image parts (unmasked images).
    codes = self.visual_codes(ctx.frozen, jnp.concatenate(
        [img["images"], pair["images"]], axis=0))
    out = self.forward(params, batch, rng)
    parts = {
        "mlm": (out["text"]["text_logits"], txt["targets"], txt["mlm_mask"]),
        "mim": (out["image"]["image_logits"], codes[:n], img["image_mask"]),
        "mvlm_text": (out["pair"]["text_logits"], pair["targets"],
                      pair["mlm_mask"]),
        "mvlm_image": (out["pair"]["image_logits"], codes[n:],
                       pair["image_mask"]),
    }
    return mdm_losses(parts, dict(self.config.mdm.loss_weights))

  # -- cost -------------------------------------------------------------------

  def flops_per_example(self):
    """Analytic training FLOPs per row of the global batch (florax.models.
    flops; a row holds composition / rows images, texts and pairs, and the
    trainer's global batch counts rows, so the step is linear in it).

    Trained, forward + backward (3x; the patch conv on pixels 2x): the
    Multiway over each image (cls + patches), each text (data.max_len
    tokens) and each pair (both), every token through one expert (v, l or,
    in a pair's top layers, vl: dense FLOPs); the MIM head (width ->
    codes) on every patch token of images and pairs and the MLM head
    (width -> vocab) on every text token of texts and pairs: the heads
    run on all tokens, the loss keeps the masked ones ([MASK] tokens
    remove no compute). Frozen, forward only: the VQ-KD tokenizer's codes
    of every image and pair image (encoder, encode head, nearest-code
    search; `flops.vq_codes_forward`), plus the resize of the pixels to
    its resolution when it differs. None for a tokenizer that is not a
    VQ-KD run (a test's stand-in): its cost is unknown.
    """
    vq = self.visual_tokenizer
    vq_cfg = getattr(vq, "model_config", None)
    if not isinstance(vq_cfg, vqkd_lib.VQKDConfig):
      return None
    mw, d = self.backbone, self.config.data
    comp = d.composition
    rows = beit3_digits.rows_per_step(comp)
    k = {p: comp[p] // rows for p in beit3_digits.PARTS}
    length = d.max_len
    mim = flops_lib.Forward(flops_lib.dense(mw.grid ** 2, mw.width,
                                            vq.num_codes))
    mlm = flops_lib.Forward(flops_lib.dense(length, mw.width,
                                            mw.vocab_size))
    image = flops_lib.multiway_forward(mw, images=True) + mim
    text = flops_lib.multiway_forward(mw, images=False,
                                      text_len=length) + mlm
    pair = flops_lib.multiway_forward(mw, images=True,
                                      text_len=length) + mim + mlm
    trained = k["image"] * image + k["text"] * text + k["pair"] * pair
    tokenizer = (flops_lib.vq_codes_forward(vq_cfg)
                 + flops_lib.resize_flops(d.image_size, vq.image_size))
    return trained.train() + (k["image"] + k["pair"]) * tokenizer
