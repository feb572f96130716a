"""COCO mAP against values derived by hand from the COCO protocol, and the
box plot's file.

The protocol facts used: 10 IoU thresholds 0.50:0.05:0.95, a detection
matches at threshold t when IoU >= t; AP per threshold is the mean over 101
recall points 0:0.01:1 of the interpolated precision, 0 past the highest
recall reached.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from florax.evaluate import box_plot
from florax.evaluate import coco_map

# Category ids 5 and 9 (class indices 0 and 1). Every box is 81 px wide and
# 40 px tall (area 3240: "medium"), far apart from the others.
CATEGORY_IDS = [5, 9]
_GT = {  # image id -> [(x1, y1, x2, y2), class index]
    1: [((10, 10, 91, 50), 0), ((100, 120, 181, 160), 1)],
    2: [((5, 60, 86, 100), 1)],
    3: [((50, 5, 131, 45), 0)],
    4: [((0, 150, 81, 190), 0), ((110, 20, 191, 60), 1)],
}


def _gt_dict(gt=None):
  gt = _GT if gt is None else gt
  anns = []
  for image_id, objs in gt.items():
    for (x1, y1, x2, y2), c in objs:
      anns.append({"id": len(anns) + 1, "image_id": image_id,
                   "category_id": CATEGORY_IDS[c],
                   "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  return {"images": [{"id": i, "width": 200, "height": 200,
                      "file_name": f"{i}.png"} for i in gt],
          "annotations": anns,
          "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}


def _detections(shift=0.0, class_offset=0, images=None):
  out = []
  for image_id, objs in _GT.items():
    if images is not None and image_id not in images:
      continue
    for k, ((x1, y1, x2, y2), c) in enumerate(objs):
      out.append({"image_id": image_id,
                  "category_id": CATEGORY_IDS[(c + class_offset) % 2],
                  "bbox": [x1 + shift, y1, x2 - x1, y2 - y1],
                  "score": 0.9 - 0.1 * k})
  return out


def test_perfect_predictions():
  m = coco_map.coco_metrics(_gt_dict(), _detections())
  assert m["AP"] == pytest.approx(1.0)
  assert m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(1.0)
  assert m["APm"] == pytest.approx(1.0)
  # no small or large ground truth: pycocotools' -1 becomes NaN
  assert math.isnan(m["APs"]) and math.isnan(m["APl"])
  assert set(m) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_iou_062_passes_three_of_ten_thresholds():
  # width 81 shifted by 19: IoU = (81 - 19) / (81 + 19) = 0.62, clear of
  # the 0.60 and 0.65 thresholds (no float tie). It matches at 0.50, 0.55,
  # 0.60 (AP 1 each) and at none of the 7 others (AP 0 each).
  m = coco_map.coco_metrics(_gt_dict(), _detections(shift=19.0))
  assert m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(0.0)
  assert m["AP"] == pytest.approx(0.3)


def test_wrong_class_scores_zero():
  m = coco_map.coco_metrics(_gt_dict(), _detections(class_offset=1))
  assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AP75"] == 0.0


def test_half_the_images_missed():
  # One class, one object per image in 4 images; the detector finds images
  # 1 and 2 perfectly and returns nothing for 3 and 4. Recall reaches 2/4
  # at precision 1: the recall points 0.00..0.50 (51 of 101) score 1, the
  # 50 above 0.5 score 0, so AP = 51/101 at every IoU threshold.
  gt = {i: [((10 * i, 10, 10 * i + 81, 50), 0)] for i in range(1, 5)}
  dets = [{"image_id": i, "category_id": 5,
           "bbox": [10 * i, 10, 81, 40], "score": 0.5 + 0.1 * i}
          for i in (1, 2)]
  m = coco_map.coco_metrics(_gt_dict(gt), dets)
  for key in ("AP", "AP50", "AP75"):
    assert m[key] == pytest.approx(51 / 101)


def test_empty_detections_are_zero_not_a_crash():
  m = coco_map.coco_metrics(_gt_dict(), [])
  assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AP75"] == 0.0
  assert m["APm"] == 0.0


def test_unknown_image_id_is_a_clear_error():
  dets = _detections()
  dets[0] = dict(dets[0], image_id=77)
  with pytest.raises(ValueError, match="image_id 77"):
    coco_map.coco_metrics(_gt_dict(), dets)


def test_detections_to_coco_by_hand():
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, 0] = [10, 20, 30, 60]
  boxes[0, 1] = [0, 0, 4, 4]       # invalid slot: left out
  boxes[1, 2] = [2, 4, 10, 12]
  scores = np.array([[0.9, 0.8, 0.1], [0.0, 0.0, 0.7]], np.float32)
  classes = np.array([[1, 0, 0], [0, 0, 0]], np.int32)
  valid = np.array([[True, False, False], [False, False, True]])
  out = coco_map.detections_to_coco(boxes, scores, classes, valid,
                                    np.array([42, 43]), [5, 9],
                                    scales=np.array([2.0, 0.5]))
  assert len(out) == 2
  assert out[0]["image_id"] == 42 and out[0]["category_id"] == 9
  assert out[0]["bbox"] == pytest.approx([5, 10, 10, 20])  # / scale 2
  assert out[0]["score"] == pytest.approx(0.9)
  assert out[1]["image_id"] == 43 and out[1]["category_id"] == 5
  assert out[1]["bbox"] == pytest.approx([4, 8, 16, 16])  # / scale 0.5
  # round trip into the metric: perfect by construction of the gt below
  gt = {"images": [{"id": 42, "width": 100, "height": 100},
                   {"id": 43, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 9,
             "bbox": [5, 10, 10, 20]},
            {"id": 2, "image_id": 43, "category_id": 5,
             "bbox": [4, 8, 16, 16]}],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}
  m = coco_map.coco_metrics(gt, out)
  assert m["AP"] == pytest.approx(1.0)
  assert math.isnan(m["APm"])  # areas 200 and 256: small only
  assert m["APs"] == pytest.approx(1.0)


def _red(pixels):
  # class 0's colour is (230, 25, 75); the images are black
  return ((pixels[..., 0] > 180) & (pixels[..., 1] < 80)
          & (pixels[..., 2] < 120)).sum()


def test_box_plot_png_size_and_boxes(tmp_path):
  images = np.full((5, 32, 32, 3), -1.0, np.float32)
  dets = {"boxes": np.tile([[[2, 3, 20, 25], [0, 0, 8, 8]]], (5, 1, 1)),
          "scores": np.tile([[0.9, 0.1]], (5, 1)),
          "classes": np.tile([[0, 1]], (5, 1)),
          "valid": np.ones((5, 2), bool)}
  gt = {"boxes": np.tile([[[1, 1, 21, 24], [0, 0, 0, 0]]], (5, 1, 1)),
        "labels": np.tile([[0, -1]], (5, 1))}
  path = str(tmp_path / "boxes.png")
  box_plot.save_box_plot(path, images, dets, gt,
                         class_names=[str(i) for i in range(10)])
  with Image.open(path) as img:
    assert img.format == "PNG"
    assert img.size == (4 * 300, 2 * 300)  # 5 panels: 2 rows of 4, 3 in
    pixels = np.asarray(img.convert("RGB"))
  assert _red(pixels) > 100  # the 0.9 box and its label
  white = (pixels.min(axis=-1) > 200).sum()
  assert white > 100  # dashed ground truth
  # max_images=2 -> one row of 2; a threshold above every score -> no box
  path2 = str(tmp_path / "two.png")
  box_plot.save_box_plot(path2, images, dets, max_images=2,
                         score_threshold=0.95)
  with Image.open(path2) as img:
    assert img.size == (2 * 300, 300)
    pixels = np.asarray(img.convert("RGB"))
  assert _red(pixels) == 0 and not (pixels.min(axis=-1) > 200).any()
