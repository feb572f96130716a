"""BEiT-3 fusion-encoder fine-tuning: VQA (task `beit3_vqa`) and NLVR2
(task `beit3_nlvr2`), florax/tasks/beit3_vqa.py.

Presets (`--config configs/beit3_vqa.py:NAME`):
  tiny, nlvr2_tiny   the tiny Multiway (configs/beit3.py:tiny's model) on
         the generated digits questions / statements (florax.data.digits_qa),
         started from a tiny MDM run (configs/beit3.py:tiny):
           python -m launch.train --config configs/beit3_vqa.py:tiny \\
               --workdir /tmp/vqa --config.init_from.path=MDM_WORKDIR
         (its tokenizer.model is read from there too); without init_from
         the same run starts from random init. VQA on the held-out digits
         after 4000 steps (one run each, 2026-11-24): 0.966 from the
         1,200-step configs/beit3.py:tiny run, 0.951 from random init.
  base, large, nlvr2_base, nlvr2_large   the released BEiT-3 sizes with
         unilm's fine-tuning recipes (beit3/get_started/
         get_started_for_{vqav2,nlvr2}.md; the paper's appendix tables give
         the same): AdamW (0.9, 0.98), cosine schedule with linear warmup,
           VQA   base lr 3e-5 / large 2e-5, batch 128, 10 epochs with 1 of
                 warmup, drop path 0.1 / 0.15, weight decay 0.01, 480 px,
                 layer decay 1.0, head lr x 20 (--task_head_lr_weight);
           NLVR2 base lr 7e-4 / large 3e-4, batch 256, 20 epochs with 5 of
                 warmup, drop path 0.2, weight decay 0.2, 224 px, layer
                 decay 0.65 / 0.85.
         The head's x20 is optimizer.lr_multipliers (("^head/", 20.0),)
         (unilm applies it only when layer decay is 1.0, as here).

The tiny presets' VQA head is one dense on the final [cls] token
(model.head='linear'); base/large keep the released pooler + two-layer
head ('unilm'). Measured on the digits (1000 steps, random init): the
unilm head never leaves the question-only prior (VQA accuracy 0.566, the
'what' family at chance 0.14), the linear head reaches 0.765.
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.data import digits_qa
from florax.models import multiway

VQAV2_TRAIN = 443_757 + 214_354  # train + val questions (unilm trains on both)
NLVR2_TRAIN = 86_373

# name: (task, Multiway preset, image size, batch, epochs or steps, warmup
# epochs or steps, lr, drop path, weight decay, recipe layer decay)
_PRESETS = {
    "tiny": ("vqa", "tiny", 32, 64, 4000, 100, 1e-3, 0.0, 0.01, 1.0),
    "base": ("vqa", "base", 480, 128, 10, 1, 3e-5, 0.1, 0.01, 1.0),
    "large": ("vqa", "large", 480, 128, 10, 1, 2e-5, 0.15, 0.01, 1.0),
    "nlvr2_tiny": ("nlvr2", "tiny", 32, 64, 600, 30, 1e-3, 0.0, 0.01, 1.0),
    "nlvr2_base": ("nlvr2", "base", 224, 256, 20, 5, 7e-4, 0.2, 0.2, 0.65),
    "nlvr2_large": ("nlvr2", "large", 224, 256, 20, 5, 3e-4, 0.2, 0.2, 0.85),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown beit3_vqa preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  (use, preset, size, batch, length, warmup, lr, drop_path, wd,
   recipe_layer_decay) = _PRESETS[name]
  tiny = preset == "tiny"
  c = common.base_config()
  c.task = "beit3_vqa" if use == "vqa" else "beit3_nlvr2"
  c.preset = name

  c.model = ml_collections.ConfigDict()
  # unilm's VQA model has no final norm (normalize_output=False; its NLVR2
  # keeps it); the tiny demo was measured with the norm.
  mw = multiway.config_for(preset, image_size=size,
                           drop_path_rate=drop_path,
                           remat="none" if tiny else "full",
                           normalize_output=tiny or use == "nlvr2")
  c.model.multiway = ml_collections.ConfigDict(dict(vars(mw)))
  c.model.dtype = "float32" if tiny else "bfloat16"
  if use == "nlvr2":
    c.model.head_init_scale = 0.001  # unilm's init_scale of the NLVR2 head
  else:
    # 'unilm': the released pooler + 2-layer head; 'linear': one dense on
    # the final [cls] token (florax/tasks/beit3_vqa.py says when).
    c.model.head = "linear" if tiny else "unilm"
    c.vqa = ml_collections.ConfigDict()
    # 'sum' over answers (unilm: BCE mean x num answers) | 'mean'.
    c.vqa.loss_reduction = "sum"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = size
  c.data.max_len = mw.max_text_len if tiny else 64
  c.data.random_shift = 2 if tiny else 0
  c.data.train_examples = -1
  c.data.holdout_seed = 0
  if use == "vqa":
    c.data.families = digits_qa.FAMILIES
    c.data.p_correct = 0.9  # an annotator's chance of the right answer
  else:
    c.data.families = digits_qa.STATEMENT_FAMILIES
    c.data.holdout_examples = 1000
  # The pretrained run's tokenizer: a file, else init_from.path's
  # tokenizer.model, else beit3_mdm's recipe (a SentencePiece of this size
  # on the digits descriptions).
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = 127 if tiny else 64_000

  c.init_from.prefixes = (("multiway", "multiway"),)

  c.train.batch_size = batch
  if tiny:
    c.train.steps, c.optimizer.warmup_steps = length, warmup
  else:
    examples = VQAV2_TRAIN if use == "vqa" else NLVR2_TRAIN
    c.train.steps = round(length * examples / batch)
    c.optimizer.warmup_steps = round(warmup * examples / batch)
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 1000 if tiny else 5_000
  c.train.checkpoint_every = 1000 if tiny else 5_000

  c.optimizer.learning_rate = lr
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.eps = 1e-8  # unilm's run_beit3_finetuning default
  c.optimizer.weight_decay = wd
  c.optimizer.clip_norm = 1.0 if tiny else 0.0
  c.optimizer.layer_decay = recipe_layer_decay
  if use == "vqa" and not tiny:
    c.optimizer.lr_multipliers = (("^head/", 20.0),)
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "mask_token")
  c.sharding.zero_stage = 0 if tiny else 1
  c.lock()
  return c
