"""FLAVA's downstream heads (Singh et al. 2022, §3.1 "Applying to downstream
tasks"): a classifier on h_CLS,I (vision), h_CLS,T (language) or h_CLS,M
(multimodal reasoning), through the shared fine-tuning task (task
`flava_classify`, configs/flava_finetune.py).

`finetune.input` picks the encoder and the data:

  image  h_CLS,I of the image encoder: digit classification of images (the
         paper's ImageNet-style linear evaluation: the ',probe' presets).
  text   h_CLS,T of the text encoder: which digit a description names (a
         single-sentence task, as SST-2 is for GLUE).
  pair   h_CLS,M of the multimodal encoder over (image, text): visual
         entailment (SNLI-VE's shape): the text describes the image's digit
         (1, 'entailment') or another digit (0, 'contradiction'),
         `data.negative_rate` of the pairs being contradictions.

h_CLS is the [CLS] token's final (normed) hidden state, the pooler is not
used (FLAVA pre-training trains only the multimodal pooler, through ITM);
the head is classify's (`head`, trunc-normal x model.head_init_scale),
optionally behind an MLP (`model.head_hidden` > 0: dense -> GELU ->
LayerNorm, the paper's "a linear layer or a multi-layer perceptron").

Everything else is classify's (florax/tasks/classify.py): Mixup/CutMix and
label smoothing (soft-target cross-entropy; mixing only for images),
`finetune.train_backbone=False` + optimizer.freeze of `flava/` for a
linear probe, eval/top1 (+ top5 with >= 5 classes) and eval/loss over the
whole held-out split, the trainer, checkpoints and mesh.

Params: `flava/...` (florax.models.flava.Flava's names, HF FlavaModel's
layout) -- only the encoders the input reaches -- and `head/...`; a FLAVA
pre-training run loads with init_from.prefixes [["flava", "flava"]] (the
preset), an HF import directory with [["", "flava"]]. The text tokenizer
follows beit3_common's rule (data.text_tokenizer_path, else the init_from
run's tokenizer.model, else one trained on the digits' descriptions).

An export serves `classify` (image), `classify_text` (text) or `entail`
(image, text), each returning the label names (florax.serving).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import digits
from florax.data import digits_images
from florax.data import pipeline
from florax.data import tokenizer as tok_lib
from florax.evaluate import mesh_map
from florax.models import flava as flava_lib
from florax.models import layers, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks import classify
from florax.tasks.registry import register

INPUTS = ("image", "text", "pair")
PAIR_LABELS = ("contradiction", "entailment")
# The served function of each input.
SERVED = {"image": "classify", "text": "classify_text", "pair": "entail"}


# -- data ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Describe(grain.transforms.RandomMap):
  """{'image', 'label'} -> + 'ids': a description from a random template of
  the image's digit; with `entailment`, of another digit (uniform over the
  other nine) with probability `negative_rate`, and 'label' becomes 1 if
  the description names the image's digit, else 0."""
  tokenizer: tok_lib.TextTokenizer
  max_len: int
  entailment: bool = False
  negative_rate: float = 0.5

  def random_map(self, element, rng: np.random.Generator):
    out = dict(element)
    digit = label = int(element["label"])
    template = digits.TEMPLATES[rng.integers(len(digits.TEMPLATES))]
    if self.entailment:
      negative = rng.random() < self.negative_rate
      if negative:
        digit = (label + int(rng.integers(1, 10))) % 10
      out["label"] = np.int32(not negative)
    out["ids"] = self.tokenizer.encode(digits.describe(digit, template),
                                       self.max_len)
    return out


def holdout_examples(input_: str, image_size: int, tok, max_len: int):
  """The held-out split as (inputs dict, labels). text: each held-out
  image's digit described with template i mod T; pair: each held-out image
  with its own description and with one of digit (label + 1 + i mod 9) mod
  10 (2N pairs, half entailed)."""
  images, labels = pipeline.holdout_arrays(image_size)
  if input_ == "image":
    return {"image": images}, labels
  own, other = digits.matched_descriptions(labels)
  if input_ == "text":
    return {"ids": tok.encode_batch(own, max_len)}, labels
  ids = tok.encode_batch(own + other, max_len)
  return ({"image": np.concatenate([images, images]), "ids": ids},
          np.concatenate([np.ones(len(labels)), np.zeros(len(labels))]
                         ).astype(np.int32))


# -- model --------------------------------------------------------------------

class FlavaClassifier(nn.Module):
  """Flava's encoders for `input` -> h_CLS (fp32) -> [MLP] -> dropout ->
  linear head."""
  config: flava_lib.FlavaConfig
  input: str
  num_classes: int
  pad_id: int = 0
  head_init_scale: float = 0.001
  head_dropout: float = 0.0
  head_hidden: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.flava = flava_lib.Flava(self.config, self.dtype)
    if self.head_hidden:
      self.mlp = layers.dense(self.head_hidden, ("embed", "mlp"),
                              name="head_mlp")
      self.mlp_norm = layers.layer_norm(name="head_norm")
    self.head = classify.head_layer(self.num_classes, self.head_init_scale)
    self.drop = nn.Dropout(self.head_dropout)

  def features(self, inputs, deterministic: bool = True):
    """h_CLS of the input's encoder, (B, width) float32."""
    f = self.flava
    if self.input in ("image", "pair"):
      image, ai = f.encode_image(inputs["image"], deterministic=deterministic,
                                 pool=False)
    if self.input in ("text", "pair"):
      valid = inputs["ids"] != self.pad_id
      text, at = f.encode_text(inputs["ids"], valid,
                               deterministic=deterministic, pool=False)
    if self.input == "image":
      tokens = image
    elif self.input == "text":
      tokens = text
    else:
      tokens, _ = f.multimodal(ai["pre_norm_tokens"], at["pre_norm_tokens"],
                               valid, deterministic, pool=False)
    return tokens[:, 0].astype(jnp.float32)

  def __call__(self, inputs, deterministic: bool = True,
               train_backbone: bool = True):
    if train_backbone:
      feat = self.features(inputs, deterministic)
    else:  # a frozen tower: eval-mode features, no backward pass through it
      feat = jax.lax.stop_gradient(self.features(inputs, True))
    if self.head_hidden:
      feat = self.mlp_norm(jax.nn.gelu(self.mlp(feat), approximate=False))
    return self.head(self.drop(feat, deterministic=deterministic))


# -- the task -----------------------------------------------------------------

@register("flava_classify")
class FlavaClassifyTask(classify.ClassifyTask):
  example_unit = "examples"
  tower = "flava"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tok = None

  # -- config ---------------------------------------------------------------

  @property
  def input(self) -> str:
    return (self.config.get("finetune") or {}).get("input", "image")

  @property
  def flava_config(self) -> flava_lib.FlavaConfig:
    return flava_lib.from_dict(self.config.model.flava.to_dict())

  @property
  def label_names(self) -> tuple[str, ...]:
    if self.input == "pair":
      return PAIR_LABELS
    names = list(digits.CLASS_WORDS)
    return tuple(names + [str(i) for i in range(len(names),
                                                 self.config.model.num_classes)])

  def _validate_model(self):
    cfg, m = self.config, self.config.model
    if self.input not in INPUTS:
      raise ValueError(f"finetune.input must be one of {INPUTS}, got "
                       f"{self.input!r}")
    fc = self.flava_config
    flava_lib.validate(fc, cfg.data.image_size)
    if m.get("dtype", "float32") not in two_tower.DTYPES:
      raise ValueError(f"model.dtype={m.get('dtype')!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    classes = m.get("num_classes", 0)
    need = 2 if self.input == "pair" else classify.DIGIT_CLASSES
    if not common.is_int(classes) or classes < need:
      raise ValueError(
          f"model.num_classes must be an integer >= {need} for "
          f"finetune.input={self.input!r} (labels 0..{need - 1}), got "
          f"{classes!r}")
    hidden = m.get("head_hidden", 0)
    if not common.is_int(hidden) or hidden < 0:
      raise ValueError(f"model.head_hidden must be an integer >= 0 (0: a "
                       f"linear head), got {hidden!r}")
    if self.input == "image":
      return
    d = cfg.data
    if not common.is_int(d.max_len) or not 3 <= d.max_len <= fc.text.max_len:
      raise ValueError(f"data.max_len must be an integer in [3, model.flava."
                       f"text.max_len={fc.text.max_len}], got {d.max_len!r}")
    if self.input == "pair" and not 0 < d.get("negative_rate", 0.5) < 1:
      raise ValueError(f"data.negative_rate must be in (0, 1), got "
                       f"{d.get('negative_rate')!r}")
    mix = self.mix_config()
    if mix.enabled:
      raise ValueError(
          f"finetune.input={self.input!r}: Mixup/CutMix mix images, set "
          "finetune.mixup_alpha=0 and finetune.cutmix_alpha=0 (label "
          "smoothing still applies)")
    tok = self.text_tokenizer
    if tok.vocab_size > fc.text.vocab_size:
      raise ValueError(
          f"the text tokenizer has {tok.vocab_size} pieces but model.flava."
          f"text.vocab_size is {fc.text.vocab_size}")

  # -- pieces ---------------------------------------------------------------

  @property
  def text_tokenizer(self) -> tok_lib.TextTokenizer:
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  @property
  def model(self) -> FlavaClassifier:
    m = self.config.model
    needs_text = self.input != "image"
    return FlavaClassifier(
        self.flava_config, self.input, m.num_classes,
        pad_id=self.text_tokenizer.pad_id if needs_text else 0,
        head_init_scale=float(m.get("head_init_scale", 0.001)),
        head_dropout=float(m.get("head_dropout", 0.0)),
        head_hidden=int(m.get("head_hidden", 0)),
        dtype=two_tower.DTYPES[m.get("dtype", "float32")])

  def _input_spec(self, b: int) -> dict:
    d = self.config.data
    s = d.image_size
    spec = {}
    if self.input in ("image", "pair"):
      spec["image"] = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
    if self.input in ("text", "pair"):
      spec["ids"] = jax.ShapeDtypeStruct((b, d.max_len), jnp.int32)
    return spec

  def batch_spec(self, global_batch_size):
    return {**self._input_spec(global_batch_size),
            "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

  def init(self, rng):
    zeros = {k: jnp.zeros(v.shape, v.dtype)
             for k, v in self._input_spec(1).items()}
    return self.model.init({"params": rng}, zeros)["params"]

  def train_iterators(self, process_index, process_count):
    d = self.config.data
    transforms, keys = (), ("image", "label")
    if self.input != "image":
      common.record_tokenizer(self)  # a resume with another is refused
      transforms = (Describe(self.text_tokenizer, d.max_len,
                             entailment=self.input == "pair",
                             negative_rate=d.get("negative_rate", 0.5)),)
      keys = tuple(self.batch_spec(1))
    return {base.DEFAULT_KIND: iter(digits_images.digits_image_dataset(
        image_size=d.image_size,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.get("random_shift", 0),
        train_examples=d.get("train_examples", -1), transforms=transforms,
        keys=keys))}

  # -- objective ------------------------------------------------------------

  def loss(self, params, batch, rng, ctx=None):
    mix_rng, drop_rng = jax.random.split(rng)
    inputs = {k: batch[k] for k in self._input_spec(1)}
    mix, classes = self.mix_config(), self.config.model.num_classes
    if self.input == "image":
      images = inputs["image"]
      draws = classify.draw_mix(mix_rng, mix, images.shape[1],
                                images.shape[2])
      inputs["image"], targets, lam = classify.apply_mix(
          images, batch["label"], draws, mix, classes)
    else:
      lam = jnp.float32(1.0)
      targets = classify.mixup_target(batch["label"], classes, lam,
                                      mix.label_smoothing)
    logits = self.model.apply({"params": params}, inputs,
                              deterministic=False,
                              train_backbone=self.train_backbone,
                              rngs={"dropout": drop_rng})
    loss = classify.soft_cross_entropy(logits, targets)
    hits = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
    return loss, {"accuracy": jnp.mean(hits.astype(jnp.float32)),
                  "mix_lambda": lam}

  def flops_per_example(self):
    """Analytic FLOPs per example (florax.models.flops): the input's
    encoders (image: the ViT; text: the text encoder over data.max_len
    tokens; pair: both + the multimodal pass) and the head, trained; with
    train_backbone=False the encoders run forward only and the head's
    first layer, behind a stop_gradient, computes no input gradient."""
    from florax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
    fc, m = self.flava_config, self.config.model
    length = self.config.data.get("max_len", 0)
    tower = flops_lib.Forward(0.0)
    if self.input in ("image", "pair"):
      tower += flops_lib.flava_image_forward(fc)
    if self.input in ("text", "pair"):
      tower += flops_lib.flava_text_forward(fc, length)
    if self.input == "pair":
      tower += flops_lib.flava_multimodal_forward(fc, length)
    width = {"image": fc.image.width, "text": fc.text.width,
             "pair": fc.multimodal.width}[self.input]
    hidden = int(m.get("head_hidden", 0))
    first = flops_lib.dense(1, width, hidden or m.num_classes)
    rest = flops_lib.dense(1, hidden, m.num_classes) if hidden else 0.0
    if self.train_backbone:
      return (tower + flops_lib.Forward(first + rest)).train()
    return tower.flops + flops_lib.Forward(first + rest,
                                           input_layer=first).train()

  # -- evaluation and export ------------------------------------------------

  def logits_map(self) -> mesh_map.MeshMap:
    """(params, inputs dict) -> float32 logits, fed over the mesh."""
    if "logits" not in self._maps:
      model = self.model
      self._maps["logits"] = mesh_map.MeshMap(
          lambda params, x: model.apply({"params": params}, x),
          sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps["logits"]

  def holdout(self):
    if self._holdout is None:
      d = self.config.data
      tok = self.text_tokenizer if self.input != "image" else None
      self._holdout = holdout_examples(self.input, d.image_size, tok,
                                       d.get("max_len", 0))
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    inputs, labels = self.holdout()
    logits = np.asarray(self.logits_map()(params, inputs), np.float64)
    return classify.classification_metrics(logits, labels)

  def serving(self):
    """The head's labels from raw inputs: `classify` (image),
    `classify_text` (text) or `entail` (image, text)."""
    model, spec = self.model, self._input_spec(1)
    # (name, kind) of each input, as BEiT-3's served functions name them.
    names = {"image": ("images", "image"), "ids": ("text", "text")}
    inputs = tuple(serving.Input(*names[k], v.shape[1:], str(v.dtype))
                   for k, v in spec.items())

    def fn(params, *xs):
      return model.apply({"params": params}, dict(zip(spec, xs)))
    return {SERVED[self.input]: serving.Function(fn, inputs, "labels",
                                                 self.label_names)}

  def serving_tokenizer(self):
    return self.text_tokenizer if self.input != "image" else None
