"""A small synthetic task that uses the whole task contract (registered on
import): a frozen teacher, two batch kinds of different shapes (one of them
a nested batch), a loss that reads the step.

The student, an MLP, regresses the outputs of a frozen random linear teacher
on two streams: `vec` batches {'x': (B, 8)} and `seq` batches {'inputs':
{'x': (B, 3, 8)}, 'weight': (B,)} whose three positions are averaged.
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
from configs import common
from florax import tasks
from florax.models import layers
from florax.tasks import base

DIM, OUT = 8, 4


class _Student(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(layers.dense(16, ("embed", "mlp"), name="fc1")(x))
    return layers.dense(OUT, ("mlp", "embed"), name="fc2")(h)


class _Teacher(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.dense(OUT, ("embed", "mlp"), name="proj")(x)


@dataclasses.dataclass(frozen=True)
class _Batches(grain.transforms.Map):
  """Batch i of a kind: a pure function of (seed, kind, i), so a resumed
  stream is checkable."""
  kind: str
  batch: int
  seed: int

  def map(self, i):
    rng = np.random.default_rng([self.seed, len(self.kind), int(i)])
    if self.kind == "vec":
      return {"x": rng.normal(size=(self.batch, DIM)).astype(np.float32)}
    return {"inputs": {"x": rng.normal(size=(self.batch, 3, DIM)
                                       ).astype(np.float32)},
            "weight": rng.uniform(0.5, 1.5, size=(self.batch,)
                                  ).astype(np.float32)}


@tasks.register("contract_synthetic")
class SyntheticTask(base.Task):

  def validate(self):
    pass

  def init(self, rng):
    return _Student().init(rng, jnp.zeros((1, DIM)))["params"]

  def frozen_spec(self):
    return jax.eval_shape(lambda: self._teacher_init())

  def _teacher_init(self):
    return _Teacher().init(jax.random.key(self.config.teacher_seed),
                           jnp.zeros((1, DIM)))["params"]

  def load_frozen(self, shardings):
    return jax.jit(lambda: nn.unbox(self._teacher_init()),
                   out_shardings=shardings)()

  def frozen_source(self):
    return f"random teacher, seed {self.config.teacher_seed}"

  def batch_kinds(self):
    b = self.config.kind_batch
    return {
        "vec": {"x": jax.ShapeDtypeStruct((b.vec, DIM), jnp.float32)},
        "seq": {"inputs": {"x": jax.ShapeDtypeStruct((b.seq, 3, DIM),
                                                     jnp.float32)},
                "weight": jax.ShapeDtypeStruct((b.seq,), jnp.float32)},
    }

  def train_iterators(self, process_index, process_count):
    out = {}
    for kind, size in self.config.kind_batch.items():
      ds = grain.MapDataset.range(10 ** 6).map(
          _Batches(kind, size // process_count, self.config.seed))
      out[kind] = iter(ds.to_iter_dataset())
    return out

  def loss(self, params, batch, rng, ctx):
    teacher = lambda x: _Teacher().apply({"params": ctx.frozen}, x)
    student = lambda x: _Student().apply({"params": params}, x)
    if ctx.kind == "vec":
      err = jnp.mean(jnp.square(student(batch["x"]) - teacher(batch["x"])),
                     axis=-1)
    else:
      x = batch["inputs"]["x"]
      err = batch["weight"] * jnp.mean(
          jnp.square(student(x) - teacher(x)), axis=(-2, -1))
    # A loss weight that ramps with the step: the step reaches the loss.
    weight = 1.0 + ctx.step.astype(jnp.float32) / 100.0
    return weight * jnp.mean(err), {"step_seen": ctx.step.astype(jnp.float32)}


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = "contract_synthetic"
  c.teacher_seed = 7
  c.kind_batch = ml_collections.ConfigDict({"vec": 16, "seq": 8})
  c.train.steps = 8
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 4
  c.train.mixture = ml_collections.ConfigDict({"vec": 1.0, "seq": 1.0})
  c.optimizer.warmup_steps = 0
  c.optimizer.learning_rate = 1e-2
  c.sharding.rules = [["batch", ["data", "fsdp"]], ["mlp", "tensor"]]
  return helpers.apply_overrides(c, overrides)
