"""The config a training workdir was run with (its config.json).

  --config=configs/workdir.py:/path/to/workdir

The launchers (evaluate, export, plan) use this when only --workdir is given;
--config.a.b=value overrides still apply on top.
"""

from florax import config_io


def get_config(workdir: str):
  return config_io.load(workdir)
