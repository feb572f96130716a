"""EVA: masked image modeling against a frozen image-text teacher.

Presets (`--config configs/eva.py:NAME`):
  tiny  a 2-layer ViT (patch 8 at 32 px: a 4x4 grid) on the embedded
        digits, regressing the quickstart Florence model's last-stage
        features (also 4x4 at 32 px): the CPU demo. Set the teacher with
        --config.teacher.path=WORKDIR_OF_THE_QUICKSTART.
  b16, l14  ViT-B/16 and ViT-L/14 students at 224 px (smaller runs).
  g14   EVA's ViT-g/14 (40 x 1408 x 6144 x 16, 1011M) at 224 px.
The teacher is any florax image tower: a training workdir or an export,
e.g. OpenAI's CLIP ViT-L/14 imported with
  python -m launch.import_weights --source open_clip --arch ViT-L-14 \
      --checkpoint open_clip_pytorch_model.bin --out clip_l14
  --config.teacher.path=clip_l14
(EVA's target: its 16x16 patch grid at 224 px matches a /14 student's).

Recipe (EVA, Fang et al. 2023, §2.2 and Table 3): block-wise masking of 40%
of the patches, AdamW (0.9, 0.98) with decoupled weight decay 0.05, peak
lr 1e-3 with cosine decay, stochastic depth 0.1, RandomResizedCrop(0.2, 1),
no colour jitter, fp16 with dynamic loss scaling, ZeRO stage 1; no relative
position bias or LayerScale in pre-training. Batch 4096 and 150 epochs
over 29.6M images are EVA's; the warmup (not in the paper) is 1% of the
steps, florax's default.
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.data import record_pipeline
from florax.models import vit

# name: (ViT preset, image size, global batch, steps)
_PRESETS = {
    "tiny": ("tiny/8", 32, 128, 1000),
    "b16": ("B/16", 224, 4096, 1_080_000),
    "l14": ("L/14", 224, 4096, 1_080_000),
    "g14": ("g/14", 224, 4096, 1_080_000),
}


def image_config(preset: str, image_size: int,
                 **overrides) -> ml_collections.ConfigDict:
  """`model.image` of a ViT preset (arch 'vit'), as EVA pre-trains it."""
  fields = dict(vars(vit.config_for(preset, image_size, **overrides)))
  return ml_collections.ConfigDict({"arch": "vit", **fields})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown eva preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  preset, image_size, batch, steps = _PRESETS[name]
  tiny = name == "tiny"
  c = common.base_config()
  c.task = "eva_mim"
  c.preset = name

  c.model = ml_collections.ConfigDict()
  # Class token + learned absolute positions; no relative position bias and
  # no LayerScale in pre-training (§2.2).
  c.model.image = image_config(preset, image_size,
                               drop_path_rate=0.0 if tiny else 0.1,
                               remat="none" if tiny else "full")
  c.model.dtype = "float32" if tiny else "float16"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = ""  # a florax workdir or export (required)
  c.teacher.step = -1  # a workdir's checkpoint; -1 = the latest

  c.mim = ml_collections.ConfigDict()
  c.mim.mask_ratio = 0.4
  # BEiT's smallest block is 16 of 196 patches; a 4x4 grid takes blocks of 2.
  c.mim.min_block = 2 if tiny else 16

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # 'digits' | 'records' | 'tfds' (data.records)
  c.data.image_size = image_size
  c.data.random_shift = 2 if tiny else 0  # digits only
  c.data.train_examples = -1
  c.data.records = record_pipeline.user_data_config()
  c.data.records.text = False
  c.data.records.crop_scale = (0.2, 1.0)  # EVA's RandomResizedCrop
  c.data.records.color_jitter = 0.0

  c.train.batch_size = batch
  c.train.steps = steps
  c.train.eval_every = 250 if tiny else 10_000
  c.train.checkpoint_every = 250 if tiny else 5_000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20 if tiny else steps // 100
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.weight_decay = 0.05
  c.sharding.zero_stage = 0 if tiny else 1
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "mask_token")

  # Linear probes of the student's mean patch token on the held-out digits,
  # trained on the first 600 / 100 train images (a fifth of them sweeps l2).
  for name, n in (("linear_probe", 600), ("linear_probe_100", 100)):
    c.evals[name] = ml_collections.ConfigDict(dict(
        type="linear_probe", enabled=True, every=0,
        data=_digits_split(""), train_data=_digits_split("train", n)))
  c.lock()
  return c


def _digits_split(split: str, max_examples: int = 0):
  return ml_collections.ConfigDict(dict(
      source="digits", path="", split=split, names_file="", tfds_name="",
      max_examples=max_examples))
