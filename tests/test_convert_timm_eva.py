"""timm EVA / EVA-02 (timm.models.eva.Eva) weights on florax's ViT.

Parity against timm's own outputs for small random models (committed in
tests/fixtures/timm_eva/ by tests/fixtures/ref_timm_eva.py and in
tests/fixtures/timm_eva_rope/ by ref_timm_eva_rope.py; regenerated and
compared live when timm is installed): EVA-01 style (q/v bias, layer scale,
avg pool + fc_norm), EVA-02 style (2-D rope, SwiGLU, MLP-only sub-LN), and
EVA-02 on a 6x6 grid with a 4x4 rope reference grid (timm's
ref_feat_shape, as the 448 px fine-tunes: florax's rope_ref_grid); pooled
features, logits and every block's output, fp32, atol 1e-4. Live only: the
packed SwiGLU / separate q,k,v layouts, an `image_size` override of a rope
arch against timm built at that size, and every arch of the table against
timm's model. Without torch: full-size names and shapes (recorded from
timm), the rope option's identities, and clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax import convert as florax_convert
from florax.convert import common, timm_eva
from florax.export import unflatten_params
from florax.models import transformer, vit
from tests.fixtures import ref_timm_eva as ref
from tests.fixtures import ref_timm_eva_rope as ref_rope
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

  def run(state, images, arch, image_overrides=None, **kwargs):
    config, params, _ = timm_eva.convert_state_dict(state, arch, **kwargs)
    cfg = vit.ViTConfig(**dict(config["image"], **(image_overrides or {})))
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


def _check_parity(run_florax, state, io, arch, **kwargs):
  pooled, logits, blocks, config = run_florax(
      state, ref.images_float(io["images_u8"]), arch, **kwargs)
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


# Live, two archs are also converted shape by shape (florax's eval_shape of
# a full-size model costs a second): a fine-tune at 336 px and an EVA-CLIP
# trunk. The other layouts are converted from committed full-size names by
# test_full_size_names_and_shapes here (eva02_tiny/base) and in
# tests/test_convert_open_clip.py (the EVA01-g / EVA02-B-16 trunks); every
# entry is compared with timm field by field.
_LAYOUTS = ("eva02_small_patch14_336", "eva02_base_patch16_clip_224")


def _timm_fields(model, torch):
  """florax ViTConfig fields read off a timm Eva."""
  blk = model.blocks[0]
  glu = hasattr(blk.mlp, "fc1_g") or type(blk.mlp).__name__ == "GluMlp"
  identity = torch.nn.Identity
  mlp_ln = not isinstance(getattr(blk.mlp, "norm", identity()), identity)
  attn_ln = not isinstance(blk.attn.norm, identity)
  # Fused qkv: q_bias; separate projections: q_proj.bias.
  q_bias = blk.attn.q_bias if blk.attn.q_bias is not None else getattr(
      getattr(blk.attn, "q_proj", None), "bias", None)
  return dict(
      image_size=model.patch_embed.img_size[0],
      patch_size=model.patch_embed.patch_size[0], width=model.embed_dim,
      depth=len(model.blocks), num_heads=blk.attn.num_heads,
      mlp_dim=blk.mlp.fc2.in_features, act="swiglu" if glu else "gelu",
      qkv_bias="qv" if q_bias is not None else "none",
      layer_scale=blk.gamma_1 is not None, norm_eps=blk.norm1.eps,
      sub_ln={(False, False): False, (True, True): True,
              (True, False): "attn", (False, True): "mlp"}[attn_ln, mlp_ln],
      rope=model.rope is not None,
      rope_ref_grid=None if model.rope is None
      else tuple(model.rope.ref_feat_shape),
      pool={"token": "cls", "avg": "mean"}[model.global_pool],
      fc_norm=not isinstance(model.fc_norm, torch.nn.Identity))


def test_every_arch_matches_timm(monkeypatch):
  """Each table entry against timm's own model (meta device): every field
  (incl. settings shapes do not show: eps, pooling, rope reference, sub-LN
  places, eval transform), and for one arch per layout the names and
  shapes through the converter."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  # Shapes only: timm's weight init on the meta device is most of the time.
  monkeypatch.setattr(timm.models.eva.Eva, "init_weights",
                      lambda self, needs_reset=True: None)
  for arch in _timm_eva_archs():
    with torch.device("meta"):
      model = timm.create_model(arch, pretrained=False)
    fields = timm_eva.arch_fields(arch)
    want = _timm_fields(model, torch)
    got = {k: fields.get(k) for k in want}
    got["layer_scale"] = got["layer_scale"] is not None
    got["norm_eps"] = pytest.approx(got["norm_eps"])
    assert want == got, arch
    cfg = model.pretrained_cfg
    ev = timm_eva.eval_transform(arch)
    assert tuple(cfg["mean"]) == pytest.approx(ev["mean"], abs=1e-6), arch
    assert cfg["crop_pct"] == pytest.approx(ev["crop_pct"]), arch
    if arch in _LAYOUTS:
      state = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32)
               for k, v in model.state_dict().items()}
      config, shapes, _ = timm_eva.convert_state_dict(state, arch,
                                                      shapes_only=True)
      assert sum(int(np.prod(s)) for s in shapes.values()) == sum(
          p.numel() for p in model.parameters()), arch
      assert config["num_classes"] == (model.num_classes or None), arch
  # The one timm EVA florax refuses is refused for what it is.
  with torch.device("meta"):
    model = timm.create_model("eva02_enormous_patch14_clip_224")
  assert type(model.blocks[0]).__name__ == "EvaBlockPostNorm"
  assert set(timm_eva.UNSUPPORTED) == {"eva02_enormous_patch14_clip_224"}


def test_routing_and_errors(fixture):
  states, _, _ = fixture
  assert florax_convert.module_for("timm", "eva02_base_patch14_224") is (
      timm_eva)
  assert "eva02_test" in florax_convert.known_archs("timm")
  with pytest.raises(ValueError, match="unknown timm EVA arch"):
    timm_eva.convert_state_dict(states["eva_test"], "eva_nonesuch")
  # EVA02-E's post-norm blocks are named, not half-imported.
  assert florax_convert.module_for(
      "timm", "eva02_enormous_patch14_clip_224") is timm_eva
  with pytest.raises(ValueError, match="post-norm"):
    timm_eva.convert_state_dict(states["eva02_test"],
                                "eva02_enormous_patch14_clip_224")
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


# -- rope on a grid other than its reference grid ------------------------------

@pytest.fixture(scope="module")
def rope_fixture():
  state = common.read_checkpoint(os.path.join(ref_rope.FIXTURE_DIR,
                                              ref_rope.STATE_FILE))
  io = dict(np.load(os.path.join(ref_rope.FIXTURE_DIR, ref_rope.IO_FILE)))
  return state, {f"{ref_rope.ARCH}/{k}": v for k, v in io.items()} | {
      "images_u8": io["images_u8"]}


def test_rope_on_another_grid_matches_timm(rope_fixture, run_florax):
  """timm's EVA-02 on a 6x6 grid with ref_feat_shape 4x4 (committed
  outputs): florax with rope_ref_grid=(4, 4) matches; the native-grid rope
  does not (so the fixture does test the rescale)."""
  state, io = rope_fixture
  diffs = _check_parity(run_florax, state, io, ref_rope.ARCH)
  assert max(diffs.values()) <= ATOL
  config, _, _ = timm_eva.convert_state_dict(state, ref_rope.ARCH)
  img = config["image"]
  assert img["image_size"] // img["patch_size"] == 6
  assert tuple(img["rope_ref_grid"]) == (4, 4)
  pooled, _, _, _ = run_florax(state, ref.images_float(io["images_u8"]),
                               ref_rope.ARCH,
                               image_overrides={"rope_ref_grid": None})
  assert np.abs(pooled - io[f"{ref_rope.ARCH}/pooled"]).max() > 100 * ATOL


def test_rope_on_another_grid_live(tmp_path, run_florax):
  """Regenerates the rope fixture with the installed timm and compares;
  the committed outputs are what this timm produces."""
  torch_env.require_timm()
  out = ref_rope.make(str(tmp_path))
  state = common.read_checkpoint(os.path.join(out, ref_rope.STATE_FILE))
  io = dict(np.load(os.path.join(out, ref_rope.IO_FILE)))
  io = {f"{ref_rope.ARCH}/{k}": v for k, v in io.items()} | {
      "images_u8": io["images_u8"]}
  _check_parity(run_florax, state, io, ref_rope.ARCH)
  committed = np.load(os.path.join(ref_rope.FIXTURE_DIR, ref_rope.IO_FILE))
  np.testing.assert_allclose(io[f"{ref_rope.ARCH}/logits"],
                             committed["logits"], atol=1e-5)


def test_rope_arch_at_another_image_size(fixture):
  """--image_size on an EVA-02 arch: the grid changes, the rope reference
  stays the pretrained grid (as timm keeps ref_feat_shape), the position
  embedding is interpolated."""
  states, _, _ = fixture
  config, params, report = timm_eva.convert_state_dict(
      states["eva02_test"], "eva02_test", image_size=48)
  img = config["image"]
  assert (img["image_size"], tuple(img["rope_ref_grid"])) == (48, (4, 4))
  assert report.resized == [("image_encoder/pos_embed", (1, 17, 64),
                             (37, 64))]
  assert params["image_encoder/pos_embed"].shape == (37, 64)


def test_rope_arch_at_another_image_size_matches_timm_live(fixture,
                                                           run_florax):
  """timm's Eva built at 48 px on the same 4x4 reference, with the
  interpolated position embedding florax made (the rope and the rest are
  what is compared), gives florax's outputs."""
  timm = torch_env.require_timm()
  import torch  # pylint: disable=g-import-not-at-top
  del timm
  from timm.models.eva import Eva  # pylint: disable=g-import-not-at-top
  states, _, _ = fixture
  state = states["eva02_test"]
  _, params, _ = timm_eva.convert_state_dict(state, "eva02_test",
                                             image_size=48)
  model = Eva(**dict(ref.MODEL_KWARGS["eva02_test"], img_size=48)).eval()
  sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  sd["pos_embed"] = torch.from_numpy(params["image_encoder/pos_embed"][None])
  model.load_state_dict(sd)
  assert tuple(model.rope.ref_feat_shape) == (4, 4)
  images = np.random.default_rng(5).integers(0, 256, (2, 48, 48, 3),
                                             dtype=np.uint8)
  io = {f"eva02_test/{k}": v for k, v in ref.reference_outputs(
      model, images, torch).items()}
  io["images_u8"] = images
  _check_parity(run_florax, state, io, "eva02_test", image_size=48)


def test_rope_ref_grid_option():
  """At its own grid (or unset) the reference changes nothing, bit for bit;
  elsewhere row i sits at i * ref / h (timm's EVA scheme), so a token's
  angles equal those of the native rope at that fractional position; and
  mistakes are named."""
  plain = transformer.rope_2d((6, 6), 16, 1)
  same = transformer.rope_2d((6, 6), 16, 1, ref_grid=(6, 6))
  for a, b in zip(plain, same):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  sin, cos = transformer.rope_2d((6, 4), 16, 1, ref_grid=(3, 8))
  # Token (row 2, col 3) of the 6x4 grid sits at (1.0, 6.0) on the 3x8
  # reference: the angles of the native rope at row 1 of a grid and the
  # column-6 half of another.
  tok = 1 + 2 * 4 + 3
  native_row = transformer.rope_2d((2, 1), 16)   # token 1: row 1, col 0
  native_col = transformer.rope_2d((1, 7), 16)   # token 6: row 0, col 6
  np.testing.assert_allclose(sin[tok, :8], native_row[0][1, :8], atol=1e-7)
  np.testing.assert_allclose(sin[tok, 8:], native_col[0][6, 8:], atol=1e-7)
  np.testing.assert_allclose(cos[tok, 8:], native_col[1][6, 8:], atol=1e-7)
  assert not sin[0].any() and (cos[0] == 1).all()  # the class token
  layout = transformer.TokenLayout(1, (4, 4))
  with pytest.raises(ValueError, match="rope_ref_grid.*rope is off"):
    transformer.validate(transformer.EncoderConfig(
        16, 1, 2, 8, rope_ref_grid=(4, 4)), layout)
  with pytest.raises(ValueError, match="two positive ints"):
    transformer.validate(transformer.EncoderConfig(
        16, 1, 2, 8, rope=True, rope_ref_grid=(4, 0)), layout)
  with pytest.raises(ValueError, match="two positive ints"):
    vit.validate(vit.ViTConfig(image_size=32, patch_size=8, width=16,
                               depth=1, num_heads=2, mlp_dim=8, rope=True,
                               rope_ref_grid=(4,)))
