"""FLAVA downstream fine-tuning: a head on h_CLS,I / h_CLS,T / h_CLS,M
(task `flava_classify`, florax/tasks/flava_classify.py).

Presets (`--config configs/flava_finetune.py:NAME`):
  tiny_image  digit classification of images on the tiny FLAVA's image
              encoder (configs/flava.py:tiny's model).
  tiny_text   which digit a description names, on its text encoder.
  tiny_pair   visual entailment (does the description name the image's
              digit?) on its multimodal encoder.
  full_image  FLAVA-full, ImageNet-1K-shaped (1000 classes, 224 px).
  full_text   FLAVA-full's text encoder, a GLUE-shaped 2-class task.
  full_pair   FLAVA-full's multimodal encoder, SNLI-VE-shaped (3 classes).
Each starts from a FLAVA pre-training run or export:
  --config.init_from.path=FLAVA_WORKDIR  (prefixes [["flava", "flava"]];
an HF import directory: --config.init_from.prefixes='(("", "flava"),)').
A ',probe' suffix trains the head only on the frozen encoders
(finetune.train_backbone=False + optimizer.freeze of flava/, no weight
decay): the paper's linear evaluation (§5, its vision tasks).

The full presets' optimizer settings are BERT's GLUE fine-tuning defaults
(AdamW, lr 2e-5 for the encoders' tasks, batch 32, 10% warmup, weight
decay 0.01) and, for the probe, the head's lr 1e-3: the paper defers its
fine-tuning hyper-parameters to the supplemental, which is not in its text;
only the embedded digits are read (classify.py), so they describe a run's
shape, optimizer and schedule.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from florax.models import flava

# name: (model preset, input, classes, batch, steps, warmup, lr)
_PRESETS = {
    "tiny_image": ("tiny", "image", 10, 32, 600, 50, 1e-3),
    "tiny_text": ("tiny", "text", 10, 32, 300, 30, 1e-3),
    "tiny_pair": ("tiny", "pair", 2, 32, 600, 50, 1e-3),
    "full_image": ("full", "image", 1000, 1024, 50_000, 5_000, 1e-4),
    "full_text": ("full", "text", 2, 32, 20_000, 2_000, 2e-5),
    "full_pair": ("full", "pair", 3, 32, 50_000, 5_000, 2e-5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, _, mode = (arg or "tiny_image").lower().partition(",")
  if name not in _PRESETS or mode not in ("", "probe"):
    raise ValueError(f"unknown flava_finetune preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}, optionally with ',probe'")
  preset, input_, classes, batch, steps, warmup, lr = _PRESETS[name]
  probe, tiny = mode == "probe", preset == "tiny"
  c = common.base_config()
  c.task = "flava_classify"
  c.preset = arg or "tiny_image"

  fc = flava.config_for(preset)
  c.model = ml_collections.ConfigDict()
  c.model.flava = ml_collections.ConfigDict(dataclasses.asdict(fc))
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.num_classes = classes
  c.model.head_init_scale = 1.0 if tiny else 0.001
  c.model.head_dropout = 0.0
  c.model.head_hidden = 0

  c.finetune = ml_collections.ConfigDict()
  c.finetune.input = input_
  c.finetune.train_backbone = not probe
  # Mixup/CutMix only mix images; the digits demo trains without them.
  c.finetune.mixup_alpha = 0.0
  c.finetune.cutmix_alpha = 0.0
  c.finetune.mix_prob = 1.0
  c.finetune.switch_prob = 0.5
  c.finetune.label_smoothing = 0.0 if probe else 0.1

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = fc.image.image_size
  c.data.max_len = fc.text.max_len if tiny else 77
  c.data.random_shift = 2 if tiny else 0
  c.data.train_examples = -1
  c.data.negative_rate = 0.5  # pair: contradictions
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = 127 if tiny else 30_000

  c.init_from.prefixes = (("flava", "flava"),)

  c.train.batch_size = batch
  c.train.steps = steps
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 200 if tiny else 5_000
  c.train.checkpoint_every = 200 if tiny else 5_000
  c.optimizer.learning_rate = (1e-3 if not tiny else lr) if probe else lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.0 if probe else (0.05 if tiny else 0.01)
  # FLAVA's logit scale (a setup param) gets no gradient here: no decay.
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "logit_scale")
  if probe:
    c.optimizer.freeze = ("^flava/",)
  c.sharding.zero_stage = 0 if tiny else 3
  c.lock()
  return c
