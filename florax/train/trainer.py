"""The one training loop shared by every task.

It knows nothing about any model family: a `Task` supplies the parameters,
the data stream, the loss (and gradient) and the evaluators; this loop owns
the mesh, sharded state, the jitted step, metrics, checkpoints, evaluation,
resumption and preemption.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from florax import config_checks
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.parallel import zero
from florax.tasks import base as task_lib
from florax.train import checkpoint as ckpt_lib
from florax.train import grad_accum
from florax.train import hardware
from florax.train import logging as log_lib
from florax.train import optimizer as opt_lib
from florax.train import precision


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def _first_flops(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis.

  Under SPMD the compiled module is the per-device partition, so these are
  per-device FLOPs (checked: a matmul split 8 ways reports 1/8 of its
  2·M·N·K), and TFLOP/s per device = flops · steps/s without dividing by
  the device count.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _preemption_sync_manager():
  """JAX's preemption sync manager, present once jax.distributed is
  initialised with the preemption service (the default): it catches the
  preemption notice (SIGTERM) itself and agrees on a common step."""
  try:
    from jax._src import distributed as dist  # no public accessor
  except ImportError:
    return None
  state = getattr(dist, "global_state", None)
  if state is None or getattr(state, "client", None) is None:
    return None
  return getattr(state, "preemption_sync_manager", None)


def _has_loops(compiled) -> bool:
  try:
    return " while(" in compiled.as_text()
  except Exception:  # as_text is best effort on some backends
    return False


class _StopSignal:
  """Preemption: every process stops after the same step, with a checkpoint.

  Three cases: (1) jax.distributed's preemption sync manager is running
  (multi-host TPU/GPU): it owns SIGTERM and `reached_preemption_sync_point`
  names the step at which all hosts stop; (2) several processes without it:
  a SIGTERM flag is agreed on by an all-gather every step, so no process
  saves a step its peers skip; (3) one process: the SIGTERM flag.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync = _preemption_sync_manager() is not None

  def __enter__(self):
    if self._sync:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Called by every process after every step."""
    if self._sync:
      from jax.experimental import multihost_utils
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    elif jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.int32(self.requested))
      self.requested = bool(np.max(flags))
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Trainer:
  """Builds sharded state for a task and runs (or resumes) training."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_checks.check_config(config)
    self.config = config
    self.workdir = workdir
    self.task = task_lib.build(config, workdir)
    self.task.validate()  # every config problem surfaces before compiling

    self.mesh = mesh_lib.make_mesh(dict(config.mesh.axes))
    self.task.mesh = self.mesh  # for tasks with explicit collectives
    self.rules = sharding_lib.rules_from_config(config.sharding.rules)
    self.zero_stage = int(config.sharding.get("zero_stage", 0))
    dp = mesh_lib.data_size(self.mesh)
    bs = config.train.batch_size
    if bs % dp or bs % jax.process_count():
      raise ValueError(
          f"train.batch_size {bs} must be divisible by the data-parallel size "
          f"{dp} and by the process count {jax.process_count()}")
    self.accum_steps = int(config.train.get("grad_accum_steps", 1))
    if self.accum_steps > 1:
      if not getattr(self.task, "supports_grad_accumulation", True):
        raise ValueError(
            f"task {config.task!r} does not support train.grad_accum_steps="
            f"{self.accum_steps}: its loss is not a mean over examples (a "
            "contrastive loss needs the whole batch as negatives), so "
            "micro-batches would change the objective; use its gradient "
            "cache instead")
      if bs % (dp * self.accum_steps):
        raise ValueError(
            f"train.batch_size {bs} must be divisible by data-parallel size "
            f"{dp} x train.grad_accum_steps {self.accum_steps}")
    self.loss_scaling = precision.loss_scaling_enabled(config)
    if self.loss_scaling:
      self.precision = config.precision
      precision.check_config(self.precision)
    self.total_steps = config.train.steps

    root = jax.random.key(config.seed)
    self.init_rng, train_rng = jax.random.split(root)
    self.train_rng_data = jax.random.key_data(train_rng)

    boxed = jax.eval_shape(self.task.init, self.init_rng)
    logical = nn.unbox(
        sharding_lib.logical_shardings(boxed, self.mesh, self.rules))
    abstract_params = nn.unbox(boxed)
    ckpt_lib.check_model_spec(workdir, abstract_params)
    self.tx, self.schedule = opt_lib.build_optimizer(
        config.optimizer, self.total_steps, abstract_params)
    self.layout = zero.state_layout(boxed, logical, self.tx, self.mesh,
                                    self.zero_stage)
    self.param_shardings = self.layout.params
    repl = sharding_lib.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.state_shardings = {"step": repl, "params": self.layout.params,
                            "opt_state": self.layout.opt_state, "rng": repl}
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params, "opt_state": abstract_opt,
        "rng": jax.ShapeDtypeStruct(self.train_rng_data.shape, jnp.uint32)}
    if self.loss_scaling:
      scale_state = jax.eval_shape(
          lambda: precision.init_state(self.precision.init_scale))
      abstract_state["loss_scale"] = scale_state
      self.state_shardings["loss_scale"] = jax.tree.map(lambda _: repl,
                                                        scale_state)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, self.state_shardings)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.num_params = sum(int(np.prod(p.shape))
                          for p in jax.tree.leaves(abstract_params))

  # -- state ----------------------------------------------------------------

  def init_state(self):
    """The train state, created directly in its target shardings (a ZeRO-3
    run never materialises unsharded parameters anywhere)."""
    def init(rng):
      params = nn.unbox(self.task.init(rng))
      state = {"step": jnp.zeros((), jnp.int32), "params": params,
               "opt_state": self.tx.init(params),
               "rng": jnp.asarray(self.train_rng_data)}
      if self.loss_scaling:
        state["loss_scale"] = precision.init_state(self.precision.init_scale)
      return state
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=self.state_shardings)(self.init_rng)

  # -- step -----------------------------------------------------------------

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                             state["step"])
    scale_state = state.get("loss_scale")
    scale = None if scale_state is None else scale_state["scale"]
    (loss, metrics), grads = grad_accum.accumulate(
        lambda p, b, r: self.task.value_and_grad(p, b, r, loss_scale=scale),
        state["params"], batch, rng, self.accum_steps,
        batch_sharding=self.batch_sharding, grad_shardings=self.layout.grads)
    # ZeRO-2/3: gradients are reduce-scattered into their shards here.
    grads = jax.lax.with_sharding_constraint(grads, self.layout.grads)
    if scale_state is not None:
      grads = precision.unscale(grads, scale_state)
    # ZeRO-1/2: each device updates only its slice of the parameters (the
    # slice of its optimizer state) and the new parameters are all-gathered.
    shard = lambda t: jax.lax.with_sharding_constraint(
        t, self.layout.sharded_params)
    params = shard(state["params"])
    updates, opt_state = self.tx.update(shard(grads), state["opt_state"],
                                        params)
    params = jax.lax.with_sharding_constraint(
        optax.apply_updates(params, updates), self.layout.params)
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics.update({"train/loss": loss,
                    "train/grad_norm": optax.tree.norm(grads),
                    "train/learning_rate": self.schedule(state["step"])})
    new_state = {"step": state["step"] + 1, "params": params,
                 "opt_state": opt_state, "rng": state["rng"]}
    if scale_state is not None:
      finite = precision.all_finite(grads)
      # A non-finite gradient skips the update: params and optimizer state
      # stay exactly as they were.
      new_state["params"] = precision.select_tree(finite, params,
                                                  state["params"])
      new_state["opt_state"] = precision.select_tree(finite, opt_state,
                                                     state["opt_state"])
      new_state["loss_scale"] = precision.update_state(
          scale_state, finite,
          growth_interval=self.precision.growth_interval,
          growth_factor=self.precision.growth_factor,
          backoff_factor=self.precision.backoff_factor)
      metrics["train/loss_scale"] = scale
      metrics["train/skipped_steps"] = new_state["loss_scale"]["skipped"]
    return new_state, metrics

  def compile_step(self):
    """Lowers and compiles the step for abstract inputs (no allocation)."""
    step = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings,
                                  sharding_lib.replicated(self.mesh)),
                   donate_argnums=(0,))
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return step.lower(self.abstract_state, self.abstract_batch()).compile()

  def abstract_batch(self):
    """The global batch as sharded ShapeDtypeStructs."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=self.batch_sharding)
            for k, v in self.task.batch_spec(
                self.config.train.batch_size).items()}

  # -- loop -----------------------------------------------------------------

  def evaluate(self, state) -> dict[str, float]:
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return {k: float(v) for k, v in self.task.evaluate(state["params"]).items()}

  def train(self, max_steps: int | None = None) -> dict[str, float]:
    """Trains to `config.train.steps`, resuming from the latest checkpoint.

    Args:
      max_steps: stop (with a checkpoint) after this many steps of this call,
        e.g. to train a notebook model in slices; None runs to the end.
    Returns:
      The last evaluation's metrics.
    """
    cfg = self.config.train
    writer = log_lib.MetricWriter(self.workdir)
    checkpointer = ckpt_lib.Checkpointer(self.workdir, cfg.keep_checkpoints,
                                         cfg.checkpoint_every)
    per_process = cfg.batch_size // jax.process_count()
    data_iter = self.task.train_iterator(per_process, jax.process_index(),
                                         jax.process_count())

    latest = checkpointer.latest_step()
    restore_data = cfg.get("restore_data_state", True)
    ckpt_lib.check_data_layout(
        self.workdir, {"process_count": jax.process_count(),
                       "batch_size": cfg.batch_size},
        restore_data and latest is not None)
    if latest is not None:
      state = checkpointer.restore(
          latest, self.abstract_state, data_iter,
          restore_data=restore_data)
      writer.truncate_after(latest)
      _log(f"florax: resumed from checkpoint step {latest} in {self.workdir}")
    else:
      state = self.init_state()
      _log(f"florax: task {self.config.task}, {self.num_params / 1e6:.2f}M "
           f"params, mesh {dict(self.mesh.shape)}, ZeRO stage "
           f"{self.zero_stage}, "
           f"{jax.device_count()} {jax.devices()[0].platform} devices, "
           f"{jax.process_count()} processes")
    start_step = int(jax.device_get(state["step"]))

    t0 = time.perf_counter()
    compiled = self.compile_step()
    _log(f"florax: compiled the train step in {time.perf_counter() - t0:.1f}s")
    flops_per_step = _first_flops(compiled)
    if flops_per_step and _has_loops(compiled):
      _log("florax: the step has loops (scanned layers or gradient "
           "accumulation); XLA's cost analysis counts a loop body once, so "
           "TFLOP/s and MFU below are lower bounds")
    peak = hardware.peak_flops_per_device()
    unit = self.task.example_unit

    timer = log_lib.Timer()
    last_eval: dict[str, float] = {}
    step = start_step
    end = self.total_steps if max_steps is None else min(
        self.total_steps, start_step + max_steps)
    with _StopSignal() as stop:
      while step < end:
        t_data = time.perf_counter()
        local = next(data_iter)
        timer.data_wait += time.perf_counter() - t_data
        batch = sharding_lib.global_batch(local, self.batch_sharding)
        state, metrics = compiled(state, batch)
        step += 1
        timer.steps += 1

        if step % cfg.log_every == 0 or step == self.total_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = timer.elapsed()
          sps = timer.steps / elapsed
          metrics["perf/steps_per_sec"] = sps
          metrics[f"perf/{unit}_per_sec"] = sps * cfg.batch_size
          metrics["data/wait_fraction"] = timer.data_wait / elapsed
          if hasattr(data_iter, "metrics"):
            metrics.update(data_iter.metrics())
          if flops_per_step:
            tflops = flops_per_step * sps / 1e12
            metrics["perf/tflops_per_device"] = tflops
            if peak:
              metrics["perf/mfu"] = tflops * 1e12 / peak
          writer.write(step, metrics)
          _log(log_lib.progress_line(step, self.total_steps, metrics, unit))
          timer.reset()

        pause = time.perf_counter()
        if cfg.eval_every and (step % cfg.eval_every == 0
                               or step == self.total_steps):
          last_eval = self.evaluate(state)
          writer.write(step, last_eval)
          _log("florax: eval at step %d: %s" % (step, ", ".join(
              f"{k} {v:.4f}" for k, v in sorted(last_eval.items()))))
        stopping = stop.should_stop(step)
        if (step % cfg.checkpoint_every == 0 or step == end
            or stopping):
          checkpointer.save(step, state, data_iter, force=True)
        timer.excluded += time.perf_counter() - pause
        if stopping:
          _log(f"florax: preemption (SIGTERM) received; checkpoint written at "
               f"step {step}, exiting")
          break
    checkpointer.wait()
    checkpointer.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
    writer.flush()
    writer.close()
    self.state = state
    return last_eval


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  return Trainer(config, workdir).train()
