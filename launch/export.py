"""Export a checkpoint for inference (params, config, tokenizer, jax.export).

  python -m launch.export --workdir W --out W/export [--step N] \
      [--dtype bfloat16] [--ema]  # --config defaults to W/config.json

Load the result with `florax.inference.load(OUT)`; see florax/export.py for
the directory layout. A task that serves its own functions (BEiT-3's VQA
answers, captions, ...: `Task.serving()`) is exported as florax/serving.py
describes, and loads as a `ServedModel`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir")
_OUT = flags.DEFINE_string("out", None, "export directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "storage dtype of the exported params")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "jax.export lowering platforms")
_EMA = flags.DEFINE_bool("ema", False, "export the EMA of the weights (a run "
                         "trained with optimizer.ema_decay > 0)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from florax import export  # pylint: disable=g-import-not-at-top
  manifest = export.export_workdir(_CONFIG.value, _WORKDIR.value, _OUT.value,
                                   _STEP.value, _DTYPE.value,
                                   tuple(_PLATFORMS.value), ema=_EMA.value)
  served = manifest.get("functions")
  print(f"florax: exported step {manifest['step']} "
        f"({manifest['num_params'] / 1e6:.2f}M params, "
        f"{'serving ' + '/'.join(served) + ', ' if served else ''}"
        f"{manifest['param_dtype']}{', EMA weights' if _EMA.value else ''}, "
        f"jax.export for "
        f"{'/'.join(manifest['export_platforms'])}) to {_OUT.value}",
        flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "out"])
  cli.run(main, workdir_config=True)
