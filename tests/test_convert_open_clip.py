"""open_clip CLIP and EVA-CLIP weights on florax's TwoTower (ViT + text
transformer).

Parity against open_clip's own outputs for a small random CLIP (committed in
tests/fixtures/open_clip/ by tests/fixtures/ref_open_clip.py; regenerated
and compared live when open_clip is installed): image and text embeddings of
real strings tokenized by open_clip's tokenizer, the logit scale and the
first block's output of each tower. Full-size ViT-B-16 / ViT-L-14 /
ViT-B-32 names, shapes and parameter counts (recorded from open_clip); with
open_clip installed, every arch of the table against open_clip's own model
configs. Strict errors, and the image position embedding at another
resolution.

EVA-CLIP (open_clip's CustomTextCLIP with a timm Eva trunk): parity against
a small random open_clip EVA-CLIP built through open_clip's own timm path
(tests/fixtures/eva_clip/ by ref_eva_clip.py; live when open_clip is
installed): embeddings, logit scale, every trunk block, the first text
block, the tower's normed tokens against timm's final-norm output (the trunk
head, bias included, is image_proj as it is: nothing shifted) and rope on a
grid other than its reference grid. Full-size EVA02-B-16 / EVA01-g-14
layouts, the arch table against open_clip's EVA configs, the post-norm
EVA02-E refused by name, other resolutions, and `launch.import_weights` end
to end. TwoTower's `image_proj_bias` option: off, the params of before."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from florax.convert import common
from florax.convert import open_clip as oc
from florax.convert import timm_eva
from florax.data import tokenizer as tok_lib
from florax.export import unflatten_params
from florax.models import two_tower
from tests.fixtures import ref_eva_clip as eva_ref
from tests.fixtures import ref_open_clip as ref
from tests.fixtures import torch_env

ATOL = 1e-4


def _load(fixture_dir, tmp_dir, maker=ref):
  """(state dict, inputs/outputs, meta) of a fixture written by `maker`."""
  state = common.read_checkpoint(maker.gunzip_state(fixture_dir, tmp_dir))
  io = dict(np.load(os.path.join(fixture_dir, maker.IO_FILE)))
  with open(os.path.join(fixture_dir, maker.META_FILE)) as f:
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
        # The image tower's aux output: its final-normed tokens.
        tokens = model.apply({"params": p}, x, method=lambda m, x: (
            m.image_encoder(x, True)[1]["tokens"]))
        return (img, txt, model.apply({"params": p},
                                      method=model.logit_scale),
                si["intermediates"], st["intermediates"], tokens)
      cache[key] = jax.jit(apply)
    img, txt, scale, si, st, tokens = cache[key](
        unflatten_params(params), jnp.asarray(images), jnp.asarray(ids))
    out = {"image_features": np.asarray(img), "text_features": np.asarray(txt),
           "image_tokens": np.asarray(tokens), "scale": float(scale),
           "text_block0": np.asarray(
               st["text_encoder"]["encoder"]["block0"]["out"][0])}
    for name, block in si["image_encoder"]["encoder"].items():
      out[f"image_{name}"] = np.asarray(block["out"][0])
    return out, (config, params, report)

  return run


def _check_parity(run_florax, state, io):
  out, (config, _, report) = run_florax(
      state, ref.images_float(io["images_u8"]), io["ids"])
  assert not report.resized
  assert config["model"]["text"]["eos_id"] == ref.VOCAB_SIZE - 1
  assert config["model"]["image_proj_bias"] is False  # CLIP's proj has none
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
    if arch == ref.ARCH or oc.is_eva(entry):  # EVA: its own test below
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


# -- EVA-CLIP ------------------------------------------------------------------

@pytest.fixture(scope="module")
def eva_fixture(tmp_path_factory):
  return _load(eva_ref.FIXTURE_DIR, str(tmp_path_factory.mktemp("eva")),
               eva_ref)


def _check_eva_parity(run_florax, state, io):
  out, (config, params, report) = run_florax(
      state, eva_ref.images_float(io["images_u8"]), io["ids"],
      arch=eva_ref.ARCH)
  assert not report.resized
  assert config["model"]["image_proj_bias"] is True
  depth = config["model"]["image"]["depth"]
  # image_tokens: the tower's normed tokens against timm's trunk
  # forward_features (its final norm on every token); the head's bias is
  # image_proj/bias, not folded into that norm, so they agree.
  names = ["image_features", "text_features", "text_block0",
           "image_tokens"] + [f"image_block{i}" for i in range(depth)]
  diffs = {n: float(np.abs(out[n] - io[n]).max()) for n in names}
  assert max(diffs.values()) <= ATOL, diffs
  np.testing.assert_allclose(out["image_tokens"][:, 0], io["image_pooled"],
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose(out["scale"], np.exp(io["logit_scale"]),
                             rtol=1e-6)
  # The head and the final norm are copied as they are (fp16 values: exact).
  for src, dst in (("visual.trunk.head.bias", "image_proj/bias"),
                   ("visual.trunk.norm.bias", "image_encoder/norm/bias")):
    np.testing.assert_array_equal(params[dst], state[src], err_msg=dst)
  assert ("visual.trunk.head.bias", "image_proj/bias") in {
      m[:2] for m in report.mapped}
  assert not report.notes and not report.fresh
  # Outputs and the head's bias of a useful size: atol 1e-4 means something
  # (without the bias the image features would be off by far more).
  for name in ("image_features", "text_features", "image_tokens"):
    assert np.abs(io[name]).max() > 0.1, name
  assert np.abs(state["visual.trunk.head.bias"]).max() > 100 * ATOL
  return diffs


def test_eva_clip_parity_with_committed_open_clip_outputs(eva_fixture,
                                                          run_florax):
  state, io, _ = eva_fixture
  _check_eva_parity(run_florax, state, io)


def test_eva_clip_fixture_is_eva02_clip(eva_fixture):
  """The fixture has what EVA02-CLIP-B/16 has, and converts to it: separate
  q/k/v with q/v bias, SwiGLU, sub-LN in attention and MLP, class-token
  pooling with a final norm, the head as projection, rope on a grid other
  than its reference grid; the CLIP text tower with exact GELU."""
  state, _, _ = eva_fixture
  for name in ("visual.trunk.blocks.0.attn.q_proj.weight",
               "visual.trunk.blocks.0.attn.q_proj.bias",
               "visual.trunk.blocks.0.attn.v_proj.bias",
               "visual.trunk.blocks.0.attn.norm.weight",
               "visual.trunk.blocks.0.mlp.fc1_g.weight",
               "visual.trunk.blocks.0.mlp.norm.weight",
               "visual.trunk.norm.weight", "visual.trunk.head.bias",
               "text.token_embedding.weight", "text.text_projection"):
    assert name in state, name
  assert not any("fc_norm" in k or "k_proj.bias" in k for k in state)
  config, _, _ = oc.convert_state_dict(state, eva_ref.ARCH, shapes_only=True)
  img, txt = config["model"]["image"], config["model"]["text"]
  assert (img["sub_ln"], img["act"], img["qkv_bias"], img["pool"]) == (
      True, "swiglu", "qv", "cls")
  assert img["image_size"] // img["patch_size"] == 4
  assert tuple(img["rope_ref_grid"]) == (5, 5)
  assert (txt["act"], txt["eos_id"], txt["pad_id"]) == (
      "gelu", eva_ref.VOCAB_SIZE - 1, None)


def test_eva_clip_florax_tokenizer_gives_open_clip_ids(eva_fixture):
  _, io, meta = eva_fixture
  tok = tok_lib.from_file(eva_ref.MERGES, kind="clip_bpe")
  ids = tok.encode_batch(meta["texts"], io["ids"].shape[1])
  np.testing.assert_array_equal(ids, io["ids"])


def test_eva_clip_parity_live_against_open_clip(tmp_path, run_florax):
  """Regenerates the fixture with the installed open_clip/timm and
  compares; the committed one is what they produce."""
  torch_env.require_open_clip()
  torch_env.require_timm()
  out = eva_ref.make(str(tmp_path / "fixture"), full_size=False)
  state, io, _ = _load(out, str(tmp_path), eva_ref)
  _check_eva_parity(run_florax, state, io)
  _, committed, _ = _load(eva_ref.FIXTURE_DIR, str(tmp_path), eva_ref)
  np.testing.assert_array_equal(io["ids"], committed["ids"])
  for name in ("image_features", "text_features", "image_tokens"):
    np.testing.assert_allclose(io[name], committed[name], atol=1e-5)


@pytest.mark.parametrize("arch", eva_ref.FULL_SIZE_ARCHS)
def test_eva_clip_full_size_names_and_shapes(eva_fixture, arch):
  """Every tensor of a full-size open_clip EVA-CLIP (names and shapes
  recorded from open_clip) is mapped, nothing is left over, and the
  parameter counts agree (the head's bias is image_proj/bias)."""
  layout = eva_fixture[2]["full_size"][arch]
  config, shapes, report = oc.convert_state_dict(
      _shapes(layout["keys"]), arch, shapes_only=True)
  assert not report.dropped and not report.resized and not report.ignored
  model = config["model"]
  embed = model["embed_dim"]
  assert sum(int(np.prod(s)) for s in shapes.values()) == layout[
      "param_count"]
  assert layout["keys"]["visual.trunk.head.bias"] == [embed]
  assert shapes["image_proj/bias"] == (embed,)
  assert model["image_proj_bias"] is True
  assert model["text"]["vocab_size"] == 49408 and model["text"]["act"] == (
      "gelu")
  img = model["image"]
  if arch == "EVA02-B-16":  # a 14x14 grid on timm's 16x16 rope reference
    assert (img["image_size"] // img["patch_size"],
            tuple(img["rope_ref_grid"])) == (14, (16, 16))
    assert img["sub_ln"] is True and img["act"] == "swiglu"
  else:
    assert not img["rope"] and img["act"] == "gelu" and img["pool"] == "cls"


def test_every_eva_arch_matches_open_clip_configs():
  """Each EVA-CLIP entry against open_clip's own model config: the vision
  trunk and its pooling/projection, the text tower; EVA02-E is in open_clip
  and refused here by name."""
  open_clip = torch_env.require_open_clip()
  for arch, entry in oc.EVA_ARCHS.items():
    if arch == eva_ref.ARCH:
      continue
    cfg = open_clip.get_model_config(arch)
    assert cfg is not None, arch
    assert cfg.get("custom_text") is True, arch
    assert cfg["embed_dim"] == entry["embed_dim"], arch
    assert cfg.get("quick_gelu", False) == entry["quick_gelu"], arch
    v = dict(open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]).__dict__)
    t = dict(open_clip.model.CLIPTextCfg(**cfg["text_cfg"]).__dict__)
    for k, want in entry["vision"].items():
      assert v[k] == want, (arch, "vision", k)
    for k, want in entry["text"].items():
      assert t[k] == want, (arch, "text", k)
    assert (t["pool_type"], t["no_causal_mask"], t["proj_bias"],
            t["proj_type"], t["embed_cls"], t["ls_init_value"],
            t["hf_model_name"], v["timm_proj_bias"]) == (
                "argmax", False, False, "linear", False, None, None,
                False), arch
  _check_eva_archs_offline()


def _check_eva_archs_offline():
  trunks = {e["vision"]["timm_model_name"] for e in oc.EVA_ARCHS.values()}
  for arch, entry in oc.EVA_ARCHS.items():
    trunk = entry["vision"]["timm_model_name"]
    if trunk in timm_eva.UNSUPPORTED:
      with pytest.raises(ValueError, match=f"{arch}.*post-norm"):
        oc.arch_entry(arch)
      continue
    # open_clip does not pass its image_size to timm: the trunk's own size.
    assert entry["vision"]["image_size"] == timm_eva.ARCHS[trunk][
        "image_size"], arch
  assert "eva02_enormous_patch14_clip_224" in trunks


def test_eva_clip_routing_and_errors(eva_fixture, fixture):
  """open_clip's EVA names go through florax.convert like its CLIPs; the
  post-norm EVA02-E is refused naming the block it needs; a CLIP checkpoint
  is not an EVA-CLIP one and vice versa; a truncated one names the gap."""
  from florax import convert as florax_convert  # pylint: disable=g-import-not-at-top
  _check_eva_archs_offline()
  state, _, _ = eva_fixture
  assert florax_convert.module_for("open_clip", "EVA02-B-16") is oc
  assert {"EVA02-B-16", "EVA01-g-14", "EVA02-E-14"} <= set(
      florax_convert.known_archs("open_clip"))
  imported = florax_convert.convert("open_clip", state, eva_ref.ARCH)
  assert imported.model["image"]["rope_ref_grid"] == (5, 5)
  assert imported.preprocess["transform"] == "resize_center_crop"
  with pytest.raises(ValueError, match="EVA02-E-14-plus.*post-norm"):
    oc.convert_state_dict(state, "EVA02-E-14-plus")
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(state, ref.ARCH)
  assert "visual.trunk.blocks.0.attn.q_proj.bias" in e.value.unmapped
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(fixture[0], eva_ref.ARCH)
  assert "visual.conv1.weight" in e.value.unmapped
  cut = {k: v for k, v in state.items()
         if not k.startswith(("visual.trunk.blocks.1.attn.", "text.ln_final"))}
  with pytest.raises(common.ConversionError) as e:
    oc.convert_state_dict(cut, eva_ref.ARCH)
  assert "image_encoder/encoder/block1/attn/q_bias" in e.value.missing
  assert "text_encoder/norm/scale" in e.value.missing


def test_eva_clip_at_another_image_size(eva_fixture):
  """At 48 px the trunk's grid goes 4 -> 6: the position embedding is
  interpolated (the class position kept), the rope keeps its 5x5 reference
  as timm does (tests/test_convert_timm_eva.py runs such a model against
  timm), the text tower is untouched."""
  state, _, _ = eva_fixture
  config, params, report = oc.convert_state_dict(state, eva_ref.ARCH,
                                                 image_size=48)
  assert report.resized == [("image_encoder/pos_embed", (1, 17, 32),
                             (37, 32))]
  img = config["model"]["image"]
  assert (img["image_size"], tuple(img["rope_ref_grid"])) == (48, (5, 5))
  np.testing.assert_array_equal(params["image_encoder/pos_embed"][0],
                                state["visual.trunk.pos_embed"][0, 0])
  np.testing.assert_array_equal(params["text_encoder/pos_embed"],
                                state["text.positional_embedding"])


def test_eva_clip_import_weights(eva_fixture, tmp_path, capsys):
  """What `python -m launch.import_weights --source open_clip --arch
  EVA02-test` does after parsing its flags (tests/test_import_weights_cli.py
  runs the command itself for a CLIP): the export it writes, rope reference
  grid included, runs in florax.inference.load, and the unit-norm
  embeddings of the fixture's images and strings (the export's tokenizer)
  equal open_clip's."""
  from florax import convert as florax_convert  # pylint: disable=g-import-not-at-top
  from florax import inference  # pylint: disable=g-import-not-at-top
  from launch import import_weights  # pylint: disable=g-import-not-at-top
  state, io, meta = eva_fixture
  ckpt = eva_ref.gunzip_state(eva_ref.FIXTURE_DIR, str(tmp_path))
  tokenizer = import_weights.load_tokenizer("open_clip", eva_ref.MERGES)
  imported = florax_convert.convert("open_clip", state, eva_ref.ARCH,
                                    eos_id=tokenizer.eos_id)
  out = str(tmp_path / "eva")
  import_weights.write(imported, tokenizer, out, ckpt, [],
                       platforms=("cpu",))
  assert "note:" not in capsys.readouterr().out  # nothing folded or dropped
  # The export keeps the head's bias as image_proj/bias and says so in its
  # config.json, which inference.load builds the TwoTower from.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, export.CONFIG_FILE)) as f:
    assert json.load(f)["model"]["image_proj_bias"] is True
  np.testing.assert_array_equal(
      load_file(os.path.join(out, export.PARAMS_FILE))["image_proj/bias"],
      state["visual.trunk.head.bias"])
  model = inference.load(out)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(
      model.encode_pixels(eva_ref.images_float(io["images_u8"])),
      unit(io["image_features"]), atol=ATOL)
  np.testing.assert_allclose(model.encode_text(meta["texts"]),
                             unit(io["text_features"]), atol=ATOL)
  np.testing.assert_allclose(model.logit_scale, np.exp(io["logit_scale"]),
                             rtol=1e-6)


def test_two_tower_image_proj_bias_option():
  """`model.image_proj_bias`: off (the default, and absent from older
  configs) the TwoTower has exactly the params of before, no image_proj
  bias; on, a zero-initialised ('proj',)-named bias that the projection
  adds; anything but a bool, or a bias without a projection, is refused."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  image, text, embed = oc.arch_config(ref.ARCH)
  cfg = oc.model_config(image, text, embed)
  assert cfg["image_proj_bias"] is False
  del cfg["image_proj_bias"]  # a config written before the option existed

  def init(model_cfg):
    model = two_tower.from_config(ml_collections.ConfigDict(model_cfg))
    s, length = image.image_size, text.max_len
    return model, jax.eval_shape(model.init, jax.random.key(0),
                                 jnp.zeros((1, s, s, 3)),
                                 jnp.zeros((1, length), jnp.int32))["params"]

  _, old = init(cfg)
  assert set(old["image_proj"]) == {"kernel"}
  _, off = init(dict(cfg, image_proj_bias=False))
  assert jax.tree.structure(off) == jax.tree.structure(old)
  model, on = init(dict(cfg, image_proj_bias=True))
  bias = on["image_proj"]["bias"]
  assert isinstance(bias, nn.Partitioned) and bias.names == ("proj",)
  assert bias.value.shape == (embed,)
  # The bias is added: y = x W + b (against numpy).
  rng = np.random.default_rng(0)
  w = rng.standard_normal((image.width, embed)).astype(np.float32)
  b = rng.standard_normal(embed).astype(np.float32)
  x = rng.standard_normal((3, image.width)).astype(np.float32)
  params = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype),
                        nn.unbox(on))  # setup needs every param present
  params["image_proj"] = {"kernel": w, "bias": b}
  y = model.apply({"params": params}, jnp.asarray(x),
                  method=lambda m, x: m.image_proj(x))
  np.testing.assert_allclose(np.asarray(y), x @ w + b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="image_proj_bias"):
    two_tower.from_config(ml_collections.ConfigDict(
        dict(cfg, image_proj_bias="yes")))
  with pytest.raises(ValueError, match="image_proj_bias.*embed_dim"):
    two_tower.from_config(ml_collections.ConfigDict(
        dict(cfg, image_proj_bias=True, embed_dim=0)))
