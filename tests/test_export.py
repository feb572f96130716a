"""Export round trip: checkpoint -> safetensors/jax.export -> embeddings."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from safetensors import safe_open  # noqa: E402

from florax import tasks  # noqa: E402
from florax import export, inference  # noqa: E402
from florax.data import digits, pipeline  # noqa: E402
from tests import trained_tiny  # noqa: E402

TEXTS = ["a handwritten 7.", "a photo of the digit three.", "a blurry photo "
         "of a zero.", "the digit 4, written by hand.", "a handwritten 1.",
         "a drawing of the number nine.", "a scanned image of the digit two.",
         "a handwritten 5."]


def _checkpoint_params():
  """The whole train state of the latest checkpoint, read by plain Orbax
  (independent of florax.restore), and its params as {flat name: numpy}."""
  wd = trained_tiny.workdir()
  path = os.path.join(wd, "checkpoints", str(trained_tiny.STEPS), "state")
  state = ocp.PyTreeCheckpointer().restore(path)
  flat = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in keys)] = np.asarray(leaf)
  return state, flat


@functools.lru_cache(maxsize=None)
def _reference():
  _, ckpt = _checkpoint_params()
  return _reference_embeddings(ckpt)


def _reference_embeddings(flat_params):
  """Embeddings by the training task's own jitted encoders."""
  task = tasks.build(trained_tiny.config(), trained_tiny.workdir())
  encode_image, encode_text = task.encode_fns()
  params = export.unflatten_params(flat_params)
  images = pipeline.holdout_arrays(16)[0][:8]
  ids = task.tokenizer.encode_batch(TEXTS, task.config.data.max_len)
  return (np.asarray(encode_image(params, images)),
          np.asarray(encode_text(params, ids)))


def test_safetensors_hold_exactly_the_params_with_stable_names():
  state, ckpt = _checkpoint_params()
  out = trained_tiny.export_dir("float32")
  with safe_open(os.path.join(out, export.PARAMS_FILE), "np") as f:
    stored = {k: f.get_tensor(k) for k in f.keys()}
  # No optimizer state: the names are exactly the param paths.
  assert set(stored) == set(ckpt)
  assert "image_encoder/stage0_block0/attn/qkv/kernel" in stored
  assert "text_encoder/token_embed/embedding" in stored
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]))
  assert n_opt > 0  # the checkpoint had optimizer state to leave out
  for k, v in ckpt.items():
    assert stored[k].dtype == np.float32
    np.testing.assert_array_equal(stored[k], v, err_msg=k)
  manifest = json.load(open(os.path.join(out, export.MANIFEST)))
  assert manifest["step"] == trained_tiny.STEPS
  assert manifest["num_params"] == sum(v.size for v in ckpt.values())
  with open(os.path.join(trained_tiny.workdir(), "tokenizer.model"),
            "rb") as f:
    assert open(os.path.join(out, "tokenizer.model"), "rb").read() == f.read()


def test_flatten_unflatten_round_trip():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(())}}, "e": np.ones(1)}
  flat = export.flatten_params(tree)
  assert sorted(flat) == ["a/b", "a/c/d", "e"]
  back = export.unflatten_params(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_fp32_round_trip_is_bit_exact_and_bf16_close():
  ref_img, ref_txt = _reference()
  raw = digits.load_split("holdout")[0][:8]  # uint8 8x8, as users pass them

  model = trained_tiny.model("float32")
  np.testing.assert_array_equal(model.encode_image(raw), ref_img)
  np.testing.assert_array_equal(model.encode_text(TEXTS), ref_txt)

  bf16_dir = trained_tiny.export_dir("bfloat16")
  with safe_open(os.path.join(bf16_dir, export.PARAMS_FILE), "np") as f:
    assert str(f.get_tensor("image_proj/kernel").dtype) == "bfloat16"
  half = inference.load(bf16_dir)
  err_img = np.abs(half.encode_image(raw) - ref_img).max()
  err_txt = np.abs(half.encode_text(TEXTS) - ref_txt).max()
  assert err_img < 1e-2 and err_txt < 1e-2, (err_img, err_txt)
  assert err_img > 0 or err_txt > 0  # the cast really happened


_SUBPROCESS = r"""
import sys
import numpy as np
from florax import inference
model = inference.load(sys.argv[1], backend="exported")
raw = np.load(sys.argv[2])
img = model.encode_image(raw)
txt = model.encode_text(sys.argv[4:])
loaded = sorted(m for m in sys.modules if m.startswith("florax"))
assert "florax.models" not in sys.modules, loaded
assert not any(m.startswith(("florax.models", "florax.tasks", "flax"))
               for m in sys.modules), loaded
np.savez(sys.argv[3], img=img, txt=txt)
print("modules:", loaded)
"""


def test_jax_export_runs_without_model_code(tmp_path):
  ref_img, ref_txt = _reference()
  raw = digits.load_split("holdout")[0][:8]
  np.save(tmp_path / "raw.npy", raw)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=trained_tiny.REPO)
  env.pop("XLA_FLAGS", None)  # a plain one-device process
  proc = subprocess.run(
      [sys.executable, "-c", _SUBPROCESS, trained_tiny.export_dir("float32"),
       str(tmp_path / "raw.npy"), str(tmp_path / "out.npz"), *TEXTS],
      env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_allclose(out["img"], ref_img, atol=1e-6, rtol=0)
  np.testing.assert_allclose(out["txt"], ref_txt, atol=1e-6, rtol=0)


def test_export_refuses_bad_dtype_and_foreign_directory(tmp_path):
  cfg = trained_tiny.config()
  try:
    export.export_workdir(cfg, trained_tiny.workdir(), str(tmp_path / "x"),
                          dtype="float16")
  except ValueError as e:
    assert "float16" in str(e)
  else:
    raise AssertionError("float16 export accepted")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  try:
    export.export_workdir(cfg, trained_tiny.workdir(), str(tmp_path / "mine"))
  except FileExistsError as e:
    assert "not a florax export" in str(e)
  else:
    raise AssertionError("overwrote a foreign directory")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
