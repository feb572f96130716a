"""VQ-KD: BEiT v2's visual tokenizer, distilled from a frozen teacher.

Presets (`--config configs/vqkd.py:NAME`):
  tiny  the digits demo: a 2-layer ViT (patch 8 at 32 px: a 4x4 grid of
        tokens), 256 codes of dim 32, a 2-block decoder regressing the
        quickstart Florence model's last-stage features (4x4 x 128 at
        32 px). The teacher defaults to runs/tiny, the quickstart's workdir
        (python -m launch.train --config configs/florence.py:tiny
        --workdir runs/tiny); set another with --config.teacher.path=DIR.
  b16   BEiT v2's tokenizer (vqkd_encoder_base_decoder_3x768x12_clip):
        ViT-B/16 encoder at 224 px, 8192 codes of dim 32, a 3 x 768 decoder,
        regressing an imported CLIP ViT-B/16's patch features, e.g.
          python -m launch.import_weights --source open_clip \
              --arch ViT-B-16 --checkpoint ... --out clip_b16
          --config.teacher.path=clip_b16 --config.data.name=records
          --config.data.records.path=IMAGENET_RECORDS

Recipe of b16 (BEiT v2, Peng et al. 2022, §2.2 and its TOKENIZER.md /
run_vqkd_training.py): batch 512 (8 x 64), 100 epochs of ImageNet-1k
(2502 steps each: 250,200 steps) with 10 warmup epochs, AdamW (0.9, 0.99),
eps 1e-8, weight decay 1e-4 (none on the codebook, class token and position
embeddings), peak lr 2e-4 (5e-5 x 512 / 128) with cosine decay to 1e-5, no
gradient clipping, RandomResizedCrop(0.08, 1) + flip, no colour jitter,
pixels scaled to [-1, 1], fp16 mixed precision. Two departures, both
forced by florax's trainer having no mutable state: the codebook learns by
the gradient of ||sg[h] - z||^2 instead of an EMA (decay 0.99), and the
dead-code term (model docstring) stands in for the k-means initialisation.
The teacher target is the tower's final patch tokens (CLIP: after ln_post,
768-d) where BEiT v2 takes them through CLIP's projection (512-d).
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.data import record_pipeline
from florax.models import vit

# name: (ViT preset, image size, codebook size, decoder (depth, width,
# heads, mlp), global batch, steps)
_PRESETS = {
    "tiny": ("tiny/8", 32, 256, (2, 64, 2, 128), 128, 500),
    "b16": ("B/16", 224, 8192, (3, 768, 12, 3072), 512, 250_200),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown vqkd preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  preset, image_size, codes, decoder, batch, steps = _PRESETS[name]
  tiny = name == "tiny"
  c = common.base_config()
  c.task = "vqkd"
  c.preset = name

  c.model = ml_collections.ConfigDict()
  # BEiT's ViT: q/v biases, LayerNorm eps 1e-6, no LayerScale, absolute
  # positions; its fc_norm on the patch tokens is the final norm here.
  fields = dict(vars(vit.config_for(preset, image_size, qkv_bias="qv",
                                    remat="none" if tiny else "full")))
  c.model.image = ml_collections.ConfigDict({"arch": "vit", **fields})
  c.model.codebook_size = codes
  c.model.code_dim = 32
  c.model.codebook_init_std = 0.02
  c.model.decoder = ml_collections.ConfigDict(dict(zip(
      ("depth", "width", "num_heads", "mlp_dim"), decoder)))
  c.model.dtype = "float32" if tiny else "float16"

  # Loss: -cos(decoder, teacher) + codebook_weight ||sg[h] - z||^2 +
  # commitment_weight ||h - sg[z]||^2 + dead_code_weight * the pull of
  # unused codes towards random encoder outputs.
  c.vq = ml_collections.ConfigDict()
  c.vq.codebook_weight = 1.0
  c.vq.commitment_weight = 1.0
  c.vq.dead_code_weight = 1.0

  c.teacher = ml_collections.ConfigDict()
  # A florax workdir or export; tiny: the quickstart's run.
  c.teacher.path = "runs/tiny" if tiny else ""
  c.teacher.step = -1  # a workdir's checkpoint; -1 = the latest

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # 'digits' | 'records' | 'tfds' (data.records)
  c.data.image_size = image_size
  c.data.random_shift = 2 if tiny else 0  # digits only
  c.data.train_examples = -1
  c.data.records = record_pipeline.user_data_config()
  c.data.records.text = False
  c.data.records.crop_scale = (0.08, 1.0)
  c.data.records.color_jitter = 0.0
  c.data.records.mean = c.data.records.std = (0.5, 0.5, 0.5)  # [-1, 1]

  c.train.batch_size = batch
  c.train.steps = steps
  c.train.log_every = 50 if tiny else 100
  c.train.eval_every = 250 if tiny else 10_000
  c.train.checkpoint_every = 250 if tiny else 5_000
  c.optimizer.learning_rate = 2e-3 if tiny else 2e-4
  c.optimizer.warmup_steps = 50 if tiny else 25_020
  c.optimizer.min_lr_ratio = 0.05  # 1e-5 / 2e-4
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_norm = 1.0 if tiny else 0.0
  c.sharding.zero_stage = 0 if tiny else 1
  c.optimizer.no_decay_patterns = (*c.optimizer.no_decay_patterns,
                                   "cls_token", "codebook")

  # Codebook usage over the held-out digits (b16: point data at a records
  # validation split and enable it).
  c.evals.codebook = ml_collections.ConfigDict(dict(
      type="codebook_usage", enabled=tiny, every=0, data=ml_collections.
      ConfigDict(dict(source="digits" if tiny else "records", path="",
                      split="" if tiny else "validation", names_file="",
                      tfds_name="", max_examples=0))))
  c.lock()
  return c
