"""Served exports (florax.serving): BEiT-3's uses exported with their own
functions -- VQA answers, captions, dual-encoder embeddings (NLVR2's
`reason` is the same fusion-task code as VQA's `answer`) -- and served through `florax.inference.load` with the jax.export artifacts
and with florax's code. Each is checked against the task's own evaluation
path on held-out digits (the evaluator's batching, tokenization and
decoding, not the export's), plus the manifest and bad-input refusals."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import beit3_uses, beit3_vqa
from florax import export, inference, serving, tasks
from florax.data import digits, digits_qa

N = 6  # held-out examples per check (a non-power of two: padded buckets)


def _task(module, preset, workdir, **overrides):
  c = module.get_config(preset)
  with c.unlocked():
    c.train.batch_size = 8
    c.eval_batch_size = 8
    c.model.multiway.depth = 2  # one plain and one VL layer: compiles less
    for k, v in overrides.items():
      node = c
      *path, leaf = k.split(".")
      for p in path:
        node = node[p]
      node[leaf] = v
  return tasks.build(c, str(workdir))


def _served(task, out, seed, platforms=("cpu",)):
  params = nn.unbox(task.init(jax.random.key(seed)))
  manifest = serving.write(str(out), task.config, params,
                           task.serving_tokenizer(), task.serving(), step=3,
                           platforms=platforms)
  return params, manifest


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_vqa")
  task = _task(beit3_vqa, "tiny", root / "work")
  params, manifest = _served(task, root / "export", 0)
  model = inference.load(str(root / "export"), backend="exported",
                         max_batch=8)
  return task, params, str(root / "export"), manifest, model


def _uint8(images):
  """Held-out pixels in [-1, 1] back to uint8 (what a user passes)."""
  return np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def test_vqa_export_answers_like_the_evaluator(vqa):
  task, params, out, manifest, exported = vqa
  h = task.holdout()
  want = np.asarray(task._predict(params, {"images": h["images"][:N],
                                           "ids": h["ids"][:N]}))
  assert manifest["functions"]["answer"]["labels"] == list(digits_qa.ANSWERS)
  assert manifest["task"] == "beit3_vqa" and manifest["step"] == 3
  native = inference.load(out, backend="native", max_batch=4)
  for model in (exported, native):
    assert isinstance(model, serving.ServedModel)
    got = model.call("answer", images=h["images"][:N], text=h["ids"][:N])
    np.testing.assert_allclose(got, want, atol=2e-5)
    answers = model.run("answer", images=h["images"][:N], text=h["ids"][:N])
    assert answers == [digits_qa.ANSWERS[i] for i in np.argmax(want, -1)]
  # Six examples: one padded bucket of 8, or buckets of 4 and 2 under
  # max_batch=4, each traced once however often it is called.
  assert dict(exported.traces) == {("answer", 8): 1}
  assert dict(native.traces) == {("answer", 4): 1, ("answer", 2): 1}


def test_vqa_export_tokenizes_and_preprocesses_like_the_data(vqa):
  task, _, _, _, model = vqa
  images, labels = digits.load_split("holdout")
  images, labels = images[:N], labels[:N]
  questions = ["what digit is shown?"] * N
  ids = task.text_tokenizer.encode_batch(questions, task.config.data.max_len)
  pixels = model.call("answer", images=[im for im in images], text=questions)
  # The digits pipeline's eval images, tokenized by the run's tokenizer.
  from florax.data import pipeline
  want_images, _ = pipeline.holdout_arrays(task.config.data.image_size)
  ref = model.call("answer", images=want_images[:N], text=ids)
  np.testing.assert_allclose(pixels, ref, atol=1e-5)


def test_served_bad_input_is_named(vqa):
  model = vqa[4]
  with pytest.raises(ValueError, match="serves .*'answer'.*not 'caption'"):
    model.run("caption", images=np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"takes inputs \['images', 'text'\]"):
    model.run("answer", images=np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="a list of strings"):
    model.run("answer", images=np.zeros((1, 32, 32, 3), np.float32),
              text="what digit is shown?")
  with pytest.raises(ValueError, match="different lengths"):
    model.run("answer", images=np.zeros((2, 32, 32, 3), np.float32),
              text=["what digit is shown?"])


def test_a_truncated_function_file_is_refused(vqa, tmp_path):
  out = vqa[2]
  import shutil
  broken = str(tmp_path / "broken")
  shutil.copytree(out, broken)
  path = os.path.join(broken, "answer.jaxexp")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(inference.ExportError, match="answer.jaxexp is truncated"):
    inference.load(broken)


def test_caption_export_decodes_like_the_evaluator(tmp_path):
  task = _task(beit3_uses, "caption_tiny", tmp_path / "work")
  params, manifest = _served(task, tmp_path / "export", 2)
  images, _ = task.holdout()
  want = task.caption_images(params, images[:N])
  assert manifest["functions"]["caption"]["output"] == "tokens"
  model = inference.load(str(tmp_path / "export"), backend="exported")
  assert model.run("caption", images=images[:N]) == want


def test_retrieval_export_embeds_like_the_evaluator(tmp_path):
  task = _task(beit3_uses, "retrieval_tiny", tmp_path / "work")
  params, _ = _served(task, tmp_path / "export", 3)
  images, _, ids = task.holdout()
  want_i = task._map("image", type(task.model).encode_image)(params,
                                                             images[:N])
  want_t = task._map("text", type(task.model).encode_text)(params, ids[:N])
  model = inference.load(str(tmp_path / "export"), backend="exported")
  np.testing.assert_allclose(model.encode_image(images[:N]), want_i,
                             atol=2e-5)
  np.testing.assert_allclose(model.call("encode_text", text=ids[:N]), want_t,
                             atol=2e-5)
  texts = ["a handwritten 7.", "an 8."] * 3  # the bucket already compiled
  np.testing.assert_allclose(
      model.similarity(images[:N], texts),
      want_i @ task._map("text", type(task.model).encode_text)(
          params, task.text_tokenizer.encode_batch(
              texts, task.config.data.max_len)).T, atol=2e-5)


def test_export_workdir_serves_a_task_with_functions(vqa, tmp_path,
                                                     monkeypatch):
  task, params = vqa[:2]
  # A restored checkpoint is florax.restore's business (tested there); the
  # dispatch to the task's functions is what is checked here.
  monkeypatch.setattr(export, "_restore", lambda t, w, s, e: (params, 11))
  manifest = export.export_workdir(task.config, task.workdir,
                                   str(tmp_path / "out"), platforms=("cpu",))
  assert sorted(manifest["functions"]) == ["answer"]
  assert manifest["step"] == 11
  with open(tmp_path / "out" / "manifest.json", encoding="utf-8") as f:
    assert json.load(f)["files"]["answer.jaxexp"]["bytes"] > 0
