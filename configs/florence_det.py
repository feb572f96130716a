"""Florence's object-level adapter: Dynamic Head + ATSS on CoSwin (task
`detection`, florax/tasks/detection.py).

Presets (`--config configs/florence_det.py:NAME`):
  tiny     the quickstart's CoSwin tower (configs/florence.py:tiny: 2
           stages, windows of 4) on 128 px canvases of several sklearn
           digits (florax/data/digits_canvas.py), a 4-level pyramid of 64
           channels, 2 Dynamic Head blocks; the 2-core CPU demo. From the
           quickstart's UniCL checkpoint:
             python -m launch.train --config configs/florence_det.py:tiny \\
                 --workdir runs/det --config.init_from.path=runs/tiny
  b        CoSwin-B (configs/florence.py:b's tower) at 1024 px, 5 levels of
           256 channels, 6 Dynamic Head blocks (Florence §3.4), COCO's 1x
           shape (90k steps at batch 16, AdamW lr 1e-4, weight decay 0.05,
           the backbone at the same lr): give it COCO as records
           (launch/make_dataset.py --coco_instances ...) with
           --config.data.name=records --config.data.records.path=DIR.
  swin_t   the same head on a Swin-T imported from timm
           (launch/import_weights.py ... swin_tiny_patch4_window7_224):
           --config.init_from.path=IMPORT_DIR.

Every field of the head, the assignment and the post-processing is in
`model.detector` / `detector`; the ATSS paper's values are the b/swin_t
defaults (one anchor of 8 x stride per location, top-9 candidates per
level, focal alpha 0.25 / gamma 2, GIoU weight 2, NMS at IoU 0.6, 100
detections).
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import florence
from florax.convert import timm_swin

COCO_TRAIN_2017 = 117_266  # images with annotations


def _detector(channels: int, levels: int, blocks: int):
  return ml_collections.ConfigDict(dict(
      channels=channels, num_levels=levels, dyhead_blocks=blocks,
      num_convs=0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  if name not in ("tiny", "b", "swin_t"):
    raise ValueError(f"unknown florence_det preset {arg!r}; choose one of "
                     "['b', 'swin_t', 'tiny']")
  tiny = name == "tiny"
  c = common.base_config()
  c.task = "detection"
  c.preset = name

  c.model = ml_collections.ConfigDict()
  if name == "swin_t":
    arch = dict(timm_swin.ARCHS["swin_tiny_patch4_window7_224"])
    arch.pop("image_size")
    fields = dict(florence._image_config("T"))  # pylint: disable=protected-access
    fields.update(timm_swin._BASE, **arch)  # pylint: disable=protected-access
    c.model.image = ml_collections.ConfigDict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})
  else:
    c.model.image = florence._image_config("tiny" if tiny else "B")  # pylint: disable=protected-access
  c.model.image.drop_path_rate = 0.1 if tiny else 0.2
  if not tiny:
    c.model.image.remat = "full"
  # tiny: the FPN from CoSwin-tiny's stride-8 stage + 2 extra levels
  # (strides 8, 16, 32; 16x16, 8x8, 4x4 at 128 px) and anchors of 4 x
  # stride (32, 64, 128 px: the digits are 16-40 px). The stride-4 level
  # would hold 3/4 of the anchors and of the head's cost. b / swin_t: the
  # ATSS layout, P3-P7 from the stride-8 stage on, anchors of 8 x stride.
  c.model.detector = (_detector(64, 3, 2) if tiny else
                      _detector(256, 5, 6))
  c.model.detector.first_stage = 1
  c.model.dtype = "float32" if tiny else "bfloat16"

  c.detector = ml_collections.ConfigDict(dict(
      anchor_scale=4.0 if tiny else 8.0, topk=9, focal_alpha=0.25, focal_gamma=2.0,
      box_weight=2.0, score_threshold=0.05, pre_nms_topk=1000,
      iou_threshold=0.6, max_detections=100))

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits_canvas" if tiny else "records"
  c.data.image_size = 128 if tiny else 1024
  c.data.max_objects = 8 if tiny else 100
  c.data.eval_images = 300 if tiny else 5000
  c.data.canvas = ml_collections.ConfigDict(dict(
      min_digits=1, max_digits=4, min_scale=16, max_scale=40,
      max_overlap=0.2))
  c.data.records = ml_collections.ConfigDict(dict(path="", split="train"))
  c.data.eval_split = "validation"

  c.init_from.prefixes = (("image_encoder", "image_encoder"),)
  c.optimizer.weight_decay = 0.05
  if tiny:
    c.train.batch_size = 16
    c.train.steps = 800
    c.train.log_every = 50
    c.train.eval_every = 400
    c.train.checkpoint_every = 400
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.eval_batch_size = 50
  else:
    c.train.batch_size = 16
    c.train.steps = 90_000  # COCO 1x: 12 epochs of 118k images
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.checkpoint_every = 5_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 1_000
    c.eval_batch_size = 16
    c.sharding.zero_stage = 1
  c.lock()
  return c
