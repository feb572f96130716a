"""The one training loop shared by every task.

It knows nothing about any model family: a `Task` supplies the parameters,
the data stream, the loss (and gradient) and the evaluators; this loop owns
the mesh, sharded state, the jitted step, metrics, checkpoints, evaluation,
resumption and preemption.
"""

from __future__ import annotations

import signal
import sys
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
from florax.tasks import base as task_lib
from florax.train import checkpoint as ckpt_lib
from florax.train import hardware
from florax.train import logging as log_lib
from florax.train import optimizer as opt_lib


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def _first_flops(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


class _StopSignal:
  """SIGTERM sets a flag; the loop checkpoints at the next step and exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

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
    self.rules = sharding_lib.rules_from_config(config.sharding.rules)
    dp = mesh_lib.data_parallel_size(self.mesh)
    bs = config.train.batch_size
    if bs % dp or bs % jax.process_count():
      raise ValueError(
          f"train.batch_size {bs} must be divisible by the data-parallel size "
          f"{dp} and by the process count {jax.process_count()}")
    self.total_steps = config.train.steps

    root = jax.random.key(config.seed)
    self.init_rng, train_rng = jax.random.split(root)
    self.train_rng_data = jax.random.key_data(train_rng)

    boxed = jax.eval_shape(self.task.init, self.init_rng)
    self.param_shardings = nn.unbox(
        sharding_lib.logical_shardings(boxed, self.mesh, self.rules))
    abstract_params = nn.unbox(boxed)
    ckpt_lib.check_model_spec(workdir, abstract_params)
    self.tx, self.schedule = opt_lib.build_optimizer(
        config.optimizer, self.total_steps, abstract_params)
    repl = sharding_lib.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: repl)
    self.state_shardings = {"step": repl, "params": self.param_shardings,
                            "opt_state": opt_shardings, "rng": repl}
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params, "opt_state": abstract_opt,
        "rng": jax.ShapeDtypeStruct(self.train_rng_data.shape, jnp.uint32)}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, self.state_shardings)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.num_params = sum(int(np.prod(p.shape))
                          for p in jax.tree.leaves(abstract_params))

  # -- state ----------------------------------------------------------------

  def init_state(self):
    def init(rng):
      params = nn.unbox(self.task.init(rng))
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": self.tx.init(params),
              "rng": jnp.asarray(self.train_rng_data)}
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=self.state_shardings)(self.init_rng)

  # -- step -----------------------------------------------------------------

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                             state["step"])
    (loss, metrics), grads = self.task.value_and_grad(state["params"], batch,
                                                      rng)
    updates, opt_state = self.tx.update(grads, state["opt_state"],
                                        state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics.update({"train/loss": loss,
                    "train/grad_norm": optax.tree.norm(grads),
                    "train/learning_rate": self.schedule(state["step"])})
    new_state = {"step": state["step"] + 1, "params": params,
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  def compile_step(self):
    """Lowers and compiles the step for abstract inputs (no allocation)."""
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                          sharding=self.batch_sharding)
                  for k, v in self.task.batch_spec(
                      self.config.train.batch_size).items()}
    step = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings,
                                  sharding_lib.replicated(self.mesh)),
                   donate_argnums=(0,))
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return step.lower(self.abstract_state, batch_spec).compile()

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
    if latest is not None:
      state = checkpointer.restore(latest, self.abstract_state, data_iter)
      writer.truncate_after(latest)
      _log(f"florax: resumed from checkpoint step {latest} in {self.workdir}")
    else:
      state = self.init_state()
      _log(f"florax: task {self.config.task}, {self.num_params / 1e6:.2f}M "
           f"params, mesh {dict(self.mesh.shape)}, "
           f"{jax.device_count()} {jax.devices()[0].platform} devices, "
           f"{jax.process_count()} processes")
    start_step = int(jax.device_get(state["step"]))

    t0 = time.perf_counter()
    compiled = self.compile_step()
    _log(f"florax: compiled the train step in {time.perf_counter() - t0:.1f}s")
    flops_per_step = _first_flops(compiled)
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
        if (step % cfg.checkpoint_every == 0 or step == end
            or stop.requested):
          checkpointer.save(step, state, data_iter, force=True)
        timer.excluded += time.perf_counter() - pause
        if stop.requested:
          _log(f"florax: SIGTERM received; checkpoint written at step {step}, "
               "exiting")
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
