"""Task names -> classes, and building a task for a config.

`launch/` builds the task and hands it to the trainer, which never looks a
task up by name itself.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from florax import config_checks
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
  """Class decorator: `@register("unicl") class UniCLTask(Task): ...`."""
  def wrap(cls):
    _REGISTRY[name] = cls
    return cls
  return wrap


def build(config: ml_collections.ConfigDict, workdir: str, mesh=None):
  """Checks the config, makes the mesh (unless given) and logical rules,
  instantiates `config.task` and validates it, all before any compile."""
  from florax import tasks as _  # noqa: F401  (registers the built-in tasks)
  config_checks.check_config(config)
  if config.task not in _REGISTRY:
    raise ValueError(f"unknown task {config.task!r}; registered tasks: "
                     f"{sorted(_REGISTRY)}")
  if mesh is None:
    mesh = mesh_lib.make_mesh(dict(config.mesh.axes))
  rules = sharding_lib.rules_from_config(config.sharding.rules)
  task = _REGISTRY[config.task](config, workdir, mesh, rules)
  task.validate()  # every config problem surfaces before compiling
  return task
