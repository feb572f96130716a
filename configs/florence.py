"""Florence: CoSwin + text transformer trained with UniCL.

Presets (`--config configs/florence.py:NAME`):
  tiny  CoSwin-tiny + 2-layer text tower on the embedded digits at 32 px;
        the CPU quickstart (~0.4M params).
  t, s, b, l  CoSwin-T/S/B/L + a CLIP-sized text tower at 224 px.
  h     CoSwin-H (637M) + Florence's 12-layer 256M text tower (893M), 224 px,
        batch 24,576 as in the paper (for planning; it will not run on a CPU).
Every field can be overridden on the command line: --config.train.steps=50.

Training stages (Florence §2.4), `--config configs/florence.py:NAME,stage=N`:
  stage=1  all data, class names wrapped in prompt templates; 224 px;
           1M steps (10K warmup).
  stage=2  template-augmented texts dropped (data.records.drop_templated);
           224 px; 180K steps (1.8K warmup).
  stage=3  as stage 2 at 384 px with windows of 12 (Swin's 384 setting:
           384/4 = 96, 48, 24, 12 tokens a side, each a multiple of 12);
           80K steps (800 warmup).
Each stage is its own run in its own workdir with its own warmup + cosine
over its own steps, continuing from the previous stage's weights (the
optimizer starts fresh, hence the short warmups):
  python -m launch.train --config configs/florence.py:b,stage=1 --workdir s1
  python -m launch.train --config configs/florence.py:b,stage=2 --workdir s2 \
      --config.init_from.path=s1
  python -m launch.train --config configs/florence.py:b,stage=3 --workdir s3 \
      --config.init_from.path=s2
Stage 3's relative position bias tables are resized (bicubic) from windows
of 7 to 12 when loaded (florax/train/init_from.py); stages 2 and 3 refuse to
start without init_from.path. The paper publishes no per-stage learning
rate: every stage peaks at optimizer.learning_rate; batch size, like every
other field, is the preset's. tiny has the same three stages scaled down for
a CPU (300, 60 and 30 steps; stage 3 at 48 px with windows of 6); its digits
texts are all templated, so its stage 2 differs from stage 1 only in steps.
"""

from __future__ import annotations

import ml_collections

from configs import common
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


def _evaluator(kind: str, **fields) -> ml_collections.ConfigDict:
  """One entry of config.evals on the digits holdout (by default)."""
  fields.setdefault("enabled", True)
  ev = ml_collections.ConfigDict(dict(type=kind, every=0, **fields))
  ev.data = ml_collections.ConfigDict(dict(
      source="digits", path="", split="", names_file="", tfds_name="",
      max_examples=0))
  return ev


# stage: (train.steps, warmup steps, drop templated texts, image size,
# window size); warmups are 1% of the stage, as stage 1's 10K of 1M.
_STAGES = {
    1: (1_000_000, 10_000, False, 224, 7),
    2: (180_000, 1_800, True, 224, 7),
    3: (80_000, 800, True, 384, 12),
}
_TINY_STAGES = {
    1: (300, 20, False, 32, 4),
    2: (60, 5, True, 32, 4),
    3: (30, 5, True, 48, 6),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, sep, stage = (arg or "tiny").partition(",")
  if not sep:
    return _preset_config(name)
  if not stage.startswith("stage=") or stage[6:] not in ("1", "2", "3"):
    raise ValueError(f"florence config {arg!r}: write NAME or NAME,stage=N "
                     "with N = 1, 2 or 3")
  c = _preset_config(name)
  stage = int(stage[6:])
  steps, warmup, drop_templated, image_size, window = (
      _TINY_STAGES if c.preset == "tiny" else _STAGES)[stage]
  with c.unlocked():
    c.stage = stage  # stages 2, 3 need init_from.path (the trainer checks)
  c.train.steps = steps
  c.optimizer.warmup_steps = warmup
  c.data.records.drop_templated = drop_templated
  c.data.image_size = image_size
  c.model.image.window_size = window
  coswin.validate(coswin.CoSwinConfig(**c.model.image.to_dict()), image_size)
  return c


def _preset_config(arg: str) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown florence preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  image_preset, text_preset, image_size, embed_dim = _PRESETS[name]
  c = common.base_config()
  c.task = "unicl"
  c.preset = name

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
  # Image size, text length, batch and seed come from data.image_size,
  # data.max_len, train.batch_size and seed.
  c.data.records = record_pipeline.user_data_config()

  c.train.batch_size = 24576 if name == "h" else 128
  c.train.steps = 1_000_000 if name == "h" else 300
  c.optimizer.warmup_steps = 20 if name == "tiny" else 10_000
  c.optimizer.weight_decay = 0.05 if name == "tiny" else 0.2

  c.contrastive = ml_collections.ConfigDict()
  # Each device scores its rows against all gathered columns; gradients flow
  # back through the all-gather (FLAVA's global backprop).
  c.contrastive.global_loss = True
  c.contrastive.global_backprop = True
  # Gradient cache: rows per device per chunk. 0 = off; an int dividing the
  # per-device batch; 'auto' = the largest chunk whose compiled gradient
  # step fits memory_budget_gb per device.
  c.contrastive.chunk_size = ml_collections.FieldReference(0, field_type=object)
  c.contrastive.memory_budget_gb = 16.0

  # Held-out zero-shot classification (the digits' own templates). Opt-in
  # extras, --config.evals.NAME.enabled=True (the default stays cheap: the
  # quickstart runs on 2 CPU cores):
  #   retrieval     each held-out image vs one description of it
  #   linear_probe  l2 swept on a validation part of train_data, scored on data
  #   few_shot      CD-FSL episodes (Florence: 5-way, 5/20/50-shot) on data
  # For your own records: data.source='records', data.path=DIR, split
  # 'validation' (make_dataset --holdout_fraction) and templates='training'.
  c.evals.zeroshot = _evaluator("zeroshot", templates="dataset", ks=(1, 5))
  c.evals.retrieval = _evaluator("retrieval", enabled=False, ks=(1, 5, 10))
  c.evals.linear_probe = _evaluator("linear_probe", enabled=False)
  c.evals.linear_probe.train_data = _evaluator("linear_probe").data
  c.evals.linear_probe.train_data.split = "train"
  c.evals.linear_probe.train_data.max_examples = 600
  c.evals.few_shot = _evaluator("few_shot", enabled=False, ways=5,
                                shots=(5, 20), queries=15, episodes=100)
  c.lock()
  return c
