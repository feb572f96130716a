"""The task interface: the unit a model family adds to florax.

A task owns everything that is specific to an objective: its model, its data
stream, its loss and its evaluators. The trainer (`florax.train`) only sees
this interface, so contrastive two-tower training (Florence, EVA-CLIP),
masked data modeling (BEiT-3), masked feature regression (EVA) and
multi-objective multi-dataset training (FLAVA) all share one loop.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping

import grain
import jax
import ml_collections

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
  """An objective: builds a model, feeds data, defines loss and evaluation."""

  #: What one example of a batch counts as in throughput logs.
  example_unit: str = "examples"
  #: False for losses that are not a mean over examples (contrastive): the
  #: trainer then refuses gradient accumulation over micro-batches.
  supports_grad_accumulation: bool = True
  #: The device mesh, set by the trainer before anything is traced, for
  #: tasks with explicit collectives (shard_map).
  mesh: jax.sharding.Mesh | None = None

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises ValueError naming any config problem; runs before compiling."""

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Params:
    """Model variables with logical-axis boxes (nn.LogicallyPartitioned).

    The trainer calls it under `jax.eval_shape` to learn shapes and logical
    axes, then under `jit` with the target shardings to materialise them.
    """

  @abc.abstractmethod
  def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/dtypes of one global training batch (for compiling and plans).

    Every leaf's leading dimension is the batch, sharded over data axes.
    """

  @abc.abstractmethod
  def loss(self, params: Params, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, Metrics]:
    """Scalar training loss and metrics for one batch (train mode)."""

  def value_and_grad(self, params: Params, batch: Batch, rng: jax.Array,
                     loss_scale: jax.Array | None = None
                     ) -> tuple[tuple[jax.Array, Metrics], Params]:
    """Loss, metrics and gradient. Tasks may override this with a cheaper or
    memory-lighter exact equivalent (e.g. a gradient cache).

    Args:
      loss_scale: fp16 dynamic loss scaling: when given, the gradient is that
        of `loss * loss_scale` (the returned loss stays unscaled).
    """
    if loss_scale is None:
      return jax.value_and_grad(self.loss, has_aux=True)(params, batch, rng)

    def scaled(p, b, r):
      loss, metrics = self.loss(p, b, r)
      return loss.astype(jax.numpy.float32) * loss_scale, (loss, metrics)
    (_, aux), grads = jax.value_and_grad(scaled, has_aux=True)(params, batch,
                                                               rng)
    return aux, grads

  @abc.abstractmethod
  def train_iterator(self, batch_size: int, process_index: int,
                     process_count: int) -> grain.DatasetIterator:
    """This process's iterator of per-process batches (numpy dicts).

    It must have `get_state()`/`set_state()` (saved with every checkpoint);
    if it has `metrics()`, those are logged with the training metrics
    (e.g. `data/skipped`).
    """

  def evaluate(self, params: Params) -> dict[str, float]:
    """Evaluation metrics named 'eval/...'; called every eval_every steps."""
    return {}

  def flops_per_example(self) -> float | None:
    """Analytic training FLOPs per example, if the task knows them."""
    return None


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str):
  def wrap(cls):
    _REGISTRY[name] = cls
    return cls
  return wrap


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """Instantiates `config.task` from the registry."""
  from florax import tasks as _  # noqa: F401  (registers the built-in tasks)
  if config.task not in _REGISTRY:
    raise ValueError(f"unknown task {config.task!r}; registered tasks: "
                     f"{sorted(_REGISTRY)}")
  return _REGISTRY[config.task](config, workdir)
