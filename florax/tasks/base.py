"""The task interface: the unit a model family adds to florax.

A task owns everything that is specific to an objective: its model, its
frozen networks (a teacher, a visual tokenizer), its batch kinds and data
streams, its loss and its evaluators. The trainer (`florax.train`) only sees
this interface, so contrastive two-tower training (Florence, EVA-CLIP),
masked data modeling with a frozen tokenizer (BEiT-3), masked feature
regression against a frozen teacher (EVA) and several objectives over
several datasets in one run (FLAVA) all share one loop.

A task is built by `florax.tasks.build` (from `launch/`) with the mesh and
logical-axis rules it will run under, and handed to the trainer.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import grain
import jax
import ml_collections

Params = Any
Batch = Any  # a pytree (nested dicts allowed) of arrays, batch-major
Metrics = dict[str, jax.Array]

#: The kind name of a task with a single stream of batches.
DEFAULT_KIND = "train"


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a loss may depend on besides params, batch and rng.

  Attributes:
    step: the global step (a traced int32 scalar): schedules of mask ratios
      or loss weights.
    frozen: the task's frozen variables (teacher, visual tokenizer), placed
      like params but never trained; None when the task has none.
    kind: the batch kind of this step (static: one compiled step per kind).
  """
  step: Any
  frozen: Any = None
  kind: str = DEFAULT_KIND


class Task(abc.ABC):
  """An objective: builds a model, feeds data, defines loss and evaluation."""

  #: What one example of a batch counts as in throughput logs.
  example_unit: str = "examples"
  #: False for losses that are not a mean over examples (contrastive): the
  #: trainer then refuses gradient accumulation over micro-batches.
  supports_grad_accumulation: bool = True

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mesh: jax.sharding.Mesh, rules: tuple):
    self.config = config
    self.workdir = workdir
    #: The device mesh and logical-axis rules the task runs under (for
    #: explicit collectives and for placing evaluation inputs).
    self.mesh = mesh
    self.rules = rules

  # -- config ---------------------------------------------------------------

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises ValueError naming any config problem; runs before compiling."""

  # -- variables ------------------------------------------------------------

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Params:
    """Trainable variables with logical-axis boxes (nn.LogicallyPartitioned).

    The trainer calls it under `jax.eval_shape` to learn shapes and logical
    axes, then under `jit` with the target shardings to materialise them.
    """

  def frozen_spec(self) -> Any:
    """Abstract frozen variables with logical-axis boxes, or None.

    Frozen variables (a teacher network, a visual tokenizer, a frozen tower)
    are inputs of every step, sharded by the same logical rules as params,
    but never reach the optimizer, the gradients or the loss scaling, and
    are not written into checkpoints: `load_frozen` recreates them.
    """
    return None

  def load_frozen(self, shardings: Any) -> Any:
    """The frozen variables, placed on `shardings` (a tree like
    `frozen_spec()`'s). Called once per run, before the first step."""
    raise NotImplementedError(
        f"{type(self).__name__} declares frozen variables but no load_frozen")

  def frozen_source(self) -> str:
    """Where the frozen variables come from (a path, a step, a seed); it is
    recorded in the workdir with their checksum."""
    return ""

  def adapt_init_source(self, source: dict) -> dict:
    """The flat source params `config.init_from` read ({name: numpy
    array}), before they are matched to this task's params by name
    (init_from.prefixes) and shape. A task may transform them, e.g. inflate
    a 2-D image tower's weights into its video tower's shapes
    (florax/tasks/video.py). Default: unchanged."""
    return source

  # -- data -----------------------------------------------------------------

  def batch_kinds(self) -> dict[str, Any]:
    """{kind: pytree of global jax.ShapeDtypeStruct} of one batch per kind.

    Every leaf's leading dimension is that kind's global batch. The trainer
    compiles one step per kind. A task with one stream keeps the default:
    `{DEFAULT_KIND: batch_spec(train.batch_size)}`.
    """
    return {DEFAULT_KIND: self.batch_spec(self.config.train.batch_size)}

  def batch_spec(self, global_batch_size: int) -> Any:
    """The batch of a single-kind task (see `batch_kinds`)."""
    raise NotImplementedError

  def kind_weights(self) -> dict[str, float]:
    """Sampling weight of each kind (FLAVA's round-robin): each step draws
    one kind, a pure function of (seed, step) so resumes replay it. Default:
    `config.train.mixture` if the config has one, else equal weights."""
    kinds = list(self.batch_kinds())
    mixture = self.config.train.get("mixture")
    if mixture:  # unknown names stay in, for the trainer to refuse
      return {**{k: 0.0 for k in kinds},
              **{k: float(v) for k, v in mixture.items()}}
    return {k: 1.0 for k in kinds}

  @abc.abstractmethod
  def train_iterators(self, process_index: int, process_count: int
                      ) -> Mapping[str, grain.DatasetIterator]:
    """{kind: this process's iterator of per-process batches (numpy trees)}.

    Each must have `get_state()`/`set_state()` (saved with every
    checkpoint); if it has `metrics()`, those are logged with the training
    metrics (e.g. `data/skipped`).
    """

  # -- objective ------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, params: Params, batch: Batch, rng: jax.Array,
           ctx: StepContext) -> tuple[jax.Array, Metrics]:
    """Scalar training loss and metrics for one batch of kind `ctx.kind`."""

  def value_and_grad(self, params: Params, batch: Batch, rng: jax.Array,
                     ctx: StepContext, loss_scale: jax.Array | None = None
                     ) -> tuple[tuple[jax.Array, Metrics], Params]:
    """Loss, metrics and gradient w.r.t. params. Tasks may override this
    with a cheaper or memory-lighter exact equivalent (a gradient cache).

    Args:
      loss_scale: fp16 dynamic loss scaling: when given, the gradient is that
        of `loss * loss_scale` (the returned loss stays unscaled).
    """
    if loss_scale is None:
      return jax.value_and_grad(self.loss, has_aux=True)(params, batch, rng,
                                                         ctx)

    def scaled(p, b, r):
      loss, metrics = self.loss(p, b, r, ctx)
      return loss.astype(jax.numpy.float32) * loss_scale, (loss, metrics)
    (_, aux), grads = jax.value_and_grad(scaled, has_aux=True)(params, batch,
                                                               rng)
    return aux, grads

  # -- evaluation and export ------------------------------------------------

  def evaluate(self, params: Params, frozen: Any = None,
               step: int | None = None) -> dict[str, float]:
    """Evaluation metrics named 'eval/...' of the evaluators due at `step`
    (all of them when None: the final step, launch.evaluate). Called by
    every process; inputs are fed over the mesh and results are global."""
    return {}

  def preprocess_spec(self) -> dict:
    """The eval-time image transform (florax.data.preprocess spec) an export
    records for inference. Default: the whole image resized to
    data.image_size, scaled to [-1, 1] (the embedded digits')."""
    from florax.data import preprocess  # pylint: disable=g-import-not-at-top
    return preprocess.resize_spec(self.config.data.image_size)

  def serving(self) -> dict[str, Any] | None:
    """What an export of this task serves: {name: florax.serving.Function}
    (answers, captions, embeddings... each a pure function of params and
    batched inputs, serialized with `jax.export`), or None for the
    two-tower export (florax.export.write_export: encode_image/encode_text
    of `florax.models.two_tower`)."""
    return None

  def serving_tokenizer(self):
    """The tokenizer an export of `serving()` holds (its text inputs'), or
    None when no function reads text."""
    return None

  def flops_per_example(self) -> float | None:
    """Analytic training FLOPs per example, if the task knows them and they
    do not depend on the batch (see `step_flops`)."""
    return None

  def step_flops(self, kind: str, global_batch: int) -> float | None:
    """Analytic FLOPs of one training step of batch kind `kind` over the
    whole global batch (all devices together), or None if unknown.

    Model FLOPs as florax.models.flops counts them: matmuls and
    convolutions only, forward + backward of the trained network (3x its
    forward, 2x for layers fed by data) + the forward of frozen networks;
    recomputation (remat, a gradient cache) is not counted. The trainer
    divides them by the mesh's device count for TFLOP/s and MFU, and falls
    back to XLA's cost analysis when this returns None. The default scales
    `flops_per_example`; a task whose cost is not linear in the batch (a
    contrastive loss's B x B logits) overrides this.
    """
    per_example = self.flops_per_example()
    return None if per_example is None else per_example * global_batch
