"""The one training loop shared by every task.

It knows nothing about any model family: a `Task` (built by `launch/` with
`florax.tasks.build`) supplies the parameters, frozen variables, batch kinds
and data streams, the loss (and gradient) and the evaluators; this loop owns
sharded state, one jitted step per batch kind, metrics, checkpoints,
evaluation, resumption, `init_from` and preemption.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from florax import config_checks
from florax import config_io
from florax.data import mixtures
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.parallel import zero
from florax.tasks import base as task_lib
from florax.train import checkpoint as ckpt_lib
from florax.train import ema as ema_lib
from florax.train import grad_accum
from florax.train import hardware
from florax.train import init_from as init_from_lib
from florax.train import logging as log_lib
from florax.train import optimizer as opt_lib
from florax.train import precision
from florax.train import run_record


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def _first_flops(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis: the fallback
  of `Trainer.flops_per_device` for a task without an analytic count.

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


def _kind_item(kind: str) -> str:
  """Checkpoint item holding the data position of batch kind `kind`."""
  return f"data_{kind}"


def _final_metrics(workdir: str) -> dict[str, float]:
  """The last logged value of every eval/ metric (for a finished run)."""
  path = os.path.join(workdir, log_lib.METRICS_FILE)
  out: dict[str, float] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          out.update({k: v for k, v in row.items() if k.startswith("eval/")})
  return out


class Trainer:
  """Builds sharded state for a task and runs (or resumes) training.

  Args:
    task: a built task (`florax.tasks.build(config, workdir)`); its config,
      workdir, mesh and logical rules are the run's.
  """

  def __init__(self, task: task_lib.Task):
    config, workdir = task.config, task.workdir
    config_checks.check_config(config)
    self.config = config
    self.workdir = workdir
    self.task = task
    self.mesh, self.rules = task.mesh, task.rules
    self.zero_stage = int(config.sharding.get("zero_stage", 0))
    self.accum_steps = int(config.train.get("grad_accum_steps", 1))
    if self.accum_steps > 1 and not task.supports_grad_accumulation:
      raise ValueError(
          f"task {config.task!r} does not support train.grad_accum_steps="
          f"{self.accum_steps}: its loss is not a mean over examples (a "
          "contrastive loss needs the whole batch as negatives), so "
          "micro-batches would change the objective; use its gradient "
          "cache instead")
    self.kind_specs, self.kind_weights = self._check_kinds()
    self.loss_scaling = precision.loss_scaling_enabled(config)
    if self.loss_scaling:
      self.precision = config.precision
      precision.check_config(self.precision)
    self.total_steps = config.train.steps
    # > 0: the optimizer keeps an EMA of the weights, and evaluation uses it.
    self.ema_decay = float(config.optimizer.get("ema_decay", 0.0))
    self._ema_reader = None

    root = jax.random.key(config.seed)
    self.init_rng, train_rng = jax.random.split(root)
    self.train_rng_data = jax.random.key_data(train_rng)

    boxed = jax.eval_shape(task.init, self.init_rng)
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
    self.abstract_state = _with_shardings(abstract_state, self.state_shardings)

    # Frozen variables: placed by the same logical rules as params, but an
    # input of the step, not part of the (optimised, checkpointed) state.
    frozen_boxed = task.frozen_spec()
    if frozen_boxed is None:
      self.frozen_shardings, self.abstract_frozen = {}, {}
    else:
      self.frozen_shardings = nn.unbox(sharding_lib.logical_shardings(
          frozen_boxed, self.mesh, self.rules))
      if self.zero_stage >= 3:  # sharded like the (FSDP) params
        self.frozen_shardings = zero.shard_tree_over_data(
            frozen_boxed, self.frozen_shardings, self.mesh)
      self.abstract_frozen = _with_shardings(nn.unbox(frozen_boxed),
                                             self.frozen_shardings)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    self.num_params = sum(int(np.prod(p.shape))
                          for p in jax.tree.leaves(abstract_params))
    self.num_frozen = sum(int(np.prod(p.shape))
                          for p in jax.tree.leaves(self.abstract_frozen))

  def _check_kinds(self) -> tuple[dict, dict]:
    """The task's batch kinds and their sampling weights, checked."""
    specs = self.task.batch_kinds()
    weights = self.task.kind_weights()
    unknown = sorted(set(weights) - set(specs))
    if unknown:
      raise ValueError(f"train.mixture names unknown batch kinds {unknown}; "
                       f"task {self.config.task!r} has {sorted(specs)}")
    weights = {k: float(weights.get(k, 0.0)) for k in specs}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
      raise ValueError(f"batch kind weights must be >= 0 with a positive "
                       f"sum, got {weights}")
    shards = sharding_lib.batch_size_divisor(self.mesh, self.rules)
    for kind, spec in specs.items():
      if not re.fullmatch(r"[a-z][a-z0-9_]*", kind):
        raise ValueError(f"batch kind name {kind!r}: use lower-case letters, "
                         "digits and '_'")
      sizes = {leaf.shape[0] for leaf in jax.tree.leaves(spec)}
      if len(sizes) != 1:
        raise ValueError(f"batch kind {kind!r}: leaves disagree on the batch "
                         f"size {sorted(sizes)}")
      size, = sizes
      need = shards * self.accum_steps
      if size % need or size % jax.process_count():
        raise ValueError(
            f"the batch size {size} of kind {kind!r} must be divisible by the "
            f"batch's {shards} data-parallel shards (sharding rule 'batch')"
            + (f" x train.grad_accum_steps {self.accum_steps}"
               if self.accum_steps > 1 else "")
            + f" and by the process count {jax.process_count()}")
    return specs, {k: w for k, w in weights.items() if w > 0}

  def batch_size(self, kind: str) -> int:
    return jax.tree.leaves(self.kind_specs[kind])[0].shape[0]

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
      state = jax.jit(init, out_shardings=self.state_shardings)(self.init_rng)
    return self._init_from(state)

  def _init_from(self, state):
    """Loads `config.init_from`'s matching params into a fresh state; the
    optimizer state stays fresh (AdamW's moments do not depend on params)."""
    cfg = self.config.get("init_from")
    if not cfg or not cfg.get("path"):
      return state
    source, what = init_from_lib.read_source(cfg.path, cfg.get("step", -1))
    source = self.task.adapt_init_source(source)
    prefixes = [tuple(p) for p in cfg.get("prefixes", ())]
    params, report = init_from_lib.load_matching(state["params"], source,
                                                 prefixes)
    if not report["loaded"]:
      raise ValueError(
          f"init_from {what}: no parameter matched (prefixes {prefixes}); "
          f"e.g. target {next(iter(report['fresh']), None)!r}, source "
          f"{next(iter(source), None)!r}")
    _log(init_from_lib.summary(report, what))
    if self.ema_decay:  # the average starts at the loaded weights
      return dict(state, params=params, opt_state=ema_lib.with_ema_params(
          state["opt_state"], params))
    return dict(state, params=params)

  def load_frozen(self):
    """The task's frozen variables, placed; their source and checksum are
    recorded in the workdir, and a run with other ones is refused."""
    if not self.frozen_shardings:
      return {}
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      frozen = self.task.load_frozen(self.frozen_shardings)
    run_record.record_or_check(
        self.workdir, "frozen.json",
        {"source": self.task.frozen_source(),
         "checksum": run_record.fingerprint(frozen)},
        "frozen variables (teacher / tokenizer network)",
        "Point the config at the frozen network this workdir was trained "
        "with, or use a new --workdir.")
    return frozen

  # -- step -----------------------------------------------------------------

  def _train_step(self, kind, state, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                             state["step"])
    ctx = task_lib.StepContext(step=state["step"], frozen=frozen or None,
                               kind=kind)
    scale_state = state.get("loss_scale")
    scale = None if scale_state is None else scale_state["scale"]
    (loss, metrics), grads = grad_accum.accumulate(
        lambda p, b, r: self.task.value_and_grad(p, b, r, ctx,
                                                 loss_scale=scale),
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

  def compile_step(self, kind: str | None = None):
    """Lowers and compiles the step of one batch kind (default: the first)
    for abstract inputs (no allocation)."""
    kind = next(iter(self.kind_weights)) if kind is None else kind
    batch = self.abstract_batch(kind)
    step = jax.jit(functools.partial(self._train_step, kind),
                   in_shardings=(self.state_shardings,
                                 jax.tree.map(lambda s: s.sharding, batch),
                                 self.frozen_shardings),
                   out_shardings=(self.state_shardings,
                                  sharding_lib.replicated(self.mesh)),
                   donate_argnums=(0,))
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return step.lower(self.abstract_state, batch,
                        self.abstract_frozen).compile()

  def flops_per_device(self, compiled: dict[str, Any]
                       ) -> dict[str, float | None]:
    """FLOPs of one step of each kind per device, for TFLOP/s and MFU.

    The task's analytic count (`Task.step_flops`: model FLOPs of the global
    batch, florax.models.flops) divided by the mesh's device count; for a
    kind without one, XLA's cost analysis of the compiled step, which
    counts a loop body once (a lower bound when the step has scanned layers
    or gradient accumulation) and includes elementwise work. Logs the
    source once.
    """
    devices = self.mesh.devices.size
    out, sources = {}, {}
    for kind, c in compiled.items():
      try:
        analytic = self.task.step_flops(kind, self.batch_size(kind))
      except Exception as e:  # a metric never stops training
        _log(f"florax: analytic FLOPs of kind {kind!r} failed ({e!r}); "
             "using XLA's cost analysis")
        analytic = None
      if analytic is not None:
        out[kind], sources[kind] = float(analytic) / devices, "analytic"
        continue
      out[kind] = _first_flops(c)
      if out[kind] is None:
        sources[kind] = "unknown (no TFLOP/s or MFU)"
      elif _has_loops(c):
        sources[kind] = ("XLA cost analysis, a LOWER BOUND: the step has "
                         "loops (scanned layers or gradient accumulation), "
                         "whose body it counts once")
      else:
        sources[kind] = "XLA cost analysis (elementwise ops included)"
    if len(set(sources.values())) == 1:
      what = next(iter(sources.values()))
    else:
      what = "; ".join(f"{k}: {v}" for k, v in sources.items())
    if what == "analytic":
      what = ("analytic model FLOPs (florax.models.flops: matmuls, no "
              "recompute)")
    _log(f"florax: TFLOP/s and MFU from {what}"
         + "".join(f", {k} {v / 1e12:.4g} TFLOP/device/step"
                   for k, v in out.items() if v))
    return out

  def abstract_batch(self, kind: str | None = None):
    """One global batch of `kind` as sharded ShapeDtypeStructs."""
    kind = next(iter(self.kind_weights)) if kind is None else kind
    return jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                       sharding=self.batch_sharding),
        self.kind_specs[kind])

  def global_batch(self, local_batch):
    """This process's numpy batch -> the global jax.Array batch."""
    return sharding_lib.global_batch(local_batch, self.batch_sharding)

  # -- loop -----------------------------------------------------------------

  def eval_params(self, state):
    """The params evaluation uses: the EMA of the weights (placed like the
    params) when optimizer.ema_decay > 0, else the params."""
    if not self.ema_decay:
      return state["params"]
    if self._ema_reader is None:
      _log(f"florax: evaluating the EMA of the weights (optimizer.ema_decay="
           f"{self.ema_decay})")
      self._ema_reader = jax.jit(ema_lib.ema_params,
                                 out_shardings=self.param_shardings)
    return self._ema_reader(state["opt_state"])

  def evaluate(self, state, frozen=None, step=None) -> dict[str, float]:
    params = self.eval_params(state)
    with mesh_lib.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return {k: float(v) for k, v in self.task.evaluate(
          params, frozen or None, step).items()}

  def kind_sequence(self, start: int, end: int) -> list[str]:
    """The batch kind of every step in [start, end): a pure function of
    (seed, step), so a resumed run replays the same sequence."""
    names = list(self.kind_weights)
    if len(names) == 1:
      return names * (end - start)
    idx = mixtures.round_robin_choices(self.kind_weights, self.config.seed,
                                       np.arange(start, end))
    return [names[i] for i in idx]

  def train(self, max_steps: int | None = None) -> dict[str, float]:
    """Trains to `config.train.steps`, resuming from the latest checkpoint.

    Args:
      max_steps: stop (with a checkpoint) after this many steps of this call,
        e.g. to train a notebook model in slices; None runs to the end.
    Returns:
      The last evaluation's metrics.
    """
    cfg = self.config.train
    kinds = list(self.kind_weights)
    checkpointer = ckpt_lib.Checkpointer(
        self.workdir, cfg.keep_checkpoints, cfg.checkpoint_every,
        data_names=tuple(_kind_item(k) for k in kinds))
    latest = checkpointer.latest_step()
    if latest is not None and latest >= self.total_steps:
      checkpointer.close()
      final = _final_metrics(self.workdir)
      _log(f"florax: {self.workdir} already finished at step {latest} "
           f"(train.steps={self.total_steps}); nothing to do")
      return final
    restore_data = cfg.get("restore_data_state", True)
    ckpt_lib.check_data_layout(
        self.workdir, {"process_count": jax.process_count(),
                       "batch_size": {k: self.batch_size(k) for k in kinds}},
        restore_data and latest is not None)
    # The lr schedule of this workdir: a train.steps changed since the last
    # run continues it from the resumed step, never restarts or jumps it
    # (optimizer.schedule_segments; read before config.json is rewritten).
    self.tx, self.schedule = opt_lib.build_optimizer(
        self.config.optimizer,
        opt_lib.schedule_segments(self.workdir, self.total_steps, latest),
        self.abstract_state["params"])
    config_io.save(self.workdir, self.config)
    iterators = self.task.train_iterators(jax.process_index(),
                                          jax.process_count())
    missing = [k for k in kinds if k not in iterators]
    if missing:
      raise ValueError(f"task {self.config.task!r} gave no train iterator for "
                       f"batch kinds {missing}")
    data_iters = {_kind_item(k): iterators[k] for k in kinds}

    restored_step, state = checkpointer.restore_latest(
        self.abstract_state, data_iters, restore_data=restore_data)
    writer = log_lib.MetricWriter(self.workdir)
    if state is not None:
      writer.truncate_after(restored_step)
      _log(f"florax: resumed from checkpoint step {restored_step} in "
           f"{self.workdir}")
    else:
      state = self.init_state()
      _log(f"florax: task {self.config.task}, {self.num_params / 1e6:.2f}M "
           f"params" + (f" + {self.num_frozen / 1e6:.2f}M frozen"
                        if self.num_frozen else "")
           + f", mesh {dict(self.mesh.shape)}, ZeRO stage {self.zero_stage}, "
           f"{jax.device_count()} {jax.devices()[0].platform} devices, "
           f"{jax.process_count()} processes"
           + (f", batch kinds {self.kind_weights}" if len(kinds) > 1 else ""))
    frozen = self.load_frozen()
    start_step = int(jax.device_get(state["step"]))

    t0 = time.perf_counter()
    compiled = {k: self.compile_step(k) for k in kinds}
    _log("florax: compiled the train step"
         + (f" for {len(kinds)} batch kinds" if len(kinds) > 1 else "")
         + f" in {time.perf_counter() - t0:.1f}s")
    flops = self.flops_per_device(compiled)
    peak = hardware.peak_flops_per_device()
    unit = self.task.example_unit

    timer = log_lib.Timer()
    window = {"examples": 0, "flops": 0.0, "kinds": collections.Counter()}
    last_metrics: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    said_no_evals = False
    step = start_step
    end = self.total_steps if max_steps is None else min(
        self.total_steps, start_step + max_steps)
    sequence = self.kind_sequence(start_step, end)
    with _StopSignal() as stop:
      while step < end:
        kind = sequence[step - start_step]
        t_data = time.perf_counter()
        local = next(data_iters[_kind_item(kind)])
        timer.data_wait += time.perf_counter() - t_data
        state, metrics = compiled[kind](state, self.global_batch(local),
                                        frozen)
        last_metrics[kind] = metrics
        step += 1
        timer.steps += 1
        window["examples"] += self.batch_size(kind)
        window["flops"] += flops[kind] or 0.0
        window["kinds"][kind] += 1

        if step % cfg.log_every == 0 or step == self.total_steps:
          row = self._log_row(metrics, last_metrics, window, timer,
                              data_iters, unit, peak)
          writer.write(step, row)
          _log(log_lib.progress_line(step, self.total_steps, row, unit))
          timer.reset()
          window = {"examples": 0, "flops": 0.0,
                    "kinds": collections.Counter()}

        pause = time.perf_counter()
        stopping = stop.should_stop(step)
        if (step % cfg.checkpoint_every == 0 or step == end
            or stopping):
          # Saved before evaluating: an evaluation that fails never costs
          # the checkpoint of the steps it evaluates.
          checkpointer.save(step, state, data_iters, force=True)
        if cfg.eval_every and (step % cfg.eval_every == 0
                               or step == self.total_steps) and not stopping:
          metrics_eval = self.evaluate(
              state, frozen, None if step == self.total_steps else step)
          if metrics_eval:
            last_eval = metrics_eval
            writer.write(step, last_eval)
            _log("florax: eval at step %d: %s" % (step, ", ".join(
                f"{k} {v:.4f}" for k, v in sorted(last_eval.items()))))
          elif not said_no_evals:
            said_no_evals = True
            _log("florax: no evaluators are configured (config.evals is "
                 "empty); training runs without evaluation")
        timer.excluded += time.perf_counter() - pause
        if stopping:
          _log(f"florax: preemption (SIGTERM) received; checkpoint written at "
               f"step {step}, exiting")
          break
    checkpointer.wait()
    checkpointer.close()
    for it in data_iters.values():
      getattr(it, "close", lambda: None)()
    writer.flush()
    writer.close()
    self.state = state
    self.frozen = frozen
    return last_eval

  def _log_row(self, metrics, last_metrics, window, timer, data_iters, unit,
               peak) -> dict[str, float]:
    """The logged row: this step's metrics (and with several kinds, each
    kind's latest under train/<kind>/...), throughput and data metrics."""
    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if len(self.kind_weights) > 1:
      for kind, m in last_metrics.items():
        for k, v in jax.device_get(m).items():
          row[k.replace("train/", f"train/{kind}/", 1)] = float(v)
      for kind in self.kind_weights:
        row[f"data/{kind}/steps"] = float(window["kinds"][kind])
    elapsed = timer.elapsed()
    row["perf/steps_per_sec"] = timer.steps / elapsed
    row[f"perf/{unit}_per_sec"] = window["examples"] / elapsed
    row["data/wait_fraction"] = timer.data_wait / elapsed
    for it in data_iters.values():
      if hasattr(it, "metrics"):
        for k, v in it.metrics().items():
          row[k] = row.get(k, 0.0) + float(v)
    if window["flops"]:
      tflops = window["flops"] / elapsed / 1e12
      row["perf/tflops_per_device"] = tflops
      if peak:
        row["perf/mfu"] = tflops * 1e12 / peak
    return row


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
