"""florax.convert.common: checkpoint reading, the rule table, layouts,
strict errors and resolution-dependent resizing.

Layouts are checked by what they must preserve (a torch Linear / Conv2d
computes the same function with the converted kernel, computed naively in
numpy), not against their own code."""

import json
import struct
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import common
from florax.models import coswin, windows
from tests.fixtures import torch_env

RNG = np.random.default_rng(0)


def _randn(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _write_safetensors(path, tensors):
  """A .safetensors file written from the format spec (8-byte little-endian
  header length, JSON header, raw little-endian data), independent of the
  library the reader uses. tensors: {name: (dtype tag, shape, bytes)}."""
  header, blobs, offset = {}, [], 0
  for name, (dtype, shape, data) in tensors.items():
    header[name] = {"dtype": dtype, "shape": list(shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# -- reading ------------------------------------------------------------------

def test_read_safetensors_dtypes(tmp_path):
  a32 = _randn(2, 3)
  a16 = _randn(4).astype(np.float16)
  bf16_bits = np.array([0x3F80, 0xC040, 0x3EAA], np.uint16)  # 1, -3, ~0.332
  idx = np.array([[0, 1], [2, 3]], np.int64)
  path = tmp_path / "w.safetensors"
  _write_safetensors(path, {
      "a32": ("F32", a32.shape, a32.tobytes()),
      "a16": ("F16", a16.shape, a16.tobytes()),
      "bf": ("BF16", (3,), bf16_bits.tobytes()),
      "idx": ("I64", idx.shape, idx.tobytes())})
  out = common.read_checkpoint(str(path))
  assert set(out) == {"a32", "a16", "bf", "idx"}
  np.testing.assert_array_equal(out["a32"], a32)
  assert out["a16"].dtype == np.float32
  np.testing.assert_array_equal(out["a16"], a16.astype(np.float32))
  # bf16 is the top half of a float32's bits.
  expected_bf = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
  np.testing.assert_array_equal(out["bf"], expected_bf)
  assert out["bf"][0] == 1.0 and out["bf"][1] == -3.0
  assert out["idx"].dtype == np.int64
  np.testing.assert_array_equal(out["idx"], idx)


def test_truncated_safetensors_names_the_file(tmp_path):
  a = _randn(64, 64)
  path = tmp_path / "model.safetensors"
  _write_safetensors(path, {"a": ("F32", a.shape, a.tobytes())})
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(common.CheckpointReadError,
                     match="model.safetensors.*truncated or corrupt"):
    common.read_checkpoint(str(path))
  path.write_bytes(b"\x00garbage")
  with pytest.raises(common.CheckpointReadError, match="model.safetensors"):
    common.read_checkpoint(str(path))


def test_missing_and_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    common.read_checkpoint(str(tmp_path / "nope.safetensors"))
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(common.CheckpointReadError, match="unknown file type"):
    common.read_checkpoint(str(tmp_path / "w.npz"))


def test_torch_pickle_without_torch_says_what_to_do(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read anyway")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
  with pytest.raises(common.CheckpointReadError) as e:
    common.read_checkpoint(str(path))
  msg = str(e.value)
  assert "model.pth" in msg and "pip install -e .[torch]" in msg
  assert "safetensors" in msg


def test_unwrap_state_dict():
  w = _randn(3)
  assert set(common.unwrap_state_dict(
      {"state_dict": {"module.a.weight": w, "module.b": w}, "epoch": 3})) == {
          "a.weight", "b"}
  assert set(common.unwrap_state_dict({"model": {"x": w}, "args": {}})) == {
      "x"}
  assert set(common.unwrap_state_dict({"_orig_mod.x": w})) == {"x"}
  # A prefix that only some names carry is part of the names.
  assert set(common.unwrap_state_dict({"module.x": w, "y": w})) == {
      "module.x", "y"}


def test_read_torch_pickle_live(tmp_path):
  torch = pytest.importorskip("torch")
  w = torch.randn(4, 3)
  bf = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
  path = tmp_path / "ckpt.pth"
  torch.save({"state_dict": {"module.fc.weight": w, "module.bf": bf},
              "epoch": 7}, path)
  out = common.read_checkpoint(str(path))
  assert set(out) == {"fc.weight", "bf"}
  np.testing.assert_array_equal(out["fc.weight"], w.numpy())
  np.testing.assert_array_equal(out["bf"], np.array([1.5, -2.0], np.float32))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(common.CheckpointReadError, match="ckpt.pth"):
    common.read_checkpoint(str(path))


# -- layouts ------------------------------------------------------------------

def test_linear_layouts_compute_what_torch_computes():
  d, h, hd = 6, 2, 3
  x = _randn(d)
  # Fused qkv: torch y = W x, split as (3, heads, head_dim).
  w = _randn(3 * h * hd, d)
  kernel, resized = common.LINEAR.apply(w, (d, 3, h, hd), "qkv/kernel")
  assert not resized
  torch_y = (w @ x).reshape(3, h, hd)
  np.testing.assert_allclose(np.einsum("d,dthk->thk", x, kernel), torch_y,
                             rtol=1e-5, atol=1e-6)
  # Output projection: input is the (heads, head_dim) attention output.
  o = _randn(h, hd)
  wp = _randn(d, h * hd)
  kernel, _ = common.linear(2).apply(wp, (h, hd, d), "proj/kernel")
  np.testing.assert_allclose(np.einsum("hk,hkd->d", o, kernel),
                             wp @ o.reshape(-1), rtol=1e-5, atol=1e-6)
  # Fused bias (3D,) -> (3, heads, head_dim), same split as the weight.
  b = _randn(3 * h * hd)
  out, _ = common.FLAT.apply(b, (3, h, hd), "qkv/bias")
  np.testing.assert_array_equal(out[1, 0], b[h * hd:h * hd + hd])
  with pytest.raises(common._Mismatch):  # pylint: disable=protected-access
    common.LINEAR.apply(w.T, (d, 3, h, hd), "qkv/kernel")


def test_conv2d_layout_matches_a_naive_torch_conv():
  cin, cout, k = 3, 4, 2
  w = _randn(cout, cin, k, k)              # torch OIHW
  b = _randn(cout)
  img = _randn(1, 4, 4, cin)               # NHWC
  kernel, _ = common.CONV2D.apply(w, (k, k, cin, cout), "stem/conv/kernel")
  # torch Conv2d(kernel=stride=k), written as loops over NCHW semantics.
  naive = np.zeros((1, 2, 2, cout), np.float32)
  for i in range(2):
    for j in range(2):
      for o in range(cout):
        patch = img[0, i * k:(i + 1) * k, j * k:(j + 1) * k, :]  # (kh, kw, c)
        naive[0, i, j, o] = np.sum(w[o] * patch.transpose(2, 0, 1)) + b[o]
  ours = jax.lax.conv_general_dilated(
      img, kernel, (k, k), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  np.testing.assert_allclose(np.asarray(ours), naive, rtol=1e-5, atol=1e-5)


def test_relative_table_same_window_is_exact_and_shrunk_window_embeds():
  table = _randn(15 * 15, 2)
  out, resized = common.relative_position_table(8).apply(
      table, (225, 2), "a/relative_position_bias")
  assert not resized and out is not table
  assert np.array_equal(out, table)
  # A stage whose grid (4) is smaller than the window (8): timm keeps a
  # (2*4-1)^2 table, florax a (2*8-1)^2 one read only at its centre.
  small = _randn(7 * 7, 2)
  big, resized = common.relative_position_table(4).apply(
      small, (225, 2), "a/relative_position_bias")
  assert not resized
  theirs = small[windows.relative_position_index((4, 4), 4)]
  ours = big[windows.relative_position_index((4, 4), 8)]
  assert np.array_equal(ours, theirs)


def test_relative_table_other_window_is_interpolated():
  const = np.full((13 * 13, 3), 0.25, np.float32)
  out, resized = common.RELATIVE_POSITION_TABLE.apply(
      const, (23 * 23, 3), "image_encoder/stage0_block0/attn/"
      "relative_position_bias")
  assert resized and out.shape == (529, 3)
  # Bicubic interpolation reproduces a constant.
  np.testing.assert_allclose(out, 0.25, atol=1e-6)
  with pytest.raises(common._Mismatch):  # pylint: disable=protected-access
    common.RELATIVE_POSITION_TABLE.apply(const, (529, 4), "x/relative_"
                                         "position_bias")


def test_pos_embed_resize_keeps_the_class_token():
  pos = _randn(1, 1 + 4 * 4, 5)
  same, resized = common.POS_EMBED.apply(pos, (17, 5), "image_encoder/"
                                         "pos_embed")
  assert not resized and np.array_equal(same, pos[0])
  big, resized = common.POS_EMBED.apply(pos, (1 + 8 * 8, 5),
                                        "image_encoder/pos_embed")
  assert resized and big.shape == (65, 5)
  assert np.array_equal(big[0], pos[0, 0])
  # Not an image position embedding (a text tower's): no guessing.
  with pytest.raises(common._Mismatch):  # pylint: disable=protected-access
    common.POS_EMBED.apply(pos, (65, 5), "text_encoder/pos_embed")


# -- convert ------------------------------------------------------------------

RULES = [
    common.Rule(r"blocks\.(\d+)\.fc\.weight", r"enc/block\1/fc/kernel",
                common.LINEAR),
    common.Rule(r"blocks\.(\d+)\.fc\.bias", r"enc/block\1/fc/bias"),
    common.Rule(r"head\.weight", "head/kernel", common.LINEAR),
]
SHAPES = {"enc/block0/fc/kernel": (4, 3), "enc/block0/fc/bias": (3,),
          "enc/block1/fc/kernel": (4, 3), "enc/block1/fc/bias": (3,),
          "head/kernel": (4, 2)}


def _state():
  return {"blocks.0.fc.weight": _randn(3, 4), "blocks.0.fc.bias": _randn(3),
          "blocks.1.fc.weight": _randn(3, 4), "blocks.1.fc.bias": _randn(3),
          "head.weight": _randn(2, 4), "blocks.0.index": np.arange(3)}


def test_convert_maps_everything():
  sd = _state()
  out, report = common.convert(sd, RULES, SHAPES, ignore=[r".*\.index"])
  assert set(out) == set(SHAPES)
  assert np.array_equal(out["enc/block1/fc/kernel"], sd["blocks.1.fc.weight"].T)
  assert all(v.dtype == np.float32 for v in out.values())
  assert report.ignored == ["blocks.0.index"]
  assert len(report.mapped) == 5 and not report.resized
  assert "imported 5 tensors" in report.summary()


def test_convert_lists_every_problem_at_once():
  sd = _state()
  del sd["blocks.1.fc.bias"]                          # truncated
  sd["blocks.0.attn.weight"] = sd.pop("head.weight")  # another architecture
  sd["blocks.0.fc.weight"] = _randn(5, 4)             # wrong width
  sd["blocks.7.fc.bias"] = _randn(3)                  # deeper model
  with pytest.raises(common.ConversionError) as e:
    common.convert(sd, RULES, SHAPES, ignore=[r".*\.index"])
  err = e.value
  assert isinstance(err, ValueError)
  assert err.unmapped == ["blocks.0.attn.weight"]
  assert err.missing == ["enc/block1/fc/bias", "head/kernel"]
  assert err.unexpected == [("blocks.7.fc.bias", "enc/block7/fc/bias")]
  assert err.mismatched == [("enc/block0/fc/kernel", "blocks.0.fc.weight",
                             (5, 4), (3, 4), "linear")]
  msg = str(err)
  for needle in ("blocks.0.attn.weight", "enc/block1/fc/bias", "head/kernel",
                 "blocks.7.fc.bias", "(5, 4)", "(3, 4)"):
    assert needle in msg


def test_convert_allow_missing_drops_sources_and_leaves_targets():
  sd = _state()
  del sd["blocks.1.fc.bias"]
  sd["extra.weight"] = _randn(2)
  out, report = common.convert(
      sd, RULES, SHAPES, allow_missing=["extra.*", "enc/block1/fc/bias"],
      ignore=[r".*\.index"])
  assert "enc/block1/fc/bias" not in out
  assert report.fresh == ["enc/block1/fc/bias"]
  assert report.dropped == ["extra.weight"]
  # A dropped classifier: its source is dropped, its florax param absent.
  shapes = {k: v for k, v in SHAPES.items() if not k.startswith("head/")}
  out, report = common.convert(_state(), RULES, shapes,
                               allow_missing=["head.*"], ignore=[r".*index"])
  assert report.dropped == ["head.weight"] and "head/kernel" not in out


def test_convert_rejects_two_sources_for_one_param():
  rules = [common.Rule(r"(a|b)\.w", "w")]
  with pytest.raises(common.ConversionError, match="several source"):
    common.convert({"a.w": _randn(2), "b.w": _randn(2)}, rules, {"w": (2,)})


def test_convert_shapes_only():
  sd = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _state().items()}
  out, _ = common.convert(sd, RULES, SHAPES, ignore=[r".*\.index"],
                          shapes_only=True)
  assert out == SHAPES
  sd["head.weight"] = jax.ShapeDtypeStruct((3, 4), np.float32)
  with pytest.raises(common.ConversionError, match=r"\(3, 4\)"):
    common.convert(sd, RULES, SHAPES, ignore=[r".*\.index"], shapes_only=True)


# -- florax side --------------------------------------------------------------

def test_target_shapes_of_a_patch_coswin():
  cfg = coswin.CoSwinConfig(embed_dim=8, depths=(2, 2), num_heads=(2, 4),
                            window_size=4, stem="patch", merge="patch")
  shapes = common.target_shapes(coswin.CoSwin(cfg), 32, prefix="image_encoder")
  assert shapes["image_encoder/stem/conv/kernel"] == (4, 4, 3, 8)
  assert shapes["image_encoder/merge1/norm/scale"] == (32,)
  assert shapes["image_encoder/merge1/reduction/kernel"] == (32, 16)
  assert "image_encoder/merge1/reduction/bias" not in shapes
  assert shapes["image_encoder/stage1_block1/attn/qkv/kernel"] == (16, 3, 4, 4)
  assert shapes["image_encoder/stage1_block1/attn/proj/kernel"] == (4, 4, 16)
  assert shapes["image_encoder/stage0_block0/attn/relative_position_bias"] == (
      49, 2)
  assert all(k.startswith("image_encoder/") for k in shapes)


def test_patch_merging_matches_swin_concatenation():
  """florax's PatchMerging against Swin's x0..x3 slicing, written in numpy."""
  x = _randn(1, 4, 6, 3)
  module = coswin.PatchMerging(5)
  params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x)))
  params = params["params"]
  params["norm"]["scale"] = jnp.asarray(1.0 + _randn(12))
  params["norm"]["bias"] = jnp.asarray(_randn(12))
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
  x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
  cat = np.concatenate([x0, x1, x2, x3], -1)             # (1, 2, 3, 12)
  mu = cat.mean(-1, keepdims=True)
  var = cat.var(-1, keepdims=True)
  scale = np.asarray(params["norm"]["scale"])
  normed = (cat - mu) / np.sqrt(var + 1e-5) * scale + np.asarray(
      params["norm"]["bias"])
  want = normed @ np.asarray(params["reduction"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_env_without_torch(monkeypatch):
  for name in ("torch", "timm", "open_clip", "torchvision"):
    monkeypatch.setitem(sys.modules, name, None)
  assert not torch_env.torch_available()
  assert torch_env.import_timm() is None
  assert torch_env.import_open_clip() is None
