"""Image classification fine-tuning: any florax image tower + a linear head.

The fine-tuning stage every family shares (EVA's and BEiT's ImageNet
fine-tuning, BEiT-3's vision-only use, FLAVA's image classification head):
the tower of `config.model.image` (arch 'vit', 'coswin' or 'multiway',
built by `two_tower.image_encoder`) pools each image, and a linear layer
`head` maps the pooled feature to `model.num_classes` logits. Params are
`image_encoder/...` and `head/{kernel,bias}`, the layout of florax's
image-only two-tower model (`two_tower.from_config` with no text tower,
embed_dim 0 and num_classes), so
  * `init_from.prefixes=[["image_encoder", "image_encoder"]]` seeds the
    tower from any UniCL / EVA / imported run or export;
  * BEiT-3 (arch 'multiway', `two_tower.MultiwayImageTower`): the Multiway
    backbone image-only (vision experts), the mean of its patch tokens and
    `fc_norm`, as unilm's BEiT3ForImageClassification; its params are
    `image_encoder/multiway/...`, so a beit3_mdm run's backbone loads with
    `init_from.prefixes=[["multiway", "image_encoder/multiway"]]` and
    layer decay counts its vision_embed as layer 0 and block i as i + 1
    (the beit3_* presets of configs/finetune.py set both);
  * `launch.export` of a classify workdir is loaded by
    `florax.inference.load(...)`, whose `classify(images)` gives these
    logits (encode_image gives the unit-norm pooled feature).
The head starts as BEiT/EVA start it: trunc-normal(0.02) scaled by
`model.head_init_scale` (their --init_scale 0.001; 0 = timm's zero head).

Training (`config.finetune`), in timm's terms, on device inside the jitted
loss:
  * Mixup/CutMix in timm's 'batch' mode (timm.data.Mixup): with probability
    `mix_prob` the batch is mixed; if both alphas are > 0 CutMix is chosen
    with probability `switch_prob`; lambda ~ Beta(alpha, alpha) of the
    chosen kind; every example is mixed with the batch reversed (the global
    batch: mesh-independent, a resumed run on another mesh mixes the same);
    CutMix pastes a box of side int(S * sqrt(1 - lambda)) centred at a
    uniform pixel, clipped to the image, and lambda becomes 1 - box area /
    image area. One draw per step (micro-batch, with gradient
    accumulation) from the step's rng: `draw_mix` makes the draws,
    `apply_mix` is the arithmetic, so either can be checked alone.
  * Soft targets exactly as timm's `mixup_target`: one-hot smoothed to
    1 - s + s/K and s/K (`label_smoothing` s, K classes), mixed as
    lambda * y + (1 - lambda) * y reversed; the loss is their cross-entropy
    with the logits (timm's SoftTargetCrossEntropy), in fp32. With mixing
    off this is label-smoothed cross-entropy.
  * `train_backbone=False`: head-only training (a linear probe): the tower
    runs deterministically (no dropout / drop path) and the gradient stops
    at its pooled feature, so no backward pass runs through it; because
    AdamW's decoupled weight decay would still shrink a tower whose gradient
    is zero, validate() requires `optimizer.freeze` to cover the tower
    (the optimizer then gives it exactly zero updates). The ',probe'
    presets of configs/finetune.py set both.

Evaluation: top-1 and top-5 of the head's logits over the whole held-out
digits split (pessimistic ties, as every florax evaluator), fed over the
mesh, plus the plain (unsmoothed) cross-entropy: eval/top1, eval/top5,
eval/loss. With `optimizer.ema_decay` > 0 the trainer evaluates the EMA of
the weights (florax/train/ema.py).

Data: the embedded digits (labels 0-9) at `data.image_size` with
`data.random_shift`. Records and TFDS are refused for now: their pipeline
yields no class label for image-only examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax import export
from florax.data import digits
from florax.data import digits_images
from florax.data import pipeline
from florax.data import preprocess
from florax.evaluate import mesh_map
from florax.models import flops as flops_lib
from florax.models import layers, two_tower
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks.registry import register
from florax.train import optimizer as opt_lib

#: Where the tower's params live (init_from prefixes, optimizer.freeze).
TOWER = "image_encoder"
DIGIT_CLASSES = len(digits.CLASS_WORDS)


# -- Mixup / CutMix (timm.data.Mixup, mode='batch') ---------------------------

@dataclasses.dataclass(frozen=True)
class MixConfig:
  """timm's Mixup arguments (its defaults as BEiT/EVA fine-tune with)."""
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  @property
  def enabled(self) -> bool:
    """timm's `mixup_active`, and a probability that can fire."""
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and (
        self.mix_prob > 0)


class MixDraws(NamedTuple):
  """The random draws of one step (scalars).

  Attributes:
    apply: whether the batch is mixed at all (u < mix_prob).
    use_cutmix: CutMix rather than Mixup.
    lam: the Beta(alpha, alpha) draw of the chosen kind, before CutMix's
      area correction.
    cy, cx: the CutMix box centre, uniform in [0, H) x [0, W).
  """
  apply: Any
  use_cutmix: Any
  lam: Any
  cy: Any
  cx: Any


def draw_mix(rng: jax.Array, cfg: MixConfig, height: int,
             width: int) -> MixDraws:
  """The draws of timm's `_params_per_batch` and `rand_bbox` for one batch.

  Two random calls (each costs its own compile of the PRNG): four uniforms
  give the apply and switch coin flips and the box centre (floor(u * S):
  uniform over [0, S), as randint), one Gamma draw gives both lambdas.
  """
  k_uniform, k_gamma = jax.random.split(rng)
  u = jax.random.uniform(k_uniform, (4,))
  apply = u[0] < cfg.mix_prob
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = u[1] < cfg.switch_prob
  else:  # only one of them is on
    use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a), both kinds' in one
  # vectorised draw (jax.random.beta would compile two rejection loops per
  # call), in log space as jax.random.beta does, so that small alphas do
  # not underflow to 0 / 0. An alpha that is off draws a dummy Gamma(1).
  alphas = jnp.asarray([cfg.mixup_alpha] * 2 + [cfg.cutmix_alpha] * 2,
                       jnp.float32)
  logg = jax.random.loggamma(k_gamma, jnp.where(alphas > 0, alphas, 1.0))
  top = jnp.maximum(logg[0::2], logg[1::2])
  g1, g2 = jnp.exp(logg[0::2] - top), jnp.exp(logg[1::2] - top)
  lam_mixup, lam_cutmix = g1 / (g1 + g2)
  centre = lambda v, size: jnp.minimum(jnp.floor(v * size).astype(jnp.int32),
                                       size - 1)
  return MixDraws(
      apply=apply, use_cutmix=use_cutmix,
      lam=jnp.where(use_cutmix, lam_cutmix, lam_mixup).astype(jnp.float32),
      cy=centre(u[2], height), cx=centre(u[3], width))


def cutmix_box(lam, cy, cx, height: int, width: int):
  """timm's `rand_bbox` for given draws: (yl, yh, xl, xh) and the corrected
  lambda 1 - box area / image area (`cutmix_bbox_and_lam`)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  return (yl, yh, xl, xh), 1.0 - area / float(height * width)


def mixup_target(labels, num_classes: int, lam, smoothing: float):
  """timm's `mixup_target`: smoothed one-hot, mixed with its reverse."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  y1 = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_),
                 jnp.float32(on), jnp.float32(off))
  return y1 * lam + y1[::-1] * (1.0 - lam)


def apply_mix(images, labels, draws: MixDraws, cfg: MixConfig,
              num_classes: int):
  """Mixes a (B, H, W, C) batch for given draws.

  Returns:
    (mixed images, soft targets (B, num_classes) float32, lambda).
  """
  if not cfg.enabled:
    return images, mixup_target(labels, num_classes, 1.0,
                                cfg.label_smoothing), jnp.float32(1.0)
  height, width = images.shape[1:3]
  flipped = images[::-1]
  lam = draws.lam.astype(jnp.float32)
  mixed = images * lam.astype(images.dtype) + flipped * (
      1.0 - lam).astype(images.dtype)
  (yl, yh, xl, xh), lam_box = cutmix_box(lam, draws.cy, draws.cx, height,
                                         width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  # With one kind on, the config decides it (timm draws no switch then).
  use_cutmix = (draws.use_cutmix if cfg.mixup_alpha > 0 and
                cfg.cutmix_alpha > 0 else jnp.asarray(cfg.cutmix_alpha > 0))
  out = jnp.where(draws.apply, jnp.where(use_cutmix, cut, mixed), images)
  lam = jnp.where(draws.apply, jnp.where(use_cutmix, lam_box, lam),
                  jnp.float32(1.0))
  return out, mixup_target(labels, num_classes, lam,
                           cfg.label_smoothing), lam


def soft_cross_entropy(logits, targets):
  """Mean over examples of -sum(targets * log_softmax(logits)), in fp32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets * logp, axis=-1))


# -- model ---------------------------------------------------------------------

def head_layer(num_classes: int, init_scale: float) -> nn.Module:
  """The linear head `head`: trunc-normal(0.02) x init_scale (0: zeros)."""
  init = (nn.initializers.zeros if init_scale == 0 else
          nn.initializers.truncated_normal(stddev=0.02 * init_scale))
  return layers.dense(num_classes, ("embed", "classes"), name="head",
                      kernel_init=init)


class Classifier(nn.Module):
  """Image tower -> pooled feature (fp32) -> dropout -> linear head.

  Same params and the same logits as `two_tower.TwoTower.classify` of the
  image-only model `two_tower.from_config(config.model)` builds.
  """
  image_encoder: nn.Module
  num_classes: int
  head_init_scale: float = 0.001
  head_dropout: float = 0.0

  def setup(self):
    self.head = head_layer(self.num_classes, self.head_init_scale)
    self.drop = nn.Dropout(self.head_dropout)

  def features(self, images, deterministic: bool = True):
    feat, _ = self.image_encoder(images, deterministic)
    return feat.astype(jnp.float32)

  def __call__(self, images, deterministic: bool = True,
               train_backbone: bool = True):
    if train_backbone:
      feat = self.features(images, deterministic)
    else:  # a frozen tower: eval-mode features, no backward pass through it
      feat = jax.lax.stop_gradient(self.features(images, True))
    return self.head(self.drop(feat, deterministic=deterministic))


def _number(value, name: str, low: float, high: float | None = None,
            high_open: bool = True) -> float:
  """`value` as a float in [low, high) (or [low, high]); ValueError naming
  `name` otherwise."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    value = float(value)
    ok = value >= low and (high is None or value < high
                           or (not high_open and value == high))
  if not ok:
    span = (f">= {low}" if high is None else
            f"in [{low}, {high}{')' if high_open else ']'}")
    raise ValueError(f"config.{name} must be a number {span}, got {value!r}")
  return value


@register("classify")
class ClassifyTask(base.Task):
  example_unit = "images"
  tower = TOWER  # the params a linear probe freezes

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._maps: dict[str, mesh_map.MeshMap] = {}
    self._holdout = None

  # -- config ---------------------------------------------------------------

  def mix_config(self) -> MixConfig:
    ft = self.config.get("finetune") or {}
    defaults = MixConfig()
    return MixConfig(**{f.name: ft.get(f.name, getattr(defaults, f.name))
                        for f in dataclasses.fields(MixConfig)})

  @property
  def train_backbone(self) -> bool:
    return bool((self.config.get("finetune") or {}).get("train_backbone",
                                                        True))

  def validate(self):
    self._validate_data()
    self._validate_model()
    self._validate_finetune()

  def _validate_data(self):
    cfg = self.config
    if cfg.data.name != "digits":
      raise ValueError(
          f"data.name={cfg.data.name!r}: the classify task reads the "
          "embedded digits only (data.name='digits'); the records/TFDS "
          "pipeline yields no class label for image-only examples yet")
    size = cfg.data.image_size
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
      raise ValueError(f"data.image_size must be a positive integer, got "
                       f"{size!r}")
    if cfg.data.get("train_examples", -1) == 0:
      raise ValueError("the digits train split is empty: "
                       "data.train_examples=0")

  def _validate_model(self):
    cfg = self.config
    size = cfg.data.image_size
    model = cfg.model
    if model.get("text") is not None:
      raise ValueError("model.text: the classify task trains an image tower "
                       "and a head; remove the text tower (model.text=None)")
    if model.get("embed_dim", 0):
      raise ValueError(
          f"model.embed_dim={model.embed_dim}: the head reads the tower's "
          "pooled feature directly; set model.embed_dim=0")
    if model.get("dtype", "float32") not in two_tower.DTYPES:
      raise ValueError(f"model.dtype={model.get('dtype')!r} is not one of "
                       f"{sorted(two_tower.DTYPES)}")
    classes = model.get("num_classes", 0)
    if not isinstance(classes, int) or isinstance(classes, bool) or (
        classes < 2):
      raise ValueError(f"model.num_classes must be an integer >= 2, got "
                       f"{classes!r}")
    if classes < DIGIT_CLASSES:
      raise ValueError(f"model.num_classes={classes}, but the digits labels "
                       f"are 0..{DIGIT_CLASSES - 1}")
    # model.image: arch, and whether the image size fits the tower.
    two_tower.validate_image(model, size)

  def _validate_finetune(self):
    cfg, model = self.config, self.config.model
    _number(model.get("head_init_scale", 0.001), "model.head_init_scale", 0.0)
    _number(model.get("head_dropout", 0.0), "model.head_dropout", 0.0, 1.0)
    ft = cfg.get("finetune") or {}
    _number(ft.get("label_smoothing", 0.1), "finetune.label_smoothing",
            0.0, 1.0)
    _number(ft.get("mixup_alpha", 0.8), "finetune.mixup_alpha", 0.0)
    _number(ft.get("cutmix_alpha", 1.0), "finetune.cutmix_alpha", 0.0)
    _number(ft.get("mix_prob", 1.0), "finetune.mix_prob", 0.0, 1.0,
            high_open=False)
    _number(ft.get("switch_prob", 0.5), "finetune.switch_prob", 0.0, 1.0,
            high_open=False)
    if not isinstance(ft.get("train_backbone", True), bool):
      raise ValueError("config.finetune.train_backbone must be True or "
                       f"False, got {ft.get('train_backbone')!r}")
    if not self.train_backbone:
      self._check_tower_frozen()

  def _check_tower_frozen(self):
    abstract = nn.unbox(jax.eval_shape(self.init, jax.random.key(0)))
    mask = opt_lib.frozen_mask(abstract,
                               self.config.optimizer.get("freeze", ()))
    names = export.flatten_params(abstract)
    frozen = export.flatten_params(mask) if mask is not None else {}
    loose = [n for n in names if n.startswith(self.tower + "/")
             and not frozen.get(n, False)]
    if loose:
      raise ValueError(
          "finetune.train_backbone=False trains the head only, but "
          f"optimizer.freeze leaves {len(loose)} tower params trainable "
          f"(e.g. {loose[0]!r}), which AdamW's weight decay would still "
          f"change: set --config.optimizer.freeze='(\"^{self.tower}/\",)' "
          "(the ',probe' presets of configs/finetune.py set both)")

  # -- pieces ---------------------------------------------------------------

  @property
  def model(self) -> Classifier:
    m = self.config.model
    return Classifier(
        image_encoder=two_tower.image_encoder(m, two_tower.DTYPES[m.dtype]),
        num_classes=m.num_classes,
        head_init_scale=float(m.get("head_init_scale", 0.001)),
        head_dropout=float(m.get("head_dropout", 0.0)))

  def batch_spec(self, global_batch_size):
    s = self.config.data.image_size
    return {
        "image": jax.ShapeDtypeStruct((global_batch_size, s, s, 3),
                                      jnp.float32),
        "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32),
    }

  def init(self, rng):
    s = self.config.data.image_size
    return self.model.init({"params": rng},
                           jnp.zeros((1, s, s, 3), jnp.float32))["params"]

  def train_iterators(self, process_index, process_count):
    cfg = self.config.data
    return {base.DEFAULT_KIND: iter(digits_images.digits_image_dataset(
        image_size=cfg.image_size,
        batch_size=self.config.train.batch_size // process_count,
        seed=self.config.seed, process_index=process_index,
        process_count=process_count, random_shift=cfg.get("random_shift", 0),
        train_examples=cfg.get("train_examples", -1)))}

  # -- objective ------------------------------------------------------------

  def loss(self, params, batch, rng, ctx=None):
    mix_rng, drop_rng = jax.random.split(rng)
    images, labels = batch["image"], batch["label"]
    mix = self.mix_config()
    draws = draw_mix(mix_rng, mix, images.shape[1], images.shape[2])
    images, targets, lam = apply_mix(images, labels, draws, mix,
                                     self.config.model.num_classes)
    logits = self.model.apply({"params": params}, images,
                              deterministic=False,
                              train_backbone=self.train_backbone,
                              rngs={"dropout": drop_rng})
    loss = soft_cross_entropy(logits, targets)
    # Against the class with the larger share of the mixed target.
    hits = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
    return loss, {"accuracy": jnp.mean(hits.astype(jnp.float32)),
                  "mix_lambda": lam}

  def flops_per_example(self):
    """Analytic FLOPs per image (florax.models.flops): tower + head
    trained; with train_backbone=False the tower runs forward only and the
    head, behind a stop_gradient, computes no input gradient."""
    m = self.config.model
    tower = flops_lib.image_tower_forward(m, self.config.data.image_size)
    head = flops_lib.dense(1, flops_lib.image_feature_width(m),
                           m.num_classes)
    if self.train_backbone:
      return (tower + flops_lib.Forward(head)).train()
    return tower.flops + flops_lib.Forward(head, input_layer=head).train()

  # -- evaluation and export ------------------------------------------------

  def preprocess_spec(self) -> dict:
    """The digits' eval transform: whole image resized to [-1, 1] (also
    recorded in exports and applied by florax.inference)."""
    return preprocess.resize_spec(self.config.data.image_size)

  def zeroshot_defaults(self) -> dict:
    """Recorded in exports: the class names (the head's label order)."""
    return export.zeroshot_defaults(self.config)

  def logits_map(self) -> mesh_map.MeshMap:
    """(params, images) -> float32 logits, fed over the mesh."""
    if "logits" not in self._maps:
      model = self.model
      self._maps["logits"] = mesh_map.MeshMap(
          lambda params, images: model.apply({"params": params}, images),
          sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps["logits"]

  def holdout(self) -> tuple[np.ndarray, np.ndarray]:
    if self._holdout is None:
      self._holdout = pipeline.holdout_arrays(self.config.data.image_size)
    return self._holdout

  def evaluate(self, params, frozen=None, step=None):
    images, labels = self.holdout()
    logits = np.asarray(self.logits_map()(params, images), np.float64)
    return classification_metrics(logits, labels)


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           ks=(1, 5)) -> dict[str, float]:
  """eval/top{k} (k <= classes) and eval/loss (cross-entropy) of logits.

  Pessimistic ties, as every florax evaluator: the true class ranks after
  every other class scoring at least as high (or NaN: a diverged model
  scores no hits).
  """
  labels = np.asarray(labels, np.int64)
  true = logits[np.arange(len(labels)), labels]
  # Counts the true class itself, hence the - 1.
  ranks = np.sum(~(logits < true[:, None]), axis=1) - 1
  out = {f"eval/top{k}": float(np.mean(ranks < k)) for k in ks
         if k <= logits.shape[1]}
  shifted = logits - logits.max(axis=1, keepdims=True)
  logz = np.log(np.sum(np.exp(shifted), axis=1))
  out["eval/loss"] = float(np.mean(logz - shifted[np.arange(len(labels)),
                                                  labels]))
  return out
