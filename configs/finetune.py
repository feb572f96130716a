"""Image-classification fine-tuning (florax/tasks/classify.py).

Presets (`--config configs/finetune.py:NAME`):
  tiny          EVA's tiny student (a 2-layer ViT, patch 8 at 32 px) trained
                from scratch on the embedded digits; the CPU demo. It takes
                a tiny EVA MIM run's tower as is:
                --config.init_from.path=EVA_TINY_WORKDIR
  vit_b16       ViT-B/16 with BEiT's recipe for a self-supervised (MIM)
                checkpoint on ImageNet-1K.
  vit_l14       ViT-L/14 with BEiT-large's recipe for the same.
  vit_g14       EVA's ViT-g/14, EVA's intermediate fine-tuning on
                ImageNet-21K (224 px).
  vit_g14_in1k  EVA's ViT-g/14, EVA's final ImageNet-1K fine-tuning
                (336 px, EMA of the weights).
  beit3_tiny    BEiT-3's tiny Multiway (3 x 64, patch 8 at 32 px, as
                configs/beit3.py:tiny) on the digits with layer decay 0.65;
                the CPU demo of BEiT-3's vision-only use. It takes a tiny
                beit3_mdm run's backbone as is:
                --config.init_from.path=BEIT3_TINY_WORKDIR
  beit3_base    BEiT-3 base (12 x 768, patch 16 at 224 px) with unilm's
                ImageNet-1K fine-tuning recipe.
A ',probe' suffix (`tiny,probe`) trains the head only on a frozen tower
(finetune.train_backbone=False + optimizer.freeze), without Mixup/CutMix,
label smoothing or weight decay: a linear probe.

The towers are those of configs/eva.py (same ViT presets, class token and
absolute positions, q/k/v biases), so
  --config.init_from.path=EVA_RUN --config.init_from.prefixes=
      '(("image_encoder", "image_encoder"),)'
loads every tower param (pooling is BEiT/EVA fine-tuning's: the mean of
the patch tokens + a fresh fc_norm; the MIM run's final `norm` is unused).
For another source (a UniCL / EVA-CLIP run, an import), set model.image to
that run's tower. Only the embedded digits are read for now (see
classify.py); the ImageNet presets therefore describe a run's shape,
optimizer and schedule (launch/plan.py), with steps computed from the
datasets' sizes.

The beit3_* towers are BEiT-3's Multiway backbone run on images alone
(model.image.arch='multiway': the fields of multiway.MultiwayConfig, as
configs/beit3.py's model.multiway, plus the arch), pooled as unilm's
BEiT3ForImageClassification (the mean of the patch tokens + a fresh
fc_norm). init_from.prefixes is preset to (("multiway",
"image_encoder/multiway"),): only a beit3_mdm workdir's (or export's)
backbone loads; its text embedding and MDM heads are left out. The
language and vision-language experts are in the tower (so the checkpoint
loads whole and an export keeps them), but an image never reaches them.
They are frozen (optimizer.freeze), as PyTorch's AdamW skips params
without a gradient, so weight decay does not shrink them either.

Recipes (cited per preset below): BEiT (Bao et al. 2022), microsoft/unilm
beit/get_started_for_image_classification.md, "fully self-supervised
pretrained" commands; EVA (Fang et al. 2023, §2.3.1: IN-21K intermediate
fine-tuning for 60 epochs at 224 px, then IN-1K for 10 epochs, a linear
classifier), hyper-parameters from baaivision/EVA eva/README.md. Common
to both (run_class_finetuning.py defaults): AdamW, weight decay 0.05, head
init_scale 0.001, mean pooling, label smoothing 0.1, Mixup/CutMix in timm's
batch mode with prob 1.0 and switch prob 0.5, cosine decay to ~0 after a
linear warmup.
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.models import multiway, vit

IMAGENET_1K = 1_281_167  # training images
IMAGENET_21K = 14_197_122  # fall11 release, 21,841 classes


def _steps(epochs: float, examples: int, batch: int) -> int:
  return round(epochs * examples / batch)


# name: ViT preset (`vit`) or Multiway preset (`multiway`), image size,
# classes, global batch, epochs, warmup epochs, training examples per epoch
# (the CPU demos: steps, warmup steps), peak lr, layer decay, drop path,
# label smoothing, mixup alpha, cutmix alpha, EMA decay, AdamW (b2, eps).
_PRESETS = {
    # The CPU demo: from scratch (no decay of the lr per layer), 400 steps of
    # 128 over the 1,438 digits train images. Mixup/CutMix are off: they
    # regularise long runs of large models, and this short one underfits
    # with them (held-out top-1 0.66 at 0.8/1.0, 0.83 at mix_prob 0.3,
    # 0.94 without); --config.finetune.mixup_alpha=0.8 ... turns them on.
    "tiny": dict(vit="tiny/8", size=32, classes=10, batch=128, steps=400,
                 warmup=20, lr=5e-3, layer_decay=1.0, drop_path=0.0,
                 smoothing=0.1, mixup=0.0, cutmix=0.0, ema=0.0,
                 b2=0.999, eps=1e-8),
    # BEiT-base, MIM checkpoint -> IN-1K: batch 8 x 128 = 1024, lr 4e-3,
    # 100 epochs with 20 of warmup, layer decay 0.65, drop path 0.1,
    # mixup 0.8, cutmix 1.0 (smoothing 0.1: the script's default).
    "vit_b16": dict(vit="B/16", size=224, classes=1000, batch=1024,
                    epochs=100, warmup_epochs=20, examples=IMAGENET_1K,
                    lr=4e-3, layer_decay=0.65, drop_path=0.1, smoothing=0.1,
                    mixup=0.8, cutmix=1.0, ema=0.0, b2=0.999, eps=1e-8),
    # BEiT-large, MIM checkpoint -> IN-1K: batch 8 x 64 x 2 = 1024, lr 1e-3,
    # 50 epochs with 5 of warmup, layer decay 0.75, drop path 0.2, mixup
    # 0.8, cutmix 1.0; here on EVA's /14 patches.
    "vit_l14": dict(vit="L/14", size=224, classes=1000, batch=1024,
                    epochs=50, warmup_epochs=5, examples=IMAGENET_1K,
                    lr=1e-3, layer_decay=0.75, drop_path=0.2, smoothing=0.1,
                    mixup=0.8, cutmix=1.0, ema=0.0, b2=0.999, eps=1e-8),
    # EVA g/14 on IN-21K: batch 8 x 8 x 64 = 4096, lr 1e-4, layer decay
    # 0.85, 60 epochs with 15 of warmup, drop path 0.4, mixup 0.0, cutmix
    # 1.0, AdamW betas (0.9, 0.98), eps 1e-6, 224 px.
    "vit_g14": dict(vit="g/14", size=224, classes=21841, batch=4096,
                    epochs=60, warmup_epochs=15, examples=IMAGENET_21K,
                    lr=1e-4, layer_decay=0.85, drop_path=0.4, smoothing=0.1,
                    mixup=0.0, cutmix=1.0, ema=0.0, b2=0.98, eps=1e-6),
    # EVA g/14, IN-21K checkpoint -> IN-1K: batch 4 x 8 x 16 = 512, lr 3e-5,
    # layer decay 0.95, 10 epochs with 2 of warmup, drop path 0.4, no
    # mixup / cutmix, label smoothing 0.3, RandAugment (records only, not
    # in florax), --model_ema --model_ema_eval (timm's default decay
    # 0.9999), 336 px.
    "vit_g14_in1k": dict(vit="g/14", size=336, classes=1000, batch=512,
                         epochs=10, warmup_epochs=2, examples=IMAGENET_1K,
                         lr=3e-5, layer_decay=0.95, drop_path=0.4,
                         smoothing=0.3, mixup=0.0, cutmix=0.0, ema=0.9999,
                         b2=0.999, eps=1e-8),
    # BEiT-3's tiny Multiway, the CPU demo: the tiny ViT's schedule and
    # regularisation, with BEiT-3's layer decay. At 300 steps, held-out
    # top-1 0.72 from scratch, 0.89 from a 1,200-step configs/beit3.py:tiny
    # run (one run each).
    "beit3_tiny": dict(multiway="tiny", size=32, classes=10, batch=128,
                       steps=400, warmup=20, lr=5e-3,
                       layer_decay=0.65, drop_path=0.0, smoothing=0.1,
                       mixup=0.0, cutmix=0.0, ema=0.0, b2=0.999, eps=1e-8),
    # BEiT-3 base -> IN-1K, unilm beit3/get_started/
    # get_started_for_image_classification.md as recalled, NOT re-checked
    # against the file (verify before a real run): batch 8 x 128 = 1024,
    # lr 7e-4, layer decay 0.65, 50 epochs with 5 of warmup, drop path
    # 0.15, weight decay 0.05, mixup 0.8, cutmix 1.0 (smoothing 0.1 and
    # AdamW (0.9, 0.999), 1e-8: run_beit3_finetuning.py's defaults, as
    # recalled), no EMA.
    "beit3_base": dict(multiway="base", size=224, classes=1000, batch=1024,
                       epochs=50, warmup_epochs=5, examples=IMAGENET_1K,
                       lr=7e-4, layer_decay=0.65, drop_path=0.15,
                       smoothing=0.1, mixup=0.8, cutmix=1.0, ema=0.0,
                       b2=0.999, eps=1e-8),
}

# A beit3_mdm run's backbone (`multiway/...`) onto the tower.
BEIT3_PREFIXES = (("multiway", "image_encoder/multiway"),)
# What an image never reaches in the Multiway: the language and VL experts
# (norm1/norm2/mlp, torchscale's per-modality attention copies), the final
# language norm and the MIM mask token.
BEIT3_UNUSED = (r"^image_encoder/multiway/(.*_(l|vl)/|"
                r"vision_embed/mask_token$)",)


def image_config(preset: str, image_size: int,
                 **overrides) -> ml_collections.ConfigDict:
  """`model.image`: a ViT preset pooled as BEiT/EVA fine-tune (the mean of
  the patch tokens, then fc_norm)."""
  cfg = vit.config_for(preset, image_size, pool="mean", fc_norm=True,
                       **overrides)
  fields = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(cfg).items()}
  return ml_collections.ConfigDict({"arch": "vit", **fields})


def multiway_image_config(preset: str, image_size: int,
                          **overrides) -> ml_collections.ConfigDict:
  """`model.image` of arch 'multiway': a Multiway preset
  (multiway.config_for), run image-only and mean-pooled with fc_norm
  (two_tower.MultiwayImageTower)."""
  cfg = multiway.config_for(preset, image_size=image_size, **overrides)
  return ml_collections.ConfigDict({"arch": "multiway", **vars(cfg)})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, sep, mode = (arg or "tiny").lower().partition(",")
  if name not in _PRESETS:
    raise ValueError(f"unknown finetune preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)} (optionally with ',probe')")
  if sep and mode != "probe":
    raise ValueError(f"finetune config {arg!r}: write NAME or NAME,probe")
  p = _PRESETS[name]
  tiny = "steps" in p  # the CPU demos: steps, not ImageNet epochs
  c = common.base_config()
  c.task = "classify"
  c.preset = name + (",probe" if mode else "")

  c.model = ml_collections.ConfigDict()
  if "multiway" in p:
    # unilm's classifier has no final norm before its fc_norm pooling
    # (normalize_output=False); the tiny demo was measured with it on.
    c.model.image = multiway_image_config(
        p["multiway"], p["size"], drop_path_rate=p["drop_path"],
        remat="none" if tiny else "full", normalize_output=tiny)
  else:
    c.model.image = image_config(p["vit"], p["size"],
                                 drop_path_rate=p["drop_path"],
                                 remat="none" if tiny else "full")
  c.model.num_classes = p["classes"]
  c.model.embed_dim = 0  # no projection: the head reads the pooled feature
  # Head kernel ~ trunc-normal(0.02 * this) (BEiT/EVA --init_scale; 0 = a
  # zero head); dropout on the pooled feature before it.
  c.model.head_init_scale = 0.001
  c.model.head_dropout = 0.0
  # EVA/BEiT fine-tune in fp16 with dynamic loss scaling (DeepSpeed).
  c.model.dtype = "float32" if tiny else "float16"

  c.finetune = ml_collections.ConfigDict()
  c.finetune.label_smoothing = p["smoothing"]
  c.finetune.mixup_alpha = p["mixup"]    # 0 = off
  c.finetune.cutmix_alpha = p["cutmix"]  # 0 = off
  c.finetune.mix_prob = 1.0     # probability a batch is mixed at all
  c.finetune.switch_prob = 0.5  # CutMix instead of Mixup, when both are on
  # False: head-only training on a frozen tower (also needs the tower in
  # optimizer.freeze: the ',probe' presets set both).
  c.finetune.train_backbone = True

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # the only source of the classify task for now
  c.data.image_size = p["size"]
  c.data.random_shift = 2 if tiny else 0  # pixels of random translation
  c.data.train_examples = -1  # -1: the whole train split

  c.train.batch_size = p["batch"]
  if tiny:
    c.train.steps, c.optimizer.warmup_steps = p["steps"], p["warmup"]
  else:
    c.train.steps = _steps(p["epochs"], p["examples"], p["batch"])
    c.optimizer.warmup_steps = _steps(p["warmup_epochs"], p["examples"],
                                      p["batch"])
  c.train.eval_every = 100 if tiny else 5_000
  c.train.checkpoint_every = 100 if tiny else 2_500
  c.train.log_every = 20 if tiny else 100

  c.optimizer.learning_rate = p["lr"]
  c.optimizer.layer_decay = p["layer_decay"]
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, p["b2"], p["eps"]
  c.optimizer.weight_decay = 0.05
  # BEiT/EVA fine-tune without gradient clipping; the CPU demo keeps it.
  c.optimizer.clip_norm = 1.0 if tiny else 0.0
  c.optimizer.ema_decay = p["ema"]
  # BEiT/EVA's no-decay list: every vector, cls_token and pos_embed.
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token")
  # Regular expressions over flat param names that are never updated.
  c.optimizer.freeze = BEIT3_UNUSED if "multiway" in p else ()
  if "multiway" in p:
    c.init_from.prefixes = BEIT3_PREFIXES
  c.sharding.zero_stage = 0 if tiny else 1  # EVA: ZeRO stage 1

  if mode == "probe":
    # A linear probe: the head alone on the frozen tower's features.
    c.finetune.train_backbone = False
    c.optimizer.freeze = ("^image_encoder/",)
    c.finetune.mixup_alpha = c.finetune.cutmix_alpha = 0.0
    c.finetune.label_smoothing = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.layer_decay = 1.0
    c.optimizer.ema_decay = 0.0
  c.lock()
  return c
