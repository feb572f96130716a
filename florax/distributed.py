"""Multi-host start-up through JAX's own runtime (`jax.distributed`).

`jax.distributed.initialize()` detects SLURM and Cloud TPU environments by
itself; explicit coordinator settings come from the environment:
  FLORAX_COORDINATOR=host:port FLORAX_NUM_PROCESSES=N FLORAX_PROCESS_ID=i
With none of these, a single process runs and nothing is initialised.
"""

from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Cloud TPU VMs with more than one worker (a pod slice).
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> None:
  """Initialises jax.distributed when this process is one of several."""
  coordinator = os.environ.get("FLORAX_COORDINATOR")
  if coordinator:
    missing = [k for k in ("FLORAX_NUM_PROCESSES", "FLORAX_PROCESS_ID")
               if not os.environ.get(k, "").strip().isdigit()]
    if missing or ":" not in coordinator:
      raise ValueError(
          f"FLORAX_COORDINATOR={coordinator!r} needs host:port and integer "
          f"FLORAX_NUM_PROCESSES and FLORAX_PROCESS_ID (bad or missing: "
          f"{missing or ['FLORAX_COORDINATOR']})")
    num, pid = (int(os.environ["FLORAX_NUM_PROCESSES"]),
                int(os.environ["FLORAX_PROCESS_ID"]))
    if not 0 <= pid < num:
      raise ValueError(f"FLORAX_PROCESS_ID={pid} is not in [0, {num})")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num, process_id=pid)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return  # one process: nothing to start (and the backend stays unbuilt)
  if jax.process_count() > 1:
    # Every process is at the same point right after start-up: run the
    # first cross-process collective now. On CPU it builds the Gloo
    # context, which must see every process within 30 s (not
    # configurable); left to the trainer's first collective (Orbax's
    # checkpoint-directory barrier) it can fall on a process still
    # compiling on a loaded host (DEADLINE_EXCEEDED in GetKeyValue).
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("florax: processes started")
