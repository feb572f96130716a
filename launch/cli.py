"""What every launcher shares: --workdir alone finds the run's config, and a
user error prints one message instead of a traceback.

  python -m launch.evaluate --workdir W                 # W/config.json
  python -m launch.evaluate --workdir W --config.evals.zeroshot.every=0
"""

from __future__ import annotations

import os
import sys

from absl import app

_WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "workdir.py")

# What a user's mistake raises (a bad value, a missing file, a misspelled
# config field); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, KeyError, AttributeError,
               TypeError)


def _flag_value(argv, name):
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_from_workdir(argv: list[str]) -> list[str]:
  """Adds --config=configs/workdir.py:W when only --workdir W is given."""
  if _flag_value(argv, "config") is not None:
    return argv
  workdir = _flag_value(argv, "workdir")
  if workdir is None:
    return argv
  return [argv[0], f"--config={_WORKDIR_CONFIG}:{workdir}"] + argv[1:]


def _message(e: BaseException) -> str:
  msg = str(e.args[0]) if len(e.args) == 1 else str(e)
  msg = msg.replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
    msg = msg[1:-1]  # repr-quoted (KeyError, ml_collections' AttributeError)
  return " ".join(msg.split())  # one line, indentation collapsed


def check_workdir(workdir: str | None):
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory")


def run(main, *, workdir_config: bool = False):
  """`app.run(main)`, printing `florax: error: ...` and exiting 2 on a user
  error, including one in a --config.* override while flags are parsed."""
  argv = config_from_workdir(sys.argv) if workdir_config else sys.argv
  try:
    app.run(main, argv=argv)
  except USER_ERRORS as e:
    print(f"florax: error: {_message(e)}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:
    # config_flags defers an IOError of loading the config (a missing
    # WORKDIR/config.json or --config file) until the config is first read,
    # then raises a generic IOError from it: report the cause.
    if isinstance(e.__cause__, USER_ERRORS + (OSError,)):
      print(f"florax: error: {_message(e.__cause__)}", file=sys.stderr,
            flush=True)
      sys.exit(2)
    raise
