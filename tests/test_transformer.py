"""The shared encoder block against a naive numpy transformer written from
the papers' formulas (loops over heads, offsets and rotation pairs), option
by option; the masks against loops; the ViT preset table.

PyTorch parity of whole towers (timm ViT, open_clip) lives in
tests/test_convert_*.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from florax.models import transformer, vit

RNG = np.random.default_rng(0)


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _act(h, name):
  if name == "gelu":
    return 0.5 * h * (1 + erf(h / math.sqrt(2)))
  if name == "quick_gelu":
    return h / (1 + np.exp(-1.702 * h))
  if name == "gelu_tanh":
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi)
                                  * (h + 0.044715 * h ** 3)))
  raise ValueError(name)


def _rotate(x, grid, prefix, theta):
  """Rotary embedding by explicit 2x2 rotations, token by token, pair by
  pair: pair k of the first half turns by row * f_k, of the second half by
  column * f_k, f_k = theta^(-k / (d/4))."""
  n, d = x.shape
  out = x.copy()
  quarter = d // 4
  for t in range(prefix, n):
    r, c = divmod(t - prefix, grid[1])
    for pair in range(d // 2):
      k = pair % quarter
      pos = r if pair < quarter else c
      a = pos * theta ** (-k / quarter)
      x0, x1 = x[t, 2 * pair], x[t, 2 * pair + 1]
      out[t, 2 * pair] = x0 * math.cos(a) - x1 * math.sin(a)
      out[t, 2 * pair + 1] = x1 * math.cos(a) + x0 * math.sin(a)
  return out


def _rel_bias(table, grid, prefix):
  """BEiT's bias by its definition: grid pairs by (dy, dx) offset, then the
  three shared prefix entries."""
  h, w = grid
  n = prefix + h * w
  n_rel = (2 * h - 1) * (2 * w - 1)
  out = np.zeros((table.shape[1], n, n))
  for i in range(n):
    for j in range(n):
      if i < prefix and j < prefix:
        row = n_rel + 2
      elif i < prefix:
        row = n_rel
      elif j < prefix:
        row = n_rel + 1
      else:
        (yi, xi), (yj, xj) = divmod(i - prefix, w), divmod(j - prefix, w)
        row = (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
      out[:, i, j] = table[row]
  return out


def _reference_block(x, p, cfg, layout, mask):
  """One pre-LN block in numpy, per example and per head."""
  eps = cfg.norm_eps
  heads = cfg.num_heads
  hd = x.shape[-1] // heads
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    y = _ln(x[b], p["norm1"], eps)
    wqkv = p["attn"]["qkv"]["kernel"].reshape(y.shape[-1], -1)
    qkv = (y @ wqkv).reshape(-1, 3, heads, hd)
    if cfg.qkv_bias == "full":
      qkv = qkv + p["attn"]["qkv"]["bias"]
    heads_out = []
    for h in range(heads):
      q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
      if cfg.qkv_bias == "qv":
        q = q + p["attn"]["q_bias"][h]
        v = v + p["attn"]["v_bias"][h]
      if cfg.rope:
        q = _rotate(q, layout.grid, layout.num_prefix, cfg.rope_theta)
        k = _rotate(k, layout.grid, layout.num_prefix, cfg.rope_theta)
      logits = q @ k.T / math.sqrt(hd)
      if cfg.rel_pos_bias == "layer":
        logits = logits + _rel_bias(p["attn"]["relative_position_bias"],
                                    layout.grid, layout.num_prefix)[h]
      if mask is not None:
        logits = np.where(mask[b], logits, -1e30)
      e = np.exp(logits - logits.max(-1, keepdims=True))
      heads_out.append((e / e.sum(-1, keepdims=True)) @ v)
    o = np.concatenate(heads_out, -1)
    if cfg.sub_ln:
      o = _ln(o, p["attn"]["norm"], eps)
    o = o @ p["attn"]["proj"]["kernel"].reshape(-1, x.shape[-1]) + p["attn"][
        "proj"]["bias"]
    if cfg.layer_scale is not None:
      o = o * p["ls1"]
    z = x[b] + o
    y = _ln(z, p["norm2"], eps)
    m = p["mlp"]
    hid = y @ m["fc1"]["kernel"] + m["fc1"]["bias"]
    if cfg.act == "swiglu":
      g = y @ m["gate"]["kernel"] + m["gate"]["bias"]
      hid = g / (1 + np.exp(-g)) * hid
    else:
      hid = _act(hid, cfg.act)
    if cfg.sub_ln:
      hid = _ln(hid, m["norm"], eps)
    o = hid @ m["fc2"]["kernel"] + m["fc2"]["bias"]
    if cfg.layer_scale is not None:
      o = o * p["ls2"]
    out[b] = z + o
  return out


def _random(tree):
  return jax.tree.map(
      lambda s: (0.3 * RNG.standard_normal(s.shape)).astype(np.float32),
      tree)


OPTIONS = [
    dict(),
    dict(qkv_bias="qv", layer_scale=0.5, act="quick_gelu"),
    dict(qkv_bias="none", act="gelu_tanh", sub_ln=True, norm_eps=1e-6),
    dict(act="swiglu", rope=True, rel_pos_bias="layer", qkv_bias="qv"),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "vit")
def test_block_matches_numpy(opts):
  cfg = transformer.EncoderConfig(width=16, depth=1, num_heads=2, mlp_dim=24,
                                  **opts)
  layout = transformer.TokenLayout(1, (2, 3))
  transformer.validate(cfg, layout)
  encoder = transformer.Encoder(cfg, layout)  # one block
  x = RNG.standard_normal((2, 7, 16)).astype(np.float32)
  mask = transformer.prefix_lm_mask(np.array([2, 7]), 7)
  shapes = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), x, mask))
  params = _random(shapes["params"])
  got = encoder.apply({"params": params}, x, mask)
  want = _reference_block(x, jax.tree.map(np.asarray, params["block0"]), cfg,
                          layout, np.asarray(mask)[:, 0])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_masks_match_loops():
  lengths = np.array([0, 3, 6])
  got = np.asarray(transformer.prefix_lm_mask(lengths, 6))[:, 0]
  for b, n in enumerate(lengths):
    for q in range(6):
      for k in range(6):
        assert got[b, q, k] == (k <= q or k < n), (b, q, k)
  causal = np.asarray(transformer.causal_mask(5))[0, 0]
  assert (causal == np.tril(np.ones((5, 5), bool))).all()
  pad = transformer.padding_mask(np.array([[1, 1, 0]], bool))
  assert pad.shape == (1, 1, 1, 3) and not pad[0, 0, 0, 2]


def test_shared_bias_and_scan_equal_unrolled():
  """A shared relative bias is one table added in every block; scanning the
  blocks gives the unrolled result with the same (stacked) weights."""
  kw = dict(width=16, depth=3, num_heads=2, mlp_dim=32, rel_pos_bias="shared",
            layer_scale=0.1)
  layout = transformer.TokenLayout(1, (2, 2))
  plain = transformer.Encoder(transformer.EncoderConfig(**kw), layout)
  scanned = transformer.Encoder(
      transformer.EncoderConfig(**kw, scan=True, remat="full"), layout)
  x = RNG.standard_normal((2, 5, 16)).astype(np.float32)
  p = _random(nn.unbox(jax.eval_shape(plain.init, jax.random.key(0), x))[
      "params"])
  assert p["relative_position_bias"].shape == (12, 2)
  stacked = jax.tree.map(lambda *a: np.stack(a),
                         *[p[f"block{i}"] for i in range(3)])
  ps = {"relative_position_bias": p["relative_position_bias"],
        "blocks": {"block": stacked}}
  want = plain.apply({"params": p}, x)
  got = scanned.apply({"params": ps}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The shared table enters every block: blocks with a per-layer copy of it
  # give the same output.
  per_layer = transformer.Encoder(
      transformer.EncoderConfig(**{**kw, "rel_pos_bias": "layer"}), layout)
  pl = {f"block{i}": {**p[f"block{i}"], "attn": {
      **p[f"block{i}"]["attn"],
      "relative_position_bias": p["relative_position_bias"]}}
        for i in range(3)}
  np.testing.assert_allclose(per_layer.apply({"params": pl}, x), want,
                             atol=1e-5)


def test_layer_of_names():
  assert transformer.layer_of("image_encoder/encoder/block11/attn/qkv/kernel"
                              ) == 11
  assert transformer.layer_of("text_encoder/encoder/blocks/block/norm1/scale"
                              ) == "scanned"
  assert transformer.layer_of("image_encoder/pos_embed") is None


def _count(cfg):
  shapes = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0),
                          jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))


def _formula(cfg):
  """Params of a ViT by hand: patch conv, cls, positions, per block two
  LNs, qkv, proj and MLP, final LN."""
  d, f, n = cfg.width, cfg.mlp_dim, (cfg.image_size // cfg.patch_size) ** 2
  qkv_bias = {"full": 3 * d, "qv": 2 * d, "none": 0}[cfg.qkv_bias]
  block = 4 * d + 3 * d * d + qkv_bias + d * d + d + 2 * d * f + f + d
  embed = cfg.patch_size ** 2 * 3 * d + d + d + (n + 1) * d
  return embed + cfg.depth * block + 2 * d


@pytest.mark.parametrize("name,millions", [
    ("B/16", 86), ("L/14", 303), ("g/14", 1011)])
def test_vit_preset_param_counts(name, millions):
  """Without a classifier head; g/14 is EVA's 40 x 1408 x 6144 x 16 (EVA
  paper, Table 2: 1011M)."""
  cfg = vit.config_for(name, image_size=224,
                       qkv_bias="qv" if name == "g/14" else "full")
  n = _count(cfg)
  assert n == _formula(cfg)
  assert round(n / 1e6) == millions


def test_bad_vit_config_errors():
  with pytest.raises(ValueError, match="unknown ViT preset"):
    vit.config_for("X/16")
  with pytest.raises(ValueError, match="multiple of the ViT patch"):
    vit.validate(vit.config_for("B/16", image_size=100))
  with pytest.raises(ValueError, match="qkv_bias"):
    vit.validate(vit.config_for("tiny/8", image_size=32, qkv_bias="k"))
  with pytest.raises(ValueError, match="need a token grid"):
    transformer.validate(transformer.EncoderConfig(8, 1, 2, 8, rope=True))


def test_every_param_has_logical_axis_names():
  """Sharding rules map logical names to mesh axes: a param without them
  would silently stay replicated."""
  cfg = vit.config_for("tiny/8", image_size=32, qkv_bias="qv", layer_scale=0.1,
                       rel_pos_bias="layer", act="swiglu", sub_ln=True,
                       scan=True, pool="mean", fc_norm=True)
  boxed = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 32, 32, 3)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
      x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim, leaf.names
