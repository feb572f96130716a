"""open_clip CLIP weights on florax's TwoTower (ViT + text transformer).

Parity against open_clip's own outputs for a small random CLIP (committed in
tests/fixtures/open_clip/ by tests/fixtures/ref_open_clip.py; regenerated
and compared live when open_clip is installed): image and text embeddings of
real strings tokenized by open_clip's tokenizer, the logit scale and the
first block's output of each tower. Full-size ViT-B-16 / ViT-L-14 /
ViT-B-32 names, shapes and parameter counts (recorded from open_clip); with
open_clip installed, every arch of the table against open_clip's own model
configs. Strict errors, and the image position embedding at another
resolution."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from florax.convert import common
from florax.convert import open_clip as oc
from florax.data import tokenizer as tok_lib
from florax.export import unflatten_params
from florax.models import two_tower
from tests.fixtures import ref_open_clip as ref
from tests.fixtures import torch_env

ATOL = 1e-4


def _load(fixture_dir, tmp_dir):
  state = common.read_checkpoint(ref.gunzip_state(fixture_dir, tmp_dir))
  io = dict(np.load(os.path.join(fixture_dir, ref.IO_FILE)))
  with open(os.path.join(fixture_dir, ref.META_FILE)) as f:
    meta = json.load(f)
  return state, io, meta


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  return _load(ref.FIXTURE_DIR, str(tmp_path_factory.mktemp("oc")))


@pytest.fixture(scope="module")
def run_florax():
  """Converts an open_clip state dict and runs both florax towers:
  ({outputs}, (config, params, report)). Compiled once per model config."""
  cache = {}

  def run(state, images, ids, arch=ref.ARCH, **kwargs):
    config, params, report = oc.convert_state_dict(state, arch, **kwargs)
    key = json.dumps(config["model"], sort_keys=True)
    if key not in cache:
      model = two_tower.from_config(ml_collections.ConfigDict(config["model"]))

      def apply(p, x, t):
        img, si = model.apply({"params": p}, x, method=model.encode_image,
                              mutable=["intermediates"])
        txt, st = model.apply({"params": p}, t, method=model.encode_text,
                              mutable=["intermediates"])
        return (img, txt, model.apply({"params": p},
                                      method=model.logit_scale),
                si["intermediates"], st["intermediates"])
      cache[key] = jax.jit(apply)
    img, txt, scale, si, st = cache[key](
        unflatten_params(params), jnp.asarray(images), jnp.asarray(ids))
    out = {"image_features": np.asarray(img), "text_features": np.asarray(txt),
           "scale": float(scale),
           "image_block0": np.asarray(
               si["image_encoder"]["encoder"]["block0"]["out"][0]),
           "text_block0": np.asarray(
               st["text_encoder"]["encoder"]["block0"]["out"][0])}
    return out, (config, params, report)

  return run


def _check_parity(run_florax, state, io):
  out, (config, _, report) = run_florax(
      state, ref.images_float(io["images_u8"]), io["ids"])
  assert not report.resized
  assert config["model"]["text"]["eos_id"] == ref.VOCAB_SIZE - 1
  for name in ("image_features", "text_features", "image_block0",
               "text_block0"):
    np.testing.assert_allclose(out[name], io[name], rtol=0, atol=ATOL,
                               err_msg=name)
  np.testing.assert_allclose(out["scale"], np.exp(io["logit_scale"]),
                             rtol=1e-6)
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  for name in ("image_features", "text_features"):
    assert np.abs(io[name]).max() > 0.1, name


def test_parity_with_committed_open_clip_outputs(fixture, run_florax):
  state, io, _ = fixture
  assert "logit_scale" in state and state["logit_scale"].shape == ()
  _check_parity(run_florax, state, io)


def test_florax_tokenizer_gives_open_clip_ids(fixture):
  """The ids the parity test feeds are the ones florax's own CLIP tokenizer
  gives the fixture's strings (what `launch.import_weights` exports)."""
  _, io, meta = fixture
  tok = tok_lib.from_file(os.path.join(ref.FIXTURE_DIR, ref.MERGES_FILE),
                          kind="clip_bpe")
  assert tok.vocab_size == ref.VOCAB_SIZE
  assert tok.eos_id == ref.VOCAB_SIZE - 1
  ids = tok.encode_batch(meta["texts"], io["ids"].shape[1])
  np.testing.assert_array_equal(ids, io["ids"])
  assert (io["ids"][-1] != 0).all()  # the long text fills the context


def test_parity_live_against_open_clip(tmp_path, run_florax):
  """Regenerates the fixture with the installed open_clip and compares;
  the committed one is what this open_clip produces."""
  torch_env.require_open_clip()
  out = ref.make(str(tmp_path / "fixture"), full_size=False)
  state, io, _ = _load(out, str(tmp_path))
  _check_parity(run_florax, state, io)
  _, committed, _ = _load(ref.FIXTURE_DIR, str(tmp_path))
  np.testing.assert_array_equal(io["ids"], committed["ids"])
  np.testing.assert_allclose(io["text_features"],
                             committed["text_features"], atol=1e-5)


def _shapes(keys):
  return {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
          for k, s in keys.items()}


@pytest.mark.parametrize("arch", ref.FULL_SIZE_ARCHS)
def test_full_size_names_and_shapes(fixture, arch):
  """Every tensor of a full-size open_clip model (names and shapes recorded
  from open_clip) has its florax param and nothing is left over; the
  parameter counts agree."""
  layout = fixture[2]["full_size"][arch]
  config, shapes, report = oc.convert_state_dict(
      _shapes(layout["keys"]), arch, shapes_only=True)
  assert len(report.mapped) == len(layout["keys"])
  assert not report.dropped and not report.resized
  model = config["model"]
  assert model["text"]["eos_id"] == 49407 and model["text"]["pad_id"] is None
  assert model["text"]["vocab_size"] == 49408
  assert model["text"]["max_len"] == 77
  width = model["image"]["width"]
  assert shapes["image_proj/kernel"] == (width, model["embed_dim"])
  assert shapes["logit_scale"] == ()
  assert sum(int(np.prod(s)) for s in shapes.values()) == layout[
      "param_count"]
  if arch == "ViT-B-16":  # 224 -> 384 px: the image grid 14 -> 24 a side
    _, shapes, report = oc.convert_state_dict(
        _shapes(layout["keys"]), arch, image_size=384, shapes_only=True)
    assert report.resized == [("image_encoder/pos_embed", (197, 768),
                               (577, 768))]
    assert shapes["text_encoder/pos_embed"] == (77, 512)


def test_every_arch_matches_open_clip_configs():
  """Each table entry against open_clip's own model config (the JSON files
  it ships), and its full state dict layout (built on the meta device)."""
  open_clip = torch_env.require_open_clip()
  import torch  # pylint: disable=g-import-not-at-top
  for arch, entry in oc.ARCHS.items():
    if arch == ref.ARCH:
      continue
    cfg = open_clip.get_model_config(arch)
    assert cfg is not None, arch
    assert cfg["embed_dim"] == entry["embed_dim"], arch
    assert cfg.get("quick_gelu", False) == entry["quick_gelu"], arch
    v = dict(open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]).__dict__)
    t = dict(open_clip.model.CLIPTextCfg(**cfg["text_cfg"]).__dict__)
    for k, want in entry["vision"].items():
      assert v[k] == want, (arch, "vision", k)
    for k, want in entry["text"].items():
      assert t[k] == want, (arch, "text", k)
    # Defaults florax assumes (no layer scale, class-token pooling, ...).
    assert (v["ls_init_value"], v["pool_type"], v["no_ln_pre"],
            v["attentional_pool"], v["final_ln_after_pool"],
            v["pos_embed_type"]) == (None, "tok", False, False, False,
                                     "learnable"), arch
    assert (t["pool_type"], t["no_causal_mask"], t["proj_bias"],
            t["embed_cls"]) == ("argmax", False, False, False), arch
  for arch in ("ViT-B-32-quickgelu", "ViT-H-14"):  # two layouts, cheaply
    with torch.device("meta"):
      model = open_clip.CLIP(**open_clip.get_model_config(arch))
    _, _, report = oc.convert_state_dict(
        {k: jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32)
         for k, x in model.state_dict().items()}, arch, shapes_only=True)
    assert len(report.mapped) == len(model.state_dict()), arch


def test_truncated_state_dict_names_the_missing_params(fixture):
  state, _, _ = fixture
  cut = {k: v for k, v in state.items()
         if not k.startswith(("transformer.resblocks.1.", "ln_final"))}
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(cut, ref.ARCH)
  assert "text_encoder/norm/scale" in e.value.missing
  assert "text_encoder/encoder/block1/attn/qkv/kernel" in e.value.missing
  assert len(e.value.missing) == 12 + 2
  assert not e.value.unmapped and not e.value.mismatched
  assert "text_encoder/encoder/block1/mlp/fc2/kernel" in str(e.value)


def test_wrong_arch_names_the_shapes_at_fault(fixture):
  state, _, _ = fixture
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(state, "ViT-B-32")
  bad = {m[1]: (m[2], m[3]) for m in e.value.mismatched}
  assert bad["visual.conv1.weight"] == ((64, 3, 8, 8), (768, 3, 32, 32))
  assert bad["token_embedding.weight"] == ((1615, 64), (49408, 512))
  assert "image_encoder/encoder/block11/norm1/scale" in e.value.missing


def test_checkpoint_of_another_architecture(fixture):
  """A timm ViT's state dict offered as a CLIP."""
  state = common.read_checkpoint(os.path.join(
      os.path.dirname(ref.FIXTURE_DIR), "timm_vit", "vit_test.safetensors"))
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(state, ref.ARCH)
  assert "blocks.0.attn.qkv.weight" in e.value.unmapped
  assert "text_encoder/token_embed/embedding" in e.value.missing


def test_unknown_arch():
  with pytest.raises(ValueError, match="-quickgelu"):
    oc.arch_config("ViT-B-16-openai")


def test_image_position_embedding_resized_text_not(fixture, run_florax):
  """At 48 px the image grid goes 4 -> 6 (the class position kept exactly)
  and the model runs; at the checkpoint's size the copy is exact."""
  state, io, _ = fixture
  _, params, report = oc.convert_state_dict(state, ref.ARCH)
  assert not report.resized
  np.testing.assert_array_equal(params["image_encoder/pos_embed"],
                                state["visual.positional_embedding"])
  images = np.random.default_rng(3).integers(0, 256, (2, 48, 48, 3),
                                             dtype=np.uint8)
  out, (config, params, report) = run_florax(
      state, ref.images_float(images), io["ids"], image_size=48)
  assert config["image_size"] == 48
  assert report.resized == [("image_encoder/pos_embed", (17, 64), (37, 64))]
  np.testing.assert_array_equal(params["image_encoder/pos_embed"][0],
                                state["visual.positional_embedding"][0])
  assert np.isfinite(out["image_features"]).all()
  # The text tower is untouched by the image size.
  np.testing.assert_allclose(out["text_features"], io["text_features"],
                             atol=ATOL)
