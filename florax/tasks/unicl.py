"""UniCL two-tower contrastive training (Florence; CLIP as a special case).

Builds a CoSwin image tower and a text transformer joined by projections and
a learnable temperature, trains them with the UniCL loss on image-label-
description triplets, and evaluates zero-shot classification with prompt-
template ensembles on a held-out split.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from florax import export
from florax.data import corpus
from florax.data import digits
from florax.data import pipeline
from florax.data import preprocess
from florax.data import record_pipeline
from florax.data import tokenizer as tok_lib
from florax.evaluate import mesh_map
from florax.evaluate import two_tower as two_tower_evals
from florax.losses import contrastive
from florax.losses import global_contrastive
from florax.models import flops as flops_lib
from florax.models import text, two_tower
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks.registry import register
from florax.train import grad_cache
from florax.train import run_record

DATA_SOURCES = ("digits", "records", "captions", "tfds")


def _contrastive_settings(config) -> dict:
  """config.contrastive with defaults for configs that predate it."""
  cc = config.get("contrastive")
  out = {"global_loss": False, "global_backprop": True, "chunk_size": 0,
         "memory_budget_gb": 0.0}
  if cc is not None:
    out.update({k: cc[k] for k in out if k in cc})
  return out


@register("unicl")
class UniCLTask(base.Task):
  example_unit = "images"
  # Every example's loss depends on the whole batch (its negatives), so
  # micro-batch accumulation would change the objective (see grad_accum.py).
  supports_grad_accumulation = False

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tokenizer = None
    self._embedders = {}
    self._auto_chunks = {}
    self.evaluators = two_tower_evals.Evaluators(self)

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg = self.config
    if cfg.data.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {cfg.data.name!r}; data.name is one "
                       f"of {DATA_SOURCES}")
    if cfg.data.name != "digits" and cfg.data.name != "tfds" and (
        not cfg.data.records.path):
      raise ValueError(f"data.name={cfg.data.name!r} needs data.records.path")
    if not isinstance(cfg.data.image_size, int) or cfg.data.image_size <= 0:
      raise ValueError(f"data.image_size must be a positive integer, got "
                       f"{cfg.data.image_size!r}")
    two_tower.validate_image(cfg.model, cfg.data.image_size)
    text.validate(text.TextConfig(**dict(cfg.model.text)))
    if cfg.data.max_len > cfg.model.text.max_len:
      raise ValueError(f"data.max_len {cfg.data.max_len} exceeds "
                       f"model.text.max_len {cfg.model.text.max_len}")
    tok = self.tokenizer
    if tok.vocab_size > cfg.model.text.vocab_size:
      raise ValueError(
          f"the tokenizer has {tok.vocab_size} pieces but "
          f"model.text.vocab_size is {cfg.model.text.vocab_size}; set "
          f"--config.model.text.vocab_size={tok.vocab_size} (or larger)")
    text_cfg = text.TextConfig(**dict(cfg.model.text))
    if tok.eos_id != text_cfg.eos_id or text_cfg.pad_id not in (None,
                                                                tok.pad_id):
      raise ValueError(
          f"the {tok.kind} tokenizer ends texts with id {tok.eos_id} and pads "
          f"with {tok.pad_id}, but model.text has eos_id={text_cfg.eos_id}, "
          f"pad_id={text_cfg.pad_id}: the text tower would pool at the wrong "
          "token; use the tokenizer the model was built or imported with")
    if cfg.data.name == "digits" and cfg.data.train_examples == 0:
      raise ValueError("the digits train split is empty: data.train_examples=0")
    two_tower_evals.check(cfg.get("evals"))
    if cfg.get("stage", 1) > 1 and not cfg.init_from.path:
      raise ValueError(
          f"Florence stage {cfg.stage} continues from the previous stage: "
          "set --config.init_from.path=PREVIOUS_STAGE_WORKDIR")
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
      shards = sharding_lib.batch_size_divisor(self.mesh, self.rules)
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
  def tokenizer(self) -> tok_lib.TextTokenizer:
    """`data.records.tokenizer_path` if set (florax's SentencePiece, or an
    imported model's tokenizer.json), else trained on the dataset's texts
    at first use and cached in the workdir."""
    if self._tokenizer is None:
      path = self.tokenizer_path()
      if path != os.path.join(self.workdir, "tokenizer.model"):
        kind = self.config.data.records.get("tokenizer_kind") or (
            None if path.endswith((".json", ".gz")) else "sentencepiece")
        self._tokenizer = tok_lib.from_file(path, kind=kind)
      else:
        self._tokenizer = tok_lib.load_or_train_tokenizer(
            path, self._corpus(), self.config.data.tokenizer_vocab_size)
    return self._tokenizer

  def tokenizer_path(self) -> str:
    cfg = self.config.data
    if cfg.name != "digits" and cfg.records.tokenizer_path:
      return cfg.records.tokenizer_path
    return os.path.join(self.workdir, "tokenizer.model")

  def record_tokenizer(self):
    """Records the tokenizer's path and checksum in the workdir; a resume
    with another tokenizer is refused (the text tower's ids would change
    meaning)."""
    path = self.tokenizer_path()
    self.tokenizer  # trains it into the workdir if needed
    run_record.record_or_check(
        self.workdir, "tokenizer.json",
        {"sha256": export.sha256_file(path)},
        "tokenizer", "Train with the tokenizer this workdir was trained with "
        "(data.records.tokenizer_path), or use a new --workdir.")

  def _corpus(self):
    cfg = self.config.data
    if cfg.name == "digits":
      return digits.all_descriptions()
    if cfg.name in ("records", "captions"):
      return corpus.training_texts(cfg.name, cfg.records.path,
                                   cfg.records.image_root or None)
    raise ValueError(f"data.name={cfg.name!r}: set data.records.tokenizer_path "
                     "(train one with python -m launch.train_tokenizer)")

  @property
  def model(self) -> two_tower.TwoTower:
    return two_tower.from_config(self.config.model)

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

  def train_iterators(self, process_index, process_count):
    self.record_tokenizer()
    return {base.DEFAULT_KIND: self.train_iterator(
        self.config.train.batch_size // process_count, process_index,
        process_count)}

  def train_iterator(self, batch_size, process_index, process_count):
    """This process's stream of `batch_size`-row batches."""
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

  def loss(self, params, batch, rng, ctx=None):
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
    axes = sharding_lib.batch_axes(mesh, self.rules) if mesh else ()
    if cc["global_loss"] and axes:
      return global_contrastive.global_unicl_loss(
          image_emb, text_emb, labels, scale, mesh=mesh, axes=axes,
          global_backprop=cc["global_backprop"], row_block=row_block)
    return contrastive.unicl_loss(image_emb, text_emb, labels, scale)

  def value_and_grad(self, params, batch, rng, ctx=None, loss_scale=None):
    """With contrastive.chunk_size set: the gradient cache (exact gradient of
    the towers applied chunk by chunk with keys `grad_cache.chunk_rng(rng,
    tower, chunk)`, tower 0 the image and 1 the text tower); else autodiff
    of `loss`. With `loss_scale` (fp16 loss scaling) the gradients are those
    of loss * loss_scale; the returned loss is unscaled."""
    chunk = self.chunk_size(batch["image"].shape[0])
    if chunk:
      return self._cached_value_and_grad(params, batch, rng, chunk, loss_scale)
    return super().value_and_grad(params, batch, rng, ctx, loss_scale)

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
        mesh=mesh_lib.current_mesh(self.mesh),
        axes=sharding_lib.batch_axes(self.mesh, self.rules))
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
    mesh, rules = self.mesh, self.rules
    boxed = jax.eval_shape(self.init, jax.random.key(0))
    shardings = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed), shardings)
    batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in self.batch_spec(global_batch).items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    budget = _contrastive_settings(self.config)["memory_budget_gb"] * 2**30

    def peak_bytes(chunk):
      step = jax.jit(lambda p, b, r: self._cached_value_and_grad(
          p, b, r, chunk))
      with mesh_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
        return grad_cache.compiled_peak_bytes(
            step.lower(params, batch, rng).compile())

    local = global_batch // sharding_lib.batch_size_divisor(mesh, rules)
    return grad_cache.auto_chunk_size(local, peak_bytes, budget)

  def step_flops(self, kind, global_batch):
    """Analytic step FLOPs (florax.models.flops): both towers and
    projections trained on every pair, plus the B x B logits of the whole
    global batch (not linear in the batch, hence no flops_per_example).
    The gradient cache's recomputed forwards are not counted."""
    cfg = self.config
    pairs = flops_lib.two_tower_forward(cfg.model, cfg.data.image_size,
                                        cfg.data.max_len)
    dim = cfg.model.embed_dim or flops_lib.image_feature_width(cfg.model)
    logits = flops_lib.Forward(flops_lib.contrastive_logits(global_batch,
                                                            dim))
    return (pairs * global_batch + logits).train()

  # -- evaluation and inference hooks ----------------------------------------

  def preprocess_spec(self) -> dict:
    """The eval-time image transform (also recorded in exports and used by
    florax.inference): digits are resized whole to [-1, 1], records are
    centre-cropped and normalised like the records pipeline's eval path."""
    return preprocess.data_eval_spec(self.config.data)

  def _embedder(self, name, fn):
    if name not in self._embedders:
      self._embedders[name] = mesh_map.MeshMap(
          fn, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._embedders[name]

  def encode_fns(self):
    """Jitted (params, batch) -> L2-normalised (image, text) embeddings of
    one batch: the computation `florax.export` serializes and the
    embedders below feed over the mesh."""
    if "encode_fns" not in self._embedders:
      self._embedders["encode_fns"] = tuple(
          jax.jit(fn) for fn in export.encoders(self.model))
    return self._embedders["encode_fns"]

  def image_embedder(self) -> mesh_map.MeshMap:
    """(params, images) -> L2-normalised image embeddings, fed over the mesh."""
    return self._embedder("image", export.encoders(self.model)[0])

  def text_embedder(self) -> mesh_map.MeshMap:
    return self._embedder("text", export.encoders(self.model)[1])

  def feature_extractor(self) -> mesh_map.MeshMap:
    """(params, images) -> pooled image-tower features before the
    projection: the frozen features of linear probes and few-shot."""
    model = self.model

    def features(module, images):
      return module.image_encoder(images, True)[0].astype(jnp.float32)
    return self._embedder("features", lambda params, images: model.apply(
        {"params": params}, images, method=features))

  def zeroshot_defaults(self) -> dict:
    """Class names and templates an export offers for zero-shot: those of
    the first enabled zero-shot evaluator on the user's data (its split's
    class names, or its names_file, and its own templates), so that
    inference's default zero-shot is the logged evaluation; else the digits
    demo's."""
    for name, ev in (self.config.get("evals") or {}).items():
      if ev.get("type", name) != "zeroshot" or not ev.get("enabled", True):
        continue
      if ev.data.get("source", "digits") not in ("records", "tfds"):
        continue
      templates = two_tower_evals.Evaluators.templates(ev)
      if templates is None:  # 'dataset' prompts: records/tfds have none
        continue
      names = self.evaluators.eval_set(ev.data).class_names
      if names:
        return {"class_names": list(names), "templates": templates}
    return export.zeroshot_defaults(self.config)

  def encode_texts(self, params, texts) -> np.ndarray:
    ids = self.tokenizer.encode_batch(list(texts), self.config.data.max_len)
    return self.text_embedder()(params, ids)

  def evaluate(self, params, frozen=None, step=None):
    """`config.evals`, those due at `step` (all when step is None)."""
    return self.evaluators.run(params, step)
