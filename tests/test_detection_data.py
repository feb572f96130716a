"""Detection data: digit canvases, box transforms, the COCO converter and
its input pipeline, checked against hand-computed boxes and numpy
references written here (never against the code's own output)."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from florax.data import box_transforms as bt
from florax.data import coco
from florax.data import digits
from florax.data import digits_canvas as dc
from florax.data import records
from florax.evaluate import coco_map

flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------- canvases


def _glyph(image8, side):
  # The documented rendering: PIL bilinear resize of the 8x8 digit.
  return np.asarray(Image.fromarray(image8, mode="L").resize(
      (side, side), Image.BILINEAR))


def _ref_iou(a, b):
  iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) +
                  (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_ink_box_of_a_hand_glyph():
  g = np.zeros((8, 8), np.uint8)
  g[2, 3] = 5
  g[5, 1] = 200
  # ink rows 2..5, cols 1..3 -> pixel-edge box (1, 2, 4, 6)
  assert dc.ink_box(g) == (1, 2, 4, 6)
  assert dc.ink_box(np.zeros((4, 4), np.uint8)) is None


def test_canvas_boxes_are_tight_and_inside():
  spec = dc.CanvasSpec()
  images8, targets = digits.load_split("train")
  counts = []
  for index in range(25):
    placements = dc.canvas_layout(spec, "train", index, seed=3)
    image, boxes, labels = dc.canvas_example(spec, "train", index, seed=3)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert boxes.dtype == np.float32 and labels.dtype == np.int32
    assert len(boxes) == len(labels) == len(placements)
    counts.append(len(boxes))
    reference = np.zeros((128, 128), np.uint8)
    for k, p in enumerate(placements):
      assert spec.min_scale <= p.side <= spec.max_scale
      own = np.zeros((128, 128), np.uint8)
      own[p.top:p.top + p.side, p.left:p.left + p.side] = _glyph(
          images8[p.source_index], p.side)
      reference = np.maximum(reference, own)
      assert labels[k] == targets[p.source_index]
      x1, y1, x2, y2 = (int(v) for v in boxes[k])
      assert np.array_equal(boxes[k], [x1, y1, x2, y2])
      assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
      # tight: ink on each border row/col of the box ...
      assert own[y1, x1:x2].any() and own[y2 - 1, x1:x2].any()
      assert own[y1:y2, x1].any() and own[y1:y2, x2 - 1].any()
      # ... and none of this glyph outside it
      outside = own.copy()
      outside[y1:y2, x1:x2] = 0
      assert not outside.any()
    for a in range(len(boxes)):
      for b in range(a + 1, len(boxes)):
        assert _ref_iou(boxes[a], boxes[b]) <= spec.max_overlap + 1e-9
    # the canvas is the max() of exactly these glyphs, grey in 3 channels
    assert np.array_equal(image[..., 0], reference)
    assert np.array_equal(image[..., 1], reference)
    assert np.array_equal(image[..., 2], reference)
  assert 1 <= min(counts) and max(counts) <= spec.max_digits
  assert len(set(counts)) > 1  # the number of digits varies


def test_canvas_is_deterministic():
  spec = dc.CanvasSpec(size=64, max_scale=24)
  for index in range(3):
    a = dc.canvas_example(spec, "train", index, seed=7)
    b = dc.canvas_example(spec, "train", index, seed=7)
    for x, y in zip(a, b):
      assert np.array_equal(x, y)
  differ = [not np.array_equal(dc.canvas_example(spec, "train", i, 7)[0],
                               dc.canvas_example(spec, "train", i, 8)[0])
            for i in range(3)]
  assert any(differ)


def test_canvas_spec_validation():
  with pytest.raises(ValueError, match="min_digits"):
    dc.CanvasSpec(min_digits=3, max_digits=2).validate()
  with pytest.raises(ValueError, match="max_scale"):
    dc.CanvasSpec(size=32, max_scale=40).validate()
  with pytest.raises(ValueError, match="max_overlap"):
    dc.CanvasSpec(max_overlap=1.5).validate()
  with pytest.raises(ValueError, match="max_objects"):
    dc.holdout_set(dc.CanvasSpec(), 1, 0, max_objects=2)


def _ink_crop(g):
  rows = np.flatnonzero(g.any(axis=1))
  cols = np.flatnonzero(g.any(axis=0))
  return g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _sources_of(crop, pool):
  """Indices of the 8x8 digits in `pool` whose ink crop equals `crop`."""
  return [i for i, d in enumerate(pool)
          if _ink_crop(d).shape == crop.shape
          and np.array_equal(_ink_crop(d), crop)]


# side 8 = the identity resize, and max_overlap 0 keeps ink boxes apart, so
# each box of the canvas shows one 8x8 digit's ink verbatim: we can look it
# up among the digits and see which split it came from.
_EXACT = dc.CanvasSpec(size=48, min_digits=2, max_digits=3, min_scale=8,
                       max_scale=8, max_overlap=0.0)


def test_holdout_uses_only_holdout_digits():
  train8, _ = digits.load_split("train")
  hold8, hold_y = digits.load_split("holdout")
  h = dc.holdout_set(_EXACT, 6, seed=0, max_objects=3)
  assert h["images"].shape == (6, 48, 48, 3)
  assert h["images"].dtype == np.float32
  assert h["image_id"].dtype == np.int32
  u8 = np.round((h["images"][..., 0] + 1) * 127.5).astype(np.uint8)
  for i in range(6):
    for box, label in zip(h["boxes"][i], h["labels"][i]):
      if label < 0:
        continue
      x1, y1, x2, y2 = (int(v) for v in box)
      crop = u8[i, y1:y2, x1:x2]
      matches = _sources_of(crop, hold8)
      assert matches, "a holdout canvas shows a digit not in the holdout"
      assert label in hold_y[matches]
      assert not _sources_of(crop, train8)
  # the default spec: rendering the layout from the holdout digits gives
  # back exactly the holdout canvases
  spec = dc.CanvasSpec(size=64, max_scale=24)
  h = dc.holdout_set(spec, 4, seed=5, max_objects=4)
  for i in range(4):
    ref = np.zeros((64, 64), np.uint8)
    for p in dc.canvas_layout(spec, "holdout", i, seed=5):
      region = ref[p.top:p.top + p.side, p.left:p.left + p.side]
      np.maximum(region, _glyph(hold8[p.source_index], p.side), out=region)
    np.testing.assert_allclose(h["images"][i, ..., 0], ref / 127.5 - 1,
                               atol=1e-6)


def test_holdout_coco_dict_matches_padded_arrays():
  spec = dc.CanvasSpec(size=64, max_scale=24)
  h = dc.holdout_set(spec, 5, seed=1, max_objects=5)
  gt = h["coco"]
  assert [im["id"] for im in gt["images"]] == [1, 2, 3, 4, 5]
  assert list(h["image_id"]) == [1, 2, 3, 4, 5]
  assert [c["id"] for c in gt["categories"]] == list(range(1, 11))
  assert gt["categories"][7]["name"] == "seven"
  for i in range(5):
    anns = [a for a in gt["annotations"] if a["image_id"] == i + 1]
    real = h["labels"][i] >= 0
    assert len(anns) == real.sum()
    for a, box, label in zip(anns, h["boxes"][i][real], h["labels"][i][real]):
      x1, y1, x2, y2 = box
      assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
      assert a["category_id"] == label + 1
      assert a["area"] == pytest.approx((x2 - x1) * (y2 - y1))
    assert np.all(h["boxes"][i][~real] == 0)


def test_write_coco_loads_with_pycocotools(tmp_path):
  from pycocotools.coco import COCO
  spec = dc.CanvasSpec(size=64, max_scale=24)
  path = dc.write_coco(str(tmp_path), "holdout", 4, spec, seed=2)
  assert path == os.path.join(str(tmp_path), "instances_holdout.json")
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(path)
  assert sorted(gt.getImgIds()) == [1, 2, 3, 4]
  assert sorted(gt.getCatIds()) == list(range(1, 11))
  for i in range(4):
    image, boxes, labels = dc.canvas_example(spec, "holdout", i, seed=2)
    info = gt.loadImgs(i + 1)[0]
    assert (info["width"], info["height"]) == (64, 64)
    png = np.asarray(Image.open(tmp_path / "holdout" / info["file_name"]))
    assert np.array_equal(png, image)
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[i + 1]))
    assert len(anns) == len(boxes) >= 1
    for a, (x1, y1, x2, y2), label in zip(anns, boxes, labels):
      assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1]
      assert a["category_id"] == label + 1
      assert a["iscrowd"] == 0 and a["area"] == (x2 - x1) * (y2 - y1)
      x, y, w, h = (int(v) for v in a["bbox"])
      region = png[y:y + h, x:x + w, 0]
      assert region[0].any() and region[-1].any()
      assert region[:, 0].any() and region[:, -1].any()


def test_write_coco_rejects_unknown_split(tmp_path):
  with pytest.raises(ValueError, match="split"):
    dc.write_coco(str(tmp_path), "val", 1, dc.CanvasSpec(), seed=0)


def test_canvas_dataset_batches_restore_and_shard():
  spec = _EXACT
  train8, _ = digits.load_split("train")
  ds = dc.canvas_dataset(spec, batch_size=3, seed=4, max_objects=4,
                         process_index=1, process_count=2, augment=False)
  it = iter(ds)
  first = next(it)
  assert first["images"].shape == (3, 48, 48, 3)
  assert first["images"].dtype == np.float32
  assert first["boxes"].shape == (3, 4, 4)
  assert first["boxes"].dtype == np.float32
  assert first["labels"].shape == (3, 4) and first["labels"].dtype == np.int32
  assert first["images"].min() >= -1 and first["images"].max() <= 1
  state = it.get_state()
  second = next(it)
  again = iter(ds)
  again.set_state(state)
  restored = next(again)
  for k in second:
    assert np.array_equal(second[k], restored[k])
  # process 1 of 2 only shows digits of the train split's odd positions
  pool = train8[1::2]
  other = train8[0::2]
  for batch in (first, second):
    u8 = np.round((batch["images"][..., 0] + 1) * 127.5).astype(np.uint8)
    for i in range(3):
      real = batch["labels"][i] >= 0
      assert np.all(batch["boxes"][i][~real] == 0)
      assert np.all(batch["labels"][i][~real] == -1)
      for box in batch["boxes"][i][real]:
        x1, y1, x2, y2 = (int(v) for v in box)
        crop = u8[i, y1:y2, x1:x2]
        assert _sources_of(crop, pool)
        assert not _sources_of(crop, other)
  # same seed -> same stream; the other process -> other canvases
  same = next(iter(dc.canvas_dataset(spec, batch_size=3, seed=4,
                                     max_objects=4, process_index=1,
                                     process_count=2, augment=False)))
  assert np.array_equal(same["images"], first["images"])
  p0 = next(iter(dc.canvas_dataset(spec, batch_size=3, seed=4, max_objects=4,
                                   process_index=0, process_count=2,
                                   augment=False)))
  assert not np.array_equal(p0["images"], first["images"])


def test_canvas_dataset_augmented_boxes_bound_the_ink():
  spec = dc.CanvasSpec(size=64, max_scale=24, max_overlap=0.0)
  it = iter(dc.canvas_dataset(spec, batch_size=8, seed=0, max_objects=4))
  batch = next(it)
  for i in range(8):
    ink = batch["images"][i, ..., 0] > -1 + 1e-6
    covered = np.zeros_like(ink)
    for box, label in zip(batch["boxes"][i], batch["labels"][i]):
      if label < 0:
        continue
      x1, y1, x2, y2 = box
      assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
      # a 1 px margin: bilinear zoom smears ink by up to a pixel
      covered[max(0, int(np.floor(y1)) - 1):int(np.ceil(y2)) + 1,
              max(0, int(np.floor(x1)) - 1):int(np.ceil(x2)) + 1] = True
      inner = ink[int(np.ceil(y1)):int(np.floor(y2)),
                  int(np.ceil(x1)):int(np.floor(x2))]
      assert inner.any()
    assert not (ink & ~covered).any(), "ink outside every box"


# ---------------------------------------------------------- box transforms


def _rect_image(h, w, box):
  img = np.zeros((h, w, 3), np.uint8)
  x1, y1, x2, y2 = box
  img[y1:y2, x1:x2] = 255
  return img


def _nonzero_box(img):
  ys, xs = np.nonzero(img[..., 0])
  return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_resize_keep_aspect():
  img = _rect_image(50, 100, (20, 10, 60, 30))
  out, boxes, scale = bt.resize_keep_aspect(img, [[20, 10, 60, 30]], 40)
  assert scale == pytest.approx(0.4)
  assert out.shape == (20, 40, 3)
  np.testing.assert_allclose(boxes, [[8, 4, 24, 12]], atol=1e-5)
  # the rectangle moved with its box: bright inside (1 px in), dark
  # outside (1 px out) - bilinear blurs the one pixel on the edge
  assert (out[5:11, 9:23, 0] > 200).all()
  dark = out[..., 0].copy()
  dark[3:13, 7:25] = 0
  assert not dark.any()
  # tall image: the height is the longest side
  out, boxes, scale = bt.resize_keep_aspect(np.zeros((64, 16, 3), np.uint8),
                                            [[0, 8, 16, 40]], 128)
  assert out.shape == (128, 32, 3) and scale == 2.0
  np.testing.assert_allclose(boxes, [[0, 16, 32, 80]])


def test_hflip():
  img = _rect_image(50, 100, (20, 10, 60, 30))
  out, boxes = bt.hflip(img, [[20, 10, 60, 30], [0, 0, 1, 1]])
  np.testing.assert_array_equal(boxes, [[40, 10, 80, 30], [99, 0, 100, 1]])
  assert _nonzero_box(out) == [40, 10, 80, 30]


def test_crop_clips_and_drops():
  img = _rect_image(100, 100, (10, 10, 30, 30))
  boxes = [[10, 10, 30, 30],    # half inside the window: kept (50%)
           [50, 50, 90, 90],    # 1/8 inside: dropped
           [80, 0, 95, 10],     # outside: dropped
           [40, 20, 60, 40]]    # inside: kept as is (shifted)
  out, b, l = bt.crop(img, boxes, [5, 6, 7, 8], (20, 0, 70, 60))
  assert out.shape == (60, 50, 3)
  np.testing.assert_array_equal(out, img[0:60, 20:70])
  np.testing.assert_array_equal(b, [[0, 10, 10, 30], [20, 20, 40, 40]])
  np.testing.assert_array_equal(l, [5, 8])
  assert l.dtype == np.int32
  assert _nonzero_box(out) == [0, 10, 10, 30]
  # just under half left: dropped
  _, b, l = bt.crop(img, [[10, 10, 30, 30]], [1], (21, 0, 70, 60))
  assert len(b) == 0 and len(l) == 0


def test_random_crop_keeps_pixels_and_boxes_together():
  rng = np.random.default_rng(0)
  kept = 0
  for _ in range(30):
    box = (30, 20, 70, 50)
    img = _rect_image(80, 100, box)
    out, b, l = bt.random_crop(img, [box], [3], rng, min_fraction=0.5)
    assert out.shape[0] >= 40 and out.shape[1] >= 50
    assert len(b) == 1 and list(l) == [3]  # retried until the box survives
    kept += 1
    visible = out[..., 0] > 0
    assert visible.sum() >= 0.5 * 40 * 30
    assert _nonzero_box(out) == [int(v) for v in b[0]]
  assert kept == 30


def test_pad_to():
  img = np.full((20, 40, 3), 7, np.uint8)
  out = bt.pad_to(img, 40)
  assert out.shape == (40, 40, 3) and out.dtype == np.uint8
  assert (out[:20] == 7).all() and not out[20:].any()
  with pytest.raises(ValueError, match="resize"):
    bt.pad_to(img, 30)


def test_pad_objects():
  boxes = [[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 20, 20]]  # areas 100, 25, 400
  b, l, dropped = bt.pad_objects(boxes, [1, 2, 3], 2)
  # the two largest, in input order
  np.testing.assert_array_equal(b, [[0, 0, 10, 10], [0, 0, 20, 20]])
  np.testing.assert_array_equal(l, [1, 3])
  assert dropped == 1
  b, l, dropped = bt.pad_objects(boxes, [1, 2, 3], 5)
  assert b.shape == (5, 4) and b.dtype == np.float32 and l.dtype == np.int32
  np.testing.assert_array_equal(l, [1, 2, 3, -1, -1])
  assert not b[3:].any() and dropped == 0
  b, l, _ = bt.pad_objects(np.zeros((0, 4)), [], 2)
  np.testing.assert_array_equal(l, [-1, -1])


def test_bucket_size():
  assert bt.bucket_size(300, 500, [1024, 256, 512]) == 512
  assert bt.bucket_size(512, 100, [256, 512, 1024]) == 512
  assert bt.bucket_size(600, 100, [256, 512, 1024]) == 1024
  with pytest.raises(ValueError, match="bucket"):
    bt.bucket_size(2000, 10, [256, 512])


# ----------------------------------------------------------- COCO records


def _png(path, w, h, boxes):
  img = np.zeros((h, w, 3), np.uint8)
  for x1, y1, x2, y2 in boxes:
    img[int(y1):int(y2), int(x1):int(x2)] = 255
  Image.fromarray(img).save(path)


def _coco_fixture(root):
  """Two good images, a missing one, a broken one and bad annotations."""
  images = root / "images"
  images.mkdir()
  _png(images / "a.png", 40, 30, [(2, 3, 12, 11), (20, 5, 28, 11)])
  _png(images / "b.png", 50, 40, [(0, 0, 19, 40)])
  (images / "broken.png").write_bytes(b"not a png at all")
  data = {
      # unsorted ids: class index follows the id order (dog 0, cat 1)
      "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
      "images": [
          {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
          {"id": 11, "file_name": "missing.png", "width": 40, "height": 30},
          {"id": 12, "file_name": "b.png", "width": 50, "height": 40},
          {"id": 13, "file_name": "broken.png", "width": 40, "height": 30},
      ],
      "annotations": [
          {"id": 100, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 8]},
          {"id": 101, "image_id": 10, "category_id": 1,
           "bbox": [35, 20, 10, 5]},  # x2 = 45 > 40 + 1: outside
          {"id": 102, "image_id": 10, "category_id": 99,
           "bbox": [1, 1, 5, 5]},  # unknown category
          {"id": 103, "image_id": 11, "category_id": 1,
           "bbox": [1, 1, 5, 5]},  # its image is missing
          {"id": 104, "image_id": 12, "category_id": 1,
           "bbox": [-0.5, 0, 19.5, 40.5]},  # within 1 px: clipped
          {"id": 105, "image_id": 12, "category_id": 3,
           "bbox": [5, 5, 0, 4]},  # zero width
          {"id": 106, "image_id": 12, "category_id": 1, "iscrowd": 1,
           "bbox": [1, 1, 5, 5]},
          {"id": 107, "image_id": 10, "category_id": 1, "bbox": [20, 5, 8, 6]},
      ],
  }
  path = root / "instances.json"
  path.write_text(json.dumps(data))
  return str(path), str(images)


_EXPECTED = {  # record id -> (boxes, labels, texts), by hand
    "10/a.png": ([[2, 3, 12, 11], [20, 5, 28, 11]], [1, 0], ["dog", "cat"]),
    "12/b.png": ([[0, 0, 19, 40]], [0], ["dog"]),
}


def test_convert_coco_skips_and_counts(tmp_path):
  path, image_root = _coco_fixture(tmp_path)
  out = str(tmp_path / "ds")
  meta = coco.convert_coco(path, image_root, out)
  assert meta["categories"] == [{"id": 1, "name": "dog"},
                                {"id": 3, "name": "cat"}]
  assert meta["class_names"] == ["dog", "cat"]
  assert coco.categories(out) == meta["categories"]
  report = meta["coco"]["train"]
  assert report["skipped_images"] == {"missing image file": 1,
                                      "undecodable image": 1}
  assert report["skipped_annotations"] == {
      "box outside the image": 1, "unknown category id": 1,
      "its image was skipped": 1, "non-positive box size": 1, "iscrowd": 1}
  assert report["images_kept"] == 2 and report["annotations_kept"] == 3
  assert meta["skipped"]["count"] == 7
  assert meta["num_records"] == 2
  got = {r["id"]: r for r in records.read_all(out, "train")}
  assert sorted(got) == sorted(_EXPECTED)
  for rid, (boxes, labels, texts) in _EXPECTED.items():
    r = got[rid]
    np.testing.assert_allclose(r["boxes"], boxes)
    assert r["box_labels"] == labels
    assert r["texts"] == texts and r["label"] == -1
    name = rid.split("/", 1)[1]
    with open(os.path.join(image_root, name), "rb") as f:
      assert r["image"] == f.read()  # the original bytes, not re-encoded


def test_convert_coco_second_split_and_overwrite(tmp_path):
  path, image_root = _coco_fixture(tmp_path)
  out = str(tmp_path / "ds")
  coco.convert_coco(path, image_root, out, split="train")
  meta = coco.convert_coco(path, image_root, out, split="validation")
  assert sorted(records.split_names(out)) == ["train", "validation"]
  assert meta["num_records"] == 4
  for split in ("train", "validation"):
    assert sorted(r["id"] for r in records.read_all(out, split)) == sorted(
        _EXPECTED)
  with pytest.raises(FileExistsError, match="validation"):
    coco.convert_coco(path, image_root, out, split="validation")
  meta = coco.convert_coco(path, image_root, out, split="validation",
                           overwrite=True)
  assert meta["splits"]["train"]["num_records"] == 2
  assert len(records.read_all(out, "train")) == 2


def test_not_coco_json_is_a_clear_error(tmp_path):
  bad = tmp_path / "captions.json"
  bad.write_text(json.dumps({"images": [], "categories": []}))
  with pytest.raises(ValueError, match=r"captions\.json.*'annotations'"):
    coco.load_instances(str(bad), str(tmp_path))
  bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [],
                             "categories": [{"id": 1, "name": "x"}]}))
  with pytest.raises(ValueError, match=r"captions\.json.*'file_name'"):
    coco.load_instances(str(bad), str(tmp_path))
  bad.write_text("[1, 2, 3]")
  with pytest.raises(ValueError, match=r"captions\.json"):
    coco.load_instances(str(bad), str(tmp_path))


def test_records_eval_stream_and_holdout(tmp_path):
  path, image_root = _coco_fixture(tmp_path)
  out = str(tmp_path / "ds")
  coco.convert_coco(path, image_root, out)
  it = coco.records_detection_dataset(out, "train", size=64, batch_size=2,
                                      seed=0, max_objects=3, train=False)
  batch = next(it)
  assert batch["images"].shape == (2, 64, 64, 3)
  assert batch["images"].dtype == np.float32
  assert list(batch["image_id"]) == [10, 12]
  assert batch["image_id"].dtype == np.int32
  np.testing.assert_allclose(batch["scale"], [64 / 40, 64 / 50])
  s0, s1 = 64 / 40, 64 / 50
  np.testing.assert_allclose(batch["boxes"][0], np.array(
      [[2, 3, 12, 11], [20, 5, 28, 11], [0, 0, 0, 0]]) * [s0, s0, s0, s0],
                             rtol=1e-6)
  np.testing.assert_allclose(batch["boxes"][1], np.array(
      [[0, 0, 19, 40], [0, 0, 0, 0], [0, 0, 0, 0]]) * s1, rtol=1e-6)
  np.testing.assert_array_equal(batch["labels"], [[1, 0, -1], [0, -1, -1]])
  # image a.png (40x30) -> 64x48, then black padding below
  assert np.all(batch["images"][0, 48:] == -1)
  assert np.all(batch["images"][0, 6:16, 5:18] > 0.9)  # inside box 0
  h = coco.records_holdout(out, "train", 64, 3)
  assert list(h["image_id"]) == [10, 12]
  np.testing.assert_allclose(h["scale"], [s0, s1])
  np.testing.assert_allclose(h["boxes"], batch["boxes"])
  gt = h["coco"]
  assert [(i["id"], i["width"], i["height"]) for i in gt["images"]] == [
      (10, 40, 30), (12, 50, 40)]
  anns = [(a["image_id"], a["category_id"], a["bbox"])
          for a in gt["annotations"]]
  # original pixels, COCO ids, [x, y, w, h]
  assert anns == [(10, 3, [2, 3, 10, 8]), (10, 1, [20, 5, 8, 6]),
                  (12, 1, [0, 0, 19, 40])]
  assert h["category_ids"] == [1, 3]


def _hand_dataset(root, n_good, bad_at):
  """A records dir of white-rectangle PNGs with one undecodable record."""
  os.makedirs(root)
  with records.ShardWriter(os.path.join(
      root, records.shard_name("train", 0, 1))) as w:
    for i in range(n_good + 1):
      if i == bad_at:
        w.write(records.Record(id=f"{100 + i}/bad.png", image=b"garbage",
                               boxes=[[1, 1, 5, 5]], box_labels=[0]))
        continue
      box = [4 + i, 6, 30 + i, 20]
      buf = io.BytesIO()
      Image.fromarray(_rect_image(40, 60, box)).save(buf, format="PNG")
      w.write(records.Record(id=f"{100 + i}/img{i}.png", image=buf.getvalue(),
                             boxes=[[float(v) for v in box]], box_labels=[1]))
  records.write_metadata(root, {
      "num_records": n_good + 1,
      "splits": {"train": {"num_records": n_good + 1, "shards": [
          {"file": records.shard_name("train", 0, 1), "count": n_good + 1}]}},
      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})


def test_records_train_stream_augments_consistently_and_counts_bad(tmp_path):
  root = str(tmp_path / "hand")
  _hand_dataset(root, n_good=5, bad_at=2)
  it = coco.records_detection_dataset(root, "train", size=48, batch_size=5,
                                      seed=1, max_objects=2, train=False)
  batch = next(it)
  assert len(batch["image_id"]) == 5 and 102 not in batch["image_id"]
  assert it.metrics()["data/skipped"] == 1
  it = coco.records_detection_dataset(root, "train", size=48, batch_size=4,
                                      seed=1, max_objects=2, train=True)
  next(it)
  state = it.get_state()
  batches = [next(it) for _ in range(6)]
  again = coco.records_detection_dataset(root, "train", size=48, batch_size=4,
                                         seed=1, max_objects=2, train=True)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["images"], batches[0]["images"])
  assert it.metrics()["data/skipped"] >= 1
  flipped = False
  for batch in batches:
    for img, boxes, labels, image_id in zip(
        batch["images"], batch["boxes"], batch["labels"], batch["image_id"]):
      assert list(labels) == [1, -1]  # the crop never drops the only box
      x1, y1, x2, y2 = boxes[0]
      # the white rectangle is where the box says (bilinear: 1 px margin)
      bright = img[..., 0] > 0
      ys, xs = np.nonzero(bright)
      assert xs.min() >= np.floor(x1) - 1 and xs.max() + 1 <= np.ceil(x2) + 1
      assert ys.min() >= np.floor(y1) - 1 and ys.max() + 1 <= np.ceil(y2) + 1
      assert bright[int(np.ceil(y1)) + 1:int(np.floor(y2)) - 1,
                    int(np.ceil(x1)) + 1:int(np.floor(x2)) - 1].all()
      # record i's rectangle spans x 4 + i .. 30 + i of 60 px: flipped
      # and not cropped, it spans 30 - i .. 56 - i, times the scale 0.8
      i = int(image_id) - 100
      if (abs(x1 - (30 - i) * 0.8) < 1e-4 and
          abs(x2 - (56 - i) * 0.8) < 1e-4):
        flipped = True
  assert flipped


def test_canvas_coco_round_trip_maps_back_to_original_pixels(tmp_path):
  # write_coco json -> records -> resized holdout -> boxes / scale: the
  # ground truth boxes as predictions score a perfect AP against the json.
  spec = dc.CanvasSpec(size=64, max_scale=24)
  path = dc.write_coco(str(tmp_path), "holdout", 6, spec, seed=9)
  out = str(tmp_path / "ds")
  coco.convert_coco(path, str(tmp_path / "holdout"), out, split="validation")
  h = coco.records_holdout(out, "validation", 96, 4)
  np.testing.assert_allclose(h["scale"], 1.5)
  dets = coco_map.detections_to_coco(
      h["boxes"], np.ones(h["labels"].shape), np.maximum(h["labels"], 0),
      h["labels"] >= 0, h["image_id"], h["category_ids"], scales=h["scale"])
  with open(path) as f:
    original = json.load(f)
  assert len(dets) == len(original["annotations"])
  m = coco_map.coco_metrics(original, dets)
  assert m["AP"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
