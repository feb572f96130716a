"""Florence: CoSwin + text transformer trained with UniCL.

Presets (`--config configs/florence.py:NAME`):
  tiny  CoSwin-tiny + 2-layer text tower on the embedded digits at 32 px;
        the CPU quickstart (~0.4M params).
  t, s, b, l  CoSwin-T/S/B/L + a CLIP-sized text tower at 224 px.
  h     CoSwin-H (637M) + Florence's 12-layer 256M text tower (893M), 224 px,
        batch 24,576 as in the paper (for planning; it will not run on a CPU).
Every field can be overridden on the command line: --config.train.steps=50.
"""

from __future__ import annotations

import ml_collections

from florax.data import record_pipeline
from florax.models import coswin, text

_PRESETS = {
    # name: (image preset, text preset, image size, embed dim)
    "tiny": ("tiny", "tiny", 32, 64),
    "t": ("T", "B", 224, 512),
    "s": ("S", "B", 224, 512),
    "b": ("B", "L", 224, 512),
    "l": ("L", "L", 224, 768),
    "h": ("H", "florence", 224, 1024),
}


def _image_config(preset: str) -> ml_collections.ConfigDict:
  fields = dict(vars(coswin.CoSwinConfig()))
  fields.update(coswin.PRESETS[preset])
  return ml_collections.ConfigDict(
      {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()})


def _text_config(preset: str) -> ml_collections.ConfigDict:
  fields = dict(vars(text.TextConfig()))
  fields.update(text.PRESETS[preset])
  return ml_collections.ConfigDict(fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown florence preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  image_preset, text_preset, image_size, embed_dim = _PRESETS[name]
  c = ml_collections.ConfigDict()
  c.task = "unicl"
  c.preset = name
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.image = _image_config(image_preset)
  c.model.text = _text_config(text_preset)
  c.model.embed_dim = embed_dim
  c.model.init_temperature = 0.07
  c.model.dtype = "float32"  # compute dtype; params stay fp32

  c.data = ml_collections.ConfigDict()
  # 'digits' (embedded default) | 'records' | 'captions' | 'tfds'; the last
  # three read data.records (see florax/data/record_pipeline.py).
  c.data.name = "digits"
  c.data.image_size = image_size
  c.data.max_len = c.model.text.max_len
  c.data.tokenizer_vocab_size = 160
  if name == "tiny":  # BPE over the digits descriptions: every one fits in 12 tokens
    c.model.text.vocab_size = 160
  c.data.random_shift = 0
  c.data.train_examples = -1  # -1: the whole train split
  c.data.records = record_pipeline.default_data_config()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 24576 if name == "h" else 128
  c.train.steps = 1_000_000 if name == "h" else 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3 if name == "tiny" else 1e-3
  c.optimizer.warmup_steps = 20 if name == "tiny" else 10_000
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.05 if name == "tiny" else 0.2
  c.optimizer.clip_norm = 1.0
  # Decoupled weight decay skips vectors (biases, norms) by ndim and these by
  # name: position tables and the temperature.
  c.optimizer.no_decay_patterns = ("pos_embed", "relative_position_bias",
                                   "logit_scale", "token_embed")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding = ml_collections.ConfigDict()
  # logical axis -> mesh axes; unnamed logical axes are replicated.
  c.sharding.rules = [["batch", ["data", "fsdp"]]]

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128

  c.lock()
  return c
