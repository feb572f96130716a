"""EVA masked image modeling: regress a frozen teacher's patch features.

EVA (Fang et al. 2023, §2.2): a vanilla ViT sees its images with 40% of the
patches (block-wise, BEiT's masking) replaced by a learned [MASK] embedding;
its normed output tokens are projected by a linear layer to the teacher's
width, and the loss is the negative cosine similarity to the frozen
teacher's features at the masked patches only.

The teacher is any florax image tower in a workdir or export (the
quickstart's Florence model, or an imported CLIP ViT-L/14): it is the task's
frozen variables, run inside the same jitted step without gradients, placed
by the same logical rules as the student, never checkpointed, and recorded
in the workdir so that a resume with another teacher is refused.

Params: `image_encoder/...` (the student ViT, with `mask_token`) and
`mim_head/...`: EVA-CLIP and fine-tuning take the student with
init_from.prefixes [["image_encoder", "image_encoder"]].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from florax.data import digits_images
from florax.data import masking
from florax.data import preprocess
from florax.data import record_pipeline
from florax.evaluate import mesh_map
from florax.evaluate import two_tower as two_tower_evals
from florax.losses import masked_cosine
from florax.models import flops as flops_lib
from florax.models import layers, two_tower, vit
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import frozen_tower
from florax.tasks.registry import register

DATA_SOURCES = ("digits", "records", "tfds")
#: Evaluators of an image-only model (they need features, not texts).
EVAL_TYPES = ("linear_probe", "few_shot")


class MIMStudent(nn.Module):
  """ViT with a [MASK] token + (norm) + linear projection to the teacher."""
  config: vit.ViTConfig
  target_width: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.image_encoder = vit.ViT(cfg, self.dtype)
    # A ViT pooling by the normed mean (fc_norm) leaves its tokens unnormed.
    self.normed = not (cfg.pool == "mean" and cfg.fc_norm)
    if not self.normed:
      self.mim_norm = layers.layer_norm(epsilon=cfg.norm_eps)
    self.mim_head = layers.dense(self.target_width, ("embed", "proj"),
                                 dtype=self.dtype)

  def __call__(self, images, mask, deterministic: bool = True):
    _, aux = self.image_encoder(images, deterministic, mask=mask)
    x = aux["tokens"][:, self.config.num_prefix:]
    if not self.normed:
      x = self.mim_norm(x)
    return self.mim_head(x).astype(jnp.float32)

  def features(self, images):
    """Mean of the final patch tokens: the probe's frozen feature (the
    class token gets no MIM target, so it is not used)."""
    _, aux = self.image_encoder(images, True)
    return jnp.mean(aux["tokens"][:, self.config.num_prefix:].astype(
        jnp.float32), axis=1)


@register("eva_mim")
class EVAMIMTask(base.Task):
  example_unit = "images"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._teacher = None
    self._maps = {}
    self.evaluators = two_tower_evals.Evaluators(self)

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
    if two_tower.image_arch(cfg.model) != "vit":
      raise ValueError("EVA's student is a ViT: set model.image.arch='vit'")
    two_tower.validate_image(cfg.model, size)
    if cfg.model.dtype not in two_tower.DTYPES:
      raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    ratio, min_block = cfg.mim.mask_ratio, cfg.mim.min_block
    if not 0 < ratio < 1:
      raise ValueError(f"mim.mask_ratio must be in (0, 1), got {ratio!r}")
    if not isinstance(min_block, int) or min_block < 1:
      raise ValueError(f"mim.min_block must be a positive integer, got "
                       f"{min_block!r}")
    if round(ratio * self.student.grid ** 2) < 1:
      raise ValueError(f"mim.mask_ratio {ratio} masks no patch of the "
                       f"{self.student.grid}x{self.student.grid} grid")
    teacher = self.teacher  # reads its config: a bad path fails here
    g, gs = teacher.grid, self.student.grid
    if g % gs and gs % g:
      raise ValueError(
          f"the teacher ({teacher.path}) gives a {g}x{g} feature grid at "
          f"{teacher.image_size} px and the student has {gs}x{gs} patches: "
          "one must be a multiple of the other (choose the student's "
          "model.image.patch_size accordingly)")
    for name, ev in (cfg.get("evals") or {}).items():
      if ev.get("enabled", True) and ev.get("type", name) not in EVAL_TYPES:
        raise ValueError(f"config.evals.{name}: an image-only task runs "
                         f"evaluators of types {EVAL_TYPES}")
    two_tower_evals.check(cfg.get("evals"))

  # -- pieces ---------------------------------------------------------------

  @property
  def student(self) -> vit.ViTConfig:
    return two_tower.image_config(self.config.model)

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
  def model(self) -> MIMStudent:
    return MIMStudent(self.student, self.teacher.width, self.dtype)

  def batch_spec(self, global_batch_size):
    s, n = self.config.data.image_size, self.student.grid ** 2
    return {"image": jax.ShapeDtypeStruct((global_batch_size, s, s, 3),
                                          jnp.float32),
            "image_mask": jax.ShapeDtypeStruct((global_batch_size, n),
                                               jnp.bool_)}

  def init(self, rng):
    spec = self.batch_spec(1)
    return self.model.init({"params": rng},
                           jnp.zeros(spec["image"].shape, jnp.float32),
                           jnp.zeros(spec["image_mask"].shape, bool))["params"]

  # -- frozen teacher -------------------------------------------------------

  def frozen_spec(self):
    return self.teacher.spec()

  def load_frozen(self, shardings):
    return self.teacher.load(shardings)

  def frozen_source(self):
    return "teacher: " + self.teacher.source()

  # -- data -----------------------------------------------------------------

  def _block_masking(self) -> masking.BlockMasking:
    g = self.student.grid
    return masking.BlockMasking(grid=(g, g), ratio=self.config.mim.mask_ratio,
                                min_block=self.config.mim.min_block)

  def train_iterators(self, process_index, process_count):
    cfg = self.config.data
    batch = self.config.train.batch_size
    if cfg.name == "digits":
      it = iter(digits_images.digits_image_dataset(
          image_size=cfg.image_size, batch_size=batch // process_count,
          seed=self.config.seed, process_index=process_index,
          process_count=process_count, random_shift=cfg.random_shift,
          train_examples=cfg.train_examples,
          transforms=(self._block_masking(),), keys=("image", "image_mask")))
    else:
      rc = ml_collections.ConfigDict(cfg.records.to_dict())
      rc.source = cfg.name
      rc.image_size = cfg.image_size
      rc.max_text_len = 1
      rc.batch_size = batch
      rc.seed = self.config.seed
      rc.text = False
      rc.image_mask.enabled = True
      rc.image_mask.patch_size = self.student.patch_size
      rc.image_mask.ratio = self.config.mim.mask_ratio
      rc.image_mask.min_block = self.config.mim.min_block
      it = record_pipeline.make_train_iterator(
          rc, process_index=process_index, process_count=process_count)
    return {base.DEFAULT_KIND: it}

  # -- objective ------------------------------------------------------------

  def targets(self, frozen, images):
    """The teacher's features on the student's patches, (B, N, C)."""
    feats = self.teacher.patch_features(frozen, images)
    feats = frozen_tower.resample_to_grid(feats, self.student.grid)
    return feats.reshape(feats.shape[0], -1, feats.shape[-1])

  def loss(self, params, batch, rng, ctx):
    # No gradient reaches the teacher: masked_negative_cosine stops it.
    target = self.targets(ctx.frozen, batch["image"])
    pred = self.model.apply({"params": params}, batch["image"],
                            batch["image_mask"], deterministic=False,
                            rngs={"dropout": rng})
    loss, cos = masked_cosine.masked_negative_cosine(pred, target,
                                                     batch["image_mask"])
    return loss, {"masked_cosine": cos}

  def flops_per_example(self):
    """Analytic FLOPs per image (florax.models.flops): the student ViT and
    its MIM head over every patch, trained (the [MASK] token replaces
    patches, it removes no compute), plus the frozen teacher's forward and
    its input resize when the resolutions differ."""
    student = self.student
    head = flops_lib.dense(student.grid ** 2, student.width,
                           self.teacher.width)
    teacher = flops_lib.image_tower_forward(self.teacher.config.model,
                                            self.teacher.image_size)
    resize = flops_lib.resize_flops(self.config.data.image_size,
                                    self.teacher.image_size)
    return ((flops_lib.vit_forward(student) + flops_lib.Forward(head)).train()
            + teacher.flops + resize)

  # -- evaluation -----------------------------------------------------------

  def preprocess_spec(self) -> dict:
    return preprocess.data_eval_spec(self.config.data)

  def feature_extractor(self) -> mesh_map.MeshMap:
    """(params, images) -> the student's mean patch token (frozen probe)."""
    if "features" not in self._maps:
      model = self.model
      self._maps["features"] = mesh_map.MeshMap(
          lambda params, images: model.apply({"params": params}, images,
                                             method=model.features),
          sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps["features"]

  def evaluate(self, params, frozen=None, step=None):
    return self.evaluators.run(params, step)
