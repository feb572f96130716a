"""Small tasks for the scale-out tests (registered on import).

`mlp_regression`: a mean-squared-error MLP, a loss that IS a mean over
examples (so gradient accumulation must be exact), on a deterministic global
data stream that every process slices its own rows from.
`unicl_sliced`: the Florence task whose per-process batches are slices of
one global digits stream, so N processes see exactly the batches of one.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import helpers

from florax.models import two_tower
from florax import tasks
from florax.data import pipeline
from florax.models import layers
from florax.tasks import base, unicl


class _Mlp(nn.Module):
  hidden: int
  out: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.hidden, ("embed", "mlp"), dtype=self.dtype,
                     name="fc1")(x.astype(self.dtype))
    h = nn.gelu(h)
    return layers.dense(self.out, ("mlp", "vocab"), dtype=self.dtype,
                        name="fc2")(h).astype(jnp.float32)


def global_regression_batch(step: int, batch: int, dim: int, out: int,
                            seed: int) -> dict:
  rng = np.random.default_rng([seed, step])
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  w = np.random.default_rng(seed).normal(size=(dim, out)) / np.sqrt(dim)
  y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(batch, out))).astype(np.float32)
  return {"x": x, "y": y}


@dataclasses.dataclass(frozen=True)
class _RegressionRows(grain.transforms.Map):
  batch: int
  dim: int
  out: int
  seed: int
  lo: int
  hi: int

  def map(self, step):
    full = global_regression_batch(int(step), self.batch, self.dim, self.out,
                                   self.seed)
    return {k: v[self.lo:self.hi] for k, v in full.items()}


@tasks.register("mlp_regression")
class RegressionTask(base.Task):
  """y = tanh(x W) + noise fitted by a 2-layer MLP with mean squared error."""

  def validate(self):
    pass

  @property
  def model(self):
    m = self.config.model
    return _Mlp(m.hidden, m.out, two_tower.DTYPES[m.dtype])

  def batch_spec(self, global_batch_size):
    m = self.config.model
    return {"x": jax.ShapeDtypeStruct((global_batch_size, m.dim), jnp.float32),
            "y": jax.ShapeDtypeStruct((global_batch_size, m.out), jnp.float32)}

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, self.config.model.dim)))["params"]

  def loss(self, params, batch, rng, ctx=None):
    pred = self.model.apply({"params": params}, batch["x"])
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, {"mean_abs_pred": jnp.mean(jnp.abs(pred))}

  def train_iterators(self, process_index, process_count):
    return {base.DEFAULT_KIND: self.train_iterator(
        self.config.train.batch_size // process_count, process_index,
        process_count)}

  def train_iterator(self, batch_size, process_index, process_count):
    m, gb = self.config.model, self.config.train.batch_size
    lo = process_index * batch_size
    rows = _RegressionRows(gb, m.dim, m.out, self.config.seed, lo,
                           lo + batch_size)
    ds = grain.MapDataset.range(10 ** 6).map(rows)
    return iter(ds.to_iter_dataset())


def regression_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({
      "task": "mlp_regression", "seed": 0,
      "model": {"dim": 8, "hidden": 32, "out": 8, "dtype": "float32"},
      "train": {"batch_size": 16, "steps": 3, "log_every": 1,
                "eval_every": 0, "checkpoint_every": 100,
                "keep_checkpoints": 1, "grad_accum_steps": 1},
      "optimizer": {"name": "adamw", "learning_rate": 1e-2,
                    "warmup_steps": 0, "min_lr_ratio": 0.0, "b1": 0.9,
                    "b2": 0.98, "eps": 1e-6, "weight_decay": 0.01,
                    "clip_norm": 0.0, "no_decay_patterns": ()},
      "mesh": {"axes": {"data": -1, "fsdp": 1, "tensor": 1}},
      "sharding": {"rules": [["batch", ["data", "fsdp"]], ["mlp", "tensor"],
                             ["vocab", "tensor"]], "zero_stage": 0},
      "precision": {"loss_scale": "auto", "init_scale": 2.0 ** 15,
                    "growth_interval": 2000, "growth_factor": 2.0,
                    "backoff_factor": 0.5},
  })
  return helpers.apply_overrides(c, overrides)


@dataclasses.dataclass(frozen=True)
class _Rows(grain.transforms.Map):
  lo: int
  hi: int

  def map(self, batch):
    return {k: v[self.lo:self.hi] for k, v in batch.items()}


@tasks.register("unicl_sliced")
class SlicedUniCLTask(unicl.UniCLTask):
  """UniCL whose process p reads rows [p·b, (p+1)·b) of one global stream."""

  def train_iterator(self, batch_size, process_index, process_count):
    cfg = self.config.data
    ds = pipeline.digits_train_dataset(
        self.tokenizer, image_size=cfg.image_size, max_len=cfg.max_len,
        batch_size=batch_size * process_count, seed=self.config.seed)
    lo = process_index * batch_size
    return iter(ds.map(_Rows(lo, lo + batch_size)))


def run_steps(cfg, workdir, batches):
  """Trains `cfg` on the given per-step numpy batches through the Trainer's
  compiled step; returns (losses, final params, trainer)."""
  from florax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from florax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  t = trainer_lib.Trainer(tasks.build(cfg, str(workdir)))
  state = t.init_state()
  step = t.compile_step()
  losses = []
  for b in batches:
    state, metrics = step(state, sharding_lib.global_batch(b, t.batch_sharding), {})
    losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(state["params"]), t
