"""timm SwinTransformer weights on florax's CoSwin (patch stem + merging).

Parity against timm's own outputs for a small random model (committed in
tests/fixtures/timm_swin/ by tests/fixtures/ref_timm_swin.py; regenerated
and compared live when timm is installed), full-size swin_tiny/swin_base
names, shapes and parameter counts (recorded from timm), strict errors, and
resolution changes."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import common, timm_swin
from florax.export import unflatten_params
from florax.models import coswin
from tests.fixtures import ref_timm_swin as ref
from tests.fixtures import torch_env

FIXTURE = ref.FIXTURE_DIR
ATOL = 1e-4


def _load(fixture_dir=FIXTURE):
  state = common.read_checkpoint(os.path.join(fixture_dir, ref.STATE_FILE))
  io = dict(np.load(os.path.join(fixture_dir, ref.IO_FILE)))
  with open(os.path.join(fixture_dir, ref.META_FILE)) as f:
    meta = json.load(f)
  return state, io, meta


@pytest.fixture(scope="module")
def fixture():
  return _load()


@pytest.fixture(scope="module")
def run_florax():
  """Converts a timm state dict and runs florax on images: (pooled, logits,
  stage features). One jitted function, compiled once per image shape."""
  cache = {}

  def run(state, images, **kwargs):
    config, params, report = timm_swin.convert_state_dict(
        state, "swin_test", **kwargs)
    cfg = coswin.CoSwinConfig(**config["image"])
    enc = unflatten_params({k.split("/", 1)[1]: v for k, v in params.items()
                            if k.startswith("image_encoder/")})
    if cfg not in cache:
      model = coswin.CoSwin(cfg)
      cache[cfg] = jax.jit(lambda p, x: model.apply({"params": p}, x))
    pooled, aux = cache[cfg](enc, jnp.asarray(images))
    pooled = np.asarray(pooled)
    logits = pooled @ params["head/kernel"] + params["head/bias"]
    return pooled, logits, [np.asarray(f) for f in aux["stage_features"]], \
        (config, params, report)

  return run


def _check_parity(run_florax, state, io):
  pooled, logits, stages, (config, _, report) = run_florax(
      state, ref.images_float(io["images_u8"]))
  assert config["num_classes"] == io["logits"].shape[1]
  assert not report.resized and not report.notes
  np.testing.assert_allclose(pooled, io["pooled"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(logits, io["logits"], rtol=0, atol=ATOL)
  assert len(stages) == 3
  for i, got in enumerate(stages):
    np.testing.assert_allclose(got, io[f"stage{i}"], rtol=0, atol=ATOL)
  # The outputs are not trivially small: a tolerance of 1e-4 means something.
  assert np.abs(io["logits"]).max() > 0.1


def test_parity_with_committed_timm_outputs(fixture, run_florax):
  state, io, _ = fixture
  _check_parity(run_florax, state, io)


def test_parity_live_against_timm(tmp_path, run_florax):
  if torch_env.import_timm() is None:
    pytest.skip("torch/timm not installed (optional extra)")
  state, io, meta = _load(ref.make(str(tmp_path)))
  _check_parity(run_florax, state, io)
  # The committed fixture still describes the installed timm's models.
  _, _, committed = _load()
  for arch, layout in meta["full_size"].items():
    assert layout == committed["full_size"][arch], arch


def _full_size_shapes(layout):
  return {k: jax.ShapeDtypeStruct(tuple(s), np.float32)
          for k, s in layout["keys"].items()}


@pytest.mark.parametrize("arch", ref.FULL_SIZE_ARCHS)
def test_full_size_names_and_shapes(fixture, arch):
  layout = fixture[2]["full_size"][arch]
  config, shapes, report = timm_swin.convert_state_dict(
      _full_size_shapes(layout), arch, shapes_only=True)
  # Every timm tensor mapped, every florax param filled, nothing dropped.
  assert len(report.mapped) == len(layout["keys"]) == len(shapes)
  assert not report.dropped and not report.ignored and not report.fresh
  assert config["num_classes"] == 1000 and config["image_size"] == 224
  # Parameter count: florax's tower (from jax.eval_shape) is timm's model
  # without its classifier, counted by timm itself.
  cfg, size = timm_swin.arch_config(arch)
  tower = common.target_shapes(coswin.CoSwin(cfg), size)
  tower_count = sum(int(np.prod(s)) for s in tower.values())
  assert tower_count == layout["param_count"] - layout["head_param_count"]
  assert shapes["head/kernel"] == (cfg.embed_dim * 8, 1000)


def test_truncated_state_dict_names_the_missing_key(fixture):
  state = dict(fixture[0])
  del state["layers.1.blocks.1.mlp.fc2.weight"]
  with pytest.raises(common.ConversionError) as e:
    timm_swin.convert_state_dict(state, "swin_test")
  assert e.value.missing == ["image_encoder/stage1_block1/mlp/fc2/kernel"]
  assert "image_encoder/stage1_block1/mlp/fc2/kernel" in str(e.value)


def test_renamed_key_is_reported(fixture):
  state = dict(fixture[0])
  state["blocks.0.attn.qkv.weight"] = state.pop(
      "layers.0.blocks.0.attn.qkv.weight")   # a ViT-style name
  with pytest.raises(common.ConversionError) as e:
    timm_swin.convert_state_dict(state, "swin_test")
  assert e.value.unmapped == ["blocks.0.attn.qkv.weight"]
  assert e.value.missing == ["image_encoder/stage0_block0/attn/qkv/kernel"]
  assert "blocks.0.attn.qkv.weight" in str(e.value)


def test_wrong_arch_lists_shapes(fixture):
  with pytest.raises(common.ConversionError) as e:
    timm_swin.convert_state_dict(fixture[0], "swin_base_patch4_window7_224")
  err = e.value
  by_name = {m[0]: m for m in err.mismatched}
  qkv = by_name["image_encoder/stage0_block0/attn/qkv/kernel"]
  assert qkv[1:4] == ("layers.0.blocks.0.attn.qkv.weight", (24, 8), (384, 128))
  assert "(24, 8), expected (384, 128)" in str(err)
  # swin_base has a 4th stage and 18 blocks in the 3rd: all missing, listed.
  assert "image_encoder/stage3_block1/mlp/fc2/kernel" in err.missing
  assert "image_encoder/stage2_block17/norm1/scale" in err.missing


def test_unknown_arch():
  with pytest.raises(ValueError, match="unknown timm Swin arch.*swin_tiny"):
    timm_swin.convert_state_dict({}, "swin_huge_patch4")


def test_truncated_file(tmp_path):
  data = open(os.path.join(FIXTURE, ref.STATE_FILE), "rb").read()
  path = tmp_path / "swin.safetensors"
  path.write_bytes(data[:len(data) - 1000])
  with pytest.raises(common.CheckpointReadError, match="swin.safetensors"):
    common.read_checkpoint(str(path))


def test_head_can_be_dropped(fixture):
  config, params, report = timm_swin.convert_state_dict(
      fixture[0], "swin_test", allow_missing=["head.*"])
  assert config["num_classes"] is None
  assert not any(k.startswith("head/") for k in params)
  assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight"]


def test_original_microsoft_layout(fixture):
  """Swin's own checkpoints: downsampling at the end of the previous stage,
  `head.weight`, and the persistent index/mask buffers."""
  state = fixture[0]
  original = {}
  for k, v in state.items():
    k = re.sub(r"^layers\.(\d+)\.downsample",
               lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
    original[k.replace("head.fc.", "head.")] = v
  original["layers.0.blocks.1.attn_mask"] = np.zeros((4, 64, 64), np.float32)
  original["layers.0.blocks.0.attn.relative_position_index"] = np.zeros(
      (64, 64), np.int64)
  _, params, report = timm_swin.convert_state_dict(original, "swin_test")
  _, want, _ = timm_swin.convert_state_dict(state, "swin_test")
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)
  assert len(report.ignored) == 2 and report.notes


def test_same_size_is_exact(fixture):
  state = fixture[0]
  _, params, report = timm_swin.convert_state_dict(state, "swin_test")
  assert not report.resized
  # Stages 0 and 1 use the full 8-window table: copied bit for bit.
  for s in (0, 1):
    assert np.array_equal(
        params[f"image_encoder/stage{s}_block1/attn/relative_position_bias"],
        state[f"layers.{s}.blocks.1.attn.relative_position_bias_table"])
  # Stage 2 (grid 4 < window 8): timm's 7x7 table sits exactly at the centre
  # of florax's 15x15 one.
  big = params["image_encoder/stage2_block0/attn/relative_position_bias"]
  small = state["layers.2.blocks.0.attn.relative_position_bias_table"]
  assert big.shape == (225, 4) and small.shape == (49, 4)
  assert np.array_equal(big.reshape(15, 15, 4)[4:11, 4:11],
                        small.reshape(7, 7, 4))
  assert np.array_equal(params["image_encoder/stage0_block0/attn/qkv/kernel"],
                        state["layers.0.blocks.0.attn.qkv.weight"].T.reshape(
                            8, 3, 2, 4))


def test_larger_image_and_window(fixture):
  config, params, report = timm_swin.convert_state_dict(
      fixture[0], "swin_test", image_size=128, window_size=16)
  assert config["image"]["window_size"] == 16 and config["image_size"] == 128
  resized = {name: (a, b) for name, a, b in report.resized}
  assert len(resized) == 6   # every block's table
  assert resized["image_encoder/stage0_block0/attn/relative_position_bias"] \
      == ((225, 2), (961, 2))
  # Stage 2's grid (8) is smaller than the new window: timm's 7x7 table is
  # interpolated to an 8-window table, which fills florax's centre.
  assert resized["image_encoder/stage2_block1/attn/relative_position_bias"] \
      == ((49, 4), (961, 4))
  table = params["image_encoder/stage2_block1/attn/relative_position_bias"]
  assert table.reshape(31, 31, 4)[:8].max() == 0
  assert np.isfinite(table).all()
  # The converted tree is exactly what the 128 px model takes (traced, not
  # compiled: the numbers are the conversion's business, checked above).
  cfg = coswin.CoSwinConfig(**config["image"])
  enc = unflatten_params({k.split("/", 1)[1]: v for k, v in params.items()
                          if k.startswith("image_encoder/")})
  pooled, _ = jax.eval_shape(
      lambda p, x: coswin.CoSwin(cfg).apply({"params": p}, x), enc,
      jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32))
  assert pooled.shape == (2, 32)


def test_window_not_dividing_the_grid_is_noted(fixture):
  _, _, report = timm_swin.convert_state_dict(fixture[0], "swin_test",
                                              image_size=96)
  assert any("does not divide" in n for n in report.notes)
