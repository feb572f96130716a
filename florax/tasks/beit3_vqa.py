"""BEiT-3's fusion-encoder uses (Wang et al. 2022, §3.1): visual question
answering (task `beit3_vqa`) and NLVR2-style visual reasoning (task
`beit3_nlvr2`), fine-tuned from a pretrained Multiway checkpoint.

Both run an image+text pair through the Multiway model as ONE fused
sequence (image tokens then text tokens; the `vl` experts in the top
layers), as unilm's beit3/modeling_finetune.py does:

  VQA    BEiT3ForVisualQuestionAnswering: the pooler (LayerNorm -> dense ->
         tanh) on the first token ([cls] of the image), then the head
         dense(width -> 2 width) -> LayerNorm -> GELU -> dense(-> answers).
         Loss: BCE with logits against VQA-v2 soft scores, averaged over
         (examples x answers) and multiplied by the number of answers
         (unilm's `BCEWithLogitsLoss(reduction='mean') * labels.shape[1]`),
         i.e. summed over answers, mean over examples
         (`vqa.loss_reduction='sum'`; 'mean' drops the factor). Metric: VQA
         accuracy, the soft score min(#annotators / 3, 1) of the argmax
         answer (`vqa_accuracy`).
  NLVR2  BEiT3ForVisualReasoning: the two (image, statement) pairs are one
         Multiway call over a 2B batch (images_left then images_right, the
         statement twice), so both go through the same encoder and params;
         each pair's representation is [image cls ; first text token]
         (2 width), the two are concatenated (4 width) and the head is
         unilm's TwoLayerMLP: LayerNorm -> dense(-> 2 width) -> LayerNorm
         -> GELU -> dense(-> 2), its denses initialised x 0.001. Loss:
         cross-entropy over {false, true}; metric: accuracy.
The paper says "the final pooled output"; the pooled output is the above
in the released code (no pooler for NLVR2), which is what is built here
(`model.head='unilm'`). `model.head='linear'` is one dense on the final
[cls] token instead, what the tiny digits preset uses: at width 64 the
unilm pooler + head stayed on the question-only prior (random init, 1000
steps: VQA accuracy 0.566, 'what' at chance) where the linear head
learned (0.765); configs/beit3_vqa.py has the figures.

Params: `multiway/...` (the backbone as florax.models.multiway names it:
an MDM run's checkpoint loads with init_from.prefixes [["multiway",
"multiway"]]) and `pooler/...` (unilm head only) + `head/...` (fresh).

Text: the same tokenizer (ids) as the pretrained run. Resolution order:
data.text_tokenizer_path, else `tokenizer.model` of init_from.path (an MDM
workdir keeps its own there), else a SentencePiece trained on the digits
descriptions exactly as beit3_mdm trains it (same texts, same size: the
same model). Random-init runs thus read the same ids as pretrained ones.

Data: florax.data.digits_qa (generated questions and statements about the
embedded digits); evaluation on the held-out digits (eval/vqa_accuracy, per
family eval/vqa_accuracy_<family>, eval/loss; eval/accuracy for NLVR2).
Everything configurable reaches the trainer as data (one batch kind, one
compiled step); the trainer knows no family.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import digits_qa
from florax.data import tokenizer as tok_lib
from florax.evaluate import mesh_map
from florax.models import layers, multiway, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks.registry import register

BACKBONE = "multiway"
LOSS_REDUCTIONS = ("sum", "mean")
VQA_HEADS = ("unilm", "linear")


# -- the objectives (pure) ------------------------------------------------------

def vqa_bce(logits, scores, reduction: str = "sum"):
  """BCE with logits against soft scores: mean over examples of the sum
  ('sum', unilm's) or the mean ('mean') over answers, in fp32."""
  x = logits.astype(jnp.float32)
  y = scores.astype(jnp.float32)
  # log(1 + exp(-|x|)) form: stable for any logit.
  per = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  per = jnp.sum(per, -1) if reduction == "sum" else jnp.mean(per, -1)
  return jnp.mean(per)


def vqa_accuracy(logits, scores):
  """(B,) VQA accuracy of each example: the soft score of its argmax answer
  (a NaN row predicts nothing and scores 0)."""
  logits = jnp.asarray(logits, jnp.float32)
  pred = jnp.argmax(logits, -1)
  got = jnp.take_along_axis(jnp.asarray(scores, jnp.float32),
                            pred[:, None], -1)[:, 0]
  return jnp.where(jnp.all(jnp.isfinite(logits), -1), got, 0.0)


def vqa_metrics(logits, holdout: dict, families, reduction: str) -> dict:
  """eval/vqa_accuracy (overall and per family: eval/vqa_accuracy_<family>)
  and eval/loss of held-out logits (digits_qa.vqa_holdout's dict)."""
  acc = np.asarray(vqa_accuracy(logits, holdout["scores"]))
  out = {"eval/vqa_accuracy": float(acc.mean()),
         "eval/loss": float(vqa_bce(logits, holdout["scores"], reduction))}
  for k, fam in enumerate(families):
    out[f"eval/vqa_accuracy_{fam}"] = float(acc[holdout["family"] == k]
                                            .mean())
  return out


# -- the models -------------------------------------------------------------------

def _kernel_init(scale: float):
  # unilm's _init_weights: trunc_normal(std=0.02), times the head's
  # init_scale (0.001 for NLVR2's denses).
  return nn.initializers.truncated_normal(stddev=0.02 * scale)


class Pooler(nn.Module):
  """unilm's Pooler: LayerNorm -> dense -> tanh of the first token."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = layers.layer_norm(name="norm")(tokens[:, 0])
    return jnp.tanh(layers.dense(x.shape[-1], ("embed", "mlp"),
                                 dtype=self.dtype, name="dense",
                                 kernel_init=_kernel_init(1.0))(x))


class TwoLayerMLP(nn.Module):
  """[LayerNorm ->] dense(hidden) -> LayerNorm -> GELU -> dense(out), the
  denses initialised trunc-normal(0.02 * init_scale) (unilm's heads; the
  VQA head has no input norm)."""
  hidden: int
  out: int
  norm_input: bool = True
  init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.norm_input:
      x = layers.layer_norm(name="norm1", axis_name="mlp")(x)
    x = layers.dense(self.hidden, ("mlp", "embed"), dtype=self.dtype,
                     name="dense1", kernel_init=_kernel_init(
                         self.init_scale))(x)
    x = layers.layer_norm(name="norm2")(x)
    x = jax.nn.gelu(x, approximate=False)  # torch's nn.GELU: exact
    return layers.dense(self.out, ("embed", "classes"), dtype=self.dtype,
                        name="dense2", kernel_init=_kernel_init(
                            self.init_scale))(x).astype(jnp.float32)


class VQAModel(nn.Module):
  """Multiway fusion encoder -> answer logits from token 0. head='unilm':
  the pooler then the 2-layer head (released code); 'linear': one dense on
  the final [cls] token (module docstring: why the digits preset uses it)."""
  config: multiway.MultiwayConfig
  num_answers: int
  dtype: Any = jnp.float32
  head: str = "unilm"

  @nn.compact
  def __call__(self, images, text, deterministic: bool = True):
    tokens, _ = multiway.Multiway(self.config, self.dtype, name=BACKBONE)(
        images=images, text=text, deterministic=deterministic)
    if self.head == "linear":
      return layers.dense(self.num_answers, ("embed", "classes"),
                          dtype=self.dtype, name="head",
                          kernel_init=_kernel_init(1.0))(
                              tokens[:, 0]).astype(jnp.float32)
    pooled = Pooler(self.dtype, name="pooler")(tokens)
    return TwoLayerMLP(2 * self.config.width, self.num_answers,
                       norm_input=False, dtype=self.dtype, name="head")(
                           pooled)


class NLVR2Model(nn.Module):
  """Both (image, statement) pairs through ONE Multiway call (2B rows) ->
  [image cls ; text token 0] of each -> concatenated -> TwoLayerMLP -> 2."""
  config: multiway.MultiwayConfig
  head_init_scale: float = 0.001
  dtype: Any = jnp.float32

  def pair_features(self, tokens):
    """(rows, 2 width): the image [cls] and the first text token."""
    split = self.config.num_image_tokens
    return jnp.concatenate([tokens[:, 0], tokens[:, split]], -1)

  @nn.compact
  def __call__(self, images_left, images_right, text,
               deterministic: bool = True):
    b = text.shape[0]
    w = self.config.width
    tokens, _ = multiway.Multiway(self.config, self.dtype, name=BACKBONE)(
        images=jnp.concatenate([images_left, images_right], 0),
        text=jnp.concatenate([text, text], 0), deterministic=deterministic)
    rep = self.pair_features(tokens)
    x = jnp.concatenate([rep[:b], rep[b:]], -1).astype(jnp.float32)
    return TwoLayerMLP(2 * w, 2, init_scale=self.head_init_scale,
                       dtype=self.dtype, name="head")(x)


# -- shared task plumbing ------------------------------------------------------------

class _FusionTask(base.Task):
  """Config checks, tokenizer, init and held-out evaluation shared by the
  two uses; subclasses define the model, batches, loss and metrics."""
  example_unit = "examples"
  families: tuple = ()

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tok = None
    self._holdout = None
    self._eval_fn = None

  # -- config -----------------------------------------------------------------

  @property
  def backbone(self) -> multiway.MultiwayConfig:
    return common.backbone(self.config)

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  def validate(self):
    cfg = self.config
    d = cfg.data
    common.validate_common(self, needs_mask=False)
    fams = tuple(d.families)
    if not fams or set(fams) - set(self.families) or len(set(fams)) != len(
        fams):
      raise ValueError(f"data.families must be distinct names among "
                       f"{list(self.families)}, got {list(fams)}")
    if cfg.get("evals"):
      raise ValueError(f"{cfg.task} evaluates on the held-out digits itself "
                       "(config.evals must be empty)")
    shards = sharding_lib.batch_size_divisor(self.mesh, self.rules)
    bs = cfg.train.batch_size
    need = shards * cfg.train.get("grad_accum_steps", 1)
    if bs % need or bs % jax.process_count():
      raise ValueError(f"train.batch_size {bs} must be divisible by the "
                       f"{shards} data-parallel shards x grad_accum_steps "
                       f"and by {jax.process_count()} processes")
    tok = self.text_tokenizer
    n, text = digits_qa.max_pieces(tok)
    if n + 2 > d.max_len:
      raise ValueError(f"data.max_len {d.max_len} cuts the generated text "
                       f"{text!r} ({n} pieces + [bos] + [eos] under the "
                       f"text tokenizer "
                       f"{common.tokenizer_file(cfg, self.workdir)})")
    self._validate_task()

  def _validate_task(self):
    pass

  # -- text ---------------------------------------------------------------------

  @property
  def text_tokenizer(self) -> tok_lib.TextTokenizer:
    """The pretrained run's tokenizer (module docstring)."""
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  # -- variables and evaluation ---------------------------------------------------

  def init(self, rng):
    spec = self.batch_spec(1)
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in spec.items()}
    return self.model.init({"params": rng}, **self._inputs(zeros))["params"]

  def _inputs(self, batch) -> dict:
    raise NotImplementedError

  def _predict(self, params, arrays: dict) -> np.ndarray:
    """The model's logits over host arrays, in fixed-size batches fed over
    the mesh (florax.evaluate.mesh_map)."""
    if self._eval_fn is None:
      model = self.model
      self._eval_fn = mesh_map.MeshMap(
          lambda p, b: model.apply({"params": p}, **self._inputs(b)),
          sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._eval_fn(params, arrays)

  def train_iterators(self, process_index, process_count):
    common.record_tokenizer(self)
    return {base.DEFAULT_KIND: iter(self.dataset(process_index,
                                                 process_count))}

  # -- export -------------------------------------------------------------------

  #: (served function name, its label names) of the subclass.
  served: tuple = ()

  def serving(self):
    """One function over (images..., text) -> logits over the labels: the
    evaluation's computation (`_inputs` and the model)."""
    name, labels = self.served
    model, d = self.model, self.config.data
    spec = self.batch_spec(1)
    image_keys = [k for k in spec if k.startswith("images")]
    inputs = tuple(serving.Input(k, "image", spec[k].shape[1:])
                   for k in image_keys) + (
                       serving.Input("text", "text", (d.max_len,), "int32"),)

    def fn(params, *xs):
      batch = dict(zip(image_keys, xs[:-1]), ids=xs[-1])
      return model.apply({"params": params}, **self._inputs(batch))
    return {name: serving.Function(fn, inputs, "labels", tuple(labels))}

  def serving_tokenizer(self):
    return self.text_tokenizer


# -- VQA ----------------------------------------------------------------------------

@register("beit3_vqa")
class BEiT3VQATask(_FusionTask):
  families = digits_qa.FAMILIES
  served = ("answer", digits_qa.ANSWERS)

  def _validate_task(self):
    head = self.config.model.get("head", "unilm")
    if head not in VQA_HEADS:
      raise ValueError(f"model.head must be one of {VQA_HEADS}, got {head!r}")
    v = self.config.vqa
    if v.loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f"vqa.loss_reduction must be one of "
                       f"{LOSS_REDUCTIONS}, got {v.loss_reduction!r}")
    p = self.config.data.p_correct
    if not isinstance(p, (int, float)) or not 0.5 < p <= 1:
      raise ValueError(f"data.p_correct (an annotator's chance of the right "
                       f"answer) must be in (0.5, 1], got {p!r}")

  @property
  def model(self) -> VQAModel:
    return VQAModel(self.backbone, len(digits_qa.ANSWERS), self.dtype,
                    self.config.model.get("head", "unilm"))

  def batch_spec(self, global_batch_size):
    d = self.config.data
    s, b = d.image_size, global_batch_size
    return {"images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "ids": jax.ShapeDtypeStruct((b, d.max_len), jnp.int32),
            "scores": jax.ShapeDtypeStruct((b, len(digits_qa.ANSWERS)),
                                           jnp.float32)}

  def _inputs(self, batch):
    return {"images": batch["images"], "text": batch["ids"]}

  def dataset(self, process_index=0, process_count=1):
    d = self.config.data
    return digits_qa.vqa_dataset(
        tokenizer=self.text_tokenizer, image_size=d.image_size,
        max_len=d.max_len,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.random_shift,
        train_examples=d.train_examples, families=tuple(d.families),
        p_correct=float(d.p_correct))

  def loss(self, params, batch, rng, ctx=None):
    logits = self.model.apply({"params": params}, **self._inputs(batch),
                              deterministic=False, rngs={"dropout": rng})
    loss = vqa_bce(logits, batch["scores"],
                   self.config.vqa.loss_reduction)
    return loss, {"vqa_accuracy": jnp.mean(vqa_accuracy(logits,
                                                        batch["scores"]))}

  def holdout(self) -> dict:
    if self._holdout is None:
      d = self.config.data
      self._holdout = digits_qa.vqa_holdout(
          tokenizer=self.text_tokenizer, image_size=d.image_size,
          max_len=d.max_len, seed=d.holdout_seed,
          families=tuple(d.families), p_correct=float(d.p_correct))
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    h = self.holdout()
    logits = self._predict(params, {"images": h["images"], "ids": h["ids"]})
    return vqa_metrics(logits, h, self.config.data.families,
                       self.config.vqa.loss_reduction)


# -- NLVR2 --------------------------------------------------------------------------

@register("beit3_nlvr2")
class BEiT3NLVR2Task(_FusionTask):
  families = digits_qa.STATEMENT_FAMILIES
  served = ("reason", ("false", "true"))  # label 1: the statement holds

  def _validate_task(self):
    n = self.config.data.holdout_examples
    if not common.is_int(n) or n < 1:
      raise ValueError(f"data.holdout_examples must be a positive integer, "
                       f"got {n!r}")
    s = self.config.model.head_init_scale
    if not isinstance(s, (int, float)) or s < 0:
      raise ValueError(f"model.head_init_scale must be >= 0, got {s!r}")

  @property
  def model(self) -> NLVR2Model:
    return NLVR2Model(self.backbone,
                      float(self.config.model.head_init_scale), self.dtype)

  def batch_spec(self, global_batch_size):
    d = self.config.data
    s, b = d.image_size, global_batch_size
    image = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
    return {"images_left": image, "images_right": image,
            "ids": jax.ShapeDtypeStruct((b, d.max_len), jnp.int32),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def _inputs(self, batch):
    return {"images_left": batch["images_left"],
            "images_right": batch["images_right"], "text": batch["ids"]}

  def dataset(self, process_index=0, process_count=1):
    d = self.config.data
    return digits_qa.nlvr2_dataset(
        tokenizer=self.text_tokenizer, image_size=d.image_size,
        max_len=d.max_len,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.random_shift,
        train_examples=d.train_examples, families=tuple(d.families))

  def loss(self, params, batch, rng, ctx=None):
    logits = self.model.apply({"params": params}, **self._inputs(batch),
                              deterministic=False, rngs={"dropout": rng})
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["label"][:, None], -1)[:, 0]
    hits = jnp.argmax(logits, -1) == batch["label"]
    return jnp.mean(nll), {"accuracy": jnp.mean(hits.astype(jnp.float32))}

  def holdout(self) -> dict:
    if self._holdout is None:
      d = self.config.data
      self._holdout = digits_qa.nlvr2_holdout(
          tokenizer=self.text_tokenizer, image_size=d.image_size,
          max_len=d.max_len, examples=d.holdout_examples,
          seed=d.holdout_seed, families=tuple(d.families))
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    h = self.holdout()
    logits = np.asarray(self._predict(params, {
        k: h[k] for k in ("images_left", "images_right", "ids")}),
                        np.float64)
    # Pessimistic ties: a tie (or NaN) is a miss.
    other = logits[np.arange(len(logits)), 1 - h["label"]]
    mine = logits[np.arange(len(logits)), h["label"]]
    hits = mine > other
    shifted = logits - logits.max(1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(1))
    out = {"eval/accuracy": float(hits.mean()),
           "eval/loss": float(np.mean(logz - shifted[np.arange(len(logits)),
                                                     h["label"]]))}
    for k, fam in enumerate(self.config.data.families):
      out[f"eval/accuracy_{fam}"] = float(hits[h["family"] == k].mean())
    return out
