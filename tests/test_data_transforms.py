"""Image and text transforms against direct PIL / numpy references."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from florax.data import bad_records
from florax.data import prompts
from florax.data import transforms
from florax.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def photo_jpeg():
  photo = load_sample_images().images[0]  # real 427x640 photo
  buf = io.BytesIO()
  Image.fromarray(photo).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def test_random_resized_crop_box_obeys_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(500):
    l, t, r, b = transforms.random_resized_crop_box(640, 427, rng, (0.2, 1.0),
                                                    (3 / 4, 4 / 3))
    w, h = r - l, b - t
    assert 0 <= l < r <= 640 and 0 <= t < b <= 427
    # rounding to whole pixels moves area/aspect a little
    assert 0.2 * 0.98 <= w * h / (640 * 427) <= 1.0
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_fused_decode_crop_matches_full_decode(photo_jpeg):
  full = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
  for box in [(0, 0, 640, 427), (100, 50, 300, 250), (500, 300, 540, 340)]:
    ref = np.asarray(full.resize((56, 56), Image.BILINEAR, box=box), np.float32)
    got = transforms.decode_crop_resize(Image.open(io.BytesIO(photo_jpeg)),
                                        box, 56).astype(np.float32)
    # DCT-domain downscaling is not bit-identical to decode-then-resize
    assert np.abs(got - ref).mean() < 4.0, box


def test_eval_transform_normalises_a_flat_image():
  arr = np.full((30, 50, 3), (200, 100, 50), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  t = transforms.ImageTransform(size=8, train=False, mean=(0.5, 0.4, 0.3),
                                std=(0.2, 0.25, 0.5))
  out = t("x", buf.getvalue(), np.random.default_rng(0))
  expected = (np.array([200, 100, 50]) / 255 - [0.5, 0.4, 0.3]) / [0.2, 0.25,
                                                                   0.5]
  assert out.shape == (8, 8, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(expected, (8, 8, 3)),
                             atol=1e-5)


def test_train_transform_flip_and_crop_replay(photo_jpeg):
  t = transforms.ImageTransform(size=32, train=True, flip=True,
                                mean=(0, 0, 0), std=(1, 1, 1))
  flips = 0
  for seed in range(20):
    out = t("x", photo_jpeg, np.random.default_rng(seed))
    # replay the same draws by hand: box first, then the flip coin
    rng = np.random.default_rng(seed)
    box = transforms.random_resized_crop_box(640, 427, rng)
    ref = transforms.decode_crop_resize(Image.open(io.BytesIO(photo_jpeg)),
                                        box, 32) / np.float32(255)
    flipped = rng.random() < 0.5
    flips += flipped
    np.testing.assert_allclose(out, ref[:, ::-1] if flipped else ref,
                               atol=1e-6)
  assert 3 <= flips <= 17


def test_color_jitter_stays_in_range_and_changes_pixels():
  rng = np.random.default_rng(0)
  x = rng.random((16, 16, 3)).astype(np.float32)
  y = transforms.color_jitter(x, np.random.default_rng(1), 0.4)
  assert y.min() >= 0 and y.max() <= 1 and np.abs(y - x).mean() > 1e-3
  np.testing.assert_allclose(transforms.color_jitter(x, rng, 0.0), x,
                             atol=1e-6)


def test_corrupt_and_missing_images_raise_bad_record(photo_jpeg):
  t = transforms.ImageTransform(size=16)
  rng = np.random.default_rng(0)
  with pytest.raises(bad_records.BadRecordError, match="undecodable"):
    t("bad", b"not an image at all", rng)
  with pytest.raises(bad_records.BadRecordError, match="undecodable"):
    t("truncated", photo_jpeg[: len(photo_jpeg) // 3], rng)
  with pytest.raises(bad_records.BadRecordError, match="no image"):
    t("empty", b"", rng)


def test_text_transform_templates_labels_and_stage2_drop():
  tok = train_tokenizer(
      [prompts.fill(t, c) for t in prompts.FLORENCE_TEMPLATES
       for c in ("cat", "dog")], 96)
  t = transforms.TextTransform(tok, max_len=24)
  rec = {"id": "r", "texts": ["cat"], "text_labels": [7], "prompt": True}
  seen = set()
  for s in range(40):
    ids, label = t(rec, np.random.default_rng(s))
    assert label == 7 and ids.dtype == np.int32 and ids.shape == (24,)
    seen.add(tok.decode(ids))
  assert seen <= {prompts.fill(x, "cat") for x in prompts.FLORENCE_TEMPLATES}
  assert len(seen) >= 5  # a random template per sample
  caption = {"id": "c", "texts": ["a dog", "a cat"], "text_labels": [1, 2],
             "prompt": False}
  for s in range(10):
    ids, label = t(caption, np.random.default_rng(s))
    assert {"a dog": 1, "a cat": 2}[tok.decode(ids)] == label
  stage2 = transforms.TextTransform(tok, 24, drop_templated=True)
  assert stage2(rec, np.random.default_rng(0)) is None
  assert stage2(caption, np.random.default_rng(0)) is not None
  with pytest.raises(bad_records.BadRecordError, match="empty"):
    t({"id": "e", "texts": ["  "], "prompt": False}, np.random.default_rng(0))
  with pytest.raises(bad_records.BadRecordError, match="UTF-8"):
    t({"id": "u", "texts": [b"caf\xe9"], "prompt": False},
      np.random.default_rng(0))


def test_example_transform_pickles_and_marks_bad_records(photo_jpeg):
  tok = train_tokenizer(["a photo", "a cat"] * 5, 48)
  ex = transforms.ExampleTransform(
      image=transforms.ImageTransform(size=16),
      text=transforms.TextTransform(tok, 8))
  ex2 = pickle.loads(pickle.dumps(ex))
  rec = {"id": "ok", "image": photo_jpeg, "texts": ["a cat"],
         "text_labels": [0]}
  a = ex.random_map(rec, np.random.default_rng(3))
  b = ex2.random_map(rec, np.random.default_rng(3))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["text"], b["text"])
  bad = ex.random_map(dict(rec, image=b"junk"), np.random.default_rng(0))
  assert bad_records.is_bad(bad) and bad["_bad_id"] == "ok"
