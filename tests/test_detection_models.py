"""Florence's detection model: pyramids, Dynamic Head, ATSS head, Detector.

Every numerical check is against a naive numpy transcription written here
(per-pixel loops in float64) of the equations documented in
florax/models/{pyramid,dyhead,atss_head}.py, run on the modules' own
parameter trees filled with random values (so zero-initialised offsets or
unit norms cannot hide a misplaced term).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from florax.models import atss_head, coswin, detector, dyhead, pyramid, vit

TOL = dict(rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------- numpy reference


def np_bilinear(img, y, x):
  """img (H, W, C) at real (y, x): bilinear, neighbours outside count 0."""
  h, w, c = img.shape
  out = np.zeros(c)
  y0, x0 = math.floor(y), math.floor(x)
  for yy in (y0, y0 + 1):
    for xx in (x0, x0 + 1):
      if 0 <= yy < h and 0 <= xx < w:
        out += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[yy, xx]
  return out


def np_deform_conv(x, offsets, mask, kernel, stride, bias=None):
  """Per output pixel, per kernel point: sample at the shifted grid point,
  times the mask, times that point's kernel slice."""
  b, _, _, _ = x.shape
  kh, kw, _, cout = kernel.shape
  _, ho, wo, _ = offsets.shape
  out = np.zeros((b, ho, wo, cout))
  for n in range(b):
    for i in range(ho):
      for j in range(wo):
        acc = np.zeros(cout) if bias is None else np.array(bias, np.float64)
        for ky in range(kh):
          for kx in range(kw):
            k = ky * kw + kx
            y = i * stride - (kh - 1) // 2 + ky + offsets[n, i, j, 2 * k]
            xx = j * stride - (kw - 1) // 2 + kx + offsets[n, i, j, 2 * k + 1]
            acc += mask[n, i, j, k] * (np_bilinear(x[n], y, xx)
                                       @ kernel[ky, kx])
        out[n, i, j] = acc
  return out


def np_conv(x, kernel, bias=None, stride=1):
  """Square conv padded (k - 1) // 2 on every side, naive loops."""
  b, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  p = (kh - 1) // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ho, wo = (h + 2 * p - kh) // stride + 1, (w + 2 * p - kw) // stride + 1
  out = np.zeros((b, ho, wo, cout))
  for i in range(ho):
    for j in range(wo):
      for ky in range(kh):
        for kx in range(kw):
          out[:, i, j] += xp[:, i * stride + ky, j * stride + kx] @ kernel[
              ky, kx]
  return out if bias is None else out + bias


def np_group_norm(x, groups, scale, bias, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_hsig(x):
  return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def np_resize_align_corners(x, size):
  b, h, w, c = x.shape
  out = np.zeros((b, size[0], size[1], c))
  for i in range(size[0]):
    for j in range(size[1]):
      y = i * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
      xx = j * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
      for n in range(b):
        # Inside the map by construction; edge neighbours clamp.
        y0, x0 = min(int(y), h - 1), min(int(xx), w - 1)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = y - y0, xx - x0
        out[n, i, j] = ((1 - fy) * (1 - fx) * x[n, y0, x0]
                        + (1 - fy) * fx * x[n, y0, x1]
                        + fy * (1 - fx) * x[n, y1, x0] + fy * fx * x[n, y1, x1])
  return out


def np_dyrelu(x, p):
  pooled = x.mean(axis=(1, 2))
  hidden = np.maximum(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  y = np_hsig(hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  c = x.shape[-1]
  y1, y2, y3, y4 = (y[:, i * c:(i + 1) * c][:, None, None] for i in range(4))
  a1, b1 = 2 * (y1 - 0.5) + 1, y2 - 0.5
  a2, b2 = 2 * (y3 - 0.5), y4 - 0.5
  return np.maximum(a1 * x + b1, a2 * x + b2)


def np_scale_attention(maps, p):
  out = 0
  for s in maps:
    z = s.mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]   # (B, 1)
    out = out + s * np_hsig(np.maximum(z, 0))[:, None, None]
  return out / len(maps)


def np_dyhead_block(features, p):
  """The documented block: per level, offsets/mask from the level, the
  same / finer (stride 2) / coarser (offsets at min(2i, H-1), then
  align-corners upsampling) deformable convs + GroupNorm, scale attention,
  DyReLU."""
  c = features[0].shape[-1]
  groups = pyramid.group_count(c, 16)

  def dcn(name, x, off, mask, stride):
    q = p[name]
    y = np_deform_conv(x, off, mask, q["kernel"], stride, q["bias"])
    return np_group_norm(y, groups, q["norm"]["scale"], q["norm"]["bias"])

  outs = []
  for l, f in enumerate(features):
    om = np_conv(f, p["offset"]["kernel"], p["offset"]["bias"])
    off, mask = om[..., :18], 1 / (1 + np.exp(-om[..., 18:]))
    maps = [dcn("conv_same", f, off, mask, 1)]
    if l > 0:
      maps.append(dcn("conv_fine", features[l - 1], off, mask, 2))
    if l < len(features) - 1:
      nxt = features[l + 1]
      iy = [min(2 * i, f.shape[1] - 1) for i in range(nxt.shape[1])]
      ix = [min(2 * j, f.shape[2] - 1) for j in range(nxt.shape[2])]
      sub = lambda a: a[:, iy][:, :, ix]  # noqa: E731
      s = dcn("conv_coarse", nxt, sub(off), sub(mask), 1)
      maps.append(np_resize_align_corners(s, f.shape[1:3]))
    outs.append(np_dyrelu(np_scale_attention(maps, p["scale_attn"]),
                          p["dyrelu"]))
  return outs


# ----------------------------------------------------------------- helpers


def _random_params(abstract, seed, overrides=None):
  """numpy-random values for an abstract (boxed) param tree: kernels
  N(0, 1/fan_in), biases N(0, 0.3^2), norm scales 1 + N(0, 0.1^2);
  `overrides` maps a path suffix to a std for kernels ending there."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(abstract))
  out = {}
  for path, leaf in flat.items():
    shape, name = leaf.shape, path[-1]
    if name == "scale" or name == "scales":
      val = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
      val = 0.3 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[:-1])) or 1
      std = 1 / math.sqrt(fan_in)
      for suffix, s in (overrides or {}).items():
        if "/".join(path[:-1]).endswith(suffix):
          std = s
      val = std * rng.standard_normal(shape)
    out[path] = np.asarray(val, np.float32)
  return traverse_util.unflatten_dict(out)


def _np_tree(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -------------------------------------------------------- deformable conv


@pytest.mark.parametrize("stride", [1, 2])
def test_deformable_conv_matches_naive_loop(stride):
  rng = np.random.default_rng(stride)
  b, h, w, cin, cout = 2, 7, 6, 3, 4
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  # Non-integer offsets up to 3 px: many points land outside the map
  # (fully, or with only some neighbours inside).
  offsets = rng.uniform(-3, 3, (b, ho, wo, 18)).astype(np.float32)
  mask = rng.uniform(0, 1, (b, ho, wo, 9)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  got = jax.jit(dyhead.deformable_conv, static_argnums=4)(
      x, offsets, mask, kernel, stride, bias)
  want = np_deform_conv(x.astype(np.float64), offsets, mask, kernel, stride,
                        bias)
  assert got.shape == (b, ho, wo, cout)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  # Some sampling points really fell outside the map.
  ky = np.arange(9) // 3
  pos = np.arange(ho)[None, :, None, None] * stride - 1 + ky + offsets[
      ..., 0::2]
  assert (pos <= -1).any() and (pos >= h).any()


@pytest.mark.parametrize("stride", [1, 2])
def test_deformable_conv_zero_offsets_is_plain_conv(stride):
  x = _normal((2, 7, 8, 5), 0)
  kernel = _normal((3, 3, 5, 6), 1)
  ho, wo = (7 - 1) // stride + 1, (8 - 1) // stride + 1
  got = dyhead.deformable_conv(x, jnp.zeros((2, ho, wo, 18)),
                               jnp.ones((2, ho, wo, 9)), kernel, stride)
  # Stride 1: lax's SAME. Stride 2: one pixel of padding each side (torch's
  # padding=1; SAME would pad (0, 1) on the even width).
  padding = "SAME" if stride == 1 else ((1, 1), (1, 1))
  want = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


# ------------------------------------------------------------- attentions


def test_dyrelu_matches_numpy():
  x = 2 * _normal((2, 5, 4, 16), 2)
  module = dyhead.DyReLU()
  params = _random_params(jax.eval_shape(module.init, jax.random.key(0), x),
                          3, {"fc1": 1.0, "fc2": 1.0})
  got = module.apply(params, x)
  want = np_dyrelu(x.astype(np.float64), _np_tree(params["params"]))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  # The coefficients are not degenerate: both ReLU pieces are selected.
  a = np.asarray(got)
  assert (a != np.maximum(x, 0)).mean() > 0.5


def test_scale_attention_matches_numpy():
  maps = [_normal((2, 4, 5, 8), s) + 0.5 * s for s in range(3)]
  module = dyhead.ScaleAttention()
  params = _random_params(
      jax.eval_shape(module.init, jax.random.key(0), maps), 4, {"fc": 1.0})
  p = params["params"]
  p["fc"]["bias"] = np.array([0.5], np.float32)   # keep the ReLU mostly open
  got = module.apply(params, maps)
  want = np_scale_attention([m.astype(np.float64) for m in maps],
                            _np_tree(p))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  # Not the plain mean: the attention weights differ per map and sample.
  assert not np.allclose(np.asarray(got), np.mean(maps, axis=0) / 2,
                         atol=1e-3)


def test_dyhead_block_matches_numpy():
  c = 32                                      # 16 groups of 2 channels
  shapes = [(7, 7), (4, 4), (2, 2)]           # odd finest level
  feats = [_normal((2, h, w, c), 10 + i) for i, (h, w) in enumerate(shapes)]
  block = dyhead.DyHeadBlock()
  abstract = jax.eval_shape(block.init, jax.random.key(0), feats)
  # Offsets of ~1.5 px std: non-integer, some outside the small maps.
  params = _random_params(abstract, 5, {"offset": 1.5 / math.sqrt(9 * c),
                                        "scale_attn/fc": 1.0})
  params["params"]["scale_attn"]["fc"]["bias"] = np.array([0.5], np.float32)
  got = jax.jit(block.apply)(params, feats)
  want = np_dyhead_block([f.astype(np.float64) for f in feats],
                         _np_tree(params["params"]))
  for g, wv, (h, w) in zip(got, want, shapes):
    assert g.shape == (2, h, w, c)
    np.testing.assert_allclose(np.asarray(g), wv, **TOL)


# ----------------------------------------------------------------- pyramids


def test_feature_pyramid_odd_shapes_and_values():
  feats = [_normal((2, 15, 13, 6), 20), _normal((2, 8, 7, 10), 21),
           _normal((2, 4, 4, 12), 22)]
  fpn = pyramid.FeaturePyramid(channels=8, num_levels=5)
  params = _random_params(jax.eval_shape(fpn.init, jax.random.key(0), feats),
                          6)
  got = jax.jit(fpn.apply)(params, feats)
  assert [g.shape[1:3] for g in got] == [(15, 13), (8, 7), (4, 4), (2, 2),
                                         (1, 1)]
  assert all(g.shape == (2,) + g.shape[1:3] + (8,) for g in got)
  p = _np_tree(params["params"])
  lat = [np.einsum("bhwc,cd->bhwd", f, p[f"lateral{i}"]["kernel"][0, 0])
         + p[f"lateral{i}"]["bias"] for i, f in enumerate(feats)]
  for i in (1, 0):                            # top-down, nearest neighbour
    h, w = lat[i].shape[1:3]
    hs, ws = lat[i + 1].shape[1:3]
    up = np.zeros_like(lat[i])
    for y in range(h):
      for x in range(w):
        up[:, y, x] = lat[i + 1][:, y * hs // h, x * ws // w]
    lat[i] = lat[i] + up
  want = [np_conv(m, p[f"output{i}"]["kernel"], p[f"output{i}"]["bias"])
          for i, m in enumerate(lat)]
  e = p["extra"]
  want.append(np_conv(want[-1], e["extra3"]["kernel"], e["extra3"]["bias"], 2))
  want.append(np_conv(np.maximum(want[-1], 0), e["extra4"]["kernel"],
                      e["extra4"]["bias"], 2))
  for g, wv in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), wv, **TOL)


def test_simple_pyramid_and_vit_feature_map():
  grid, dim = 5, 16
  tokens = _normal((2, 1 + grid * grid, dim), 30)
  fmap = pyramid.vit_feature_map(tokens, grid)
  assert fmap.shape == (2, grid, grid, dim)
  # Patch (y, x) is token 1 + y * grid + x (class token first, row-major).
  np.testing.assert_array_equal(np.asarray(fmap[:, 3, 2]), tokens[:, 18])
  sp = pyramid.SimplePyramid(channels=8, num_levels=5)
  out = jax.eval_shape(lambda: sp.init_with_output(
      jax.random.key(0), fmap)[0])
  assert [o.shape for o in out] == [(2, 20, 20, 8), (2, 10, 10, 8),
                                    (2, 5, 5, 8), (2, 2, 2, 8), (2, 1, 1, 8)]


# ---------------------------------------------------------------- ATSS head


def test_atss_head_anchor_layout():
  shapes = [(5, 7), (3, 4), (2, 2)]
  num_classes, c = 3, 4
  feats = []
  for l, (h, w) in enumerate(shapes):
    f = np.zeros((2, h, w, c), np.float32)
    for b in range(2):
      for y in range(h):
        for x in range(w):
          f[b, y, x, 0] = 10000 * b + 1000 * l + 100 * y + x
    feats.append(f)
  head = atss_head.ATSSHead(num_classes=num_classes, channels=c)
  p = _random_params(jax.eval_shape(head.init, jax.random.key(0), feats), 7)
  q = p["params"]
  # Centre taps read channel 0 only: every output plants that pixel's code.
  for name, n_out, gain in (("cls_logits", num_classes, None),
                            ("bbox_pred", 4, 1.0), ("centerness", 1, -1.0)):
    k = np.zeros((3, 3, c, n_out), np.float32)
    k[1, 1, 0] = np.arange(1, n_out + 1) if gain is None else gain
    q[name] = {"kernel": k, "bias": np.zeros(n_out, np.float32)}
  q["scales"] = np.array([1.0, 2.0, 3.0], np.float32)
  cls, deltas, ctr = head.apply(p, feats)
  codes = np.array([[10000 * b + 1000 * l + 100 * y + x
                     for l, (h, w) in enumerate(shapes)
                     for y in range(h) for x in range(w)] for b in range(2)],
                   np.float64)
  level = np.concatenate([np.full(h * w, l) for l, (h, w) in
                          enumerate(shapes)])
  assert cls.shape == (2, len(level), num_classes)
  np.testing.assert_array_equal(np.asarray(cls),
                                codes[..., None] * np.arange(1, 4))
  np.testing.assert_array_equal(
      np.asarray(deltas), np.repeat((codes * (level + 1))[..., None], 4, -1))
  np.testing.assert_array_equal(np.asarray(ctr), -codes)
  assert atss_head.ATSSHead.feature_shapes(feats) == tuple(shapes)


def test_atss_head_towers_match_numpy():
  c, num_classes = 8, 3
  feats = [_normal((2, 5, 3, c), 45), _normal((2, 3, 2, c), 46)]
  head = atss_head.ATSSHead(num_classes=num_classes, channels=c, num_convs=2)
  params = _random_params(jax.eval_shape(head.init, jax.random.key(0), feats),
                          9)
  got = jax.jit(head.apply)(params, feats)
  p = _np_tree(params["params"])

  def tower(x, prefix):       # [3x3 conv -> GroupNorm(min(32, C)) -> ReLU] x 2
    for i in range(2):
      conv, norm = p[f"{prefix}_conv{i}"], p[f"{prefix}_norm{i}"]
      x = np_conv(x, conv["kernel"], conv["bias"])
      x = np.maximum(np_group_norm(x, c, norm["scale"], norm["bias"]), 0)
    return x

  def out(x, name):
    y = np_conv(x, p[name]["kernel"], p[name]["bias"])
    return y.reshape(y.shape[0], -1, y.shape[-1])

  cls, box, ctr = [], [], []
  for l, f in enumerate(feats):
    f = f.astype(np.float64)
    t_cls, t_box = tower(f, "cls_tower"), tower(f, "box_tower")
    cls.append(out(t_cls, "cls_logits"))
    box.append(out(t_box, "bbox_pred") * p["scales"][l])
    ctr.append(out(t_box, "centerness")[..., 0])   # on the box tower
  for g, wv in zip(got, (cls, box, ctr)):
    np.testing.assert_allclose(np.asarray(g), np.concatenate(wv, 1), **TOL)


def test_fresh_init_values():
  feats = [_normal((1, 4, 4, 16), 40), _normal((1, 2, 2, 16), 41)]
  head = atss_head.ATSSHead(num_classes=5, channels=16, num_convs=2)
  block = dyhead.DyHeadBlock()
  # rbg keys: threefry's compile costs seconds on a busy 2-core CPU.
  head_vars, block_vars = jax.jit(lambda k: (head.init(k, feats),
                                             block.init(k, feats)))(
                                                 jax.random.key(0, impl="rbg"))
  params = nn.unbox(head_vars)["params"]
  np.testing.assert_allclose(np.asarray(params["cls_logits"]["bias"]),
                             np.full(5, -math.log(99)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(params["scales"]), [1.0, 1.0])
  assert params["cls_tower_conv1"]["kernel"].shape == (3, 3, 16, 16)
  assert "box_tower_norm1" in params and "cls_tower_conv2" not in params
  # DyHead starts from the plain 3x3 sampling grid: zero offset conv.
  offset = nn.unbox(block_vars)["params"]["offset"]
  assert offset["kernel"].shape == (3, 3, 16, 27)
  assert not np.any(np.asarray(offset["kernel"]))
  assert not np.any(np.asarray(offset["bias"]))


# ----------------------------------------------------------------- Detector

TINY = coswin.CoSwinConfig(**coswin.PRESETS["tiny"])


def _shapes(tree):
  return {"/".join(k): v.shape
          for k, v in traverse_util.flatten_dict(nn.unbox(tree)).items()}


def test_detector_param_tree_holds_a_coswin_under_image_encoder():
  images = jnp.zeros((2, 64, 64, 3))
  model = detector.Detector(detector.DetectorConfig(num_classes=7),
                            coswin.CoSwin(TINY))
  tree = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  bare = jax.eval_shape(coswin.CoSwin(TINY).init, jax.random.key(0),
                        images)["params"]
  assert set(tree) == {"image_encoder", "pyramid", "dyhead", "head"}
  assert _shapes(tree["image_encoder"]) == _shapes(bare)
  assert sorted(tree["dyhead"]) == [f"block{i}" for i in range(6)]
  assert detector.level_strides(
      detector.backbone_strides(model.config, model.backbone), 4) == [
          4, 8, 16, 32]
  # ViT backbone: ViTDet's pyramid over the patch grid (stride 8 -> 2..32).
  vcfg = vit.config_for("tiny/8", image_size=64)
  vmodel = detector.Detector(
      detector.DetectorConfig(num_classes=7, backbone="vit", num_levels=5,
                              dyhead_blocks=1), vit.ViT(vcfg))
  cls, _, _, _ = jax.eval_shape(
      lambda: vmodel.init_with_output(jax.random.key(0), images)[0])
  assert cls.shape == (2, 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2, 7)
  assert detector.level_strides(
      detector.backbone_strides(vmodel.config, vmodel.backbone), 5) == [
          2, 4, 8, 16, 32]


def test_detector_jit_forward_and_gradient():
  images = jnp.asarray(_normal((2, 64, 64, 3), 50))
  model = detector.Detector(
      detector.DetectorConfig(num_classes=5, channels=32, num_levels=3,
                              dyhead_blocks=1), coswin.CoSwin(TINY))
  # numpy-random params (an init would compile the RNG as well).
  variables = _random_params(
      jax.eval_shape(model.init, jax.random.key(0), images), 8,
      {"offset": 0.5 / math.sqrt(9 * 32)})

  def loss(v):
    cls, deltas, ctr, _ = model.apply(v, images)
    return (jnp.mean(jax.nn.log_sigmoid(cls)) + jnp.mean(deltas ** 2)
            + jnp.mean(ctr ** 2)), (cls, deltas, ctr)

  (value, (cls, deltas, ctr)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(variables)
  a = 16 * 16 + 8 * 8 + 4 * 4
  assert cls.shape == (2, a, 5) and deltas.shape == (2, a, 4)
  assert ctr.shape == (2, a)
  assert np.isfinite(float(value))
  leaves = traverse_util.flatten_dict(grads["params"])
  assert set(leaves) == set(traverse_util.flatten_dict(variables["params"]))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves.values())
  # The loss reaches the backbone and the offsets through the DyHead.
  for path in (("image_encoder", "stem", "conv", "kernel"),
               ("dyhead", "block0", "offset", "kernel")):
    assert np.abs(np.asarray(leaves[path])).max() > 0, path
  assert detector.feature_shapes(model, images) == ((16, 16), (8, 8), (4, 4))
