"""timm's BEiT-3 (beit3_*) weights on florax's Multiway image classifier
(florax.convert.timm_beit3: a vision_only Multiway in
two_tower.MultiwayImageTower, timm's head as the classifier).

Parity against timm's own outputs for a small random timm BEiT-3
(tests/fixtures/timm_beit3_test.npz, written by
tests/fixtures/make_timm_beit3.py; rebuilt and compared live when timm is
installed): logits and pooled features, fp32, atol 1e-4, converted in
process and through `python -m launch.import_weights` +
`florax.inference.load`. Full-size beit3_base / giant names and shapes
(recorded from timm; every arch live against timm's meta-device models),
the florax names as the vision subset of a torchscale BEiT-3 import,
clear errors (another arch, unilm / torchscale naming), the position grid
at another size, the vision_only Multiway itself and its layer decay."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from florax import convert as florax_convert
from florax.convert import common
from florax.convert import timm_beit3
from florax.convert import torchscale_beit3 as ts
from florax.export import flatten_params, unflatten_params
from florax.models import multiway, two_tower
from florax.train import layer_decay
from tests.fixtures import make_timm_beit3 as ref
from tests.fixtures import torch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHSCALE_CKPT = os.path.join(ROOT, "tests", "fixtures", "torchscale_beit3",
                               "test.safetensors")
ATOL = 1e-4


@pytest.fixture(scope="module")
def fixture():
  return ref.load()


@pytest.fixture(scope="module")
def imported(fixture):
  state, _, _ = fixture
  return florax_convert.convert("timm", state, ref.ARCH)


@pytest.fixture(scope="module")
def outputs(fixture, imported):
  """florax's (logits, pooled) for the fixture's images: the image-only
  two-tower of the import's config (one jit; the head, a plain dense
  layer, in numpy)."""
  _, io, _ = fixture
  model = two_tower.from_config(ml_collections.ConfigDict(imported.model))
  params = unflatten_params(imported.params)
  run = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                         method=model.image_features))
  pooled = np.asarray(run(params,
                          jnp.asarray(ref.images_float(io["images_u8"]))))
  p = imported.params
  return pooled @ p["head/kernel"] + p["head/bias"], pooled


class _Shape:
  def __init__(self, shape):
    self.shape = tuple(shape)


# -- parity ---------------------------------------------------------------------

def test_parity_with_committed_timm_outputs(fixture, imported, outputs):
  _, io, _ = fixture
  logits, pooled = outputs
  assert imported.model["image"]["arch"] == "multiway"
  assert imported.model["image"]["vision_only"] is True
  assert imported.model["num_classes"] == 10 and imported.max_len is None
  assert not imported.report.resized
  np.testing.assert_allclose(logits, io["logits"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(pooled, io["pooled"], rtol=0, atol=ATOL)
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  assert np.abs(io["logits"]).max() > 0.5 and io["pooled"].std() > 0.5


def test_fixture_exercises_the_norms(fixture):
  """Every LayerNorm of the fixture is re-drawn (not timm's 1/0 init), so a
  swapped or skipped norm cannot go unnoticed."""
  state, _, _ = fixture
  norms = [k for k in state if re.search(r"norm\d?\.(weight|bias)$", k)]
  assert len(norms) == 2 * (1 + 2 * 4)  # fc_norm + per block 4 LNs, w & b
  for k in norms:
    base = 1.0 if k.endswith("weight") else 0.0
    assert np.abs(state[k] - base).max() > 0.1, k


def test_eval_preprocess_is_timms(imported):
  pre = imported.preprocess
  assert pre["transform"] == "resize_center_crop"
  assert pre["size"] == pre["resize_size"] == 32  # crop_pct 1.0
  assert pre["mean"] == pytest.approx(timm_beit3.IMAGENET_MEAN)
  assert pre["std"] == pytest.approx(timm_beit3.IMAGENET_STD)


def test_parity_live_against_timm(fixture, outputs):
  """With timm installed: the committed fixture is what timm computes now
  (same weights, same outputs)."""
  timm = torch_env.import_timm()
  if timm is None:
    pytest.skip("torch/timm not installed (optional extra)")
  import torch  # pylint: disable=g-import-not-at-top
  state, io, _ = fixture
  model = ref.build(torch)
  live = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(live) == sorted(state)
  for k, v in live.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)
  got = ref.reference(model, io["images_u8"], torch)
  logits, pooled = outputs
  np.testing.assert_allclose(logits, got["logits"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(pooled, got["pooled"], rtol=0, atol=ATOL)


# -- launch.import_weights -> florax.inference ------------------------------------

def _run_import(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "launch.import_weights",
                         *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_import_weights_then_inference_load(fixture, imported, tmp_path):
  """The whole path: a .safetensors checkpoint -> `python -m
  launch.import_weights --source timm` -> florax.inference.load(...)'s
  classifier gives timm's logits."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from florax import inference  # pylint: disable=g-import-not-at-top
  state, io, _ = fixture
  ckpt = tmp_path / "beit3_test.safetensors"  # fp16, as a hub file may be
  save_file({k: v.astype(np.float16) for k, v in state.items()}, str(ckpt))
  out = tmp_path / "beit3"
  res = _run_import("--source", "timm", "--arch", ref.ARCH, "--checkpoint",
                    ckpt, "--out", out, "--platforms", "cpu")
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"florax: imported timm {ref.ARCH}" in res.stdout
  model = inference.load(str(out))
  assert model.tokenizer is None and model.manifest["num_classes"] == 10
  assert model.manifest["source"]["fresh"] == []
  # The directory holds exactly the in-process conversion.
  stored = load_file(str(out / "params.safetensors"))
  assert sorted(stored) == sorted(imported.params)
  for k, v in imported.params.items():
    np.testing.assert_array_equal(stored[k], v, err_msg=k)
  pixels = ref.images_float(io["images_u8"])
  np.testing.assert_allclose(model.classify_pixels(pixels), io["logits"],
                             rtol=0, atol=ATOL)


# -- full-size names and shapes ---------------------------------------------------

def _arch_of_layout(layout) -> dict:
  """The MultiwayConfig fields a timm state dict layout pins down."""
  depth = len({k.split(".")[1] for k in layout if k.startswith("blocks.")})
  patch = layout["patch_embed.proj.weight"]
  return dict(width=patch[0], patch_size=patch[2], depth=depth,
              mlp_dim=layout["blocks.0.mlp.fc1.weight"][0],
              image_size=round((layout["pos_embed"][1] - 1) ** 0.5) * patch[2])


def test_full_size_archs_are_timms_layouts(fixture):
  """Width, depth, FFN, patch and size of every recorded full-size timm
  model (meta device) are the ARCHS entry's (giant: int(1408 * 4.3637))."""
  _, _, meta = fixture
  assert sorted(meta["full_size"]) == sorted(ref.FULL_SIZE_ARCHS)
  for arch, layout in meta["full_size"].items():
    fields = timm_beit3.ARCHS[arch]
    assert _arch_of_layout(layout) == {k: fields[k] for k in (
        "width", "patch_size", "depth", "mlp_dim", "image_size")}, arch
  assert timm_beit3.ARCHS["beit3_giant_patch14_224"]["mlp_dim"] == 6144


def test_full_size_names_and_shapes(fixture):
  """timm's full-size beit3_base state dict layout (recorded on the meta
  device) converts with every name mapped and every florax param filled."""
  _, _, meta = fixture
  arch = "beit3_base_patch16_224"
  layout = meta["full_size"][arch]
  config, shapes, report = timm_beit3.convert_state_dict(
      {k: _Shape(v) for k, v in layout.items()}, arch, shapes_only=True)
  assert len(report.mapped) == len(layout) == len(shapes)
  assert config["num_classes"] == 1000 and not report.resized
  fields = timm_beit3.ARCHS[arch]
  w = fields["width"]
  assert shapes["head/kernel"] == (w, 1000)
  assert shapes["image_encoder/multiway/block0/mlp_v/fc1/kernel"] == (
      w, fields["mlp_dim"])
  assert not any(re.search(r"_(l|vl)/|text_embed|mask_token|norm_l", k)
                 for k in shapes)


def test_every_arch_matches_timm(fixture):
  """With timm installed: ARCHS holds every timm beit3_* model, each built
  as its entry says (meta device: no weights), and the recorded layouts
  are timm's current ones."""
  timm = torch_env.import_timm()
  if timm is None:
    pytest.skip("torch/timm not installed (optional extra)")
  import torch  # pylint: disable=g-import-not-at-top
  _, _, meta = fixture
  assert sorted(timm.list_models("beit3_*")) == sorted(
      a for a in timm_beit3.ARCHS if a != ref.ARCH)
  for arch in timm.list_models("beit3_*"):
    with torch.device("meta"):
      model = timm.create_model(arch, pretrained=False)
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    if arch in meta["full_size"]:
      assert layout == meta["full_size"][arch], arch
    fields = timm_beit3.ARCHS[arch]
    assert _arch_of_layout(layout) == {k: fields[k] for k in (
        "width", "patch_size", "depth", "mlp_dim", "image_size")}, arch
    assert model.blocks[0].attn.num_heads == fields["num_heads"], arch
    assert model.global_pool == "avg" and model.fc_norm.eps == 1e-5, arch
    assert not isinstance(model.blocks[0].attn.norm, torch.nn.Identity)
    assert not isinstance(model.blocks[0].mlp.norm, torch.nn.Identity)


# -- the same names as a torchscale BEiT-3 import -------------------------------------

def _torchscale_state():
  return common.read_checkpoint(TORCHSCALE_CKPT)


def test_names_are_the_vision_half_of_a_torchscale_import(imported):
  """The florax names of a timm BEiT-3 (under image_encoder/multiway/) are
  a torchscale BEiT-3 import's vision params, shape for shape ('beit3_test'
  has torchscale's 'test' shapes)."""
  _, ts_params, _ = ts.convert_state_dict(_torchscale_state(), "test")
  ours = {k[len(timm_beit3.BACKBONE) + 1:]: v.shape
          for k, v in imported.params.items()
          if k.startswith(timm_beit3.BACKBONE + "/")}
  assert ours and all(k in ts_params for k in ours), sorted(
      set(ours) - set(ts_params))
  assert all(ts_params[k].shape == s for k, s in ours.items())
  rest = set(ts_params) - set(ours)
  # What the timm checkpoint lacks: the language side, the mask token and
  # the final norm (timm's 'avg' pooling uses fc_norm instead).
  assert all(re.search(r"_l/|text_embed/|mask_token|norm_v/", k)
             for k in rest), sorted(rest)


def test_timm_conversion_of_a_unilm_checkpoint_equals_torchscale_import():
  """With timm: timm's own `_convert_beit3` of the torchscale fixture
  (unilm naming), imported here, gives exactly the torchscale import's
  vision params."""
  timm = torch_env.import_timm()
  if timm is None:
    pytest.skip("torch/timm not installed (optional extra)")
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as tvt  # pylint: disable=g-import-not-at-top
  state = _torchscale_state()
  converted = tvt._convert_beit3(  # pylint: disable=protected-access
      {k: torch.from_numpy(v) for k, v in state.items()}, None)
  converted = {k: v.numpy() for k, v in converted.items()
               if not k.startswith("layer_norm.")}  # the unused final norm
  converted["fc_norm.weight"] = np.ones(64, np.float32)
  converted["fc_norm.bias"] = np.zeros(64, np.float32)
  _, ours, _ = timm_beit3.convert_state_dict(converted, ref.ARCH)
  _, want, _ = ts.convert_state_dict(state, "test")
  for k, v in ours.items():
    if k.startswith(timm_beit3.BACKBONE + "/"):
      np.testing.assert_array_equal(
          v, want[k[len(timm_beit3.BACKBONE) + 1:]], err_msg=k)


# -- errors -----------------------------------------------------------------------

def test_registry():
  assert florax_convert.module_for("timm", "beit3_base_patch16_224") is (
      timm_beit3)
  assert "beit3_large_patch16_224" in florax_convert.known_archs("timm")
  with pytest.raises(ValueError, match=r"BEiT-3 \(beit3_\*\)"):
    florax_convert.module_for("timm", "deit_small_patch16_224")


def test_torchscale_naming_points_at_source_torchscale():
  with pytest.raises(ValueError, match="--source torchscale") as e:
    florax_convert.convert("timm", _torchscale_state(),
                           "beit3_base_patch16_224")
  # Not a ConversionError: import_weights shows this message as it is.
  assert not isinstance(e.value, common.ConversionError)
  assert "beit3.encoder.layers.0" in str(e.value) or "beit3." in str(e.value)


def test_wrong_arch_names_the_shapes_at_fault(fixture):
  state, _, _ = fixture
  with pytest.raises(common.ConversionError) as e:
    timm_beit3.convert_state_dict(state, "beit3_base_patch16_224")
  err = e.value
  assert err.mismatched and not err.unmapped
  assert any(m[0] == "image_encoder/multiway/block0/attn/qkv_v/kernel"
             for m in err.mismatched)
  assert "image_encoder/multiway/block11/norm1_v/scale" in err.missing


def test_unknown_arch_and_missing_tensors(fixture):
  state, _, _ = fixture
  with pytest.raises(ValueError, match="unknown timm BEiT-3 arch"):
    timm_beit3.convert_state_dict(state, "beit3_huge_patch14_224")
  cut = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
  with pytest.raises(common.ConversionError, match="16 florax params with "
                     "no source"):
    timm_beit3.convert_state_dict(cut, ref.ARCH)


def test_head_dropped_and_other_size(fixture):
  state, _, _ = fixture
  config, params, report = timm_beit3.convert_state_dict(
      state, ref.ARCH, image_size=48, allow_missing=("head.*",))
  assert config["num_classes"] is None and "head/kernel" not in params
  assert config["image_size"] == 48
  assert report.resized == [("image_encoder/multiway/vision_embed/pos_embed",
                             (1, 17, 64), (37, 64))]
  # At the checkpoint's own size the grid is copied exactly.
  _, same, _ = timm_beit3.convert_state_dict(state, ref.ARCH)
  np.testing.assert_array_equal(
      same["image_encoder/multiway/vision_embed/pos_embed"],
      state["pos_embed"][0])


# -- the vision_only Multiway ----------------------------------------------------------

def test_vision_only_multiway_and_its_layer_decay(imported):
  cfg = multiway.MultiwayConfig(**{k: v for k, v in
                                   imported.model["image"].items()
                                   if k != "arch"})
  model = multiway.Multiway(cfg)
  images = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  names = list(flatten_params(params))
  assert not any(re.search(r"_(l|vl)/|text_embed|mask_token|norm_l", k)
                 for k in names), names
  text = jnp.ones((1, 4), jnp.int32)
  for kwargs in ({"images": images, "text": text}, {"text": text}):
    with pytest.raises(ValueError, match="vision_only"):
      jax.eval_shape(lambda kw=kwargs: model.init(jax.random.key(0), **kw))
  with pytest.raises(ValueError, match="no image_mask"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), images,
                                      image_mask=jnp.zeros((1, 16), bool)))
  with pytest.raises(ValueError, match="vision_only"):
    multiway.validate(multiway.config_for("tiny", vision_only="yes"))
  # num_vl_layers is ignored: no VL expert even where the preset has one.
  tiny = multiway.config_for("tiny", vision_only=True)
  assert tiny.num_vl_layers == 1 and not tiny.is_vl_layer(tiny.depth - 1)
  # Layer decay finds the Multiway by vision_embed beside block{i}.
  tree = unflatten_params(imported.params)
  towers = layer_decay.find_towers(tree)
  assert [(t.prefix, t.kind, t.depth) for t in towers] == [
      (("image_encoder", "multiway"), "multiway", 2)]
  flat = list(flatten_params(tree))
  got = dict(zip(flat, layer_decay.multipliers(tree, 0.5)))
  for name in flat:
    if m := re.match(r"image_encoder/multiway/block(\d+)/", name):
      want = 0.5 ** (2 - int(m[1]))
    elif name.startswith("image_encoder/multiway/vision_embed/"):
      want = 0.5 ** 3
    else:
      want = 1.0
    assert (1.0 if got[name] is None else got[name]) == want, name
