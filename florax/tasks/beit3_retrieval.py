"""BEiT-3 as a dual encoder for image-text retrieval (Wang et al. 2022, §3.1,
Fig. 2d; unilm's BEiT3ForRetrieval), fine-tuned from the pretrained
Multiway checkpoint (task `beit3_retrieval`).

The shared Multiway backbone encodes images and texts SEPARATELY: an image
call routes every token through the vision experts (`encode_image`), a text
call through the language experts (`encode_text`); the vision-language
experts are never used. The image's [CLS] and the text's first token
([BOS], unilm's language CLS), after the per-modality final norms, are
projected (`image_proj`, `text_proj`: linear, no bias, as unilm's heads)
and L2-normalised; similarities are cosines times a learned scale
(`logit_scale`, log(1/0.07) at init, clamped at 100 as CLIP does).

Loss: florax's contrastive loss (`florax.losses.contrastive.unicl_loss`)
over the batch. `retrieval.positives` says what a positive is:
  'instance'  CLIP's InfoNCE, each image's own text (COCO/Flickr, as BEiT-3);
  'class'     UniCL: texts of the same digit are positives of each other
              (the digits repeat 10 classes in every batch, so 'instance'
              would push apart identical descriptions).
The loss is the SUM of the two directions (unicl_loss's convention; CLIP
halves it, which only rescales the gradient).

Evaluation (`evaluate`): the held-out digits, one description per image
(template i mod T of image i's digit, as florax.evaluate.eval_sets does).
Many images share a digit and identical descriptions, so instance-level
recall is undefined there (identical texts tie); the evaluator scores at the
level of the digit: image->text R@k = fraction of images whose k best texts
include one describing their digit, text->image R@k = fraction of texts
whose k best images include one of their digit (`class_recall_at_k`, with
florax's pessimistic tie rule: a right answer tied with a wrong one ranks
after it). Logged as eval/retrieval_i2t_r{1,5}, eval/retrieval_t2i_r{1,5}.

Params: `multiway/...` (init_from.prefixes [["multiway", "multiway"]] from a
`beit3_mdm` workdir), `image_proj`, `text_proj`, `logit_scale`. The text
tokenizer is the pretrained run's (florax.tasks.beit3_caption).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import digits
from florax.data import pipeline
from florax.evaluate import mesh_map
from florax.losses import contrastive
from florax.models import layers, multiway, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common as common
from florax.tasks.registry import register

POSITIVES = ("instance", "class")
POOLS = ("cls", "mean")


def pool_tokens(tokens, valid, pool: str):
  """'cls': the first token (unilm's); 'mean': the mean over the valid
  tokens (text padding excluded)."""
  if pool == "cls":
    return tokens[:, 0]
  w = valid.astype(jnp.float32)[..., None]
  return (jnp.sum(tokens.astype(jnp.float32) * w, 1)
          / jnp.maximum(jnp.sum(w, 1), 1.0)).astype(tokens.dtype)


class DualEncoder(nn.Module):
  """Multiway backbone used as two towers (module docstring)."""
  config: multiway.MultiwayConfig
  embed_dim: int
  dtype: Any = jnp.float32
  pool: str = "cls"

  def setup(self):
    self.multiway = multiway.Multiway(self.config, self.dtype)
    self.image_proj = layers.dense(self.embed_dim, ("embed", "mlp"),
                                   use_bias=False, dtype=self.dtype)
    self.text_proj = layers.dense(self.embed_dim, ("embed", "mlp"),
                                  use_bias=False, dtype=self.dtype)
    self.log_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(np.log(1 / 0.07)), ()), (), jnp.float32)

  def logit_scale(self):
    return jnp.exp(jnp.minimum(self.log_scale, np.log(100.0)))

  def encode_image(self, images, deterministic=True):
    tokens, valid = self.multiway.encode_image(images,
                                               deterministic=deterministic)
    return contrastive.l2_normalize(self.image_proj(
        pool_tokens(tokens, valid, self.pool)))

  def encode_text(self, ids, deterministic=True):
    tokens, valid = self.multiway.encode_text(ids,
                                              deterministic=deterministic)
    return contrastive.l2_normalize(self.text_proj(
        pool_tokens(tokens, valid, self.pool)))

  def __call__(self, images, ids, deterministic=True):
    return (self.encode_image(images, deterministic),
            self.encode_text(ids, deterministic), self.logit_scale())

  def init_all(self, images, ids):
    """Creates every param: the pair call also creates the vl experts, which
    the dual encoder never runs but a full Multiway checkpoint holds."""
    self.multiway(images=images, text=ids)
    return self(images, ids)


def retrieval_loss(image_emb, text_emb, labels, scale, positives: str):
  """florax's contrastive loss: 'instance' = CLIP (every pair its own
  class), 'class' = UniCL over `labels`."""
  if positives == "instance":
    labels = jnp.arange(image_emb.shape[0])
  return contrastive.unicl_loss(image_emb, text_emb, labels, scale)


def class_ranks(sims: np.ndarray, query_labels, cand_labels) -> np.ndarray:
  """Pessimistic rank of each query's best right candidate: the number of
  wrong candidates (another class) scoring >= it. sims (Q, C)."""
  sims = np.asarray(sims, np.float64)
  right = np.asarray(query_labels)[:, None] == np.asarray(cand_labels)[None]
  if not right.any(axis=1).all():
    raise ValueError("a query has no candidate of its class")
  best = np.max(np.where(right, sims, -np.inf), axis=1)
  return np.sum(~right & (sims >= best[:, None]), axis=1)


def class_recall_at_k(image_emb, text_emb, image_labels, text_labels,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """{'i2t_r{k}', 't2i_r{k}'}: recall at the level of the class (module
  docstring). NaN similarities score as misses."""
  sims = np.asarray(image_emb, np.float64) @ np.asarray(text_emb,
                                                         np.float64).T
  sims = np.where(np.isnan(sims), -np.inf, sims)
  i2t = class_ranks(sims, image_labels, text_labels)
  t2i = class_ranks(sims.T, text_labels, image_labels)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i < k))
  return out


@register("beit3_retrieval")
class BEiT3RetrievalTask(base.Task):
  example_unit = "pairs"
  # The contrastive loss couples the batch: no micro-batch accumulation.
  supports_grad_accumulation = False

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tok = None
    self._maps = {}
    self._holdout = None

  def validate(self):
    common.validate_common(self, needs_mask=False)
    r = self.config.retrieval
    if r.positives not in POSITIVES:
      raise ValueError(f"retrieval.positives must be one of {POSITIVES}, got "
                       f"{r.positives!r}")
    if not common.is_int(r.embed_dim) or r.embed_dim < 1:
      raise ValueError(f"retrieval.embed_dim must be a positive integer, got "
                       f"{r.embed_dim!r}")
    if r.get("pool", "cls") not in POOLS:
      raise ValueError(f"retrieval.pool must be one of {POOLS}, got "
                       f"{r.pool!r}")
    ks = tuple(r.ks)
    if not ks or not all(common.is_int(k) and k >= 1 for k in ks):
      raise ValueError(f"retrieval.ks must be positive integers, got {ks!r}")
    if self.config.get("evals"):
      raise ValueError("beit3_retrieval's evaluator is configured under "
                       "config.retrieval (config.evals must be empty)")

  @property
  def backbone(self):
    return common.backbone(self.config)

  @property
  def text_tokenizer(self):
    if self._tok is None:
      self._tok = common.load_text_tokenizer(self.config, self.workdir)
    return self._tok

  @property
  def model(self) -> DualEncoder:
    return DualEncoder(self.backbone, int(self.config.retrieval.embed_dim),
                       two_tower.DTYPES[self.config.model.dtype],
                       self.config.retrieval.get("pool", "cls"))

  def batch_spec(self, global_batch_size):
    s, length = self.config.data.image_size, self.config.data.max_len
    b = global_batch_size
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def init(self, rng):
    s, length = self.config.data.image_size, self.config.data.max_len
    return self.model.init({"params": rng}, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, length), jnp.int32),
                           method=DualEncoder.init_all)["params"]

  def train_iterators(self, process_index, process_count):
    common.record_tokenizer(self)
    d = self.config.data
    return {base.DEFAULT_KIND: iter(pipeline.digits_train_dataset(
        self.text_tokenizer, image_size=d.image_size, max_len=d.max_len,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=d.get("random_shift", 0),
        train_examples=d.get("train_examples", -1)))}

  def loss(self, params, batch, rng, ctx=None):
    image_emb, text_emb, scale = self.model.apply(
        {"params": params}, batch["image"], batch["text"],
        deterministic=False, rngs={"dropout": rng})
    loss, metrics = retrieval_loss(image_emb, text_emb, batch["label"], scale,
                                   self.config.retrieval.positives)
    metrics["temperature"] = 1.0 / scale
    return loss, metrics

  # -- export --------------------------------------------------------------------

  def serving(self):
    """The two towers' unit embeddings (`ServedModel.encode_image /
    encode_text / similarity`), as the evaluator computes them."""
    model, d = self.model, self.config.data

    def image(params, images):
      return model.apply({"params": params}, images,
                         method=DualEncoder.encode_image)

    def text(params, ids):
      return model.apply({"params": params}, ids,
                         method=DualEncoder.encode_text)
    s = d.image_size
    return {
        "encode_image": serving.Function(
            image, (serving.Input("images", "image", (s, s, 3)),),
            "embedding"),
        "encode_text": serving.Function(
            text, (serving.Input("text", "text", (d.max_len,), "int32"),),
            "embedding")}

  def serving_tokenizer(self):
    return self.text_tokenizer

  # -- evaluation ----------------------------------------------------------------

  def _map(self, name, method):
    if name not in self._maps:
      model = self.model
      self._maps[name] = mesh_map.MeshMap(
          lambda params, x: model.apply({"params": params}, x, method=method),
          sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps[name]

  def holdout(self):
    """(images, labels, text ids): image i described once, by template
    i mod T of its digit."""
    if self._holdout is None:
      images, labels = pipeline.holdout_arrays(self.config.data.image_size)
      texts = [digits.describe(int(c),
                               digits.TEMPLATES[i % len(digits.TEMPLATES)])
               for i, c in enumerate(labels)]
      ids = self.text_tokenizer.encode_batch(texts, self.config.data.max_len)
      self._holdout = images, labels, ids
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    images, labels, ids = self.holdout()
    image_emb = self._map("image", DualEncoder.encode_image)(params, images)
    text_emb = self._map("text", DualEncoder.encode_text)(params, ids)
    out = class_recall_at_k(image_emb, text_emb, labels, labels,
                            tuple(self.config.retrieval.ks))
    return {f"eval/retrieval_{k}": v for k, v in out.items()}
