"""One process of the multi-process test (see test_multiprocess.py).

  python tests/multiprocess_worker.py WORKDIR NUM_DEVICES_PER_PROCESS [MODE]

MODE 'regression' (default): ZeRO-3 MLP regression, final params saved.
MODE 'unicl': tiny Florence with its zero-shot evaluation switched on (every
process feeds its shard of the held-out split), final metrics saved.

Multi-process runs set FLORAX_COORDINATOR / FLORAX_NUM_PROCESSES /
FLORAX_PROCESS_ID, exactly as a user would, and go through
florax.distributed.initialize().
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))

from florax import distributed  # noqa: E402

distributed.initialize()

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import scale_tasks  # noqa: E402
from florax import tasks  # noqa: E402
from florax.train import trainer as trainer_lib  # noqa: E402


def unicl(workdir):
  import json  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  cfg = helpers.tiny_config(**{
      "task": "unicl_sliced", "train.steps": 4, "train.eval_every": 2,
      "train.checkpoint_every": 4, "mesh.axes": {"data": 2, "fsdp": 2,
                                                 "tensor": 1},
      "sharding.zero_stage": 3})
  final = trainer_lib.Trainer(tasks.build(cfg, workdir)).train()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_eval.json"), "w") as f:
      json.dump(final, f)
  print(f"worker {jax.process_index()}/{jax.process_count()} done", flush=True)


def main():
  workdir = sys.argv[1]
  if len(sys.argv) > 3 and sys.argv[3] == "unicl":
    return unicl(workdir)
  cfg = scale_tasks.regression_config(**{
      "mesh.axes": {"data": 2, "fsdp": 2, "tensor": 1},
      "sharding.zero_stage": 3, "train.steps": 3})
  t = trainer_lib.Trainer(tasks.build(cfg, workdir))
  assert jax.device_count() == 4
  t.train()
  params = multihost_utils.process_allgather(t.state["params"], tiled=True)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(workdir, "params.npz"), **flat)
  print(f"worker {jax.process_index()}/{jax.process_count()} done", flush=True)


if __name__ == "__main__":
  main()
