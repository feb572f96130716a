"""What every florax config shares: mesh, sharding, precision, optimizer,
train loop, evaluators and init_from. A family's config starts from
`base_config()` and states only what is its own (task, model, data)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""
  c.preset = ""
  c.seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3
  # False: resume the model but start the data stream afresh (needed after
  # changing the process count, which changes every process's shard).
  c.train.restore_data_state = True
  # Micro-batches per step (mean-over-examples losses only).
  c.train.grad_accum_steps = 1
  # Sampling weight per batch kind (FLAVA's round-robin); empty: the task's
  # kinds in equal measure. The kind of step s is a function of (seed, s).
  c.train.mixture = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10_000
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  # Layer-wise lr decay (BEiT/EVA fine-tuning: 0.65-0.9; 1.0 = off): encoder
  # layer l of L trains at lr * layer_decay ** (L + 1 - l), embeddings l = 0,
  # heads and final norms l = L + 1 (florax/train/layer_decay.py).
  c.optimizer.layer_decay = 1.0
  # Per-param lr factors on top of the layer decay: ((regex, factor), ...)
  # over flat param names, the first matching pattern's factor applies (its
  # weight decay is scaled with it, as BEiT's param-group lr). unilm's BEiT-3
  # VQA trains its head at x20: (("^head/", 20.0),). () = none.
  c.optimizer.lr_multipliers = ()
  # EMA of the weights kept in the optimizer state, used by evaluation (0 =
  # off; BEiT/EVA fine-tuning: 0.9999). florax/train/ema.py.
  c.optimizer.ema_decay = 0.0
  # Regular expressions over flat param names never updated (no step, no
  # weight decay): a linear probe's tower, LiT's locked image tower.
  c.optimizer.freeze = ()
  # Decoupled weight decay skips vectors (biases, norms) by ndim and these by
  # name (regular expressions over flat param names).
  c.optimizer.no_decay_patterns = ("pos_embed", "relative_position_bias",
                                   "logit_scale", "token_embed")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding = ml_collections.ConfigDict()
  # logical axis -> mesh axes; unnamed logical axes are replicated. The
  # `batch` rule alone decides which mesh axes split the batch. With
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

  # Evaluators by name (big_vision's pattern): config.evals.<name> = {type,
  # every, data, ...}; see the task's evaluators (florax/evaluate/). They run
  # every train.eval_every steps (those whose `every` divides the step) and
  # at the end, and from `python -m launch.evaluate --workdir W`.
  c.evals = ml_collections.ConfigDict()
  c.eval_batch_size = 128

  # Seed params from another run's checkpoint or an export before step 0
  # (the workdir's own checkpoints win on resume). prefixes: [[source
  # prefix, target prefix], ...] of flat param names; empty: all names.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""
  c.init_from.step = -1  # -1: the latest checkpoint
  c.init_from.prefixes = ()
  return c
