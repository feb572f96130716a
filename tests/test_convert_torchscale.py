"""torchscale BEiT3 weights on florax's Multiway model
(florax.convert.torchscale_beit3).

Parity against torchscale's own outputs for a small random BEiT3 (committed
in tests/fixtures/torchscale_beit3/ by its reference.py; regenerated and
compared live when torchscale is installed): image-only, image with masked
patches, text-only with padding, and image+text; every output token, fp32,
atol 1e-4. Without torch: the fixture's distinct A/B attention copies (so
the per-modality attention is what is tested), full-size names and shapes
(recorded from torchscale's base model), clear errors, and the import
directory of `python -m launch.import_weights --source torchscale`."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import common
from florax.convert import torchscale_beit3 as ts
from florax.export import unflatten_params
from florax.models import multiway
from tests.fixtures.torchscale_beit3 import reference as ref

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
  """Converts a state dict and runs florax's Multiway on the fixture's four
  input kinds: {kind: tokens}. One compile per config."""
  cache = {}

  def run(state, io, arch=ref.ARCH):
    config, params, _ = ts.convert_state_dict(state, arch)
    cfg = multiway.MultiwayConfig(**config["multiway"])
    if cfg not in cache:
      model = multiway.Multiway(cfg)

      def apply(p, images, text, patch_mask):
        call = lambda **kw: model.apply({"params": p}, **kw)[0]
        return {"image": call(images=images),
                "image_masked": call(images=images, image_mask=patch_mask),
                "text": call(text=text),
                "pair": call(images=images, text=text)}
      cache[cfg] = jax.jit(apply)
    out = cache[cfg](unflatten_params(params), jnp.asarray(io["images"]),
                     jnp.asarray(io["text"]), jnp.asarray(io["patch_mask"]))
    return {k: np.asarray(v) for k, v in out.items()}, config

  return run


def _diffs(got, io):
  return {k: float(np.abs(got[k] - io[f"out/{k}"]).max()) for k in ref.KINDS}


@pytest.fixture(scope="module")
def committed_diffs(fixture, run_florax):
  state, io, _ = fixture
  got, _ = run_florax(state, io)
  return _diffs(got, io)


@pytest.mark.parametrize("kind", ref.KINDS)
def test_parity_with_committed_torchscale_outputs(fixture, committed_diffs,
                                                  kind):
  _, io, _ = fixture
  assert committed_diffs[kind] <= ATOL, committed_diffs
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  assert np.abs(io[f"out/{kind}"]).max() > 1


def test_fixture_exercises_what_differs_from_a_plain_encoder(fixture):
  """Distinct A/B attention copies (florax's multiway_attention), unilm's
  'beit3.' prefix, a padded text row, masked patches that change the
  output, and a pair whose tokens differ from each modality alone."""
  state, io, meta = fixture
  assert all(k.startswith("beit3.") for k in state)
  assert all(v.dtype == np.float32 for v in state.values())
  a = state["beit3.encoder.layers.0.self_attn.q_proj.A.weight"]
  b = state["beit3.encoder.layers.0.self_attn.q_proj.B.weight"]
  assert np.abs(a - b).max() > 0.1
  assert (io["text"] == meta["pad_id"]).any(axis=1).tolist() == [False, True]
  assert np.abs(io["out/image"] - io["out/image_masked"]).max() > 0.1
  n_img = io["out/image"].shape[1]
  assert np.abs(io["out/pair"][:, :n_img] - io["out/image"]).max() > 0.1
  assert np.abs(io["out/pair"][:, n_img:] - io["out/text"]).max() > 0.1


def test_parity_live_against_torchscale(tmp_path, run_florax):
  """Regenerates the fixture with the installed torchscale, compares again,
  and checks the committed outputs are what this torchscale produces."""
  if ref.import_torchscale() is None:
    pytest.skip("torch/timm/torchscale not installed (optional extras)")
  out = ref.make(str(tmp_path), full_size=False)
  state, io, _ = _load(out)
  got, _ = run_florax(state, io)
  diffs = _diffs(got, io)
  assert max(diffs.values()) <= ATOL, diffs
  _, committed, _ = _load()
  for kind in ref.KINDS:
    np.testing.assert_allclose(io[f"out/{kind}"], committed[f"out/{kind}"],
                               atol=1e-5)


def test_full_size_base_names_and_shapes(fixture):
  """torchscale's BEiT3 base (names and shapes recorded from torchscale):
  the arch's fields, and for its first two layers (tracing all twelve
  takes seconds; the layers share one set of rules) every tensor has its
  florax param, nothing is left over, and florax's count is torchscale's
  less the two offset rows of both position tables."""
  layout = fixture[2]["full_size"]["base"]
  keys = layout["keys"]
  assert max(int(k.split(".")[2]) for k in keys
             if k.startswith("encoder.layers.")) == 11
  state = {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
           for k, s in keys.items()}
  cfg = ts.arch_config("base", state_dict=state)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.image_size,
          cfg.patch_size, cfg.vocab_size, cfg.max_text_len) == (
              768, 12, 12, 3072, 224, 16, 64010, 1022)
  assert cfg.multiway_attention and cfg.num_vl_layers == 0
  two = {k: v for k, v in state.items()
         if not k.startswith("encoder.layers.")
         or int(k.split(".")[2]) < 2}
  shapes, report = common.convert(
      ts.canonical(two, shapes_only=True), ts.rules(),
      ts.target_shapes(dataclasses.replace(cfg, depth=2)), shapes_only=True)
  assert not report.dropped and not report.resized and not report.ignored
  count = sum(int(np.prod(s)) for s in shapes.values())
  assert count == sum(int(np.prod(s.shape)) for s in two.values()) - (
      2 * 2 * 768)
  # Twelve layers of the same: the recorded total agrees.
  per_layer = sum(int(np.prod(s)) for k, s in keys.items()
                  if k.startswith("encoder.layers.0."))
  assert layout["param_count"] == sum(
      int(np.prod(s.shape)) for s in two.values()) + 10 * per_layer


def test_image_size_from_checkpoint_and_override(fixture):
  state, _, _ = fixture
  assert ts.checkpoint_image_size(ts.strip_prefix(state), 8) == 32
  config, params, report = ts.convert_state_dict(state, ref.ARCH,
                                                 image_size=48)
  assert config["image_size"] == 48
  assert report.resized == [("vision_embed/pos_embed", (19, 64), (37, 64))]
  assert params["vision_embed/pos_embed"].shape == (37, 64)
  # The class token's row is kept as is.
  np.testing.assert_array_equal(
      params["vision_embed/pos_embed"][0],
      state["beit3.encoder.embed_positions.A.weight"][2])
  # A unilm name carries its resolution; the patch size must be BEiT-3's.
  assert ts.arch_fields("beit3_large_patch16_384")["image_size"] == 384
  with pytest.raises(ValueError, match="patch size 16"):
    ts.arch_fields("beit3_base_patch14_224")


def test_checkpoint_without_final_norm_converts_without_it(fixture):
  """unilm's classification/VQA checkpoints have no encoder.layer_norm (built
  with normalize_output=False): the converted model has no norm_v/norm_l and
  every other tensor is the one the full checkpoint gives."""
  state, _, _ = fixture
  cut = {k: v for k, v in state.items()
         if not k.startswith("beit3.encoder.layer_norm.")}
  assert len(cut) == len(state) - 4  # A/B x weight/bias
  config, params, _ = ts.convert_state_dict(cut, ref.ARCH)
  assert config["multiway"]["normalize_output"] is False
  full_config, full, _ = ts.convert_state_dict(state, ref.ARCH)
  assert full_config["multiway"]["normalize_output"] is True
  assert set(full) - set(params) == {"norm_v/scale", "norm_v/bias",
                                     "norm_l/scale", "norm_l/bias"}
  for k, v in params.items():
    np.testing.assert_array_equal(v, full[k])


def test_errors_name_the_tensors(fixture):
  state, _, _ = fixture
  with pytest.raises(ValueError, match="unknown torchscale BEiT3 arch"):
    ts.convert_state_dict(state, "huge")
  cut = {k: v for k, v in state.items()
         if k != "beit3.encoder.layers.1.ffn.B.fc2.weight"}
  with pytest.raises(common.ConversionError) as e:
    ts.convert_state_dict(cut, ref.ARCH)
  assert e.value.missing == ["block1/mlp_l/fc2/kernel"]
  # Without one of q/k/v the other two are listed, and the fused kernel.
  cut = {k: v for k, v in state.items()
         if k != "beit3.encoder.layers.0.self_attn.k_proj.A.weight"}
  with pytest.raises(common.ConversionError) as e:
    ts.convert_state_dict(cut, ref.ARCH)
  assert set(e.value.unmapped) == {
      "encoder.layers.0.self_attn.q_proj.A.weight",
      "encoder.layers.0.self_attn.v_proj.A.weight"}
  assert e.value.missing == ["block0/attn/qkv_v/kernel"]
  # A fine-tuning head is named unless dropped.
  headed = dict(state, **{"head.weight": np.zeros((3, 64), np.float32)})
  with pytest.raises(common.ConversionError, match="head.weight"):
    ts.convert_state_dict(headed, ref.ARCH)
  _, _, report = ts.convert_state_dict(headed, ref.ARCH,
                                       allow_missing=["head.*"])
  assert report.dropped == ["head.weight"]
  # A tensor of another shape is named with the shape expected.
  name = "beit3.encoder.layers.0.ffn.A.fc1.weight"
  wrong = dict(state, **{name: state[name][:96]})
  with pytest.raises(common.ConversionError) as e:
    ts.convert_state_dict(wrong, ref.ARCH)
  assert e.value.mismatched == [("block0/mlp_v/fc1/kernel", name[6:],
                                 (96, 64), (128, 64), "linear")]


def test_import_directory(fixture, tmp_path):
  """launch.import_weights' torchscale path: the export's params file
  (what init_from reads) holds the converted params; config and manifest
  describe the Multiway model; a wrong arch writes nothing."""
  from launch import import_weights  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state, _, _ = fixture
  ckpt = os.path.join(ref.FIXTURE_DIR, ref.STATE_FILE)
  out = tmp_path / "beit3"
  manifest = import_weights.import_torchscale(ref.ARCH, ckpt, str(out))
  _, want, _ = ts.convert_state_dict(state, ref.ARCH)
  got = load_file(str(out / "params.safetensors"))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["model"]["arch"] == "multiway"
  assert config["model"]["multiway"]["pad_id"] == 1
  assert manifest["source"]["source"] == "torchscale"
  assert manifest["num_params"] == sum(v.size for v in want.values())
  assert os.path.exists(out / "manifest.json")
  # A checkpoint that does not fit: one line naming it, nothing written.
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cut = str(tmp_path / "cut.safetensors")
  save_file({k: v for k, v in state.items() if ".layers.1." not in k}, cut)
  bad = tmp_path / "bad"
  with pytest.raises(ValueError, match=r"does not fit torchscale arch test "
                     r"\(.*\): 32 florax params missing"):
    import_weights.import_torchscale(ref.ARCH, cut, str(bad))
  assert not bad.exists()
