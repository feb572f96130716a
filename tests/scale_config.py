"""Config file for subprocess tests: `--config tests/scale_config.py`.

Importing it registers the test tasks, so `python -m launch.train` can run
them (with tests/ on PYTHONPATH).
"""

import scale_tasks


def get_config(arg=None):
  del arg
  return scale_tasks.regression_config()
