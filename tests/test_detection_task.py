"""The detection task (florax/tasks/detection.py, configs/florence_det.py):
Dynamic Head + ATSS on CoSwin through the shared trainer.

1. Anchors: one per pyramid location at the cell centre, side anchor_scale
   x stride, levels finest first (hand-computed for the tiny preset).
2. Evaluation path: predictions equal to the held-out ground truth give
   COCO AP 1.0 (canvases, and COCO records whose images were resized: the
   boxes go back to original pixels); every box shifted by a third of its
   width loses AP75 but keeps AP50 where IoU = 0.5 is passed.
3. The image tower's params have a UniCL checkpoint's names and shapes.
4. The trainer runs the task on 8 emulated devices (ZeRO-1, data x fsdp):
   loss finite, an eval with AP keys, a box plot written; the served
   `detect` export equals the evaluator's predictions.
5. Config refusals name the field.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import florence
from configs import florence_det
from florax import export, tasks
from florax.data import coco
from florax.data import digits_canvas
from florax.models import two_tower
from florax.train import trainer as trainer_lib
from tests.helpers import apply_overrides

# A smaller detector than the demo's: compile time dominates on 2 cores.
SMALL = {"model.detector.channels": 32, "model.detector.dyhead_blocks": 1,
         "data.image_size": 64, "data.canvas.min_scale": 12,
         "data.canvas.max_scale": 24, "data.canvas.max_digits": 3,
         "data.max_objects": 4, "data.eval_images": 16,
         "train.batch_size": 8, "eval_batch_size": 8}


def _config(**overrides):
  cfg = florence_det.get_config("tiny")
  with cfg.unlocked():
    apply_overrides(cfg, {**SMALL, **overrides})
  return cfg


def _task(tmp_path, **overrides):
  return tasks.build(_config(**overrides), str(tmp_path))


# -- 1. anchors ------------------------------------------------------------------

def test_anchors_by_hand(tmp_path):
  task = tasks.build(florence_det.get_config("tiny"), str(tmp_path))
  anchors, sizes = task.anchors
  # 128 px, CoSwin-tiny's stride-8 stage + 2 extra levels: 16x16, 8x8, 4x4.
  assert sizes == (256, 64, 16) and anchors.shape == (336, 4)
  scale = task.config.detector.anchor_scale
  for level, (start, side, stride) in enumerate([(0, 16, 8), (256, 8, 16),
                                                 (320, 4, 32)]):
    for y, x in [(0, 0), (0, side - 1), (side - 1, 1)]:
      cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
      half = scale * stride / 2
      np.testing.assert_allclose(anchors[start + y * side + x],
                                 [cx - half, cy - half, cx + half, cy + half],
                                 err_msg=f"level {level}")


# -- 2. evaluation ------------------------------------------------------------------

def _perfect(held, shift=0.0):
  """Ground truth as predictions (score 1), boxes shifted by shift x width."""
  boxes = held["boxes"].copy()
  w = boxes[..., 2] - boxes[..., 0]
  boxes[..., 0] += shift * w
  boxes[..., 2] += shift * w
  labels = held["labels"]
  return {"boxes": boxes, "scores": (labels >= 0).astype(np.float32),
          "classes": labels, "valid": labels >= 0}


def test_ground_truth_predictions_score_ap_one(tmp_path, monkeypatch):
  task = _task(tmp_path, **{"plot_boxes": False})
  held = task.holdout()
  assert held["images"].shape == (16, 64, 64, 3)
  monkeypatch.setattr(task, "predictions", lambda p, x: _perfect(held))
  metrics = task.evaluate(None, step=1)
  assert metrics["eval/AP"] == pytest.approx(1.0)
  assert metrics["eval/AP50"] == pytest.approx(1.0)
  # Shifted by w/3 along x: IoU = (2/3) / (4/3) = 0.5 exactly -> AP50
  # keeps every box (pycocotools: IoU >= threshold), AP75 none.
  monkeypatch.setattr(task, "predictions",
                      lambda p, x: _perfect(held, shift=1 / 3 - 1e-4))
  metrics = task.evaluate(None, step=1)
  assert metrics["eval/AP50"] == pytest.approx(1.0)
  assert metrics["eval/AP75"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def coco_records(tmp_path_factory):
  """Digits canvases written as COCO (json + PNGs) and converted, the
  held-out split at 96 px (resized to the model's 64: scale 2/3)."""
  root = tmp_path_factory.mktemp("coco")
  spec = digits_canvas.CanvasSpec(size=96, min_scale=16, max_scale=32,
                                  max_digits=3)
  out = str(root / "records")
  for split, name, n in (("train", "train", 12), ("holdout", "validation",
                                                   10)):
    ann = digits_canvas.write_coco(str(root), split, n, spec, seed=3)
    coco.convert_coco(ann, str(root / split), out, split=name)
  return out


def test_records_ground_truth_maps_back_to_original_pixels(
    coco_records, tmp_path, monkeypatch):
  task = _task(tmp_path, **{"data.name": "records",
                            "data.records.path": coco_records,
                            "plot_boxes": False})
  batch = next(task.train_iterators(0, 1)["train"])
  spec = task.batch_spec(8)
  for k in spec:
    assert batch[k].shape == spec[k].shape, k
  held = task.holdout()
  np.testing.assert_allclose(held["scale"], 64 / 96)
  monkeypatch.setattr(task, "predictions", lambda p, x: _perfect(held))
  metrics = task.evaluate(None, step=1)
  assert metrics["eval/AP"] == pytest.approx(1.0)
  assert task.class_names == tuple(c["name"] for c in
                                   digits_canvas.categories())


# -- 3. init_from ---------------------------------------------------------------------

def test_image_tower_has_unicl_names_and_shapes(tmp_path):
  task = _task(tmp_path)
  det = export.flatten_params(nn.unbox(jax.eval_shape(task.init,
                                                      jax.random.key(0))))
  cfg = florence.get_config("tiny")
  unicl = export.flatten_params(nn.unbox(jax.eval_shape(
      two_tower.from_config(cfg.model).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
      jax.ShapeDtypeStruct((1, cfg.data.max_len), np.int32))["params"]))
  tower = {k: v.shape for k, v in unicl.items()
           if k.startswith("image_encoder/")}
  assert tower == {k: v.shape for k, v in det.items()
                   if k.startswith("image_encoder/")}
  assert {k.split("/")[0] for k in det} == {"image_encoder", "pyramid",
                                            "dyhead", "head"}


def test_vit_backbone_takes_the_simple_pyramid(tmp_path):
  """An EVA-style plain ViT (stride 8 at 64 px) through ViTDet's pyramid:
  levels at strides 4, 8, 16 (scales 2, 1, 0.5) and the ATSS loss on them,
  traced without compiling."""
  from configs import eva  # pylint: disable=g-import-not-at-top
  task = _task(tmp_path, **{
      "model.image": eva.image_config("tiny/8", 64),
      "model.detector.pyramid_scales": (2.0, 1.0, 0.5),
      "model.detector.first_stage": 0})
  assert task.detector_config.backbone == "vit"
  anchors, sizes = task.anchors
  assert sizes == (256, 64, 16)
  np.testing.assert_allclose(anchors[0], [2 - 8, 2 - 8, 2 + 8, 2 + 8])
  params = jax.eval_shape(task.init, jax.random.key(0))
  assert "image_encoder" in params and "pyramid" in params
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in task.batch_spec(2).items()}
  loss, _ = jax.eval_shape(lambda p, b: task.loss(p, b, jax.random.key(0)),
                           nn.unbox(params), batch)
  assert loss.shape == ()


# -- 4. trainer and export ---------------------------------------------------------

def test_trainer_runs_detection_and_export_serves_it(tmp_path):
  from florax import inference, serving  # pylint: disable=g-import-not-at-top
  cfg = _config(**{"train.steps": 2, "train.eval_every": 2,
                   "train.checkpoint_every": 2, "train.log_every": 1,
                   "mesh.axes.data": 4, "mesh.axes.fsdp": 2,
                   "sharding.zero_stage": 1})
  trainer = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "w")))
  final = trainer.train()
  losses = [json.loads(line)["train/loss"]
            for line in open(tmp_path / "w" / "metrics.jsonl")
            if "train/loss" in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  for key in ("eval/AP", "eval/AP50", "eval/AP75"):
    assert 0.0 <= final[key] <= 1.0
  assert os.path.exists(tmp_path / "w" / "plots" / "boxes_final.png")
  task = trainer.task
  params = jax.device_get(trainer.state["params"])
  held = task.holdout()
  pred = task.predictions(params, held["images"])
  serving.write(str(tmp_path / "export"), task.config, params, None,
                task.serving(), step=2, platforms=("cpu",))
  model = inference.load(str(tmp_path / "export"), backend="exported",
                         max_batch=8)
  rows = model.call("detect", images=held["images"][:4])
  np.testing.assert_allclose(rows[..., :4], pred["boxes"][:4], atol=1e-3)
  np.testing.assert_allclose(rows[..., 4], pred["scores"][:4], atol=1e-5)
  np.testing.assert_array_equal(rows[..., 5], np.where(
      pred["valid"][:4], pred["classes"][:4], -1))


@pytest.mark.parametrize("name,size", [("b", 1024), ("swin_t", 224)])
def test_full_presets_validate(name, size, tmp_path):
  """The full-size presets build (on the canvases: no COCO here) with
  ATSS's layout: P3-P7 from the stride-8 stage, anchors of 8 x stride,
  6 DyHead blocks of 256 channels."""
  cfg = florence_det.get_config(name)
  with cfg.unlocked():
    apply_overrides(cfg, {"data.name": "digits_canvas",
                          "data.image_size": size})
  task = tasks.build(cfg, str(tmp_path))
  det = task.detector_config
  assert (det.num_levels, det.channels, det.dyhead_blocks,
          det.first_stage) == (5, 256, 6, 1)
  assert task.config.detector.anchor_scale == 8.0
  if name == "swin_t":  # timm's Swin-T layout: loads an import by name
    assert (task.image_config.stem, task.image_config.merge,
            task.image_config.embed_dim) == ("patch", "patch", 96)


# -- 5. config ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    ({"data.name": "coco"}, "data.name"),
    ({"data.image_size": 60}, "image_size"),
    ({"data.max_objects": 2}, "data.max_objects"),
    ({"data.name": "records"}, "data.records.path"),
    ({"model.detector.anchors": 3}, "model.detector.anchors"),
    ({"model.detector.num_levels": 0}, "num_levels"),
    ({"detector.iou_threshold": 1.5}, "detector.iou_threshold"),
    ({"detector.topk": 0}, "detector.topk"),
    ({"detector.anchor_scale": -1.0}, "detector.anchor_scale"),
    ({"model.image.arch": "multiway"}, "model.image"),
])
def test_config_refusals(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    _task(tmp_path, **overrides)
