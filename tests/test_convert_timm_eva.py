"""timm EVA / EVA-02 (timm.models.eva.Eva) weights on florax's ViT.

Parity against timm's own outputs for two small random models (committed in
tests/fixtures/timm_eva/ by tests/fixtures/ref_timm_eva.py; regenerated and
compared live when timm is installed): EVA-01 style (q/v bias, layer scale,
avg pool + fc_norm) and EVA-02 style (2-D rope, SwiGLU, MLP-only sub-LN);
pooled features, logits and every block's output, fp32, atol 1e-4. Live
only: the packed SwiGLU / separate q,k,v layouts and every arch of the
table against timm's model. Without torch: full-size names and shapes
(recorded from timm), and clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax import convert as florax_convert
from florax.convert import common, timm_eva
from florax.export import unflatten_params
from florax.models import vit
from tests.fixtures import ref_timm_eva as ref
from tests.fixtures import torch_env

ATOL = 1e-4


def _load(fixture_dir=ref.FIXTURE_DIR, archs=ref.FIXTURE_ARCHS):
  states = {a: common.read_checkpoint(os.path.join(fixture_dir,
                                                   ref.state_file(a)))
            for a in archs}
  io = dict(np.load(os.path.join(fixture_dir, ref.IO_FILE)))
  with open(os.path.join(fixture_dir, ref.META_FILE)) as f:
    meta = json.load(f)
  return states, io, meta


@pytest.fixture(scope="module")
def fixture():
  return _load()


@pytest.fixture(scope="module")
def run_florax():
  """Converts a timm state dict and runs florax's ViT: (pooled, logits,
  [block outputs], config). Compiled once per config."""
  cache = {}

  def run(state, images, arch):
    config, params, _ = timm_eva.convert_state_dict(state, arch)
    cfg = vit.ViTConfig(**config["image"])
    enc = unflatten_params({k.split("/", 1)[1]: v for k, v in params.items()
                            if k.startswith("image_encoder/")})
    if cfg not in cache:
      model = vit.ViT(cfg)
      cache[cfg] = jax.jit(lambda p, x: model.apply(
          {"params": p}, x, mutable=["intermediates"]))
    (pooled, _), out = cache[cfg](enc, jnp.asarray(images))
    pooled = np.asarray(pooled)
    logits = pooled @ params["head/kernel"] + params["head/bias"]
    inter = out["intermediates"]["encoder"]
    blocks = [np.asarray(inter[f"block{i}"]["out"][0])
              for i in range(cfg.depth)]
    return pooled, logits, blocks, config

  return run


def _check_parity(run_florax, state, io, arch):
  pooled, logits, blocks, config = run_florax(
      state, ref.images_float(io["images_u8"]), arch)
  want = lambda k: io[f"{arch}/{k}"]
  assert config["num_classes"] == want("logits").shape[1]
  diffs = {"pooled": np.abs(pooled - want("pooled")).max(),
           "logits": np.abs(logits - want("logits")).max()}
  for i, got in enumerate(blocks):
    diffs[f"block{i}"] = np.abs(got - want(f"block{i}")).max()
  assert max(diffs.values()) <= ATOL, (arch, diffs)
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  assert np.abs(want("logits")).max() > 0.1
  assert np.abs(want("block1")).max() > 1
  return diffs


@pytest.mark.parametrize("arch", ref.FIXTURE_ARCHS)
def test_parity_with_committed_timm_outputs(fixture, run_florax, arch):
  states, io, _ = fixture
  assert all(v.dtype == np.float32 for v in states[arch].values())
  _check_parity(run_florax, states[arch], io, arch)


def test_eva02_fixture_exercises_rope_swiglu_and_mlp_sub_ln(fixture):
  """The EVA-02 fixture has what makes it EVA-02, and converts to it."""
  states, _, _ = fixture
  state = states["eva02_test"]
  assert "blocks.0.mlp.fc1_g.weight" in state
  assert "blocks.0.mlp.norm.weight" in state
  assert not any(".attn.norm." in k for k in state)
  config, params, _ = timm_eva.convert_state_dict(state, "eva02_test")
  assert config["image"]["rope"] and config["image"]["sub_ln"] == "mlp"
  assert "image_encoder/encoder/block0/mlp/norm/scale" in params
  assert "image_encoder/encoder/block0/attn/norm/scale" not in params


def test_parity_live_against_timm(tmp_path, run_florax):
  """Regenerates the fixtures with the installed timm, compares again, and
  checks the committed ones are what this timm produces."""
  torch_env.require_timm()
  out = ref.make(str(tmp_path), full_size=False)
  states, io, _ = _load(out)
  for arch in ref.FIXTURE_ARCHS:
    _check_parity(run_florax, states[arch], io, arch)
  _, committed, _ = _load()
  for arch in ref.FIXTURE_ARCHS:
    np.testing.assert_allclose(io[f"{arch}/logits"],
                               committed[f"{arch}/logits"], atol=1e-5)


def test_packed_swiglu_and_separate_qkv_live(run_florax):
  """eva02_tiny's packed GluMlp fc1 and eva02_base's q/k/v projections."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  arch = "eva02_test_packed"
  model = ref.build(arch, timm, torch, seed=1)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "blocks.0.mlp.fc1.weight" in state
  assert "blocks.0.attn.q_proj.weight" in state
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  io = {f"{arch}/{k}": v
        for k, v in ref.reference_outputs(model, images, torch).items()}
  io["images_u8"] = images
  _check_parity(run_florax, state, io, arch)


def _shapes(keys):
  return {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
          for k, s in keys.items()}


@pytest.mark.parametrize("arch", ref.FULL_SIZE_ARCHS)
def test_full_size_names_and_shapes(fixture, arch):
  """Every tensor of a full-size timm EVA-02 (recorded from timm) has its
  florax param, nothing is left over, and the counts agree."""
  layout = fixture[2]["full_size"][arch]
  config, shapes, report = timm_eva.convert_state_dict(
      _shapes(layout["keys"]), arch, shapes_only=True)
  # (common.convert raises on any unmapped tensor; the split/fused layouts
  # change the count of mapped names, the parameter count stays.)
  assert not report.ignored and not report.dropped and not report.resized
  # The mim_in22k tags are headless (timm num_classes=0).
  head = layout["keys"].get("head.weight")
  assert config["num_classes"] == (head[0] if head else None)
  assert sum(int(np.prod(s)) for s in shapes.values()) == layout[
      "param_count"]


def _timm_eva_archs():
  return sorted(a for a in timm_eva.ARCHS if "_test" not in a)


def test_every_arch_matches_timm():
  """Each table entry against timm's own model (meta device): names and
  shapes, and settings shapes do not show (eps, pooling, rope, eval)."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  for arch in _timm_eva_archs():
    with torch.device("meta"):
      model = timm.create_model(arch, pretrained=False)
    state = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32)
             for k, v in model.state_dict().items()}
    config, _, report = timm_eva.convert_state_dict(state, arch,
                                                    shapes_only=True)
    assert report.mapped, arch
    img = config["image"]
    assert model.blocks[0].norm1.eps == pytest.approx(img["norm_eps"]), arch
    assert (model.rope is not None) == img["rope"], arch
    if model.rope is not None:
      assert tuple(model.rope.ref_feat_shape) == (img["image_size"] //
                                                  img["patch_size"],) * 2
    assert model.global_pool == {"cls": "token", "mean": "avg"}[img["pool"]]
    assert model.patch_embed.img_size[0] == img["image_size"], arch
    cfg = model.pretrained_cfg
    ev = timm_eva.eval_transform(arch)
    assert tuple(cfg["mean"]) == pytest.approx(ev["mean"], abs=1e-6), arch
    assert cfg["crop_pct"] == pytest.approx(ev["crop_pct"]), arch


def test_routing_and_errors(fixture):
  states, _, _ = fixture
  assert florax_convert.module_for("timm", "eva02_base_patch14_224") is (
      timm_eva)
  assert "eva02_test" in florax_convert.known_archs("timm")
  with pytest.raises(ValueError, match="unknown timm EVA arch"):
    timm_eva.convert_state_dict(states["eva_test"], "eva_nonesuch")
  with pytest.raises(ValueError, match="ref_feat_shape"):
    timm_eva.convert_state_dict(states["eva02_test"], "eva02_test",
                                image_size=64)
  # An EVA-01 checkpoint is not an EVA-02 one: names and shapes listed.
  with pytest.raises(common.ConversionError, match="mlp"):
    timm_eva.convert_state_dict(states["eva_test"], "eva02_test")
  cut = {k: v for k, v in states["eva_test"].items()
         if k != "blocks.1.attn.q_bias"}
  with pytest.raises(common.ConversionError, match="q_bias"):
    timm_eva.convert_state_dict(cut, "eva_test")


def test_full_import_through_convert(fixture):
  """florax.convert.convert routes eva* to this module (an image-only
  model with timm's EVA eval transform)."""
  states, _, _ = fixture
  imported = florax_convert.convert("timm", states["eva02_test"],
                                    "eva02_test")
  assert imported.model["image"]["arch"] == "vit"
  assert imported.model["num_classes"] == 10
