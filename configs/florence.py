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
  # False: resume the model but start the data stream afresh (needed after
  # changing the process count, which changes every process's shard).
  c.train.restore_data_state = True
  # Micro-batches per step (mean-over-examples losses only; the contrastive
  # task refuses it and uses contrastive.chunk_size instead).
  c.train.grad_accum_steps = 1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
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
  # logical axis -> mesh axes; unnamed logical axes are replicated. With
  # mesh.axes.tensor > 1 the mlp/heads/vocab rules give Megatron-style
  # tensor parallelism; at tensor=1 they are no-ops.
  c.sharding.rules = [["batch", ["data", "fsdp"]], ["mlp", "tensor"],
                      ["heads", "tensor"], ["vocab", "tensor"]]
  # 0 replicated state; 1 + optimizer state sharded over data+fsdp; 2 +
  # gradients; 3 + parameters (FSDP). See florax/parallel/zero.py.
  c.sharding.zero_stage = 0

  # Compute dtype is model.dtype; params stay fp32. Loss scaling: 'auto'
  # (dynamic iff model.dtype == 'float16') | 'dynamic' | 'none'.
  c.precision = ml_collections.ConfigDict()
  c.precision.loss_scale = "auto"
  c.precision.init_scale = 2.0 ** 15
  c.precision.growth_interval = 2000  # finite steps before the scale doubles
  c.precision.growth_factor = 2.0
  c.precision.backoff_factor = 0.5

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

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  # Zero-shot prompts: 'dataset' (the digits' own templates) | 'imagenet'
  # (CLIP's 80 templates over the class words).
  c.eval.zeroshot_templates = "dataset"
  # Opt-in evaluators (the default eval stays cheap: the quickstart runs on
  # 2 CPU cores). Retrieval: each held-out image vs one description of it.
  c.eval.retrieval = False
  # Linear probe on frozen image features: l2 swept on a validation split
  # of `linear_probe_examples` digits train images, scored on the holdout.
  c.eval.linear_probe = False
  c.eval.linear_probe_examples = 600
  # Few-shot (CD-FSL protocol, Florence: 5-way, 5/20/50-shot) on the
  # holdout's frozen features; the digits holdout has ~36 images a class,
  # enough for k_shot + few_shot_queries <= 36.
  c.eval.few_shot = False
  c.eval.few_shot_ways = 5
  c.eval.few_shot_shots = (5, 20)
  c.eval.few_shot_queries = 15
  c.eval.few_shot_episodes = 100

  c.lock()
  return c
