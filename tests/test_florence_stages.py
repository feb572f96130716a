"""Florence's training stages: the stage presets, resizing position tables
when a stage changes the resolution, and a learning-rate schedule that
neither restarts nor jumps when train.steps changes on resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from scipy import ndimage

from configs import florence
from florax import tasks
from florax.models import coswin
from florax.train import init_from as init_from_lib
from florax.train import optimizer as opt_lib
from florax.train import trainer as trainer_lib
from helpers import apply_overrides

# -- presets ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "b", "h"])
def test_stage_presets(name):
  plain = florence.get_config(name)
  s1, s2, s3 = (florence.get_config(f"{name},stage={n}") for n in (1, 2, 3))
  assert "stage" not in plain  # the plain presets are unchanged
  assert [c.stage for c in (s1, s2, s3)] == [1, 2, 3]
  # Stage 1 trains on template-augmented texts, stages 2 and 3 drop them.
  assert not s1.data.records.drop_templated
  assert s2.data.records.drop_templated and s3.data.records.drop_templated
  assert s1.data.image_size == s2.data.image_size == plain.data.image_size
  assert s1.model.image.window_size == plain.model.image.window_size
  assert s3.data.image_size > s2.data.image_size
  assert s3.model.image.window_size > s2.model.image.window_size
  for c in (s1, s2, s3):  # every stage fits the CoSwin stride schedule
    coswin.validate(coswin.CoSwinConfig(**c.model.image.to_dict()),
                    c.data.image_size)
    assert 0 < c.optimizer.warmup_steps < c.train.steps
    assert c.init_from.path == ""  # pointed at the previous stage by the user
  if name != "tiny":  # the paper's recipe
    assert [c.train.steps for c in (s1, s2, s3)] == [1_000_000, 180_000, 80_000]
    assert (s3.data.image_size, s3.model.image.window_size) == (384, 12)
    # Swin's 384 setting: the window divides every stage's grid.
    assert all(g % 12 == 0 for g in coswin.stage_grids(
        384, coswin.CoSwinConfig(**s3.model.image.to_dict())))
  # Only the stage fields differ from the preset.
  diff = {k for k in ("train", "optimizer", "data", "model")
          if s2[k].to_dict() != plain[k].to_dict()}
  assert diff <= {"train", "optimizer", "data"}


def test_stage_syntax_errors():
  for arg in ("b,stage=4", "b,stage2", "b,"):
    with pytest.raises(ValueError, match="NAME,stage=N"):
      florence.get_config(arg)
  with pytest.raises(ValueError, match="unknown florence preset"):
    florence.get_config("xxl,stage=1")


# -- resizing -----------------------------------------------------------------


def _bias_table(window, heads=2):
  """A table that is a smooth function of the normalised relative offset
  (d / (2w-1)): resizing it must sample the same function on the new grid."""
  n = 2 * window - 1
  o = (np.arange(n) - (window - 1)) / n
  dy, dx = np.meshgrid(o, o, indexing="ij")
  fs = [np.cos(2 * dy) + 0.5 * np.sin(3 * dx),
        np.exp(-4 * (dy ** 2 + dx ** 2))][:heads]
  return np.stack(fs, -1).reshape(n * n, heads).astype(np.float32)


@pytest.mark.parametrize("old,new", [(4, 6), (7, 12), (6, 4)])
def test_bias_resize_samples_the_same_function(old, new):
  got = np.asarray(coswin.resize_relative_position_bias(_bias_table(old), new))
  assert got.shape == ((2 * new - 1) ** 2, 2)
  np.testing.assert_allclose(got, _bias_table(new), atol=0.035)
  if new > old:  # an independent cubic: scipy's spline (grid_mode = the
    n, m = 2 * old - 1, 2 * new - 1  # half-pixel geometry of jax/timm)
    ref = ndimage.zoom(_bias_table(old).reshape(n, n, 2), (m / n, m / n, 1),
                       order=3, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(got, ref.reshape(m * m, 2), atol=0.01)


def test_resize_to_knows_only_resolution_dependent_params():
  table = np.random.RandomState(0).randn(3, 49, 4).astype(np.float32)
  # scan's leading layers axis; heads are never mixed.
  got = init_from_lib.resize_to(
      "image_encoder/stage0_pairs/plain/attn/relative_position_bias", table,
      (3, 121, 4))
  assert got.shape == (3, 121, 4)
  np.testing.assert_allclose(
      got[1, :, 2], np.asarray(coswin.resize_relative_position_bias(
          table[1, :, 2:3], 6))[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.reshape(3, 11, 11, 4)[:, 5, 5],
                             table.reshape(3, 7, 7, 4)[:, 3, 3], atol=1e-5)
  assert init_from_lib.resize_to("x/attn/relative_position_bias", table,
                                 (3, 121, 8)) is None  # other heads
  # A text tower's position table is a sequence, not an image grid.
  assert init_from_lib.resize_to("text_encoder/pos_embed",
                                 np.zeros((16, 8), np.float32), (25, 8)) is None
  assert init_from_lib.resize_to("image_encoder/stem/conv/kernel",
                                 np.zeros((7, 7, 3, 8)), (5, 5, 3, 8)) is None
  # A ViT's (1, 1 + s*s, D) embedding: the class token kept, the grid resized.
  pos = np.random.RandomState(1).randn(1, 1 + 16, 8).astype(np.float32)
  got = init_from_lib.resize_to("image_encoder/pos_embed", pos, (1, 1 + 36, 8))
  assert got.shape == (1, 37, 8)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])


# -- schedule -----------------------------------------------------------------


def _opt(steps_warmup=1, lr=1e-3, min_ratio=0.0):
  cfg = florence.get_config("tiny").optimizer
  with cfg.unlocked():
    cfg.warmup_steps, cfg.learning_rate = steps_warmup, lr
    cfg.min_lr_ratio = min_ratio
  return cfg


def test_schedule_continues_when_train_steps_changes(tmp_path):
  cfg = _opt(steps_warmup=10, min_ratio=0.1)
  w = str(tmp_path)
  assert opt_lib.schedule_segments(w, 100, None) == [(0, 100)]
  assert opt_lib.schedule_segments(w, 100, 40) == [(0, 100)]  # same run
  for new_total in (200, 60):  # extended, cut short
    segs = opt_lib.schedule_segments(w, new_total, 40)
    assert segs == [(0, 100), (40, new_total)]
    old = opt_lib.learning_rate_schedule(cfg, 100)
    lr = opt_lib.segmented_schedule(cfg, segs)
    steps = np.arange(new_total + 1)
    got = np.array([float(lr(s)) for s in steps])
    # Unchanged before the change, continuous at it, then a cosine from
    # there down to the end value exactly at the new total.
    np.testing.assert_allclose(got[:41], [float(old(s)) for s in steps[:41]],
                               rtol=1e-6)
    assert abs(got[41] - got[40]) < 2 * abs(got[40] - got[39]) + 1e-9
    assert np.all(np.diff(got[40:]) <= 1e-9)
    np.testing.assert_allclose(got[-1], 1e-4, rtol=1e-5)
    # What a recomputed cosine would have done instead: a jump.
    plain = float(opt_lib.learning_rate_schedule(cfg, new_total)(41))
    assert abs(plain - got[41]) > 20 * abs(got[41] - got[40])
    with open(tmp_path / "schedule.json") as f:
      assert json.load(f)["segments"] == [list(s) for s in segs]
    opt_lib.schedule_segments(w, 100, 40)  # back to the original length
  # Changed during warmup: the ramp goes on, then the new total's cosine.
  opt_lib.schedule_segments(w, 100, None)
  segs = opt_lib.schedule_segments(w, 300, 5)
  lr = opt_lib.segmented_schedule(cfg, segs)
  plain = opt_lib.learning_rate_schedule(cfg, 300)
  np.testing.assert_allclose([float(lr(s)) for s in range(300)],
                             [float(plain(s)) for s in range(300)], rtol=1e-5)
  # Cut shorter than its warmup: it anneals from where it was instead of
  # squeezing the rest of the ramp (a jump to the peak) into the steps left.
  lr = opt_lib.segmented_schedule(cfg, [(0, 100), (5, 8)])
  got = [float(lr(s)) for s in range(9)]
  assert max(got[5:]) == pytest.approx(got[5]) and got[8] == pytest.approx(1e-4)
  # A finished schedule is not extended: that is the next stage's job.
  opt_lib.schedule_segments(w, 100, None)
  with pytest.raises(ValueError, match="init_from.path"):
    opt_lib.schedule_segments(w, 150, 100)


# -- end to end ---------------------------------------------------------------

_SMALL = {"train.batch_size": 16, "train.log_every": 1, "train.eval_every": 0,
          "train.checkpoint_every": 2, "model.image.drop_path_rate": 0.0}


def _stage(n, **overrides):
  cfg = florence.get_config(f"tiny,stage={n}")
  with cfg.unlocked():
    apply_overrides(cfg, {**_SMALL, **overrides})
  return cfg


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if "train/loss" in l]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """Tiny stage 1 at 16 px (windows of 4), 2 of its 4 steps trained."""
  workdir = str(tmp_path_factory.mktemp("stage1"))
  cfg = _stage(1, **{"data.image_size": 16, "train.steps": 4,
                     "optimizer.warmup_steps": 1})
  trainer_lib.Trainer(tasks.build(cfg, workdir)).train(max_steps=2)
  return workdir


def test_stage3_resizes_bias_tables_and_trains(stage1, tmp_path, capsys):
  # Stage 3 at 24 px with windows of 6: every bias table (49 -> 121 rows).
  cfg = _stage(3, **{"data.image_size": 24, "train.steps": 2,
                     "optimizer.warmup_steps": 1, "init_from.path": stage1})
  assert cfg.model.image.window_size == 6
  source, _ = init_from_lib.read_source(stage1)
  tables = sorted(n for n in source if n.endswith("relative_position_bias"))
  assert len(tables) == 4 and all(source[n].shape[0] == 49 for n in tables)
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path)))
  t.train()
  # Every table resized, every other param loaded (their values: the unit
  # tests above and tests/test_task_contract.py).
  out = capsys.readouterr().out
  assert (f"loaded {len(source) - 4} params, skipped 0, freshly initialised "
          "0, resized 4 to the new resolution") in out
  assert "stage0_block0/attn/relative_position_bias ((49, 2) -> (121, 2))" in out
  trained = init_from_lib.flatten_params(jax.device_get(t.state["params"]))
  assert all(trained[n].shape[0] == 121 for n in tables)
  t.train()
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  # Its own schedule: step 0 of stage 3 is the start of its warmup.
  assert rows[0]["train/learning_rate"] == 0.0
  assert rows[1]["train/learning_rate"] == pytest.approx(cfg.optimizer.learning_rate)


def test_stage2_without_init_from_is_refused(tmp_path):
  # Refused when the task is built, before anything compiles.
  with pytest.raises(ValueError, match="init_from.path"):
    tasks.build(_stage(2, **{"data.image_size": 16}), str(tmp_path))


def test_resume_with_other_train_steps_continues_the_schedule(stage1,
                                                              tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stage1, workdir)
  cfg = _stage(1, **{"data.image_size": 16, "train.steps": 6,
                     "optimizer.warmup_steps": 1})
  trainer_lib.Trainer(tasks.build(cfg, workdir)).train()
  lrs = [r["train/learning_rate"] for r in _rows(workdir)]
  assert len(lrs) == 6
  old = opt_lib.learning_rate_schedule(cfg.optimizer, 4)
  # Steps 1-2 ran on the 4-step cosine; from step 3 (state step 2) it
  # continues from that value to 0 at step 6, not from the 6-step cosine.
  np.testing.assert_allclose(lrs[:3], [float(old(s)) for s in range(3)],
                             rtol=1e-6)
  new = opt_lib.learning_rate_schedule(cfg.optimizer, 6)
  assert abs(float(new(2)) - lrs[2]) > 1e-4
  assert np.all(np.diff(lrs[2:]) < 0) and lrs[-1] > 0
  # The run has ended: extending it now is the next stage's job.
  with pytest.raises(ValueError, match="finished its learning-rate schedule"):
    trainer_lib.Trainer(tasks.build(
        _stage(1, **{"data.image_size": 16, "train.steps": 8,
                     "optimizer.warmup_steps": 1}), workdir)).train()
