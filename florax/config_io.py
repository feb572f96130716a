"""The resolved config of a run, kept in its workdir.

Training writes `WORKDIR/config.json` at every start, so that evaluation,
export and planning need only `--workdir W` (command-line overrides still
apply on top). `configs/workdir.py` is the config file the launchers use when
no `--config` is given.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

CONFIG_FILE = "config.json"


def save(workdir: str, config: ml_collections.ConfigDict):
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(path + ".tmp", path)


def _tuples(node):
  """JSON lists back to tuples (configs keep sequences as tuples or lists;
  code reading them accepts both, and tuples stay immutable)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (locked: a misspelled override
  is an error)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"--workdir {workdir} does not exist")
    raise FileNotFoundError(
        f"{path} is missing: this workdir was not written by launch.train "
        "(or predates config.json); pass --config=configs/<family>.py:<preset>")
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  # Rules are lists of [logical, axes] pairs: keep them as lists.
  rules = raw.get("sharding", {}).get("rules")
  config = ml_collections.ConfigDict(_tuples(raw))
  if rules is not None:
    config.sharding.rules = rules
  config.lock()
  return config
