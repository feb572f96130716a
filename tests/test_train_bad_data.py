"""Training through a captions folder holding a corrupt JPEG, a missing file
and an empty caption: the run goes on, `data/skipped` = 3 is logged; with a
lower limit the run stops with a message naming the limit."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from florax import tasks
from florax.data import bad_records
from florax.train import trainer as trainer_lib
from helpers import tiny_config


def _folder(path, n=20, corrupt=2, missing=5, empty=9):
  rng = np.random.default_rng(0)
  with open(path / "caps.jsonl", "w") as f:
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
          buf, format="JPEG")
      data = buf.getvalue()
      if i == corrupt:
        data = data[:30] + b"\x00" * 40
      if i != missing:
        (path / f"{i}.jpg").write_bytes(data)
      caption = "" if i == empty else f"a photo of the digit {i % 10}"
      f.write(json.dumps({"path": f"{i}.jpg", "caption": caption}) + "\n")
  return str(path / "caps.jsonl")


def _config(caps, **overrides):
  return tiny_config(**{
      "data.name": "captions", "data.records.path": caps,
      "data.records.shuffle": False, "data.records.read_threads": 1,
      "train.steps": 1, "train.checkpoint_every": 1, **overrides})


def test_trains_through_bad_records(tmp_path):
  caps = _folder(tmp_path)
  cfg = _config(caps, **{"data.records.max_skip_fraction": 0.5,
                         "data.records.min_seen_for_skip_limit": 1})
  trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "w"))).train()
  rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  logged = [r for r in rows if "data/skipped" in r]
  # 16 good examples fill the first batch only after reading all 19 records
  # up to the last bad one, so exactly the 3 bad ones were skipped.
  assert logged[-1]["data/skipped"] == 3
  assert np.isfinite(logged[-1]["train/loss"])


def test_stops_above_the_skip_limit(tmp_path):
  caps = _folder(tmp_path)
  cfg = _config(caps, **{"data.records.max_skip_fraction": 0.1,
                         "data.records.min_seen_for_skip_limit": 1})
  with pytest.raises(bad_records.TooManyBadRecords,
                     match="max_skip_fraction=0.1"):
    trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "w"))).train()
