"""Florence's V+L adapter: METER co-attention fusion on the UniCL towers
(tasks `meter_pretrain` and `meter_vqa`, florax/tasks/meter.py).

Presets (`--config configs/meter.py:NAME`):
  tiny_vqa       the quickstart's towers (configs/florence.py:tiny: CoSwin
                 tiny at 32 px, the 2-layer text tower, its 160-piece
                 tokenizer) + a 2-layer, 64-wide fusion; VQA on generated
                 questions about the digits (florax.data.digits_qa). From
                 the quickstart's checkpoint:
                   --config.init_from.path=runs/tiny
  tiny_pretrain  the same model, ITM + MLM on (digit, description) pairs;
                 a tiny_vqa run then starts from it (prefixes add
                 ["fusion", "fusion"]).
  b_vqa          Florence-B's towers (CoSwin-B 224 px, 12 x 512 text) +
                 METER's fusion (6 co-attention layers of 768 per stream,
                 12 heads); METER's VQA recipe (AdamW lr 1e-5 for the
                 towers, x5 for the fusion and x50 for the head via
                 optimizer.lr_multipliers, 10 epochs of VQAv2's 443,757
                 questions at batch 512, 10% warmup, weight decay 0.01).
  b_pretrain     the same with METER's pre-training recipe (ITM + MLM, lr
                 1e-5, x5 fusion, batch 4096, 100k steps, 10% warmup).
Only the embedded digits are read for now; the b presets give a run's
model, optimizer and schedule.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from configs import florence
from florax.data import digits_qa
from florax.models import meter

# name: (florence preset, METER fusion, task, batch, steps, warmup, lr)
_PRESETS = {
    "tiny_vqa": ("tiny", "tiny", "meter_vqa", 32, 1500, 100, 1e-3),
    "tiny_pretrain": ("tiny", "tiny", "meter_pretrain", 32, 1500, 100, 1e-3),
    "b_vqa": ("b", "base", "meter_vqa", 512, 8667, 867, 1e-5),
    "b_pretrain": ("b", "base", "meter_pretrain", 4096, 100_000, 10_000,
                   1e-5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny_vqa").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown meter preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  towers, fusion, task, batch, steps, warmup, lr = _PRESETS[name]
  tiny = towers == "tiny"
  src = florence.get_config(towers)
  c = common.base_config()
  c.task = task
  c.preset = name

  c.model = ml_collections.ConfigDict()
  c.model.image = src.model.image
  c.model.text = src.model.text
  c.model.meter = ml_collections.ConfigDict(dataclasses.asdict(
      meter.config_for(fusion)))
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.vqa_head = "meter"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = src.data.image_size
  c.data.max_len = src.model.text.max_len
  c.data.random_shift = 2 if tiny else 0
  c.data.train_examples = -1
  # The towers' tokenizer: a file, else init_from.path's tokenizer.model,
  # else the same SentencePiece of the digits descriptions the quickstart
  # trains (this size).
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = src.data.tokenizer_vocab_size
  if task == "meter_vqa":
    c.data.families = digits_qa.FAMILIES
    c.data.p_correct = 0.9
    c.data.holdout_seed = 0
    c.vqa = ml_collections.ConfigDict()
    c.vqa.loss_reduction = "sum"  # METER / VQAv2: BCE summed over answers
  else:
    c.meter = ml_collections.ConfigDict()
    c.meter.loss_weights = ml_collections.ConfigDict(dict(itm=1.0, mlm=1.0))
    c.meter.mlm_rate = 0.15
    c.meter.itm_negative_rate = 0.5
    # The digits' descriptions are class-level: an image of the same digit
    # matches. Web pairs: 'instance'.
    c.meter.itm_match = "class" if tiny else "instance"

  # The UniCL towers (a METER pre-training run's fusion too).
  c.init_from.prefixes = (("image_encoder", "image_encoder"),
                          ("text_encoder", "text_encoder"),
                          ("fusion", "fusion"))

  c.train.batch_size = batch
  c.train.steps = steps
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 500 if tiny else 5_000
  c.train.checkpoint_every = 500 if tiny else 5_000
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.01
  if tiny:
    # The pretrained towers at a tenth of the fusion's lr (at 1e-3 they
    # forgot the digits: 'what' stayed at chance, 0.10 at 500 steps, vs
    # 0.91 with the towers at 1e-4).
    c.optimizer.lr_multipliers = (("^(image|text)_encoder/", 0.1),)
  else:  # METER: towers at lr, the fusion x5, the heads x50
    c.optimizer.lr_multipliers = (("^fusion/", 5.0),
                                  ("^(answer_head|itm_head|mlm_head)/", 50.0))
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "type_embed", "mask_embed")
  c.sharding.zero_stage = 0 if tiny else 1
  c.lock()
  return c
