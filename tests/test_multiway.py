"""BEiT-3's Multiway Transformer (florax.models.multiway): giant's parameter
count per component against the paper (§2.3), the tiny preset against a
closed form, modality routing checked through gradients, and one block
against a naive per-token numpy implementation."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from florax.models import multiway


def _flat(params):
  return traverse_util.flatten_dict(nn.meta.unbox(params))


def _size(leaf):
  return int(np.prod(leaf.shape))


def _expert(key):
  """'v', 'l', 'vl' for an expert param of a block, else None."""
  if key[0].startswith("block") and key[1] != "attn":
    return key[1].rsplit("_", 1)[1]
  return None


# -- parameter counts ---------------------------------------------------------

# BEiT-3 §2.3: giant = 692M vision experts + 692M language experts + 52M
# vision-language experts + 90M word embeddings + 317M shared attention.
PAPER = {"v": 692e6, "l": 692e6, "vl": 52e6, "words": 90e6, "attn": 317e6}


def test_giant_param_counts_match_the_paper():
  cfg = multiway.config_for("giant")
  model = multiway.Multiway(cfg)
  s = cfg.image_size
  variables = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))
  flat = _flat(variables["params"])
  parts = dict.fromkeys(list(PAPER) + ["rest"], 0)
  for key, leaf in flat.items():
    if _expert(key):
      parts[_expert(key)] += _size(leaf)
    elif key[0].startswith("block") and key[1] == "attn":
      parts["attn"] += _size(leaf)
    elif key[:2] == ("text_embed", "token_embed"):
      parts["words"] += _size(leaf)
    else:
      parts["rest"] += _size(leaf)
  for name, paper in PAPER.items():
    assert abs(parts[name] - paper) / paper < 0.02, (name, parts[name], paper)
  total = sum(parts.values())
  # The paper's components sum to 1843M, which it rounds to "1.9B"; the rest
  # (patch/position embeddings, cls, norms) is ~3M. So the total is pinned to
  # the components' sum at 2%, and to the headline at 3% (1.9B * 0.97 =
  # 1.843B: the headline itself is 3% above its own breakdown).
  assert abs(total - sum(PAPER.values())) / sum(PAPER.values()) < 0.02, total
  assert abs(total - 1.9e9) / 1.9e9 < 0.03, total
  assert parts["rest"] < 5e6, parts["rest"]
  # VL experts live in the top 3 layers only.
  vl_blocks = {int(k[0][5:]) for k in flat if _expert(k) == "vl"}
  assert vl_blocks == {37, 38, 39}


def tiny_formula(cfg):
  """Closed-form count of a Multiway model, from the architecture."""
  w, f = cfg.width, cfg.mlp_dim
  attn = (w * 3 * w + 3 * w) + (w * w + w) + 2 * w      # qkv, proj, sub-LN
  if cfg.multiway_attention:                            # torchscale: v and l
    attn *= 2
  expert = 2 * w + 2 * w + (w * f + f) + 2 * f + (f * w + w)
  blocks = cfg.depth * (attn + 2 * expert) + cfg.num_vl_layers * expert
  vision = (cfg.patch_size ** 2 * 3 * w + w) + 2 * w + (
      1 + (cfg.image_size // cfg.patch_size) ** 2) * w
  text = cfg.vocab_size * w + cfg.max_text_len * w
  return blocks + vision + text + 2 * 2 * w


# -- the tiny model, compiled once ---------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  # Two blocks (one plain, one VL) keep the three gradient compiles short.
  cfg = multiway.config_for("tiny", depth=2)
  model = multiway.Multiway(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, cfg.image_size, cfg.image_size, 3)),
                       jnp.float32)
  text = rng.integers(4, cfg.vocab_size, size=(2, 7))
  text[1, 5:] = cfg.pad_id                      # one padded row
  text = jnp.asarray(text, jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), images, text)["params"]
  return cfg, model, params, images, text


@pytest.mark.parametrize("multiway_attention", [False, True])
def test_tiny_param_count_closed_form(multiway_attention):
  cfg = multiway.config_for("tiny", multiway_attention=multiway_attention)
  s = cfg.image_size
  params = jax.eval_shape(lambda r: multiway.Multiway(cfg).init(
      r, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 4), jnp.int32)),
                          jax.random.key(0))["params"]
  assert sum(_size(x) for x in _flat(params).values()) == tiny_formula(cfg)


def test_every_param_has_logical_axes(tiny):
  _, _, params, _, _ = tiny
  flat = traverse_util.flatten_dict(params)
  for key, leaf in flat.items():
    assert isinstance(leaf, nn.Partitioned), key
    assert len(leaf.names) == leaf.value.ndim, key
  # Experts shard like MLPs.
  assert flat[("block0", "mlp_v", "fc1", "kernel")].names == ("embed", "mlp")
  assert flat[("block1", "mlp_vl", "fc2", "kernel")].names == ("mlp", "embed")


@pytest.fixture(scope="module")
def grads(tiny):
  """Gradients of a random projection of the valid output tokens, per input
  kind (image-only, text-only, image+text)."""
  cfg, model, params, images, text = tiny
  w = jax.random.normal(jax.random.key(1), (cfg.width,))

  def loss(p, kind):
    args = {"image": dict(images=images), "text": dict(text=text),
            "pair": dict(images=images, text=text)}[kind]
    x, valid = model.apply({"params": p}, **args)
    return jnp.sum(jnp.tanh(x @ w) * valid)

  kinds = ("image", "text", "pair")
  # One compile for the three input kinds.
  all_grads = jax.jit(lambda p: [jax.grad(loss)(p, k) for k in kinds])(params)
  return {kind: {k: np.asarray(v) for k, v in _flat(g).items()}
          for kind, g in zip(kinds, all_grads)}


def _zero(g):
  return not np.any(g)


def test_text_only_leaves_vision_experts_untouched(tiny, grads):
  cfg = tiny[0]
  for key, g in grads["text"].items():
    used = (_expert(key) == "l" or key[0] == "text_embed"
            or key[1:2] == ("attn",) or key[0] == "norm_l")
    assert _zero(g) != used, key


def test_image_only_leaves_language_experts_untouched(tiny, grads):
  for key, g in grads["image"].items():
    used = ((_expert(key) == "v" or key[0] == "vision_embed"
             or key[1:2] == ("attn",) or key[0] == "norm_v")
            and key[-1] != "mask_token")          # no image mask given
    assert _zero(g) != used, key


def test_vl_experts_top_layers_pair_input_only(tiny, grads):
  cfg = tiny[0]
  top = {f"block{i}" for i in range(cfg.depth - cfg.num_vl_layers, cfg.depth)}
  vl_blocks = {k[0] for k in grads["pair"] if _expert(k) == "vl"}
  assert vl_blocks == top
  for key, g in grads["pair"].items():
    expert = _expert(key)
    if key[-1] == "mask_token":
      assert _zero(g)
    elif expert is None:
      assert not _zero(g), key
    elif key[0] in top:
      # A pair uses the VL expert for all tokens in the top layers.
      assert _zero(g) == (expert != "vl"), key
    else:
      assert not _zero(g), key                     # v on image, l on text


def _pair(model, params, images, text):
  return jax.jit(lambda p, i, t: model.apply(
      {"params": p}, i, t, method=multiway.Multiway.encode_pair))(
          params, images, text)


@pytest.fixture(scope="module")
def pair_out(tiny):
  _, model, params, images, text = tiny
  return _pair(model, params, images, text)


def test_pair_sequence_layout_and_padding(tiny, pair_out):
  cfg, model, params, images, text = tiny
  x, valid = pair_out
  n_img = cfg.num_image_tokens
  assert x.shape == (2, n_img + text.shape[1], cfg.width)
  np.testing.assert_array_equal(valid[:, n_img:], np.asarray(text) != 0)
  assert bool(valid[:, :n_img].all())
  # Padding keys are never attended: the padded row's valid tokens equal
  # those of the same text without its padding.
  short, _ = _pair(model, params, images[1:], text[1:, :5])
  np.testing.assert_allclose(np.asarray(x[1:, :n_img + 5]),
                             np.asarray(short), atol=1e-5)


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="num_vl_layers"):
    multiway.validate(multiway.config_for("tiny", num_vl_layers=9))
  with pytest.raises(ValueError, match="patch_size"):
    multiway.validate(multiway.config_for("tiny", image_size=30))
  with pytest.raises(ValueError, match="preset"):
    multiway.config_for("huge")
  with pytest.raises(ValueError, match="multiway_attention"):
    multiway.validate(multiway.config_for("tiny", multiway_attention="yes"))
  with pytest.raises(ValueError, match="normalize_output"):
    multiway.validate(multiway.config_for("tiny", normalize_output="yes"))
  multiway.validate(multiway.config_for("giant"))


# -- a naive reference of one block -------------------------------------------

def _ln(x, p, eps):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps) * p["scale"] + p["bias"]


_erf = np.vectorize(math.erf)


def _gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def reference_block(p, x, valid, split, fusion, heads, eps,
                    multiway_attention=False):
  """One Multiway block token by token, in float64: expert 'vl' for every
  token when fusion, else 'v' before `split` and 'l' after; with
  `multiway_attention` (torchscale) each token's q/k/v, sub-LN and output
  projection are its modality's copy ('v' before `split`, else 'l', a
  fusion layer included), the softmax over all tokens."""
  b, n, w = x.shape
  d = w // heads
  expert = lambda i: "vl" if fusion else ("v" if i < split else "l")
  suffix = lambda i: ("_v" if i < split else "_l") if multiway_attention else ""
  a = p["attn"]
  out = np.zeros_like(x)
  for e in range(b):
    h = np.stack([_ln(x[e, i], p[f"norm1_{expert(i)}"], eps)
                  for i in range(n)])
    qkv = np.stack([np.einsum("w,wthd->thd", h[i], a["qkv" + suffix(i)][
        "kernel"]) + a["qkv" + suffix(i)]["bias"] for i in range(n)])
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    for i in range(n):
      heads_out = []
      for hd in range(heads):
        keys = [j for j in range(n) if valid[e, j]]
        s = np.array([q[i, hd] @ k[j, hd] / math.sqrt(d) for j in keys])
        att = np.exp(s - s.max())
        att /= att.sum()
        heads_out.append(sum(att[t] * v[j, hd] for t, j in enumerate(keys)))
      o = _ln(np.concatenate(heads_out), a["norm" + suffix(i)], eps)
      proj = a["proj" + suffix(i)]
      o = o @ proj["kernel"].reshape(w, w) + proj["bias"]
      y = x[e, i] + o
      m = p[f"mlp_{expert(i)}"]
      f = _ln(y, p[f"norm2_{expert(i)}"], eps)
      f = _gelu(f @ m["fc1"]["kernel"] + m["fc1"]["bias"])
      f = _ln(f, m["norm"], eps)
      out[e, i] = y + f @ m["fc2"]["kernel"] + m["fc2"]["bias"]
  return out


@pytest.mark.parametrize("fusion,multiway_attention",
                         [(False, False), (True, False), (True, True)])
def test_block_matches_naive_reference(fusion, multiway_attention):
  cfg = multiway.MultiwayConfig(width=16, depth=1, num_heads=2, mlp_dim=32,
                                num_vl_layers=1,
                                multiway_attention=multiway_attention)
  block = multiway.MultiwayBlock(cfg, has_vl=True)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 9, 16)).astype(np.float32)
  valid = np.ones((2, 9), bool)
  valid[1, 7:] = False                              # padded text keys
  mask = jnp.asarray(valid)[:, None, None, :]
  params = jax.eval_shape(
      lambda: block.init(jax.random.key(0), x, mask, 5, fusion))["params"]
  # Random values everywhere (LayerNorm scales and biases included).
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32),
      nn.meta.unbox(params))
  got = jax.jit(lambda p, x, m: block.apply({"params": p}, x, m, 5,
                                             fusion))(params, x, mask)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = reference_block(p64, x.astype(np.float64), valid, 5, fusion,
                         cfg.num_heads, cfg.norm_eps, multiway_attention)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_tokens(tiny, pair_out):
  _, _, params, images, text = tiny
  remat = multiway.Multiway(dataclasses.replace(tiny[0], remat="full"))
  want = pair_out[0]
  got, _ = _pair(remat, params, images, text)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


# -- normalize_output=False (torchscale's args.normalize_output) ---------------

def _no_norm(tiny):
  """The tiny model without its final norms, holding the tiny model's params
  less norm_v/norm_l."""
  cfg, _, params, _, _ = tiny
  model = multiway.Multiway(dataclasses.replace(cfg, normalize_output=False))
  return model, {k: v for k, v in params.items()
                 if k not in ("norm_v", "norm_l")}


def test_no_final_norm_param_tree(tiny):
  cfg, _, params, images, text = tiny
  model, _ = _no_norm(tiny)
  got = _flat(jax.eval_shape(model.init, jax.random.key(0), images,
                             text)["params"])
  want = {k: v for k, v in _flat(params).items()
          if k[0] not in ("norm_v", "norm_l")}
  # The True tree does hold the two norms, so the filter above is not empty.
  assert {k[0] for k in _flat(params)} >= {"norm_v", "norm_l"}
  assert {k: v.shape for k, v in got.items()} == {
      k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("kind", ["pair", "image"])
def test_no_final_norm_tokens_are_the_pre_norm_tokens(tiny, kind):
  cfg, model, params, images, text = tiny
  bare, bare_params = _no_norm(tiny)
  # Distinct random scales/biases for norm_v and norm_l (init's 1/0 would not
  # catch a norm applied to the wrong modality).
  rng = np.random.default_rng(7)
  params = dict(params)
  for name in ("norm_v", "norm_l"):
    params[name] = jax.tree.map(
        lambda p: p.replace_boxed(jnp.asarray(
            rng.normal(size=p.value.shape), jnp.float32)),
        params[name], is_leaf=lambda p: isinstance(p, nn.Partitioned))
  # The pair covers norm_l on the text tokens; an image-only call must use
  # norm_v on every token.
  args = dict(images=images, text=text if kind == "pair" else None)
  run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, **args))(p)
  normed, valid = run(model, params)
  raw, raw_valid = run(bare, bare_params)
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(raw_valid))
  p64 = {name: {k: np.asarray(v, np.float64) for k, v in nn.meta.unbox(
      params[name]).items()} for name in ("norm_v", "norm_l")}
  raw = np.asarray(raw, np.float64)
  split = cfg.num_image_tokens if kind == "pair" else raw.shape[1]
  want = np.concatenate([_ln(raw[:, :split], p64["norm_v"], cfg.norm_eps),
                         _ln(raw[:, split:], p64["norm_l"], cfg.norm_eps)], 1)
  np.testing.assert_allclose(np.asarray(normed), want, atol=1e-4, rtol=1e-4)
  # The bare tokens are not normalised (else the check above is vacuous).
  assert np.abs(raw - np.asarray(normed)).max() > 0.1


def test_no_final_norm_cached_decoding_matches_the_full_call(tiny):
  cfg, _, _, images, text = tiny
  model, params = _no_norm(tiny)
  text = text[:1, :5]                      # unpadded caption
  full, _ = jax.jit(lambda p: model.apply(
      {"params": p}, images[:1], text,
      method=multiway.Multiway.encode_caption))(params)
  cache = multiway.init_cache(model.config, 1, text.shape[1])
  pre, _, cache = jax.jit(lambda p, c: model.apply(
      {"params": p}, images=images[:1], text=text[:, :3], cache=c))(params,
                                                                    cache)
  steps = [pre[:, cfg.num_image_tokens:]]
  step = jax.jit(lambda p, t, c, i: model.apply(
      {"params": p}, text=t, cache=c, cache_index=i))
  for t in range(3, text.shape[1]):
    x, _, cache = step(params, text[:, t:t + 1], cache,
                       cfg.num_image_tokens + t)
    steps.append(x)
  np.testing.assert_allclose(np.concatenate(steps, 1),
                             np.asarray(full[:, cfg.num_image_tokens:]),
                             atol=1e-5)
