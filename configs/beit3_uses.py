"""BEiT-3's captioning and dual-encoder retrieval uses, fine-tuned from a
`beit3_mdm` workdir (configs/beit3.py) through init_from (tasks
`beit3_caption`, `beit3_retrieval`; florax/tasks/beit3_caption.py and
beit3_retrieval.py).

Presets (`--config configs/beit3_uses.py:NAME`):
  caption_tiny, retrieval_tiny  the digits demos on the tiny Multiway
      (configs/beit3.py:tiny's shape, so its checkpoint loads as is):
        python -m launch.train --config configs/beit3_uses.py:caption_tiny \
            --workdir /tmp/cap --config.init_from.path=MDM_WORKDIR
      The text tokenizer is then MDM_WORKDIR/tokenizer.model. Without
      init_from.path: the same use from random init (the baseline).
      Held-out digits, from the 1,200-step configs/beit3.py:tiny run vs
      random init at equal steps (one run each, 2026-11-24): captioning
      (3000 steps) names the right digit 0.972 vs 0.930; retrieval (1500
      steps, retrieval.pool='mean') image->text R@1 0.981 vs 0.975 (0.967
      vs 0.939 at step 1000, 0.891 vs 0.850 at 500). With unilm's [CLS]
      pooling the checkpoint did not help (0.958 vs 0.981 at 1500): MDM
      never trains the image [CLS] or the text [BOS], so the tiny preset
      pools the mean of the tokens MIM/MLM did train; base keeps [CLS].
  caption_base, retrieval_base  BEiT-3 base (12 x 768) with the released
      fine-tuning recipes (unilm/beit3 get_started_for_captioning.md and
      get_started_for_retrieval.md, COCO; the seed copy of the paper lacks
      its appendix tables, so these follow the released commands):
      captioning: 480 px, batch 256, lr 4e-5, 10 epochs (1 warmup), layer
      decay 1.0, drop path 0.1, weight decay 0.05, label smoothing 0.1,
      caption mask ratio 0.6 (unilm's --captioning_mask_prob default), 32
      text tokens, beam size 3; retrieval: 384 px, batch 3072, lr 2e-4, 15
      epochs (3 warmup), layer decay 0.65, drop path 0.2, weight decay
      0.05, CLIP (instance) positives. Epochs are counted over COCO
      Karpathy train's 566,747 captions. They need BEiT-3's beit3.spm
      (--config.data.text_tokenizer_path=beit3.spm
      --config.data.text_tokenizer_kind=sentencepiece_fairseq) and a base
      MDM workdir or an imported checkpoint in init_from.path.
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.models import multiway

_COCO_CAPTIONS = 566_747

# name: (task, Multiway preset, image size)
_PRESETS = {
    "caption_tiny": ("beit3_caption", "tiny", 32),
    "retrieval_tiny": ("beit3_retrieval", "tiny", 32),
    "caption_base": ("beit3_caption", "base", 480),
    "retrieval_base": ("beit3_retrieval", "base", 384),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "caption_tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown beit3_uses preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  task, preset, size = _PRESETS[name]
  tiny = preset == "tiny"
  caption = task == "beit3_caption"
  c = common.base_config()
  c.task = task
  c.preset = name

  drop_path = 0.0 if tiny else (0.1 if caption else 0.2)
  mw = multiway.config_for(preset, image_size=size, drop_path_rate=drop_path,
                           remat="none" if tiny else "full")
  c.model = ml_collections.ConfigDict()
  c.model.multiway = ml_collections.ConfigDict(dict(vars(mw)))
  c.model.dtype = "float32" if tiny else "bfloat16"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = size
  c.data.max_len = mw.max_text_len if tiny else (32 if caption else 64)
  c.data.random_shift = 2 if tiny else 0
  c.data.train_examples = -1
  # "" : init_from.path's tokenizer.model (the pretrained run's), else one
  # trained on the digits descriptions (configs/beit3.py's settings).
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = 127 if tiny else 64_000

  if caption:
    c.caption = ml_collections.ConfigDict()
    c.caption.mask_ratio = 0.6
    c.caption.label_smoothing = 0.0 if tiny else 0.1
    # Greedy evaluation always; beam search too when beam_size > 0.
    c.caption.beam_size = 0 if tiny else 3
    # Decoded tokens ([BOS] prompt and the [MASK] slot fit beside them).
    c.caption.max_decode_len = c.data.max_len - 2
    prefixes = (("multiway", "multiway"), ("mlm_head", "mlm_head"))
  else:
    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.embed_dim = 64 if tiny else 768
    c.retrieval.positives = "class" if tiny else "instance"
    c.retrieval.ks = (1, 5)
    # 'cls': the [CLS]/[BOS] token (unilm's); 'mean': the mean of the
    # valid tokens.
    c.retrieval.pool = "mean" if tiny else "cls"
    prefixes = (("multiway", "multiway"),)
  c.init_from.prefixes = prefixes

  if tiny:
    batch, steps, warmup = 64, (3000 if caption else 1500), 30
    lr, layer_decay = 5e-4, 1.0
  elif caption:
    batch, layer_decay, lr = 256, 1.0, 4e-5
    per_epoch = _COCO_CAPTIONS // batch
    steps, warmup = 10 * per_epoch, per_epoch
  else:
    batch, layer_decay, lr = 3072, 0.65, 2e-4
    per_epoch = _COCO_CAPTIONS // batch
    steps, warmup = 15 * per_epoch, 3 * per_epoch
  c.train.batch_size = batch
  c.train.steps = steps
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 1000 if tiny else 2_000
  c.train.checkpoint_every = 1000 if tiny else 2_000
  c.eval_batch_size = 128
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.layer_decay = layer_decay
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "mask_token")
  c.sharding.zero_stage = 0 if tiny else 1
  c.lock()
  return c
