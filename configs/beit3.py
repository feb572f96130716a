"""BEiT-3: masked data modeling on images, texts and image-text pairs with a
Multiway Transformer (task `beit3_mdm`, florax/tasks/beit3_mdm.py).

Presets (`--config configs/beit3.py:NAME`):
  tiny   the tiny Multiway model (3 x 64, patch 8 at 32 px: a 4x4 grid) on
         the embedded digits: images alone, their descriptions as the
         text-only corpus, (image, description) pairs, 32 + 32 + 32 a step;
         MIM targets from the tiny VQ-KD tokenizer (configs/vqkd.py:tiny,
         also a 4x4 grid at 32 px), by default at runs/vqkd_tiny:
           python -m launch.train --config configs/beit3.py:tiny \
               --workdir /tmp/beit3 --config.tokenizer.path=VQKD_WORKDIR
  base, large   the released BEiT-3 sizes (12 x 768, 24 x 1024, patch 16).
  giant  the paper's (§2.3): 40 x 1408 x 6144 x 16, patch 14 at 224 px,
         3 vision-language layers, 1.9B params.
base/large/giant take BEiT-3's §2.3 recipe: 1M steps of 2048 images + 2048
texts + 2048 pairs, AdamW (0.9, 0.98), eps 1e-6, peak lr 1e-3 with 10k
warmup steps and cosine decay, weight decay 0.05, stochastic depth 0.1, a
64k SentencePiece (BEiT-3's own: --config.data.text_tokenizer_path=beit3.spm
--config.data.text_tokenizer_kind=sentencepiece_fairseq; without a path a
SentencePiece is trained on the data's texts). The paper states no compute
dtype, text length or ZeRO stage: bfloat16, 64 tokens (the released
fine-tuning length) and ZeRO-1 here. Masking (§2.2): MLM 15% (80/10/10),
MIM block-wise 40%, MVLM 50% of the text tokens, image as in MIM, masked
separately (one modality per pair; mdm.mvlm_mode='joint' masks both).
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.data import beit3_records
from florax.models import multiway

# name: (Multiway preset, steps)
_PRESETS = {
    "tiny": ("tiny", 1200),
    "base": ("base", 1_000_000),
    "large": ("large", 1_000_000),
    "giant": ("giant", 1_000_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown beit3 preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  preset, steps = _PRESETS[name]
  tiny = name == "tiny"
  c = common.base_config()
  c.task = "beit3_mdm"
  c.preset = name

  c.model = ml_collections.ConfigDict()
  mw = multiway.config_for(preset, drop_path_rate=0.0 if tiny else 0.1,
                           remat="none" if tiny else "full")
  c.model.multiway = ml_collections.ConfigDict(dict(vars(mw)))
  c.model.dtype = "float32" if tiny else "bfloat16"

  # The frozen visual tokenizer: a `vqkd` training workdir.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = "runs/vqkd_tiny" if tiny else ""
  c.tokenizer.step = -1  # its checkpoint; -1 = the latest

  c.mdm = ml_collections.ConfigDict()
  c.mdm.mlm_rate = 0.15        # MLM: of the text-only tokens
  c.mdm.mask_prob = 0.8        # of the chosen tokens: [MASK] ...
  c.mdm.random_prob = 0.1      # ... a random token; the rest stay
  c.mdm.mim_ratio = 0.4        # MIM (and MVLM's image): block-wise
  # BEiT's smallest block is 16 of 196 patches; a 4x4 grid takes blocks of 2.
  c.mdm.min_block = 2 if tiny else 16
  c.mdm.mvlm_text_rate = 0.5   # MVLM: of the pair's text tokens
  c.mdm.mvlm_mode = "separate"  # 'separate' (the paper's) | 'joint'
  c.mdm.mvlm_text_prob = 0.5   # separate: P(the text is the masked side)
  c.mdm.loss_weights = ml_collections.ConfigDict(dict(
      mlm=1.0, mim=1.0, mvlm_text=1.0, mvlm_image=1.0))

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = mw.image_size
  c.data.max_len = mw.max_text_len if tiny else 64
  # Examples per step of each part (BEiT-3: 2048 + 2048 + 2048).
  n = 32 if tiny else 2048
  c.data.composition = ml_collections.ConfigDict(dict(image=n, text=n,
                                                      pair=n))
  c.data.random_shift = 2 if tiny else 0   # digits only
  c.data.train_examples = -1                # digits only
  # Your own data (data.name 'records' | 'captions' | 'tfds'): images and
  # pairs from data.records (florax/data/record_pipeline.py's fields),
  # texts from data.text_corpus (one per line) or else the records' texts;
  # needs data.text_tokenizer_path. BEiT-3's augmentation (§2.3): random
  # resized crop, flip, colour jitter 0.4; unilm normalises to [-1, 1].
  c.data.records = beit3_records.records_config()
  c.data.text_corpus = ""
  # Text tokenizer: a file (BEiT-3's beit3.spm with kind
  # 'sentencepiece_fairseq'), or "" to train a SentencePiece of
  # text_tokenizer_vocab_size on the data's texts (the digits: 127 pieces,
  # every description within 16 tokens; [MASK] is id 127).
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = 127 if tiny else 64_000

  comp = c.data.composition
  # The step's examples, derived: overriding the composition updates it.
  c.train.batch_size = (comp.get_ref("image") + comp.get_ref("text")
                        + comp.get_ref("pair"))
  c.train.steps = steps
  c.train.log_every = 20 if tiny else 100
  c.train.eval_every = 0  # no evaluators: train metrics hold the accuracies
  c.train.checkpoint_every = 100 if tiny else 5_000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20 if tiny else 10_000
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.05
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "mask_token")
  c.sharding.zero_stage = 0 if tiny else 1
  c.lock()
  return c
