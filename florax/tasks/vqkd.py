"""VQ-KD tokenizer training (BEiT v2): distil a frozen teacher into codes.

The model is florax.models.vqkd (ViT encoder -> l2-normalised 32-d codes ->
decoder regressing the teacher's patch features); this task feeds it images,
runs the teacher (any florax image tower in a workdir or export: the
quickstart's Florence model for the digits demo, an imported CLIP for real
runs) as frozen variables inside the step, and reports codebook usage:

  train/codebook/perplexity, train/codebook/used_codes   in the batch
  eval/<name>_used_codes, _used_fraction, _perplexity     over a held-out
                                                          split (evaluator
                                                          type
                                                          'codebook_usage')
  eval/<name>_cosine                                      decoder vs teacher
                                                          (during training)

The trained workdir is a tokenizer: florax.tasks.vq_tokenizer reads it as
the frozen network of another task (BEiT-3's masked image modeling targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from florax.data import digits_images
from florax.data import preprocess
from florax.data import record_pipeline
from florax.evaluate import eval_sets
from florax.evaluate import mesh_map
from florax.models import flops as flops_lib
from florax.models import two_tower
from florax.models import vqkd as vqkd_lib
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import frozen_tower
from florax.tasks.registry import register

DATA_SOURCES = ("digits", "records", "tfds")
EVAL_TYPES = ("codebook_usage",)
TASK_NAME = "vqkd"


def model_config(model_cfg, target_width: int) -> vqkd_lib.VQKDConfig:
  """`config.model` as a VQKDConfig (the teacher gives the target width)."""
  if two_tower.image_arch(model_cfg) != "vit":
    raise ValueError("VQ-KD's encoder is a ViT: set model.image.arch='vit'")
  dec = model_cfg.decoder
  return vqkd_lib.VQKDConfig(
      encoder=two_tower.image_config(model_cfg),
      codebook_size=model_cfg.codebook_size, code_dim=model_cfg.code_dim,
      decoder_depth=dec.depth, decoder_width=dec.width,
      decoder_heads=dec.num_heads, decoder_mlp_dim=dec.mlp_dim,
      target_width=target_width,
      codebook_init_std=model_cfg.codebook_init_std)


class _Keys:
  """An iterator of batches keeping only `keys` (a records stream also
  yields labels); state and metrics are the wrapped iterator's."""

  def __init__(self, it, keys):
    self._it, self._keys = it, tuple(keys)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    return {k: batch[k] for k in self._keys}

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def metrics(self):
    return self._it.metrics() if hasattr(self._it, "metrics") else {}

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()


@register(TASK_NAME)
class VQKDTask(base.Task):
  example_unit = "images"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._teacher = None
    self._maps = {}
    self._sets = {}

  # -- config ---------------------------------------------------------------

  def validate(self):
    cfg = self.config
    if cfg.data.name not in DATA_SOURCES:
      raise ValueError(f"unknown dataset {cfg.data.name!r}; data.name is one "
                       f"of {DATA_SOURCES}")
    if cfg.data.name == "records" and not cfg.data.records.path:
      raise ValueError("data.name='records' needs data.records.path")
    size = cfg.data.image_size
    if not isinstance(size, int) or size <= 0:
      raise ValueError(f"data.image_size must be a positive integer, got "
                       f"{size!r}")
    if cfg.model.dtype not in two_tower.DTYPES:
      raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    # The model's own fields first (a wrong codebook fails without reading
    # the teacher), with a stand-in target width.
    vqkd_lib.validate(model_config(cfg.model, 1), size)
    for field in ("codebook", "commitment", "dead_code"):
      w = cfg.vq.get(field + "_weight")
      if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
        raise ValueError(f"vq.{field}_weight must be a number >= 0, got "
                         f"{w!r}")
    teacher = self.teacher  # reads its config: a bad path fails here
    g, gs = teacher.grid, self.model_config.grid
    if g % gs and gs % g:
      raise ValueError(
          f"the teacher ({teacher.path}) gives a {g}x{g} feature grid at "
          f"{teacher.image_size} px and the tokenizer has {gs}x{gs} patches: "
          "one must be a multiple of the other (choose model.image."
          "patch_size accordingly)")
    for name, ev in (cfg.get("evals") or {}).items():
      if not ev.get("enabled", True):
        continue
      if ev.get("type", name) not in EVAL_TYPES:
        raise ValueError(f"config.evals.{name}: the vqkd task runs "
                         f"evaluators of types {EVAL_TYPES}")
      source = ev.get("data", {}).get("source", "digits")
      if source not in DATA_SOURCES:
        raise ValueError(f"config.evals.{name}.data.source={source!r} is not "
                         f"one of {DATA_SOURCES}")
      every = ev.get("every", 0)
      if not isinstance(every, int) or every < 0:
        raise ValueError(f"config.evals.{name}.every must be an integer >= "
                         f"0, got {every!r}")

  # -- pieces ---------------------------------------------------------------

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def teacher(self) -> frozen_tower.FrozenImageTower:
    if self._teacher is None:
      self._teacher = frozen_tower.from_config(
          self.config.teacher, self.dtype, self.preprocess_spec())
    return self._teacher

  @property
  def model_config(self) -> vqkd_lib.VQKDConfig:
    return model_config(self.config.model, self.teacher.width)

  @property
  def model(self) -> vqkd_lib.VQKD:
    return vqkd_lib.VQKD(self.model_config, self.dtype)

  @property
  def loss_weights(self) -> vqkd_lib.LossWeights:
    vq = self.config.vq
    return vqkd_lib.LossWeights(float(vq.codebook_weight),
                                float(vq.commitment_weight),
                                float(vq.dead_code_weight))

  def batch_spec(self, global_batch_size):
    s = self.config.data.image_size
    return {"image": jax.ShapeDtypeStruct((global_batch_size, s, s, 3),
                                          jnp.float32)}

  def init(self, rng):
    s = self.config.data.image_size
    return self.model.init({"params": rng},
                           jnp.zeros((1, s, s, 3), jnp.float32))["params"]

  # -- frozen teacher -------------------------------------------------------

  def frozen_spec(self):
    return self.teacher.spec()

  def load_frozen(self, shardings):
    return self.teacher.load(shardings)

  def frozen_source(self):
    return "teacher: " + self.teacher.source()

  # -- data -----------------------------------------------------------------

  def train_iterators(self, process_index, process_count):
    cfg = self.config.data
    batch = self.config.train.batch_size
    if cfg.name == "digits":
      it = iter(digits_images.digits_image_dataset(
          image_size=cfg.image_size, batch_size=batch // process_count,
          seed=self.config.seed, process_index=process_index,
          process_count=process_count, random_shift=cfg.random_shift,
          train_examples=cfg.train_examples, keys=("image",)))
    else:
      rc = ml_collections.ConfigDict(cfg.records.to_dict())
      rc.source = cfg.name
      rc.image_size = cfg.image_size
      rc.max_text_len = 1
      rc.batch_size = batch
      rc.seed = self.config.seed
      rc.text = False
      it = _Keys(record_pipeline.make_train_iterator(
          rc, process_index=process_index, process_count=process_count),
                 ("image",))
    return {base.DEFAULT_KIND: it}

  # -- objective ------------------------------------------------------------

  def targets(self, frozen, images):
    """The teacher's features on the tokenizer's patches, (B, N, C)."""
    feats = self.teacher.patch_features(frozen, images)
    feats = frozen_tower.resample_to_grid(feats, self.model_config.grid)
    return feats.reshape(feats.shape[0], -1, feats.shape[-1])

  def loss(self, params, batch, rng, ctx):
    target = self.targets(ctx.frozen, batch["image"])
    out = self.model.apply({"params": params}, batch["image"],
                           deterministic=False, rngs={"dropout": rng})
    h = out["h"]
    picks = vqkd_lib.dead_code_targets(h.reshape(-1, h.shape[-1]),
                                       params["codebook"])
    # masked_negative_cosine (inside) stops the gradient at the teacher.
    return vqkd_lib.vqkd_loss(out["rec"], target, h, out["z"],
                              out["indices"], params["codebook"], picks,
                              self.loss_weights)

  def flops_per_example(self):
    """Analytic training FLOPs per image (florax.models.flops): the trained
    tokenizer, encoder ViT + encode head + decoder ViT + decode head,
    forward and backward (the encoder's patch conv on pixels computes no
    input gradient); the two nearest-code searches over the codebook
    (tokens x code_dim x codebook_size each: the model's argmax and the
    dead-code targets', both without gradient) once each; and the frozen
    teacher's forward, plus the resize of the pixels to its resolution
    when it differs. Gathers (the chosen codes), the l2 normalisations,
    the resampling of the teacher grid and the losses are elementwise."""
    m = self.model_config
    trained = (flops_lib.vqkd_encoder_forward(m)
               + flops_lib.vqkd_decoder_forward(m))
    search = flops_lib.code_similarity(m.grid ** 2, m.code_dim,
                                       m.codebook_size)
    teacher = self.teacher
    frozen = (flops_lib.image_tower_forward(teacher.config.model,
                                            teacher.image_size).flops
              + flops_lib.resize_flops(self.config.data.image_size,
                                       teacher.image_size))
    return trained.train() + 2 * search + frozen

  # -- evaluation -----------------------------------------------------------

  def preprocess_spec(self) -> dict:
    return preprocess.data_eval_spec(self.config.data)

  def _map(self, name, fn):
    if name not in self._maps:
      self._maps[name] = mesh_map.MeshMap(
          fn, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps[name]

  def code_indices(self, params, images: np.ndarray) -> np.ndarray:
    """int32 (n, N) codes of host images, fed over the mesh."""
    model = self.model
    fn = self._map("codes", lambda p, x: model.apply(
        {"params": p}, x, method=model.encode)[1])
    return fn(params, images)

  def reconstruction_cosine(self, params, frozen, images) -> np.ndarray:
    """(n,) mean over patches of cos(decoder output, teacher feature)."""
    model = self.model

    def fn(pf, x):
      p, f = pf
      rec = model.apply({"params": p}, x)["rec"]
      target = self.targets(f, x)
      unit = vqkd_lib.l2_normalize
      return jnp.mean(jnp.sum(unit(rec) * unit(target), -1), -1)
    return self._map("cosine", fn)((params, frozen), images)

  def _eval_set(self, data_cfg) -> eval_sets.EvalSet:
    key = repr(sorted(data_cfg.to_dict().items()) if hasattr(
        data_cfg, "to_dict") else data_cfg)
    if key not in self._sets:
      self._sets[key] = eval_sets.load(data_cfg, self.preprocess_spec())
    return self._sets[key]

  def evaluate(self, params, frozen=None, step=None):
    """Codebook usage over each 'codebook_usage' evaluator's split: codes
    used at least once (count and fraction of K) and the perplexity; with
    the teacher at hand (during training), the reconstruction cosine."""
    metrics = {}
    k = self.config.model.codebook_size
    for name, ev in (self.config.get("evals") or {}).items():
      if not ev.get("enabled", True):
        continue
      every = ev.get("every", 0)
      if step is not None and every and step % every:
        continue
      images = self._eval_set(ev.data).images
      codes = self.code_indices(params, images)
      counts = np.bincount(codes.reshape(-1), minlength=k)
      usage = {n: float(v) for n, v in vqkd_lib.usage_metrics(
          jnp.asarray(counts)).items()}
      out = {"used_codes": usage["used_codes"],
             "used_fraction": usage["used_codes"] / k,
             "perplexity": usage["perplexity"]}
      if frozen is not None:
        out["cosine"] = float(np.mean(self.reconstruction_cosine(
            params, frozen, images)))
      metrics.update({f"eval/{name}_{m}": v for m, v in out.items()})
    return metrics

