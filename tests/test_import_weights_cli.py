"""`python -m launch.import_weights`: a checkpoint in, an export directory
out, which `florax.inference.load` reads; a checkpoint that does not fit
stops with exit code 2 and one `florax: error:` line naming what is wrong,
before anything is written.

The tiny open_clip CLIP of tests/fixtures/open_clip/ is imported and its
embeddings of the fixture's images and strings compared with open_clip's
(recorded in the fixture). Subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures import ref_open_clip as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGES = os.path.join(ref.FIXTURE_DIR, ref.MERGES_FILE)
TIMM_VIT = os.path.join(ROOT, "tests", "fixtures", "timm_vit",
                        "vit_test.safetensors")


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "launch.import_weights",
                         *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The fixture's CLIP checkpoint as a plain .safetensors file."""
  return ref.gunzip_state(ref.FIXTURE_DIR,
                          str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def imported(checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("imp") / "clip"
  res = _run("--source", "open_clip", "--arch", ref.ARCH, "--checkpoint",
             checkpoint, "--out", out, "--tokenizer", MERGES)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"florax: imported open_clip {ref.ARCH}" in res.stdout
  return out


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_imported_clip_matches_open_clip(imported):
  from florax import inference  # pylint: disable=g-import-not-at-top
  io = np.load(os.path.join(ref.FIXTURE_DIR, ref.IO_FILE))
  with open(os.path.join(ref.FIXTURE_DIR, ref.META_FILE)) as f:
    texts = json.load(f)["texts"]
  model = inference.load(str(imported))
  image = model.encode_pixels(ref.images_float(io["images_u8"]))
  text = model.encode_text(texts)  # the export's own tokenizer
  np.testing.assert_allclose(image, _unit(io["image_features"]), atol=1e-4)
  np.testing.assert_allclose(text, _unit(io["text_features"]), atol=1e-4)
  np.testing.assert_allclose(model.logit_scale, np.exp(io["logit_scale"]),
                             rtol=1e-6)


def test_import_directory_records_its_source(imported, checkpoint):
  from florax import export  # pylint: disable=g-import-not-at-top
  with open(os.path.join(imported, "manifest.json")) as f:
    manifest = json.load(f)
  src = manifest["source"]
  assert (src["source"], src["arch"]) == ("open_clip", ref.ARCH)
  assert src["checkpoint_sha256"] == export.sha256_file(checkpoint)
  assert manifest["tokenizer"] == {"kind": "clip_bpe",
                                   "file": "tokenizer.json",
                                   "vocab_size": ref.VOCAB_SIZE}
  pre = manifest["preprocess"]
  assert pre["transform"] == "resize_center_crop"
  assert pre["size"] == 32 and pre["resize_size"] == 32
  assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
  with open(os.path.join(imported, "config.json")) as f:
    config = json.load(f)
  # Usable as a UniCL config and as init_from.path.
  assert config["task"] == "unicl"
  assert config["init_from"]["path"] == os.path.abspath(imported)
  assert config["data"]["records"]["tokenizer_path"] == os.path.join(
      os.path.abspath(imported), "tokenizer.json")
  assert config["model"]["text"]["eos_id"] == ref.VOCAB_SIZE - 1


def test_import_directory_is_a_unicl_config_and_init_from(imported,
                                                          checkpoint,
                                                          tmp_path):
  """config.json builds the UniCL task (with the imported tokenizer), and
  init_from reads every one of its params, unchanged, from the import."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from florax import config_io, tasks  # pylint: disable=g-import-not-at-top
  from florax.convert import common, open_clip  # pylint: disable=g-import-not-at-top
  from florax.export import flatten_params  # pylint: disable=g-import-not-at-top
  from florax.train import init_from  # pylint: disable=g-import-not-at-top
  config = config_io.load(str(imported))
  with config.unlocked():
    config.data.records.path = str(tmp_path / "records")  # the user's data
  task = tasks.build(config, str(tmp_path / "workdir"))
  task.validate()
  assert task.tokenizer.kind == "clip_bpe"
  assert task.preprocess_spec()["mean"] == pytest.approx(
      [0.48145466, 0.4578275, 0.40821073])

  flat, what = init_from.read_source(config.init_from.path)
  assert what.startswith("export")
  # The task's params, by name and shape, are exactly the import's.
  abstract = flatten_params(nn.unbox(jax.eval_shape(task.init,
                                                    jax.random.key(0))))
  assert {k: v.shape for k, v in abstract.items()} == {
      k: v.shape for k, v in flat.items()}
  _, want, _ = open_clip.convert_state_dict(
      common.read_checkpoint(checkpoint), ref.ARCH)
  assert sorted(flat) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)


def _one_error_line(res):
  assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("florax: error: "), lines
  return lines[0]


def test_truncated_checkpoint_file(checkpoint, tmp_path):
  with open(checkpoint, "rb") as f:
    blob = f.read()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(blob[:len(blob) * 2 // 3])
  line = _one_error_line(_run(
      "--source", "open_clip", "--arch", ref.ARCH, "--checkpoint", cut,
      "--out", tmp_path / "out", "--tokenizer", MERGES))
  assert "truncated" in line and str(cut) in line
  assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_architecture(tmp_path):
  line = _one_error_line(_run(
      "--source", "open_clip", "--arch", ref.ARCH, "--checkpoint", TIMM_VIT,
      "--out", tmp_path / "out", "--tokenizer", MERGES))
  assert "36 checkpoint tensors that open_clip ViT-test has no place for" in (
      line)
  assert "blocks.0.attn.proj.bias" in line
  assert "62 florax params missing" in line
  assert not (tmp_path / "out").exists()


def test_wrong_arch(checkpoint, tmp_path):
  line = _one_error_line(_run(
      "--source", "open_clip", "--arch", "ViT-B-32", "--checkpoint",
      checkpoint, "--out", tmp_path / "out", "--tokenizer", MERGES,
      "--allow_missing", "nothing.*"))
  # The tokenizer fits ViT-B-32's larger vocabulary; the tensors do not.
  assert "shape mismatches" in line
  assert "ln_final.bias has shape (64,), text_encoder/norm/bias needs " \
         "(512,)" in line
  assert not (tmp_path / "out").exists()


def test_timm_import_matches_timm(tmp_path):
  """An image-only timm classifier: the export's (jax.export) image
  embedding is timm's pooled feature, unit-normalised."""
  from florax import inference  # pylint: disable=g-import-not-at-top
  from tests.fixtures import ref_timm_vit  # pylint: disable=g-import-not-at-top
  res = _run("--source", "timm", "--arch", "vit_test", "--checkpoint",
             TIMM_VIT, "--out", tmp_path / "vit", "--platforms", "cpu")
  assert res.returncode == 0, res.stderr[-3000:]
  io = np.load(os.path.join(ref_timm_vit.FIXTURE_DIR, ref_timm_vit.IO_FILE))
  model = inference.load(str(tmp_path / "vit"), backend="exported")
  assert model.tokenizer is None and model.manifest["num_classes"] == 10
  pixels = ref_timm_vit.images_float(io["images_u8"])
  feats = model.encode_pixels(pixels)
  np.testing.assert_allclose(feats, _unit(io["pooled"]), atol=1e-4)
  # The head travels too: timm's logits from the native backend.
  native = inference.load(str(tmp_path / "vit"))
  np.testing.assert_allclose(native.classify_pixels(pixels), io["logits"],
                             atol=1e-4)
  with pytest.raises(ValueError, match="backend='native'"):
    model.classify_pixels(pixels)


def test_timm_import_at_a_larger_size(tmp_path):
  """An image-only timm classifier, imported at twice its resolution."""
  res = _run("--source", "timm", "--arch", "vit_test", "--checkpoint",
             TIMM_VIT, "--out", tmp_path / "vit", "--image_size", "64",
             "--platforms", "cpu")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "image_encoder/pos_embed (1, 17, 64) -> (65, 64)" in res.stdout
  from florax import inference  # pylint: disable=g-import-not-at-top
  model = inference.load(str(tmp_path / "vit"), backend="exported")
  assert model.image_size == 64
  feats = model.encode_image(np.zeros((1, 80, 72, 3), np.uint8))
  assert feats.shape == (1, 64) and np.isfinite(feats).all()


@pytest.mark.parametrize("args,message", [
    (("--source", "hf", "--arch", "flava_full"),
     "unknown Hugging Face FLAVA arch 'flava_full'; known: "
     "facebook/flava-full, flava-full, full, test"),
    (("--source", "timm", "--arch", "vit_giant"),
     "--arch 'vit_giant' is not a known timm arch; known: "),
    (("--source", "timm", "--arch", "vit_test", "--tokenizer", MERGES),
     "--tokenizer: a timm model is image-only (no text tower); drop "
     "--tokenizer"),
])
def test_flag_mistakes(tmp_path, args, message):
  line = _one_error_line(_run(*args, "--checkpoint", TIMM_VIT, "--out",
                              tmp_path / "out"))
  assert line.startswith("florax: error: " + message), line


def test_open_clip_without_a_matching_tokenizer(checkpoint, tmp_path):
  """No --tokenizer: open_clip's bundled vocabulary if open_clip is
  installed (49408 ids: too many for this model), else a request for
  --tokenizer."""
  line = _one_error_line(_run(
      "--source", "open_clip", "--arch", ref.ARCH, "--checkpoint",
      checkpoint, "--out", tmp_path / "out"))
  assert ("--source open_clip needs --tokenizer" in line
          or "has 49408 ids but ViT-test's text tower has a vocabulary of "
          "1615" in line), line


def test_open_clip_with_a_smaller_tokenizer(checkpoint, tmp_path):
  """A vocabulary smaller than the checkpoint's would run and embed every
  text wrongly: refused once the checkpoint is known to fit."""
  with open(MERGES, encoding="utf-8") as f:
    lines = f.read().split("\n")
  small = tmp_path / "small_merges.txt"
  small.write_text("\n".join(lines[:1000]), encoding="utf-8")
  line = _one_error_line(_run(
      "--source", "open_clip", "--arch", ref.ARCH, "--checkpoint",
      checkpoint, "--out", tmp_path / "out", "--tokenizer", small))
  # 2 x 256 byte tokens + 999 merges (line 0 is the header) + sot, eot.
  assert f"({small}) has 1513 ids but ViT-test's text tower has a " \
         "vocabulary of 1615" in line, line
  assert not (tmp_path / "out").exists()


def test_torchscale_beit3_import(tmp_path):
  """--source torchscale: the small torchscale BEiT3 of
  tests/fixtures/torchscale_beit3/ (parity in test_convert_torchscale.py)
  becomes a Multiway import directory; an unknown arch is named."""
  ckpt = os.path.join(ROOT, "tests", "fixtures", "torchscale_beit3",
                      "test.safetensors")
  out = tmp_path / "beit3"
  res = _run("--source", "torchscale", "--arch", "test", "--checkpoint",
             ckpt, "--out", out)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "florax: imported torchscale test" in res.stdout
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["model"] == "multiway"
  assert manifest["source"]["arch"] == "test"
  line = _one_error_line(_run("--source", "torchscale", "--arch", "huge",
                              "--checkpoint", ckpt, "--out",
                              tmp_path / "bad"))
  assert line.startswith("florax: error: unknown torchscale BEiT3 arch "
                         "'huge'"), line
  assert not (tmp_path / "bad").exists()
