"""Train any florax task from a config.

  python -m launch.train --config configs/florence.py:tiny --workdir /tmp/run
  python -m launch.train --config configs/florence.py:tiny --workdir /tmp/run \
      --config.train.steps=50

Re-running the same command on the same workdir resumes from its latest
checkpoint (data position included); a finished run says so and stops.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, "
                               "logs and the tokenizer")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes
  cli.check_workdir(_WORKDIR.value)
  from florax import distributed
  distributed.initialize()
  from florax import tasks
  from florax.train import trainer
  task = tasks.build(_CONFIG.value, _WORKDIR.value)
  final = trainer.Trainer(task).train()
  if final:
    print("florax: final " + ", ".join(f"{k} {v:.4f}"
                                        for k, v in sorted(final.items())))


if __name__ == "__main__":
  cli.run(main)
