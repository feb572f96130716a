"""Video CoSwin (Florence §2.6): inflation from 2-D CoSwin, 3-D windows.

The property the paper's inflation rule is built for: right after inflation a
static video (one frame repeated) gives, at every time slice, exactly the 2-D
CoSwin token map of that frame, and the same pooled feature.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.models import coswin, layers
from florax.models import video_coswin as vc

TINY = coswin.CoSwinConfig(**coswin.PRESETS["tiny"])   # C=64, depths (2, 2)
SIZE = 32                                               # grids 8x8 then 4x4
TOL = 1e-5


class PerStageCoSwin(nn.Module):
  """2-D CoSwin built from coswin's own blocks with one spatial window
  (= table) per stage: the 2-D counterpart of dynamic window sizes."""
  config: coswin.CoSwinConfig
  stage_windows: tuple

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    x = coswin.ConvEmbed(cfg.embed_dim, cfg.stem_kernel, cfg.stem_stride,
                         name="stem")(images)
    features = []
    for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      if s:
        x = coswin.ConvEmbed(cfg.embed_dim * 2 ** s, cfg.merge_kernel,
                             cfg.merge_stride, name=f"merge{s}")(x)
      win = self.stage_windows[s]
      for d in range(depth):
        x = coswin.SwinBlock(heads, win, 0 if d % 2 == 0 else win // 2,
                             cfg.mlp_ratio, 0.0, name=f"stage{s}_block{d}")(x)
      features.append(x)
    x = layers.layer_norm(name="norm")(x)
    return jnp.mean(x, axis=(1, 2)), {"stage_features": features, "tokens": x}


def _normal(shape, seed):
  # numpy, not jax.random: compiling threefry costs seconds on a busy CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _random_params(abstract, seed):
  """Random values for an abstract param tree, drawn with numpy (compiling
  an init costs seconds on a busy CPU): weights/biases N(0, 0.1^2),
  LayerNorm scales 1 + N(0, 0.1^2), relative position biases N(0, 1), so
  nothing is trivially zero or one and a misplaced bias entry shows."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if "relative_position_bias" in name:
      return jnp.asarray(noise)
    base = 1.0 if name.endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.1 * noise)
  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def _checkpoint_2d(cfg, seed=0):
  """A CoSwin checkpoint (random, see `_random_params`)."""
  abstract = jax.eval_shape(
      coswin.CoSwin(cfg).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))["params"]
  return _random_params(abstract, seed)


def _frames(n=2, seed=3):
  return _normal((n, SIZE, SIZE, 3), seed)


def _static(images, frames):
  return jnp.repeat(images[:, None], frames, axis=1)


def _assert_matches_2d(pooled3, aux3, pooled2, aux2):
  """Every time slice of the video outputs equals the 2-D output; returns
  the max deviation."""
  dev = float(jnp.abs(pooled3 - pooled2).max())
  tokens3, tokens2 = aux3["tokens"], aux2["tokens"]
  assert tokens3.shape[0] == tokens2.shape[0]
  assert tokens3.shape[2:] == tokens2.shape[1:]
  dev = max(dev, float(jnp.abs(tokens3 - tokens2[:, None]).max()))
  assert dev < TOL, dev
  # The stage features are the un-normed residual stream (|x| up to ~10):
  # their deviation is measured relative to the largest entry.
  rel = 0.0
  for f3, f2 in zip(aux3["stage_features"], aux2["stage_features"]):
    assert f3.shape[2:] == f2.shape[1:]
    rel = max(rel, float(jnp.abs(f3 - f2[:, None]).max()
                         / jnp.abs(f2).max()))
  assert rel < TOL, rel
  return dev, rel


def _shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _init_shapes(cfg, frames):
  abstract = jax.eval_shape(
      vc.VideoCoSwin(cfg).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, frames, SIZE, SIZE, 3), jnp.float32))
  return _shapes(nn.unbox(abstract["params"]))


# Case A: the 2-D model is coswin.CoSwin itself (one window, 3: grids 8 and 4
# are padded to 9 and 6 and shifted by 1). Temporal windows vary per stage;
# stage 0 pads time (3 -> 4) and shifts it by 1. 6 frames, tubelet 2,
# merging with an overlapping temporal kernel 3 (edge padding).
CFG_A2 = dataclasses.replace(TINY, window_size=3)
CFG_A = vc.from_coswin(CFG_A2, stem_temporal_kernel=2, stem_temporal_stride=2,
                       merge_temporal_kernel=3, merge_temporal_stride=1,
                       window_sizes=((2, 3, 3), (3, 3, 3)))
FRAMES_A = 6


@pytest.fixture(scope="module")
def case_a():
  params2 = _checkpoint_2d(CFG_A2)
  params3 = vc.inflate(params2, CFG_A2, CFG_A)
  images = _frames()
  pooled2, aux2 = jax.jit(coswin.CoSwin(CFG_A2).apply)({"params": params2},
                                                        images)
  apply3 = jax.jit(vc.VideoCoSwin(CFG_A).apply)
  return params2, params3, images, (pooled2, aux2), apply3


def test_static_video_equals_coswin_after_inflation(case_a):
  _, params3, images, (pooled2, aux2), apply3 = case_a
  pooled3, aux3 = apply3({"params": params3}, _static(images, FRAMES_A))
  assert aux3["tokens"].shape == (2, 3, 4, 4, 128)
  dev = _assert_matches_2d(pooled3, aux3, pooled2, aux2)
  print(f"case A max deviation pooled/tokens {dev[0]:.2e}, stage features "
        f"(relative) {dev[1]:.2e}")


def test_inflated_tree_has_the_video_init_shapes(case_a):
  _, params3, *_ = case_a
  assert _shapes(params3) == _init_shapes(CFG_A, FRAMES_A)
  # A 2-D checkpoint wrapped as {"params": ...} comes back wrapped.
  wrapped = vc.inflate({"params": case_a[0]}, CFG_A2, CFG_A)
  assert set(wrapped) == {"params"}
  assert _shapes(wrapped["params"]) == _shapes(params3)


def test_inflation_rule(case_a):
  params2, params3, *_ = case_a
  k2 = params2["stem"]["conv"]["kernel"]
  k3 = params3["stem"]["conv"]["kernel"]
  assert k3.shape == (2,) + k2.shape
  np.testing.assert_allclose(k3, jnp.stack([k2 / 2, k2 / 2]), rtol=0, atol=0)
  m2 = params2["merge1"]["conv"]["kernel"]
  np.testing.assert_allclose(params3["merge1"]["conv"]["kernel"],
                             jnp.stack([m2 / 3] * 3), rtol=0, atol=0)
  t2 = params2["stage0_block1"]["attn"]["relative_position_bias"]   # (25, h)
  t3 = params3["stage0_block1"]["attn"]["relative_position_bias"]
  assert t3.shape == (3 * 25, t2.shape[1])
  for dt in range(3):   # the 2-D table for every temporal offset
    np.testing.assert_array_equal(t3[dt * 25:(dt + 1) * 25], t2)
  np.testing.assert_array_equal(params3["stage1_block0"]["mlp"]["fc1"]["kernel"],
                                params2["stage1_block0"]["mlp"]["fc1"]["kernel"])


def test_moving_video_differs_from_the_frames(case_a):
  """The equality above is not vacuous: frames that change over time give
  features no single 2-D frame (nor their average) gives."""
  _, params3, images, (pooled2, aux2), apply3 = case_a
  video = _normal((2, FRAMES_A, SIZE, SIZE, 3), seed=7)
  video = video.at[:, 0].set(images)
  pooled3, aux3 = apply3({"params": params3}, video)
  assert float(jnp.abs(pooled3 - pooled2).max()) > 1e-2
  assert float(jnp.abs(aux3["tokens"][:, 0] - aux2["tokens"]).max()) > 1e-2


def test_zero_temporal_padding_is_not_exact_at_the_borders(case_a):
  """Why merging pads time by replicating slices: a zero-padded overlapping
  temporal kernel breaks the static-video identity."""
  params2, _, images, (pooled2, aux2), _ = case_a
  cfg = dataclasses.replace(CFG_A, temporal_padding="zero")
  params3 = vc.inflate(params2, CFG_A2, cfg)
  pooled3, aux3 = jax.jit(vc.VideoCoSwin(cfg).apply)(
      {"params": params3}, _static(images, FRAMES_A))
  assert float(jnp.abs(aux3["tokens"] - aux2["tokens"][:, None]).max()) > 1e-3


# Case B: dynamic spatial windows, small early and larger later (3 then 6;
# the later one is clamped to the 4x4 grid and uses the centre of its table),
# from a window-4 checkpoint: inflation resizes the tables 4 -> 3 and 4 -> 6.
# 4 frames, tubelet 2, temporal merging kernel 3 / stride 2 (edge padding).
CFG_B = vc.from_coswin(TINY, merge_temporal_kernel=3, merge_temporal_stride=2,
                       window_sizes=((2, 3, 3), (1, 6, 6)))
FRAMES_B = 4


def test_dynamic_windows_static_video_equals_2d_per_stage():
  params2 = _checkpoint_2d(TINY, seed=10)
  params3 = vc.inflate(params2, TINY, CFG_B)
  assert _shapes(params3) == _init_shapes(CFG_B, FRAMES_B)
  # The 2-D counterpart: the same checkpoint with each stage's table resized.
  ref = jax.tree.map(lambda a: a, params2)
  for s, win in enumerate((3, 6)):
    for d in range(TINY.depths[s]):
      attn = ref[f"stage{s}_block{d}"]["attn"]
      attn["relative_position_bias"] = coswin.resize_relative_position_bias(
          attn["relative_position_bias"], win)
  images = _frames(seed=11)
  pooled2, aux2 = jax.jit(PerStageCoSwin(TINY, (3, 6)).apply)(
      {"params": ref}, images)
  pooled3, aux3 = jax.jit(vc.VideoCoSwin(CFG_B).apply)(
      {"params": params3}, _static(images, FRAMES_B))
  assert aux3["tokens"].shape == (2, 1, 4, 4, 128)
  assert aux3["stage_features"][0].shape == (2, 2, 8, 8, 64)
  dev = _assert_matches_2d(pooled3, aux3, pooled2, aux2)
  print(f"case B max deviation pooled/tokens {dev[0]:.2e}, stage features "
        f"(relative) {dev[1]:.2e}")


def test_swin_patch_embeddings_inflate_too():
  """stem/merge="patch" (imported Swin weights): a (tubelet, 4, 4) patchify
  stem and frame-by-frame 2x2 PatchMerging; same static-video identity."""
  cfg2 = dataclasses.replace(TINY, stem="patch", merge="patch")
  cfg3 = vc.from_coswin(cfg2, merge_temporal_kernel=1, merge_temporal_stride=1,
                        window_sizes=((2, 4, 4), (2, 4, 4)))
  params2 = _checkpoint_2d(cfg2, seed=20)
  params3 = vc.inflate(params2, cfg2, cfg3)
  assert params3["stem"]["conv"]["kernel"].shape == (2, 4, 4, 3, 64)
  images = _frames(seed=21)
  pooled2, aux2 = jax.jit(coswin.CoSwin(cfg2).apply)({"params": params2},
                                                      images)
  pooled3, aux3 = jax.jit(vc.VideoCoSwin(cfg3).apply)(
      {"params": params3}, _static(images, 4))
  assert aux3["tokens"].shape == (2, 2, 4, 4, 128)
  _assert_matches_2d(pooled3, aux3, pooled2, aux2)


# ---------------------------------------------------------------------------
# One 3-D window attention layer against a naive loop over token pairs.


def naive_window_attention_3d(x, params, heads, window, table, shift):
  """Never partitions, rolls or builds masks: for every pair of tokens
  decides whether they share a (shifted, padded) window and the same side of
  each cyclic wrap, as Video Swin's shifted windows define it."""
  b, *grid, c = x.shape
  d = c // heads
  wk = np.asarray(params["qkv"]["kernel"], np.float64)
  bk = np.asarray(params["qkv"]["bias"], np.float64)
  tab = np.asarray(params["relative_position_bias"], np.float64)
  pk = np.asarray(params["proj"]["kernel"], np.float64)
  pb = np.asarray(params["proj"]["bias"], np.float64)
  qkv = np.einsum("bthwc,cknd->bthwknd", x, wk) + bk
  win = [min(w, g) for w, g in zip(window, grid)]
  sh = [s if g > w else 0 for s, w, g in zip(shift, window, grid)]
  pad = [-(-g // w) * w for g, w in zip(grid, win)]
  positions = [tuple(p) for p in np.ndindex(*grid)]
  rolled = {p: [(p[a] - sh[a]) % pad[a] for a in range(3)] for p in positions}
  out = np.zeros((b, *grid, heads, d))
  for p in positions:
    rq = rolled[p]
    keys, offsets = [], []
    for k in positions:
      rk = rolled[k]
      if any(rq[a] // win[a] != rk[a] // win[a] for a in range(3)):
        continue                     # different window
      if any(sh[a] and (rq[a] >= pad[a] - sh[a]) != (rk[a] >= pad[a] - sh[a])
             for a in range(3)):
        continue                     # other side of a wrap
      keys.append(k)
      offsets.append([rq[a] % win[a] - rk[a] % win[a] + table[a] - 1
                      for a in range(3)])
    offsets = np.asarray(offsets)
    index = ((offsets[:, 0] * (2 * table[1] - 1) + offsets[:, 1])
             * (2 * table[2] - 1) + offsets[:, 2])
    for bi in range(b):
      q = qkv[(bi, *p, 0)]                                   # (heads, d)
      k = np.stack([qkv[(bi, *kk, 1)] for kk in keys])       # (K, heads, d)
      v = np.stack([qkv[(bi, *kk, 2)] for kk in keys])
      logits = np.einsum("hd,khd->kh", q, k) * d ** -0.5 + tab[index]
      prob = np.exp(logits - logits.max(0))
      prob /= prob.sum(0)
      out[(bi, *p)] = np.einsum("kh,khd->hd", prob, v)
  return np.einsum("bthwnd,ndc->bthwc", out, pk) + pb


@pytest.mark.parametrize("grid,window,table,shift", [
    ((3, 5, 5), (2, 3, 3), (2, 3, 3), (0, 0, 0)),      # padding on 3 axes
    ((3, 5, 5), (2, 3, 3), (2, 3, 3), (1, 1, 1)),      # + shifted
    ((4, 6, 5), (2, 4, 3), (3, 4, 5), (1, 2, 1)),      # table > window
    ((2, 5, 4), (3, 4, 4), (3, 4, 4), (1, 2, 2)),      # t and w clamped
])
def test_window_attention_matches_naive_loop(grid, window, table, shift):
  heads, c = 2, 8
  layer = vc.VideoWindowAttention(heads, window, table, shift)
  x = _normal((2, *grid, c), seed=0)
  params = _random_params(jax.eval_shape(layer.init, jax.random.key(0),
                                          x)["params"], seed=1)
  params = jax.tree.map(np.asarray, params)
  got = np.asarray(jax.jit(layer.apply)({"params": params}, x))
  want = naive_window_attention_3d(np.asarray(x, np.float64), params, heads,
                                   window, table, shift)
  dev = np.abs(got - want).max()
  print(f"attention {grid} {window} {shift}: max deviation {dev:.2e}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_window_attention_pallas_matches_xla():
  grid, window, table, shift = (3, 5, 5), (2, 3, 3), (2, 3, 3), (1, 1, 1)
  x = _normal((2, *grid, 8), seed=0)
  outs = []
  for impl in ("xla", "pallas"):
    layer = vc.VideoWindowAttention(2, window, table, shift,
                                    attention_impl=impl)
    params = _random_params(jax.eval_shape(layer.init, jax.random.key(0),
                                           x)["params"], seed=1)
    outs.append(np.asarray(jax.jit(layer.apply)({"params": params}, x)))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize("change,frames,match", [
    (dict(), 5, "frames=5"),
    (dict(merge_temporal_stride=2), 6, "frames=6"),
    (dict(window_sizes=((2, 3, 3),)), 4, "window_sizes has 1 entries"),
    (dict(window_sizes=((2, 3), (2, 3, 3))), 4, r"window_sizes\[0\]"),
    (dict(window_sizes=((2, 0, 3), (2, 3, 3))), 4, r"window_sizes\[0\]"),
    (dict(window_sizes=((2, 4, 4), (2, 4, 4)),
          table_windows=((2, 3, 3), (2, 4, 4))), 4, r"table_windows\[0\]"),
    (dict(temporal_padding="reflect"), 4, "temporal_padding"),
    (dict(stem_temporal_stride=0), 4, "stem_temporal_stride"),
    (dict(merge="patch"), 4, "merge_temporal_kernel"),
    (dict(scan=True), 4, "scan"),
    (dict(num_heads=(3, 4)), 4, "heads"),
])
def test_validate_names_the_bad_field(change, frames, match):
  cfg = dataclasses.replace(vc.from_coswin(TINY), **change)
  with pytest.raises(ValueError, match=match):
    vc.validate(cfg, frames, SIZE)


def test_validate_accepts_and_the_model_refuses_bad_input():
  assert vc.validate(CFG_A, FRAMES_A, SIZE) == [(3, 8, 8), (3, 4, 4)]
  assert vc.validate(CFG_B, FRAMES_B, SIZE) == [(2, 8, 8), (1, 4, 4)]
  with pytest.raises(ValueError, match="frames=5"):
    jax.eval_shape(vc.VideoCoSwin(CFG_B).init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 5, SIZE, SIZE, 3), jnp.float32))


def test_inflate_refuses_checkpoints_that_do_not_fit():
  params2 = nn.unbox(jax.eval_shape(
      coswin.CoSwin(TINY).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))["params"])
  params2 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params2)
  cfg = vc.from_coswin(TINY)
  vc.inflate(params2, TINY, cfg)       # fits

  missing = jax.tree.map(lambda a: a, params2)
  del missing["stage0_block0"]["attn"]["proj"]["bias"]
  with pytest.raises(ValueError, match="stage0_block0/attn/proj/bias: missing"):
    vc.inflate(missing, TINY, cfg)

  extra = jax.tree.map(lambda a: a, params2)
  extra["head"] = {"kernel": jnp.zeros((128, 10))}
  with pytest.raises(ValueError, match="head/kernel: in the 2-D checkpoint"):
    vc.inflate(extra, TINY, cfg)

  wrong = jax.tree.map(lambda a: a, params2)
  wrong["stage1_block1"]["mlp"]["fc1"]["kernel"] = jnp.zeros((128, 7))
  with pytest.raises(ValueError, match="stage1_block1/mlp/fc1/kernel: shape"):
    vc.inflate(wrong, TINY, cfg)

  wrong = jax.tree.map(lambda a: a, params2)
  wrong["stem"]["conv"]["kernel"] = jnp.zeros((2, 7, 7, 3, 64))
  with pytest.raises(ValueError, match="stem/conv/kernel: 2-D conv kernel"):
    vc.inflate(wrong, TINY, cfg)

  wrong = jax.tree.map(lambda a: a, params2)
  wrong["stage0_block0"]["attn"]["relative_position_bias"] = jnp.zeros((48, 2))
  with pytest.raises(ValueError, match="is not a 2-D bias table"):
    vc.inflate(wrong, TINY, cfg)

  rect = dataclasses.replace(cfg, window_sizes=((2, 4, 2), (2, 4, 4)))
  with pytest.raises(ValueError, match="square spatial table"):
    vc.inflate(params2, TINY, rect)

  with pytest.raises(ValueError, match="embed_dim=64"):
    vc.inflate(params2, TINY, dataclasses.replace(cfg, embed_dim=32))
  with pytest.raises(ValueError, match="scan=True"):
    vc.inflate(params2, dataclasses.replace(TINY, scan=True), cfg)
