"""florax.inference: batch buckets, inputs, zero-shot, and clear errors."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from florax import inference  # noqa: E402
from florax.data import digits  # noqa: E402
from florax.data import tokenizer as tok_lib  # noqa: E402
from tests import trained_tiny  # noqa: E402

_COMPILES = []
_LISTENING = [False]


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if _LISTENING[0] and event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


@pytest.fixture(scope="module")
def model():
  return trained_tiny.model("float32")


def _holdout(n):
  return digits.load_split("holdout")[0][:n]


def test_one_compile_per_bucket(model):
  raw = _holdout(8)
  before = {k: v for k, v in model.traces.items() if k[0] == "image"}
  _COMPILES.clear()
  _LISTENING[0] = True
  try:
    outs = {n: model.encode_image(raw[:n]) for n in (1, 3, 7, 8)}
    first = len(_COMPILES)
    for n in (8, 7, 3, 1):
      model.encode_image(raw[:n])
    second = len(_COMPILES) - first
  finally:
    _LISTENING[0] = False
  # Buckets 1, 4, 8, 8: at most three XLA compilations (fewer if another
  # test of this process compiled a bucket already), each traced once.
  traced = {k: v for k, v in model.traces.items() if k[0] == "image"}
  assert set(traced) - set(before) <= {("image", 1), ("image", 4),
                                       ("image", 8)}
  assert all(v == 1 for v in traced.values()), traced
  assert first == len(set(traced) - set(before)) <= 3, (first, traced)
  assert second == 0, second
  # Padding never leaks into real rows.
  for n in (1, 3, 7):
    np.testing.assert_allclose(outs[n], outs[8][:n], atol=1e-5)
    assert outs[n].shape == (n, 64)


def test_bucket_sizes_and_long_inputs(model):
  assert [inference.bucket_size(n, 64) for n in (1, 2, 3, 5, 64, 65)] == [
      1, 2, 4, 8, 64, 64]
  raw = _holdout(9)
  whole = np.concatenate([model.encode_image(raw[:8]),  # buckets 8, 1
                          model.encode_image(raw[8:])])
  model.max_batch = 4  # chunks of 4, 4, 1: buckets compiled above
  try:
    chunked = model.encode_image(raw)
  finally:
    model.max_batch = 64
  np.testing.assert_allclose(chunked, whole, atol=1e-5)
  assert model.traces[("image", 4)] == 1 and model.traces[("image", 1)] == 1
  with pytest.raises(ValueError, match="power of two"):
    inference.load(trained_tiny.export_dir("float32"), max_batch=6)


def test_inputs_pil_uint8_and_pipeline_agree(model):
  raw = _holdout(3)
  # The digits pipeline's own resize is the reference.
  ref = np.stack([digits.to_rgb(im, 16) for im in raw])
  np.testing.assert_array_equal(inference.preprocess(raw, 16), ref)
  np.testing.assert_array_equal(
      inference.preprocess([Image.fromarray(im) for im in raw], 16), ref)
  rgb = np.repeat(raw[0][:, :, None], 3, axis=2)
  assert inference.preprocess(rgb, 16).shape == (1, 16, 16, 3)
  with pytest.raises(ValueError, match="uint8"):
    model.encode_image(raw.astype(np.float32))
  with pytest.raises(ValueError, match="list of strings"):
    model.encode_text("a handwritten 7.")


def test_zero_shot_and_similarity_match_numpy(model):
  raw = _holdout(5)
  names = ["zero", "one", "two"]
  templates = ["a photo of the digit {}.", "a blurry photo of a {}."]
  result = model.zero_shot(raw, names, templates)
  # Reference: CLIP's ensemble by hand (normalise, average, normalise).
  text = model.encode_text([t.format(n) for n in names for t in templates])
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  cls = text.reshape(3, 2, -1).mean(1)
  cls /= np.linalg.norm(cls, axis=1, keepdims=True)
  img = model.encode_image(raw)
  logits = model.logit_scale * img @ cls.T
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(result.probs, probs, atol=1e-5)
  assert list(result.class_ids) == list(np.argmax(probs, 1))
  assert result.predictions == [names[i] for i in np.argmax(probs, 1)]
  # Default class names and templates come from the export (digits).
  assert model.zero_shot(raw).probs.shape == (5, 10)
  sims = model.similarity(raw, ["a handwritten 7.", "a handwritten 1."])
  ref = np.array([[float(np.dot(i, t)) for t in
                   model.encode_text(["a handwritten 7.", "a handwritten 1."])]
                  for i in img])
  np.testing.assert_allclose(sims, ref, atol=1e-5)


def _copy(tmp_path):
  dst = tmp_path / "export"
  shutil.copytree(trained_tiny.export_dir("float32"), dst)
  return dst


def test_missing_or_truncated_export_fails_clearly(tmp_path):
  with pytest.raises(inference.ExportError, match="no export directory"):
    inference.load(str(tmp_path / "nothing"))

  d = _copy(tmp_path)
  os.remove(d / "manifest.json")
  with pytest.raises(inference.ExportError, match="manifest.json is missing"):
    inference.load(str(d))
  shutil.rmtree(d)

  d = _copy(tmp_path)
  data = (d / "params.safetensors").read_bytes()
  (d / "params.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(inference.ExportError,
                     match="params.safetensors is truncated"):
    inference.load(str(d))
  shutil.rmtree(d)

  d = _copy(tmp_path)
  os.remove(d / "encode_text.jaxexp")
  with pytest.raises(inference.ExportError, match="encode_text.jaxexp is "
                     "missing"):
    inference.load(str(d))
  shutil.rmtree(d)

  d = _copy(tmp_path)
  text = (d / "manifest.json").read_text()
  (d / "manifest.json").write_text(text[:len(text) // 2])
  with pytest.raises(inference.ExportError, match="truncated"):
    inference.load(str(d))


def test_mismatched_tokenizer_fails_clearly(tmp_path):
  d = _copy(tmp_path)
  # A tokenizer with more pieces than the text tower's vocabulary.
  corpus = [f"word{i} thing{i * 7} other{i * 13}" for i in range(400)]
  big = tok_lib.train_tokenizer(corpus, 400)
  assert big.vocab_size > 160
  (d / "tokenizer.model").write_bytes(big.model_proto)
  with pytest.raises(inference.ExportError, match="does not belong"):
    inference.load(str(d))
  # Same size, different tokenizer: caught by the manifest's hash.
  shutil.rmtree(d)
  d = _copy(tmp_path)
  own = tok_lib.load_tokenizer(str(d / "tokenizer.model"))
  other = tok_lib.train_tokenizer(
      [t[::-1] for t in digits.all_descriptions()], own.vocab_size)
  (d / "tokenizer.model").write_bytes(other.model_proto)
  with pytest.raises(inference.ExportError,
                     match="not the tokenizer this model was exported with"):
    inference.load(str(d))


def test_version_1_exports_still_load(tmp_path, model):
  """Exports written before the manifest named its tokenizer (version 1:
  always florax's tokenizer.model) load and embed the same."""
  import json  # pylint: disable=g-import-not-at-top
  d = _copy(tmp_path)
  manifest = json.loads((d / "manifest.json").read_text())
  tok = manifest.pop("tokenizer")
  for key in ("source", "num_classes"):
    manifest.pop(key)
  manifest.update(version=1, tokenizer_vocab_size=tok["vocab_size"])
  (d / "manifest.json").write_text(json.dumps(manifest))
  old = inference.load(str(d))
  texts = ["a handwritten 7.", "the digit one"]
  np.testing.assert_array_equal(old.encode_text(texts),
                                model.encode_text(texts))
  manifest["version"] = 7
  (d / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(inference.ExportError, match="versions 1 and 2"):
    inference.load(str(d))
