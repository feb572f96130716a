"""Florence's fine-grained V+L adapter: METER's co-attention fusion over
the UniCL-trained towers (Florence §2.5; tasks `meter_pretrain` and
`meter_vqa`, configs/meter.py).

The model (`MeterModel`): the image tower of `model.image` (CoSwin; its
final token map, flattened) and the text tower of `model.text` (Florence's
text transformer; every token's final state), fused by
florax.models.meter (co-attention layers on each stream; pooled = [text
pooler ; image pooler], 2 x width). Params `image_encoder/...` and
`text_encoder/...` are UniCL's names (florax.models.two_tower), so a
UniCL run seeds both towers with init_from.prefixes [["image_encoder",
"image_encoder"], ["text_encoder", "text_encoder"]] (the presets; a METER
pre-training run also seeds `fusion/...` through ["fusion", "fusion"]).

  meter_pretrain  ITM + MLM, as METER pre-trains (ViLT's recipe). Each
                  step's pairs are (image, a description of its digit).
                  ITM: a fraction `meter.itm_negative_rate` of the pairs get
                  another pair's image (in-batch, a random derangement:
                  florax.tasks.flava.itm_pairs), the clean text; CE of
                  `itm_head` on the pooled feature against matched
                  (`meter.itm_match` 'class': an image of the same digit
                  matches, the digits' descriptions being class-level;
                  'instance': only the pair's own). MLM: the same pairs, the
                  text BERT-masked (`meter.mlm_rate`, 80/10/10; [MASK] is
                  the text tower's learned `mask_embed`, so a UniCL tower
                  loads unchanged), CE of `mlm_head` on the text stream at
                  the chosen positions: the word is predicted from the rest
                  of the text AND the image. Loss: itm + mlm
                  (`meter.loss_weights`). Eval: held-out ITM accuracy (each
                  image with its own description and another digit's,
                  chance 0.5).
  meter_vqa       VQA as classification over digits_qa.ANSWERS with BCE on
                  VQA-v2 soft scores (min(#annotators / 3, 1)), METER's head
                  (dense 2W -> 2W, LayerNorm, GELU, dense -> answers; or
                  `model.vqa_head=linear`: one dense) on the
                  pooled feature; eval: VQA accuracy on one generated
                  question of every family about every held-out digit
                  (eval/vqa_accuracy, per family), as beit3_vqa.

Text: the UniCL run's tokenizer (ids keep their meaning): data.
text_tokenizer_path, else init_from.path's tokenizer.model, else the same
SentencePiece of the digits descriptions UniCL's tiny preset trains
(beit3_common's rule). The UniCL text tower is causal (CLIP's): each text
token sees its left context inside the tower, the whole text and image in
the fusion layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import beit3_digits
from florax.data import digits
from florax.data import digits_images
from florax.data import digits_qa
from florax.data import pipeline
from florax.data import tokenizer as tok_lib
from florax.evaluate import mesh_map
from florax.models import layers, meter, text, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks import beit3_mdm
from florax.tasks import beit3_vqa
from florax.tasks import flava
from florax.tasks.registry import register

MATCHES = ("instance", "class")
# 'meter': METER's vqa_classifier (dense 2W -> 2W, LayerNorm, GELU, dense);
# 'linear': one dense on the pooled feature.
VQA_HEADS = ("meter", "linear")


class MeterModel(nn.Module):
  """The two towers + METER fusion + the heads (module docstring)."""
  image_encoder: nn.Module
  text_encoder: nn.Module
  config: meter.MeterConfig
  vocab_size: int
  num_answers: int
  pad_id: int = 0
  vqa_head: str = "meter"
  dtype: Any = jnp.float32

  def setup(self):
    self.fusion = meter.MeterFusion(self.config, self.dtype)
    self.itm_head = layers.dense(2, ("embed", "classes"), dtype=self.dtype)
    self.mlm_head = flava.MaskedHead(self.vocab_size, self.config.norm_eps,
                                     self.dtype)
    if self.vqa_head == "linear":
      self.answer_head = layers.dense(self.num_answers, ("embed", "classes"),
                                      dtype=self.dtype)
    else:  # METER's vqa_classifier
      self.answer_head = beit3_vqa.TwoLayerMLP(
          2 * self.config.width, self.num_answers, norm_input=False,
          dtype=self.dtype)

  def fuse(self, images, ids, mask_id=None, deterministic: bool = True):
    """(text stream (B, L, W), image stream (B, N, W), pooled (B, 2W))."""
    _, ai = self.image_encoder(images, deterministic)
    grid = ai["tokens"]
    image = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    _, at = self.text_encoder(ids, deterministic, mask_id=mask_id)
    # The text's summary token: [CLS] (0) of a bidirectional tower, the
    # first end-of-text of a causal one (models/meter.py).
    tcfg = self.text_encoder.config
    pool_index = (jnp.argmax(ids == tcfg.eos_id, axis=-1) if tcfg.causal
                  else jnp.zeros(ids.shape[:1], jnp.int32))
    return self.fusion(at["hidden"], ids != self.pad_id, image, deterministic,
                       text_pool_index=pool_index)

  def itm(self, images, ids, deterministic: bool = True):
    return self.itm_head(self.fuse(images, ids, None, deterministic)[2]
                         ).astype(jnp.float32)

  def mlm(self, images, ids, mask_id, deterministic: bool = True):
    return self.mlm_head(self.fuse(images, ids, mask_id, deterministic)[0])

  def vqa(self, images, ids, deterministic: bool = True):
    return self.answer_head(self.fuse(images, ids, None, deterministic)[2]
                            ).astype(jnp.float32)

  def init_all(self, images, ids, mask_id):
    return (self.itm(images, ids), self.mlm(images, ids, mask_id),
            self.vqa(images, ids))


class _MeterTask(base.Task):
  """Config checks, tokenizer, model and init the two tasks share."""
  example_unit = "examples"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tok = None
    self._maps = {}
    self._holdout = None

  @property
  def meter_config(self) -> meter.MeterConfig:
    return meter.MeterConfig(**self.config.model.meter.to_dict())

  @property
  def text_config(self) -> text.TextConfig:
    return text.TextConfig(**self.config.model.text.to_dict())

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def text_tokenizer(self) -> tok_lib.TextTokenizer:
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  @property
  def mask_id(self) -> int:
    return common.mask_id_of(self.text_tokenizer)

  @property
  def model(self) -> MeterModel:
    m = self.config.model
    return MeterModel(
        image_encoder=two_tower.image_encoder(m, self.dtype),
        text_encoder=text.TextTransformer(self.text_config, self.dtype),
        config=self.meter_config, vocab_size=self.text_config.vocab_size,
        num_answers=len(digits_qa.ANSWERS),
        pad_id=self.text_tokenizer.pad_id,
        vqa_head=self.config.model.get("vqa_head", "meter"), dtype=self.dtype)

  def validate(self):
    cfg, d = self.config, self.config.data
    if d.name != "digits":
      raise ValueError(f"data.name={d.name!r}: the METER tasks read the "
                       "embedded digits (data.name='digits')")
    if cfg.model.dtype not in two_tower.DTYPES:
      raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    two_tower.validate_image(cfg.model, d.image_size)
    tc = self.text_config
    text.validate(tc)
    meter.validate(self.meter_config)
    if not common.is_int(d.max_len) or not 3 <= d.max_len <= tc.max_len:
      raise ValueError(f"data.max_len must be an integer in [3, model.text."
                       f"max_len={tc.max_len}], got {d.max_len!r}")
    tok = self.text_tokenizer
    if tok.vocab_size > tc.vocab_size or tok.eos_id != tc.eos_id or (
        tok.pad_id != tc.pad_id):
      raise ValueError(
          f"the text tokenizer ({tok.vocab_size} pieces, eos {tok.eos_id}, "
          f"pad {tok.pad_id}) does not fit model.text (vocab_size "
          f"{tc.vocab_size}, eos_id {tc.eos_id}, pad_id {tc.pad_id}): use the "
          "tokenizer of the run the towers come from")
    n, longest = max((len(tok.pieces(t)), t) for t in self.texts())
    if n + 2 > d.max_len:
      raise ValueError(f"data.max_len {d.max_len} cuts the text {longest!r} "
                       f"({n} pieces + bos + eos under the tokenizer "
                       f"{common.tokenizer_file(cfg, self.workdir)})")
    if cfg.get("evals"):
      raise ValueError(f"{cfg.task} evaluates on the held-out digits itself "
                       "(config.evals must be empty)")
    self._validate_task()

  def _validate_task(self):
    pass

  def texts(self) -> list[str]:
    """Every text the task feeds (the max_len check)."""
    raise NotImplementedError

  def init(self, rng):
    d = self.config.data
    s = d.image_size
    return self.model.init(
        {"params": rng}, jnp.zeros((1, s, s, 3)),
        jnp.zeros((1, d.max_len), jnp.int32), self.mask_id,
        method=MeterModel.init_all)["params"]

  def _map(self, name, fn):
    if name not in self._maps:
      self._maps[name] = mesh_map.MeshMap(
          fn, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps[name]

  def serving_tokenizer(self):
    return self.text_tokenizer

  def _served(self, name, method, labels) -> dict:
    """{name: (image, text ids) -> logits over `labels`} by `method`."""
    model, d = self.model, self.config.data
    inputs = (serving.Input("images", "image",
                            (d.image_size, d.image_size, 3)),
              serving.Input("text", "text", (d.max_len,), "int32"))

    def fn(params, images, ids):
      return model.apply({"params": params}, images, ids, method=method)
    return {name: serving.Function(fn, inputs, "labels", labels)}


# -- pre-training: ITM + MLM ---------------------------------------------------

@register("meter_pretrain")
class MeterPretrainTask(_MeterTask):

  def _validate_task(self):
    m = self.config.meter
    if m.itm_match not in MATCHES:
      raise ValueError(f"meter.itm_match must be one of {MATCHES}, got "
                       f"{m.itm_match!r}")
    for name in ("itm_negative_rate", "mlm_rate"):
      if not 0 < m[name] < 1:
        raise ValueError(f"meter.{name} must be in (0, 1), got {m[name]!r}")
    w = m.loss_weights
    if set(w) != {"itm", "mlm"} or not all(w[k] >= 0 for k in w):
      raise ValueError(f"meter.loss_weights must give itm and mlm weights "
                       f">= 0, got {dict(w)}")

  def texts(self):
    return digits.all_descriptions()

  def mask_settings(self) -> beit3_digits.MaskSettings:
    """Text-only BERT masking of each pair (MaskPair's 'separate' mode
    with the text always the masked side)."""
    tok, m = self.text_tokenizer, self.config.meter
    return beit3_digits.MaskSettings(
        grid=1, vocab_size=tok.vocab_size, mask_id=self.mask_id,
        special_ids=tok.special_ids, mvlm_text_rate=m.mlm_rate,
        mvlm_mode="separate", mvlm_text_prob=1.0)

  def batch_spec(self, global_batch_size):
    d, b = self.config.data, global_batch_size
    s, length = d.image_size, d.max_len
    ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
    return {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "ids": ids, "targets": ids,
            "mlm_mask": jax.ShapeDtypeStruct((b, length), jnp.bool_),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def train_iterators(self, process_index, process_count):
    d = self.config.data
    common.record_tokenizer(self)
    pair = beit3_digits.MaskPair(self.text_tokenizer, d.max_len,
                                 self.mask_settings(), with_label=True)
    return {base.DEFAULT_KIND: iter(digits_images.digits_image_dataset(
        image_size=d.image_size,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.random_shift,
        train_examples=d.train_examples, transforms=[pair],
        keys=tuple(self.batch_spec(1))))}

  def loss(self, params, batch, rng, ctx=None):
    m, model = self.config.meter, self.model
    k_drop, k_itm = jax.random.split(rng)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def apply(*args, method):
      return model.apply({"params": params}, *args, deterministic=False,
                         rngs={"dropout": k_drop}, method=method)
    # ITM: some pairs take another pair's image (METER swaps images).
    index, matched = flava.itm_pairs(k_itm, batch["label"],
                                     m.itm_negative_rate, m.itm_match)
    itm_logits = apply(batch["images"][index], batch["targets"],
                       method=MeterModel.itm)
    itm, itm_acc = flava.itm_loss(itm_logits, matched)
    mlm_logits = apply(batch["images"], batch["ids"], self.mask_id,
                       method=MeterModel.mlm)
    mlm, mlm_acc, masked = beit3_mdm.masked_cross_entropy(
        mlm_logits, batch["targets"], batch["mlm_mask"])
    w = m.loss_weights
    return w.itm * itm + w.mlm * mlm, {
        "itm_loss": itm, "itm_accuracy": itm_acc, "mlm_loss": mlm,
        "mlm_accuracy": mlm_acc, "mlm_masked": masked}

  def itm_logits(self, params, images, ids) -> np.ndarray:
    model = self.model
    return self._map("itm", lambda p, b: model.apply(
        {"params": p}, b["images"], b["ids"], method=MeterModel.itm))(
            params, {"images": images, "ids": ids})

  def holdout(self):
    """(images, own-digit ids, other-digit ids): image i's description with
    template i mod T, and one of digit (label + 1 + i mod 9) mod 10."""
    if self._holdout is None:
      d, tok = self.config.data, self.text_tokenizer
      images, labels = pipeline.holdout_arrays(d.image_size)
      own, other = digits.matched_descriptions(labels)
      self._holdout = (images, tok.encode_batch(own, d.max_len),
                       tok.encode_batch(other, d.max_len))
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    images, own, other = self.holdout()
    pos = self.itm_logits(params, images, own)
    neg = self.itm_logits(params, images, other)
    # Pessimistic ties: an exact tie is a miss.
    hits = np.concatenate([pos[:, 1] > pos[:, 0], neg[:, 0] > neg[:, 1]])
    return {"eval/itm_accuracy": float(hits.mean())}

  def serving(self):
    """`match`: does the text describe the image? (no, yes)."""
    return self._served("match", MeterModel.itm, ("no", "yes"))


# -- VQA --------------------------------------------------------------------------

@register("meter_vqa")
class MeterVQATask(_MeterTask):

  def _validate_task(self):
    d = self.config.data
    if self.config.model.get("vqa_head", "meter") not in VQA_HEADS:
      raise ValueError(f"model.vqa_head must be one of {VQA_HEADS}, got "
                       f"{self.config.model.get('vqa_head')!r}")
    fams = tuple(d.families)
    if not fams or set(fams) - set(digits_qa.FAMILIES) or len(set(fams)) != (
        len(fams)):
      raise ValueError(f"data.families must be distinct names among "
                       f"{list(digits_qa.FAMILIES)}, got {list(fams)}")
    if self.config.vqa.loss_reduction not in beit3_vqa.LOSS_REDUCTIONS:
      raise ValueError(f"vqa.loss_reduction must be one of "
                       f"{beit3_vqa.LOSS_REDUCTIONS}")
    if not 0.5 < d.p_correct <= 1:
      raise ValueError(f"data.p_correct must be in (0.5, 1], got "
                       f"{d.p_correct!r}")

  def texts(self):
    return digits_qa.question_texts()

  def batch_spec(self, global_batch_size):
    d, b = self.config.data, global_batch_size
    s = d.image_size
    return {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "ids": jax.ShapeDtypeStruct((b, d.max_len), jnp.int32),
            "scores": jax.ShapeDtypeStruct((b, len(digits_qa.ANSWERS)),
                                           jnp.float32)}

  def train_iterators(self, process_index, process_count):
    d = self.config.data
    common.record_tokenizer(self)
    return {base.DEFAULT_KIND: iter(digits_qa.vqa_dataset(
        tokenizer=self.text_tokenizer, image_size=d.image_size,
        max_len=d.max_len,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.random_shift,
        train_examples=d.train_examples, families=tuple(d.families),
        p_correct=float(d.p_correct)))}

  def loss(self, params, batch, rng, ctx=None):
    logits = self.model.apply({"params": params}, batch["images"],
                              batch["ids"], deterministic=False,
                              rngs={"dropout": rng}, method=MeterModel.vqa)
    loss = beit3_vqa.vqa_bce(logits, batch["scores"],
                             self.config.vqa.loss_reduction)
    return loss, {"vqa_accuracy": jnp.mean(beit3_vqa.vqa_accuracy(
        logits, batch["scores"]))}

  def holdout(self) -> dict:
    if self._holdout is None:
      d = self.config.data
      self._holdout = digits_qa.vqa_holdout(
          tokenizer=self.text_tokenizer, image_size=d.image_size,
          max_len=d.max_len, seed=d.holdout_seed,
          families=tuple(d.families), p_correct=float(d.p_correct))
    return self._holdout

  def vqa_logits(self, params, images, ids) -> np.ndarray:
    model = self.model
    return self._map("vqa", lambda p, b: model.apply(
        {"params": p}, b["images"], b["ids"], method=MeterModel.vqa))(
            params, {"images": images, "ids": ids})

  def evaluate(self, params, frozen=None, step=None):
    h = self.holdout()
    logits = self.vqa_logits(params, h["images"], h["ids"])
    return beit3_vqa.vqa_metrics(logits, h, self.config.data.families,
                                 self.config.vqa.loss_reduction)

  def serving(self):
    """`answer`: the answer word of a question about an image."""
    return self._served("answer", MeterModel.vqa, tuple(digits_qa.ANSWERS))

