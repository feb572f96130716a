"""timm VisionTransformer weights on florax's ViT.

Parity against timm's own outputs for a small random model (committed in
tests/fixtures/timm_vit/ by tests/fixtures/ref_timm_vit.py; regenerated and
compared live when timm is installed): pooled features, logits and every
block's output. Full-size vit_base/vit_large names, shapes and parameter
counts (recorded from timm); with timm installed, every arch of the table
against timm's own model. Strict errors, and the position embedding at the
checkpoint's resolution (exact) and at a larger one (interpolated)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import common, timm_vit
from florax.export import unflatten_params
from florax.models import vit
from tests.fixtures import ref_timm_vit as ref
from tests.fixtures import torch_env

ATOL = 1e-4


def _load(fixture_dir=ref.FIXTURE_DIR):
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
  """Converts a timm state dict and runs florax's ViT: (pooled, logits,
  [block outputs], (config, params, report)). Compiled once per config."""
  cache = {}

  def run(state, images, arch=ref.ARCH, **kwargs):
    config, params, report = timm_vit.convert_state_dict(state, arch,
                                                         **kwargs)
    cfg = vit.ViTConfig(**config["image"])
    enc = unflatten_params({k.split("/", 1)[1]: v for k, v in params.items()
                            if k.startswith("image_encoder/")})
    if cfg not in cache:
      model = vit.ViT(cfg)
      cache[cfg] = jax.jit(lambda p, x: model.apply(
          {"params": p}, x, mutable=["intermediates"]))
    (pooled, _), state_out = cache[cfg](enc, jnp.asarray(images))
    pooled = np.asarray(pooled)
    logits = None
    if "head/kernel" in params:
      logits = pooled @ params["head/kernel"] + params["head/bias"]
    inter = state_out["intermediates"]["encoder"]
    blocks = [np.asarray(inter[f"block{i}"]["out"][0])
              for i in range(cfg.depth)]
    return pooled, logits, blocks, (config, params, report)

  return run


def _check_parity(run_florax, state, io, arch=ref.ARCH):
  pooled, logits, blocks, (config, _, report) = run_florax(
      state, ref.images_float(io["images_u8"]), arch)
  assert config["num_classes"] == io["logits"].shape[1]
  assert not report.resized
  np.testing.assert_allclose(pooled, io["pooled"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(logits, io["logits"], rtol=0, atol=ATOL)
  for i, got in enumerate(blocks):
    np.testing.assert_allclose(got, io[f"block{i}"], rtol=0, atol=ATOL)
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  assert np.abs(io["logits"]).max() > 0.1 and np.abs(io["block1"]).max() > 1


def test_parity_with_committed_timm_outputs(fixture, run_florax):
  state, io, _ = fixture
  # The fixture is float16 on disk; the importer hands back float32.
  assert all(v.dtype == np.float32 for v in state.values())
  _check_parity(run_florax, state, io)


def test_parity_live_against_timm(tmp_path, run_florax):
  """Regenerates the fixture with the installed timm and compares again,
  and checks the committed one is what this timm produces."""
  torch_env.require_timm()
  out = ref.make(str(tmp_path), full_size=False)
  state, io, meta = _load(out)
  _check_parity(run_florax, state, io)
  _, committed, _ = _load()
  np.testing.assert_allclose(io["logits"], committed["logits"], atol=1e-5)


def test_avg_pool_and_fc_norm_live(run_florax):
  """timm's global_pool='avg' (patch-token mean, fc_norm instead of norm)."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  model = ref.build("vit_test_avg", timm, torch, seed=1)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "fc_norm.weight" in state and "norm.weight" not in state
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  io = ref.reference_outputs(model, images, torch)
  io["images_u8"] = images
  _check_parity(run_florax, state, io, "vit_test_avg")


def _shapes(keys):
  return {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
          for k, s in keys.items()}


@pytest.mark.parametrize("arch", ref.FULL_SIZE_ARCHS)
def test_full_size_names_and_shapes(fixture, arch):
  """Every tensor of a full-size timm model (names and shapes recorded from
  timm) has its florax param and nothing is left over; the counts agree."""
  layout = fixture[2]["full_size"][arch]
  config, shapes, report = timm_vit.convert_state_dict(
      _shapes(layout["keys"]), arch, shapes_only=True)
  assert len(report.mapped) == len(layout["keys"])
  assert not report.ignored and not report.dropped and not report.resized
  assert config["num_classes"] == 1000
  width = config["image"]["width"]
  assert shapes["head/kernel"] == (width, 1000)
  assert shapes["image_encoder/pos_embed"] == (197, width)
  assert shapes["image_encoder/encoder/block0/attn/qkv/kernel"] == (
      width, 3, config["image"]["num_heads"], 64)
  assert sum(int(np.prod(s)) for s in shapes.values()) == layout[
      "param_count"]


def test_full_size_224_to_384(fixture):
  """vit_base_patch16_224 built for 384 px: the 14 x 14 position grid
  becomes 24 x 24 (+ the class position); everything else as at 224."""
  layout = fixture[2]["full_size"]["vit_base_patch16_224"]
  config, shapes, report = timm_vit.convert_state_dict(
      _shapes(layout["keys"]), "vit_base_patch16_224", image_size=384,
      shapes_only=True)
  assert config["image_size"] == config["image"]["image_size"] == 384
  assert report.resized == [("image_encoder/pos_embed", (1, 197, 768),
                             (577, 768))]
  assert shapes["image_encoder/pos_embed"] == (577, 768)


def _timm_archs():
  return [a for a in timm_vit.ARCHS if not a.startswith("vit_test")]


def test_every_arch_matches_timm():
  """Each table entry against timm's own model (built on the meta device):
  names and shapes, and the settings shapes do not show (LayerNorm eps,
  activation, pre-norm, patch bias, pooling)."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  for arch in _timm_archs():
    with torch.device("meta"):
      model = timm.create_model(arch, pretrained=False)
    state = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32)
             for k, v in model.state_dict().items()}
    config, _, report = timm_vit.convert_state_dict(state, arch,
                                                    shapes_only=True)
    assert len(report.mapped) == len(state), arch
    img = config["image"]
    assert model.blocks[0].norm1.eps == pytest.approx(img["norm_eps"]), arch
    act = type(model.blocks[0].mlp.act).__name__
    assert {"GELU": "gelu", "QuickGELU": "quick_gelu"}[act] == img["act"], arch
    assert (type(model.norm_pre).__name__ != "Identity") == img["pre_norm"]
    assert (model.patch_embed.proj.bias is not None) == img["patch_bias"]
    assert model.global_pool == {"cls": "token", "mean": "avg"}[img["pool"]]
    assert model.patch_embed.img_size[0] == img["image_size"], arch
    cfg = model.pretrained_cfg
    ev = timm_vit.eval_transform(arch)
    assert tuple(cfg["mean"]) == pytest.approx(ev["mean"], abs=1e-6), arch
    assert tuple(cfg["std"]) == pytest.approx(ev["std"], abs=1e-6), arch
    assert cfg["crop_pct"] == pytest.approx(ev["crop_pct"]), arch


def test_truncated_state_dict_names_the_missing_params(fixture):
  state, _, _ = fixture
  cut = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
  with pytest.raises(common.ConversionError) as e:
    timm_vit.convert_state_dict(cut, ref.ARCH)
  assert e.value.missing == sorted(
      f"image_encoder/encoder/block1/{n}" for n in (
          "attn/proj/bias", "attn/proj/kernel", "attn/qkv/bias",
          "attn/qkv/kernel", "ls1", "ls2", "mlp/fc1/bias", "mlp/fc1/kernel",
          "mlp/fc2/bias", "mlp/fc2/kernel", "norm1/bias", "norm1/scale",
          "norm2/bias", "norm2/scale"))
  assert not e.value.unmapped and not e.value.mismatched
  assert "image_encoder/encoder/block1/attn/qkv/kernel" in str(e.value)


def test_truncated_file_is_a_clear_read_error(tmp_path):
  src = os.path.join(ref.FIXTURE_DIR, ref.STATE_FILE)
  with open(src, "rb") as f:
    blob = f.read()
  path = tmp_path / "cut.safetensors"
  path.write_bytes(blob[:len(blob) // 2])
  with pytest.raises(common.CheckpointReadError, match="truncated"):
    common.read_checkpoint(str(path))


def test_wrong_arch_names_the_shapes_at_fault(fixture):
  state, _, _ = fixture
  with pytest.raises(common.ConversionError) as e:
    timm_vit.convert_state_dict(state, "vit_small_patch16_224")
  bad = {m[1]: (m[2], m[3]) for m in e.value.mismatched}
  assert bad["blocks.0.attn.qkv.weight"] == ((192, 64), (1152, 384))
  assert bad["pos_embed"][0] == (1, 17, 64)
  # vit_small has no layer scale: the ls tensors have no place in it.
  assert ("blocks.0.ls1.gamma", "image_encoder/encoder/block0/ls1") in (
      e.value.unexpected)
  assert "blocks.0.attn.qkv.weight" in str(e.value)


def test_checkpoint_of_another_architecture(fixture):
  """A Swin state dict offered as a ViT: its names have no place here."""
  state = common.read_checkpoint(os.path.join(
      os.path.dirname(ref.FIXTURE_DIR), "timm_swin", "swin_test.safetensors"))
  with pytest.raises(common.ConversionError) as e:
    timm_vit.convert_state_dict(state, ref.ARCH)
  assert "layers.0.blocks.0.attn.relative_position_bias_table" in (
      e.value.unmapped)
  assert "image_encoder/cls_token" in e.value.missing


def test_unknown_arch():
  with pytest.raises(ValueError, match="unknown timm ViT arch 'vit_huge'"):
    timm_vit.arch_config("vit_huge")


def test_head_dropped_with_allow_missing(fixture):
  state, _, _ = fixture
  config, params, report = timm_vit.convert_state_dict(
      state, ref.ARCH, allow_missing=("head.*",))
  assert config["num_classes"] is None
  assert not any(k.startswith("head/") for k in params)
  assert sorted(report.dropped) == ["head.bias", "head.weight"]


def test_position_embedding_same_size_is_exact(fixture):
  state, _, _ = fixture
  _, params, report = timm_vit.convert_state_dict(state, ref.ARCH,
                                                  image_size=32)
  assert not report.resized
  assert np.array_equal(params["image_encoder/pos_embed"],
                        state["pos_embed"][0])


def test_position_embedding_interpolated_to_a_larger_size(fixture,
                                                          run_florax):
  """At 64 px (grid 4 -> 8) the model runs, the class position is kept and
  the grid is resampled with rows as rows and columns as columns: a pos
  embedding that is linear in (row, col) -- which bicubic interpolation
  reproduces away from the border -- comes back as that linear function at
  the new patch centres."""
  state, _, _ = fixture
  state = dict(state)
  g, dim = 4, 64
  rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  a, b = np.linspace(-1, 1, dim), np.linspace(2, -3, dim)
  grid = rows.reshape(-1, 1) * a + cols.reshape(-1, 1) * b + 0.25
  cls = state["pos_embed"][0, :1]
  state["pos_embed"] = np.concatenate([cls, grid])[None].astype(np.float32)

  images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3),
                                             dtype=np.uint8)
  pooled, logits, _, (config, params, report) = run_florax(
      state, ref.images_float(images), image_size=64)
  assert config["image_size"] == 64 and report.resized == [
      ("image_encoder/pos_embed", (1, 17, 64), (65, 64))]
  assert np.isfinite(pooled).all() and logits.shape == (2, 10)
  pos = params["image_encoder/pos_embed"]
  np.testing.assert_array_equal(pos[0], cls[0])
  new = pos[1:].reshape(8, 8, dim)
  # New patch centre i sits at old coordinate (i + 0.5) / 2 - 0.5.
  coord = (np.arange(8) + 0.5) / 2 - 0.5
  want = (coord[:, None, None] * a + coord[None, :, None] * b + 0.25)
  # Bicubic reads old rows floor(c) - 1 .. floor(c) + 2: all four exist
  # (no edge handling) for new patches 3 and 4 of 8.
  inner = slice(3, 5)
  np.testing.assert_allclose(new[inner, inner], want[inner, inner],
                             atol=1e-4)
