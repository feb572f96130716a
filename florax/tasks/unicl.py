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
from florax.evaluate import few_shot, linear_probe, retrieval, zeroshot
from florax.losses import contrastive
from florax.losses import global_contrastive
from florax.models import coswin, text, two_tower
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.train import grad_cache

DATA_SOURCES = ("digits", "records", "captions", "tfds")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def image_config(model_cfg) -> coswin.CoSwinConfig:
  """`config.model.image` as a CoSwinConfig (config lists become tuples)."""
  return coswin.CoSwinConfig(**{
      k: tuple(v) if isinstance(v, (list, tuple)) else v
      for k, v in model_cfg.image.items()})


def build_model(model_cfg, vocab_size: int | None = None) -> two_tower.TwoTower:
  """The two-tower model described by `config.model`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  dtype = DTYPES[model_cfg.dtype]
  image_cfg = image_config(model_cfg)
  text_fields = dict(model_cfg.text)
  if vocab_size is not None:
    text_fields["vocab_size"] = vocab_size
  text_cfg = text.TextConfig(**text_fields)
  return two_tower.TwoTower(
      image_encoder=coswin.CoSwin(image_cfg, dtype=dtype),
      text_encoder=text.TextTransformer(text_cfg, dtype=dtype),
      embed_dim=model_cfg.embed_dim,
      init_temperature=model_cfg.init_temperature)


def _contrastive_settings(config) -> dict:
  """config.contrastive with defaults for configs that predate it."""
  cc = config.get("contrastive")
  out = {"global_loss": False, "global_backprop": True, "chunk_size": 0,
         "memory_budget_gb": 0.0}
  if cc is not None:
    out.update({k: cc[k] for k in out if k in cc})
  return out


@base.register("unicl")
class UniCLTask(base.Task):
  example_unit = "images"
  # Every example's loss depends on the whole batch (its negatives), so
  # micro-batch accumulation would change the objective (see grad_accum.py).
  supports_grad_accumulation = False

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self._tokenizer = None
    self._holdout = None
    self._encoders = None
    self._auto_chunks = {}

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg = self.config
    if cfg.data.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {cfg.data.name!r}; data.name is one "
                       f"of {DATA_SOURCES}")
    if cfg.data.name != "digits" and cfg.data.name != "tfds" and (
        not cfg.data.records.path):
      raise ValueError(f"data.name={cfg.data.name!r} needs data.records.path")
    coswin.validate(image_config(cfg.model), cfg.data.image_size)
    text.validate(text.TextConfig(**dict(cfg.model.text)))
    if cfg.data.max_len > cfg.model.text.max_len:
      raise ValueError(f"data.max_len {cfg.data.max_len} exceeds "
                       f"model.text.max_len {cfg.model.text.max_len}")
    tok = self.tokenizer
    if tok.vocab_size > cfg.model.text.vocab_size:
      raise ValueError(
          f"the tokenizer has {tok.vocab_size} pieces but "
          f"model.text.vocab_size is {cfg.model.text.vocab_size}")
    if cfg.data.name == "digits" and cfg.data.train_examples == 0:
      raise ValueError("the digits train split is empty: data.train_examples=0")
    if cfg.data.name == "digits" and len(self.holdout[0]) == 0:
      raise ValueError("the held-out split is empty")
    self._validate_contrastive()

  def _validate_contrastive(self):
    """contrastive.chunk_size is 0 (off), a divisor of the per-device batch
    or 'auto' (then memory_budget_gb > 0)."""
    cc = _contrastive_settings(self.config)
    chunk = cc["chunk_size"]
    if chunk == "auto":
      if not cc["memory_budget_gb"] > 0:
        raise ValueError("contrastive.chunk_size='auto' needs "
                         "contrastive.memory_budget_gb > 0, got "
                         f"{cc['memory_budget_gb']!r}")
      return
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
      raise ValueError("contrastive.chunk_size must be 0 (off), a positive "
                       f"integer or 'auto', got {chunk!r}")
    if chunk:
      sizes = mesh_lib.resolve_axis_sizes(dict(self.config.mesh.axes),
                                          jax.device_count())
      shards = int(np.prod([sizes[a] for a in mesh_lib.DATA_AXES
                            if a in sizes]))
      batch = self.config.train.batch_size
      if batch % shards == 0:  # else the trainer reports the batch itself
        try:
          grad_cache.check_chunk_size(batch // shards, chunk)
        except ValueError as e:
          raise ValueError(f"contrastive.chunk_size: {e} (train.batch_size "
                           f"{batch} over {shards} data-parallel shards)"
                           ) from None

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
    if cfg.name == "captions":
      from florax.data import converters  # pylint: disable=g-import-not-at-top
      items, _ = converters.caption_items(cfg.records.path,
                                          cfg.records.image_root or None)
      return [t for item in items for t in item.texts
              if isinstance(t, str) and t.strip()]
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
    loss, metrics = self.contrastive_loss(image_emb, text_emb,
                                          batch["label"], scale)
    metrics["temperature"] = 1.0 / scale
    return loss, metrics

  def contrastive_loss(self, image_emb, text_emb, labels, scale,
                       row_block=None):
    """UniCL over the global batch: sharded over the data axes (each device
    its rows against all columns) when contrastive.global_loss is set and a
    mesh is known, else computed by GSPMD from the whole logits matrix."""
    cc = _contrastive_settings(self.config)
    mesh = mesh_lib.current_mesh(self.mesh)
    if cc["global_loss"] and mesh_lib.data_axes(mesh):
      return global_contrastive.global_unicl_loss(
          image_emb, text_emb, labels, scale, mesh=mesh,
          global_backprop=cc["global_backprop"], row_block=row_block)
    return contrastive.unicl_loss(image_emb, text_emb, labels, scale)

  def value_and_grad(self, params, batch, rng, loss_scale=None):
    """With contrastive.chunk_size set: the gradient cache (exact gradient of
    the towers applied chunk by chunk with keys `grad_cache.chunk_rng(rng,
    tower, chunk)`, tower 0 the image and 1 the text tower); else autodiff
    of `loss`. With `loss_scale` (fp16 loss scaling) the gradients are those
    of loss * loss_scale; the returned loss is unscaled."""
    chunk = self.chunk_size(batch["image"].shape[0])
    if chunk:
      return self._cached_value_and_grad(params, batch, rng, chunk, loss_scale)
    return super().value_and_grad(params, batch, rng, loss_scale)

  def _cached_value_and_grad(self, params, batch, rng, chunk, loss_scale=None):
    model = self.model

    def image_tower(p, images, key):
      return model.apply({"params": p}, images, deterministic=False,
                         rngs={"dropout": key}, method=model.encode_image)

    def text_tower(p, ids, key):
      return model.apply({"params": p}, ids, deterministic=False,
                         rngs={"dropout": key}, method=model.encode_text)

    def loss_fn(p, embeddings):
      scale = model.apply({"params": p}, method=model.logit_scale)
      loss, metrics = self.contrastive_loss(*embeddings, batch["label"], scale,
                                            row_block=chunk)
      metrics["temperature"] = 1.0 / scale
      if loss_scale is None:
        return loss, (loss, metrics)
      # The scaled embedding gradients carry the scale into every tower.
      return loss * loss_scale, (loss, metrics)

    (_, aux), grads = grad_cache.cached_value_and_grad(
        (image_tower, text_tower), loss_fn, params,
        (batch["image"], batch["text"]), rng, chunk_size=chunk,
        mesh=mesh_lib.current_mesh(self.mesh))
    return aux, grads

  def chunk_size(self, global_batch: int) -> int:
    """Per-device gradient-cache chunk for this global batch (0: no cache);
    'auto' is resolved once per batch size by compiling candidates."""
    chunk = _contrastive_settings(self.config)["chunk_size"]
    if chunk != "auto":
      return int(chunk)
    if global_batch not in self._auto_chunks:
      self._auto_chunks[global_batch] = self._auto_chunk_size(global_batch)
    return self._auto_chunks[global_batch]

  def _auto_chunk_size(self, global_batch: int) -> int:
    """Largest chunk whose compiled gradient computation (temporaries,
    params, batch and grads, params sharded by the config's rules) fits
    contrastive.memory_budget_gb per device."""
    mesh = self.mesh
    if mesh is None:
      abstract = mesh_lib.current_mesh()
      mesh = (mesh_lib.make_mesh(dict(abstract.shape)) if abstract is not None
              else mesh_lib.make_mesh({"data": -1}))
    rules = sharding_lib.rules_from_config(self.config.sharding.rules)
    boxed = jax.eval_shape(self.init, jax.random.key(0))
    shardings = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed), shardings)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in self.batch_spec(global_batch).items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    budget = _contrastive_settings(self.config)["memory_budget_gb"] * 2**30

    def peak_bytes(chunk):
      step = jax.jit(lambda p, b, r: self._cached_value_and_grad(p, b, r,
                                                                 chunk))
      with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
        return grad_cache.compiled_peak_bytes(
            step.lower(params, batch, rng).compile())

    local = global_batch // mesh_lib.data_size(mesh)
    return grad_cache.auto_chunk_size(local, peak_bytes, budget)

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

  def _image_features_fn(self):
    """Jitted (params, images) -> pooled image-tower features (before the
    projection), the frozen features of linear probes and few-shot."""
    model = self.model

    def features(module, images):
      return module.image_encoder(images, True)[0].astype(jnp.float32)

    return jax.jit(lambda params, images: model.apply(
        {"params": params}, images, method=features))

  def _in_batches(self, fn, params, x):
    """fn over x in eval.batch_size chunks, the last one zero-padded so every
    chunk has one compiled shape. Yields (start, valid rows of the output)."""
    bs = self.config.eval.batch_size
    for start in range(0, len(x), bs):
      chunk = x[start:start + bs]
      n = len(chunk)
      if n < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      yield start, np.asarray(fn(params, chunk))[:n]

  def zeroshot_prompts(self) -> list[list[str]]:
    """Per class, the prompts whose embeddings are ensembled into it.

    eval.zeroshot_templates: 'dataset' (the digits' own templates, naming
    the class as a word or a numeral) or 'imagenet' (CLIP's 80 templates
    over the class words).
    """
    kind = self.config.eval.get("zeroshot_templates", "dataset")
    if kind == "dataset":
      return [[digits.describe(c, t) for t in digits.TEMPLATES]
              for c in range(len(digits.CLASS_WORDS))]
    if kind == "imagenet":
      return [[t.format(w) for t in zeroshot.IMAGENET_TEMPLATES]
              for w in digits.CLASS_WORDS]
    raise ValueError(f"eval.zeroshot_templates={kind!r}: use 'dataset' or "
                     "'imagenet'")

  def class_embeddings(self, params) -> np.ndarray:
    """Prompt-ensembled class embeddings (classes, d), unit norm."""
    _, encode_text = self.encode_fns()
    max_len = self.config.data.max_len
    bs = self.config.eval.batch_size

    def encode(texts):
      ids = self.tokenizer.encode_batch(texts, max_len)
      return np.concatenate([out for _, out in
                             self._in_batches(encode_text, params, ids)])

    # Each class has its own full prompts (no shared "{}" template), so each
    # is ensembled as one class whose templates are its prompts.
    return np.concatenate([
        zeroshot.class_embeddings(
            encode, [""], [p.replace("{", "{{").replace("}", "}}") + "{}"
                           for p in prompts], batch_size=bs)
        for prompts in self.zeroshot_prompts()])

  def evaluate(self, params):
    """Held-out digits: zero-shot top-1/top-5, and behind `eval` flags
    retrieval R@1/5/10, a linear probe and few-shot episodes.

    Every metric uses the suite's pessimistic tie rule
    (`florax.evaluate`): a right answer tied with a wrong one ranks last.
    """
    if self.config.data.name != "digits":
      # The held-out digits say nothing about a model trained on other data;
      # evaluation splits for records/TFDS are not wired in yet.
      return {}
    ev = self.config.eval
    encode_image, _ = self.encode_fns()
    images, labels = self.holdout
    acc = zeroshot.TopKAccuracy(self.class_embeddings(params), ks=(1, 5))
    keep_emb = ev.get("retrieval", False)
    image_emb = []
    for start, emb in self._in_batches(encode_image, params, images):
      acc.update(emb, labels[start:start + len(emb)])
      if keep_emb:
        image_emb.append(emb)
    metrics = {f"eval/zeroshot_{k}": v for k, v in acc.result().items()}
    if keep_emb:
      metrics.update(self._retrieval(params, np.concatenate(image_emb),
                                     labels))
    if ev.get("linear_probe", False) or ev.get("few_shot", False):
      metrics.update(self._feature_evals(params, images, labels))
    return metrics

  def _retrieval(self, params, image_emb, labels):
    """Image i is described once, by template i mod T of its class."""
    _, encode_text = self.encode_fns()
    texts = [digits.describe(int(c), digits.TEMPLATES[i % len(digits.TEMPLATES)])
             for i, c in enumerate(labels)]
    ids = self.tokenizer.encode_batch(texts, self.config.data.max_len)
    text_emb = np.concatenate([out for _, out in
                               self._in_batches(encode_text, params, ids)])
    recall = retrieval.recall_at_k(image_emb, text_emb,
                                   np.arange(len(labels)), ks=(1, 5, 10))
    return {f"eval/retrieval_{k}": v for k, v in recall.items()}

  def _feature_evals(self, params, holdout_images, holdout_labels):
    ev = self.config.eval
    features = self._image_features_fn()

    def feats(x):
      return np.concatenate([out for _, out in
                             self._in_batches(features, params, x)])

    test_x = feats(holdout_images)
    metrics = {}
    if ev.get("linear_probe", False):
      # Train/val from the digits train split (never the holdout), capped.
      raw, train_y = digits.load_split("train")
      order = np.random.default_rng(self.config.seed).permutation(len(raw))
      order = order[:ev.linear_probe_examples]
      size = self.config.data.image_size
      x = feats(np.stack([digits.to_rgb(raw[i], size) for i in order]))
      y = train_y[order]
      n_val = max(1, len(order) // 5)
      probe = linear_probe.fit_and_score(
          x[n_val:], y[n_val:], x[:n_val], y[:n_val], test_x, holdout_labels,
          num_classes=len(digits.CLASS_WORDS))
      metrics["eval/linear_probe_top1"] = probe["test_acc"]
      metrics["eval/linear_probe_l2"] = probe["l2"]
    if ev.get("few_shot", False):
      for k in ev.few_shot_shots:
        result = few_shot.evaluate(
            test_x, holdout_labels, n_way=ev.few_shot_ways, k_shot=int(k),
            n_query=ev.few_shot_queries, episodes=ev.few_shot_episodes,
            seed=self.config.seed)
        metrics[f"eval/few_shot_{ev.few_shot_ways}way_{k}shot"] = result["acc"]
        metrics[f"eval/few_shot_{ev.few_shot_ways}way_{k}shot_ci95"] = (
            result["ci95"])
    return metrics
