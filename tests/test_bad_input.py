"""Bad input stops with one clear message naming the problem, before any
compile (the Trainer constructor never compiles; the CLI errors come from
flag parsing)."""

import os
import subprocess
import sys
import time

import pytest

from configs import florence
from florax import tasks
from florax.train import trainer as trainer_lib
from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown florence preset 'xxl'.*tiny"):
    florence.get_config("xxl")


def test_misspelled_field_on_the_command_line(tmp_path):
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config",
       "configs/florence.py:tiny", "--workdir", str(tmp_path),
       "--config.train.stepz=5"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode != 0
  assert "stepz" in proc.stderr
  assert "steps" in proc.stderr  # ml_collections suggests the right name
  assert not os.path.exists(tmp_path / "checkpoints")
  assert time.time() - t0 < 60


def test_misspelled_field_in_python():
  cfg = florence.get_config("tiny")
  with pytest.raises(AttributeError, match="stepz"):
    cfg.train.stepz = 5


@pytest.mark.parametrize("overrides,message", [
    ({"data.image_size": 30}, "image_size 30 does not fit the CoSwin stride"),
    ({"data.train_examples": 0}, "train split is empty"),
    ({"model.image.num_heads": (3, 4)}, "not divisible by 3 heads"),
    ({"model.image.remat": "sometimes"}, "unknown remat policy"),
    ({"train.batch_size": 12}, "batch size 12 of kind 'train' must be "
     "divisible by the batch's 8 data-parallel shards"),
    ({"data.image_size": 0}, "data.image_size must be a positive integer"),
    ({"train.steps": 0}, "train.steps must be a positive integer"),
    ({"model.text.vocab_size": 50}, "tokenizer has"),
    ({"task": "mae"}, "unknown task 'mae'"),
])
def test_config_errors_before_compile(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer_lib.Trainer(tasks.build(tiny_config(**overrides), str(tmp_path)))


def test_resume_with_another_tokenizer_is_refused(tmp_path):
  """A tokenizer dropped into the workdir later (e.g. by a failed run of
  something else) would silently change what every token id means."""
  from florax.data import digits, tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  tasks.build(tiny_config(), workdir).record_tokenizer()  # the first run
  other = tok_lib.train_tokenizer(digits.all_descriptions()[::2], 120)
  with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
    f.write(other.model_proto)
  with pytest.raises(ValueError, match="trained with another tokenizer"):
    tasks.build(tiny_config(), workdir).record_tokenizer()
