"""notebooks/quickstart.ipynb runs top to bottom (nbclient, CPU kernel).

To stay fast it reuses the shared tiny run and its export (the notebook's
own training cell then only sees a finished run); its outputs are checked
for the accuracy line and the three figures.
"""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from tests import trained_tiny  # noqa: E402

NOTEBOOK = os.path.join(trained_tiny.REPO, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.setenv("FLORAX_QUICKSTART_WORKDIR", trained_tiny.workdir())
  monkeypatch.setenv("FLORAX_QUICKSTART_EXPORT",
                     trained_tiny.export_dir("float32"))
  monkeypatch.setenv("FLORAX_QUICKSTART_OVERRIDES",
                     json.dumps(trained_tiny.NOTEBOOK_OVERRIDES))
  monkeypatch.setenv("FLORAX_REPO", trained_tiny.REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS")  # the kernel is a plain one-device process
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=240, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
                 ).execute()  # raises CellExecutionError on any failure

  text, pngs = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", ""))
      pngs += "image/png" in out.get("data", {})
  text = "".join(text)
  assert "reusing the finished run" in text
  m = re.search(r"zero-shot top-1 on (\d+) held-out digits: ([0-9.]+)", text)
  assert m and int(m.group(1)) == 359 and 0 <= float(m.group(2)) <= 1, text
  assert re.search(r"diagonal hits: \d+ / 10", text), text
  assert pngs == 3, pngs  # predictions, similarity matrix, curves
