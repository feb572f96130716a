"""Evaluate a checkpoint of a training workdir with the task's evaluators.

  python -m launch.evaluate --workdir W                  # the run's own config
  python -m launch.evaluate --workdir W --step 200 \
      --config.evals.linear_probe.enabled=True
  python -m launch.evaluate --config configs/eva.py:tiny --workdir W --initial
                     # the random init the run starts from: a baseline

Only the params are read from the checkpoint (no optimizer state, no train
step compiled; see florax/evaluate/checkpoint_eval.py). The metrics go to the
same sinks as training's (metrics.jsonl, TensorBoard, the console) at the
checkpoint's step, replacing that step's earlier values of the same names,
so a re-evaluation reproduces what training logged.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file[:preset] (default: WORKDIR/config.json)",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
_INITIAL = flags.DEFINE_bool(
    "initial", False, "evaluate the params the run starts from (the seed's "
    "random init, init_from applied) instead of a checkpoint; step 0")
_WRITE = flags.DEFINE_bool("write", True, "write the metrics to the "
                           "workdir's metrics.jsonl and TensorBoard")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads
  from florax.evaluate import checkpoint_eval  # pylint: disable=g-import-not-at-top
  step, metrics = checkpoint_eval.evaluate_workdir(
      _CONFIG.value, _WORKDIR.value, _STEP.value, _WRITE.value,
      initial=_INITIAL.value)
  print(f"florax: eval of {_WORKDIR.value} at step {step}: " + ", ".join(
      f"{k} {v:.4f}" for k, v in sorted(metrics.items())), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, workdir_config=True)
