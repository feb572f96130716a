"""UniCL two-tower contrastive training (Florence; CLIP as a special case).

Builds a CoSwin image tower and a text transformer joined by projections and
a learnable temperature, trains them with the UniCL loss on image-label-
description triplets, and evaluates zero-shot classification with prompt-
template ensembles on a held-out split.
"""

from __future__ import annotations

import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from florax.data import digits
from florax.data import pipeline
from florax.data import record_pipeline
from florax.data import tokenizer as tok_lib
from florax.losses import contrastive
from florax.models import coswin, text, two_tower
from florax.tasks import base

DATA_SOURCES = ("digits", "records", "captions", "tfds")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def build_model(model_cfg, vocab_size: int | None = None) -> two_tower.TwoTower:
  """The two-tower model described by `config.model`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  dtype = DTYPES[model_cfg.dtype]
  image_cfg = coswin.CoSwinConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                     for k, v in model_cfg.image.items()})
  text_fields = dict(model_cfg.text)
  if vocab_size is not None:
    text_fields["vocab_size"] = vocab_size
  text_cfg = text.TextConfig(**text_fields)
  return two_tower.TwoTower(
      image_encoder=coswin.CoSwin(image_cfg, dtype=dtype),
      text_encoder=text.TextTransformer(text_cfg, dtype=dtype),
      embed_dim=model_cfg.embed_dim,
      init_temperature=model_cfg.init_temperature)


@base.register("unicl")
class UniCLTask(base.Task):
  example_unit = "images"

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self._tokenizer = None
    self._holdout = None
    self._encoders = None

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg = self.config
    if cfg.data.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {cfg.data.name!r}; data.name is one "
                       f"of {DATA_SOURCES}")
    if cfg.data.name != "digits" and cfg.data.name != "tfds" and (
        not cfg.data.records.path):
      raise ValueError(f"data.name={cfg.data.name!r} needs data.records.path")
    image_cfg = coswin.CoSwinConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                       for k, v in cfg.model.image.items()})
    coswin.validate(image_cfg, cfg.data.image_size)
    text.validate(text.TextConfig(**dict(cfg.model.text)))
    if cfg.data.max_len > cfg.model.text.max_len:
      raise ValueError(f"data.max_len {cfg.data.max_len} exceeds "
                       f"model.text.max_len {cfg.model.text.max_len}")
    tok = self.tokenizer
    if tok.vocab_size > cfg.model.text.vocab_size:
      raise ValueError(
          f"the tokenizer has {tok.vocab_size} pieces but "
          f"model.text.vocab_size is {cfg.model.text.vocab_size}")
    if cfg.data.train_examples == 0:
      raise ValueError("the digits train split is empty: data.train_examples=0")
    if len(self.holdout[0]) == 0:
      raise ValueError("the held-out split is empty")

  # -- pieces ---------------------------------------------------------------

  @property
  def tokenizer(self) -> tok_lib.Tokenizer:
    """`data.records.tokenizer_path` if set, else trained on the dataset's
    texts at first use and cached in the workdir."""
    if self._tokenizer is None:
      cfg = self.config.data
      if cfg.name != "digits" and cfg.records.tokenizer_path:
        self._tokenizer = tok_lib.load_tokenizer(cfg.records.tokenizer_path)
      else:
        self._tokenizer = tok_lib.load_or_train_tokenizer(
            os.path.join(self.workdir, "tokenizer.model"), self._corpus(),
            cfg.tokenizer_vocab_size)
    return self._tokenizer

  def _corpus(self):
    cfg = self.config.data
    if cfg.name == "digits":
      return digits.all_descriptions()
    if cfg.name == "records":
      from florax.data import records  # pylint: disable=g-import-not-at-top
      return list(records.iter_texts(cfg.records.path))
    raise ValueError(f"data.name={cfg.name!r}: set data.records.tokenizer_path "
                     "(train one with python -m launch.train_tokenizer)")

  @property
  def model(self) -> two_tower.TwoTower:
    return build_model(self.config.model)

  @property
  def holdout(self):
    if self._holdout is None:
      self._holdout = pipeline.holdout_arrays(self.config.data.image_size)
    return self._holdout

  def batch_spec(self, global_batch_size):
    s, length = self.config.data.image_size, self.config.data.max_len
    return {
        "image": jax.ShapeDtypeStruct((global_batch_size, s, s, 3), jnp.float32),
        "text": jax.ShapeDtypeStruct((global_batch_size, length), jnp.int32),
        "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32),
    }

  def init(self, rng):
    spec = self.batch_spec(1)
    variables = self.model.init(
        {"params": rng}, jnp.zeros(spec["image"].shape, jnp.float32),
        jnp.zeros(spec["text"].shape, jnp.int32))
    return variables["params"]

  def records_data_config(self):
    """`data.records` with the fields this task owns filled in."""
    cfg = self.config.data
    rc = ml_collections.ConfigDict(cfg.records.to_dict())
    rc.source = cfg.name
    rc.image_size = cfg.image_size
    rc.max_text_len = cfg.max_len
    rc.batch_size = self.config.train.batch_size
    rc.seed = self.config.seed
    return rc

  def train_iterator(self, batch_size, process_index, process_count):
    cfg = self.config.data
    if cfg.name != "digits":
      return record_pipeline.make_train_iterator(
          self.records_data_config(), tokenizer=self.tokenizer,
          process_index=process_index, process_count=process_count)
    return iter(pipeline.digits_train_dataset(
        self.tokenizer, image_size=cfg.image_size, max_len=cfg.max_len,
        batch_size=batch_size, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        random_shift=cfg.random_shift, train_examples=cfg.train_examples))

  # -- objective ------------------------------------------------------------

  def loss(self, params, batch, rng):
    image_emb, text_emb, scale = self.model.apply(
        {"params": params}, batch["image"], batch["text"],
        deterministic=False, rngs={"dropout": rng})
    loss, metrics = contrastive.unicl_loss(image_emb, text_emb,
                                           batch["label"], scale)
    metrics["temperature"] = 1.0 / scale
    return loss, metrics

  # -- evaluation -----------------------------------------------------------

  def encode_fns(self):
    """Jitted (params, batch) -> L2-normalised embeddings, built once."""
    if self._encoders is None:
      self._encoders = self._build_encoders()
    return self._encoders

  def _build_encoders(self):
    model = self.model

    @jax.jit
    def encode_image(params, images):
      return contrastive.l2_normalize(model.apply(
          {"params": params}, images, method=model.encode_image))

    @jax.jit
    def encode_text(params, ids):
      return contrastive.l2_normalize(model.apply(
          {"params": params}, ids, method=model.encode_text))
    return encode_image, encode_text

  def evaluate(self, params):
    """Zero-shot top-1/top-5 on the held-out digits."""
    encode_image, encode_text = self.encode_fns()
    ids = self.tokenizer.encode_batch(
        [digits.describe(c, t) for c in range(10) for t in digits.TEMPLATES],
        self.config.data.max_len)
    t = np.asarray(encode_text(params, ids)).reshape(10, len(digits.TEMPLATES), -1)
    class_emb = t.mean(1)
    class_emb /= np.linalg.norm(class_emb, axis=-1, keepdims=True)
    images, labels = self.holdout
    bs = self.config.eval.batch_size
    scores = []
    for i in range(0, len(images), bs):
      chunk = images[i:i + bs]
      pad = bs - len(chunk)
      if pad:  # one compiled shape for every chunk
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                                chunk.dtype)])
      emb = np.asarray(encode_image(params, chunk))[:bs - pad]
      scores.append(emb @ class_emb.T)
    scores = np.concatenate(scores)
    correct = scores[np.arange(len(labels)), labels]
    rank = np.sum(scores > correct[:, None], axis=1)
    return {"eval/zeroshot_top1": float(np.mean(rank < 1)),
            "eval/zeroshot_top5": float(np.mean(rank < 5))}
