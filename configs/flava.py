"""FLAVA pre-training: five objectives over image-only, text-only and paired
data picked round-robin (task `flava`, florax/tasks/flava.py).

Presets (`--config configs/flava.py:NAME`):
  tiny          florax.models.flava's tiny FLAVA (64 wide, 2 layers per
                encoder, patch 8 at 32 px: a 4x4 grid) on the embedded
                digits: images, their descriptions, (image, description)
                pairs, 32 examples a step of the drawn kind; MIM/MMM targets
                from the tiny VQ-KD tokenizer (configs/vqkd.py:tiny, a 4x4
                grid at 32 px), by default at runs/vqkd_tiny:
                  python -m launch.train --config configs/flava.py:tiny \
                      --workdir /tmp/flava --config.tokenizer.path=VQKD_DIR
                tokenizer.path may instead be a FLAVA image codebook import
                directory (the paper's DALL-E dVAE targets,
                florax.models.flava_codebook): the directory
                `python -m launch.import_weights --source hf --arch full
                --checkpoint FLAVA_PRETRAINING.safetensors --out FLAVA_DIR
                --codebook_out CODEBOOK_DIR` writes; its code grid (the
                import's image_size / 8: 14x14 for facebook/flava-full's
                112 px codebook) must be the image encoder's patch grid,
                which is `full`'s, not tiny's 4x4.
  tiny_unimodal the paper's first stage on the same data: the image and
                text kinds only (MIM + MLM); the joint run then starts from
                it: --config.init_from.path=UNIMODAL_WORKDIR (prefixes
                [["flava", "flava"]]: both encoders, the rest fresh).
  full          facebook/flava-full's model (241M) with the paper's recipe
                (§4): batch 8192, AdamW, lr 1e-3, 10k warmup, weight decay
                0.1, FSDP (ZeRO-3), fp16 except LayerNorm (florax's
                LayerNorm computes in fp32; fp16 turns dynamic loss
                scaling on: precision.loss_scale 'auto'; bf16 on TPUs:
                --config.model.dtype=bfloat16). Its MIM/MMM targets, as the
                paper's, come from the DALL-E codebook:
                --config.tokenizer.path=CODEBOOK_DIR (the --codebook_out
                import above: 112 px input, a 14x14 grid = 224 px / patch
                16; a `vqkd` workdir with that grid works as well).
The sampling ratio of the kinds is `train.mixture` (the trainer draws one
kind per step from it, deterministically given the step).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from florax.data import beit3_records
from florax.models import flava

_PRESETS = {
    # name: (model preset, steps, mixture image/text/pair)
    # The digits demo: 6000 steps, two thirds of them pairs (README).
    "tiny": ("tiny", 6000, (1.0, 1.0, 4.0)),
    "tiny_unimodal": ("tiny", 2000, (1.0, 1.0, 0.0)),
    "full": ("full", 100_000, (1.0, 1.0, 2.0)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown flava preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  preset, steps, mixture = _PRESETS[name]
  tiny = preset == "tiny"
  c = common.base_config()
  c.task = "flava"
  c.preset = name

  fc = flava.config_for(preset)
  c.model = ml_collections.ConfigDict()
  c.model.flava = ml_collections.ConfigDict(dataclasses.asdict(fc))
  c.model.dtype = "float32" if tiny else "float16"

  # The frozen visual tokenizer (MIM and MMM-image targets): a `vqkd` run's
  # workdir, or a FLAVA image codebook import directory (launch.
  # import_weights --source hf ... --codebook_out DIR: the DALL-E dVAE the
  # paper used; `full` sets it on the command line). step: a vqkd
  # checkpoint (-1 the latest); an import has none (leave -1).
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = "runs/vqkd_tiny" if tiny else ""
  c.tokenizer.step = -1

  c.flava = ml_collections.ConfigDict()
  c.flava.loss_weights = ml_collections.ConfigDict(dict(
      mim=1.0, mlm=1.0, contrastive=1.0, itm=1.0, mmm_image=1.0,
      mmm_text=1.0))
  c.flava.mlm_rate = 0.15        # MLM, BERT's 80/10/10
  c.flava.mim_ratio = 0.4        # MIM and MMM's image: block-wise
  c.flava.min_block = 2 if tiny else 16
  c.flava.mmm_text_rate = 0.15   # MMM's text
  # 'class': texts of the same digit are positives (the digits repeat 10
  # classes a batch); 'instance': CLIP's InfoNCE (web pairs).
  c.flava.positives = "class" if tiny else "instance"
  c.flava.itm_match = "class" if tiny else "instance"
  c.flava.itm_negative_rate = 0.5  # pairs given another pair's text

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = fc.image.image_size
  c.data.max_len = fc.text.max_len if tiny else 77
  n = 32 if tiny else 8192
  c.data.batch_sizes = ml_collections.ConfigDict(dict(image=n, text=n,
                                                      pair=n))
  c.data.random_shift = 2 if tiny else 0
  c.data.train_examples = -1
  # data.name records / captions / tfds: your images, texts and pairs
  # (florax.data.beit3_records; the text-only kind reads data.text_corpus,
  # one text per line, else the records' texts).
  c.data.records = beit3_records.records_config()
  c.data.text_corpus = ""
  # "" trains a SentencePiece of text_tokenizer_vocab_size on the digits'
  # descriptions (127 pieces; [MASK] is id 127); a file otherwise.
  c.data.text_tokenizer_path = ""
  c.data.text_tokenizer_kind = ""
  c.data.text_tokenizer_vocab_size = 127 if tiny else 30_000

  # A unimodal run's encoders (and its MIM/MLM heads); the rest fresh.
  c.init_from.prefixes = (("flava", "flava"), ("mim_head", "mim_head"),
                          ("mlm_head", "mlm_head"))

  c.train.batch_size = n  # the logged examples of a step (every kind's)
  c.train.steps = steps
  c.train.mixture = ml_collections.ConfigDict(
      dict(zip(("image", "text", "pair"), mixture)))
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 1000 if tiny else 5_000
  c.train.checkpoint_every = 1000 if tiny else 5_000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50 if tiny else 10_000
  c.optimizer.weight_decay = 0.1
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "mask_token", "logit_scale")
  c.sharding.zero_stage = 0 if tiny else 3
  c.lock()
  return c
