"""Activation checkpointing and scanned layers.

1. Scanned towers compute exactly what the unrolled towers compute, given
   the same weights (unrolled params stacked along the new `layers` axis):
   text blocks, and CoSwin's (plain, shifted) pairs.
2. Full remat of a 12-layer, width-768 transformer (ViT-B-sized) at batch
   32 cuts the compiled gradient's temp memory at least in half at no more
   than 1.4x the FLOPs, both from XLA's analyses of the compiled program.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax.data.tokenizer import EOS_ID
from florax.models import coswin, text


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _random_params(model, *args):
  """Random weights in the unrolled layout, from shapes alone (jitting the
  initializers costs more compile time than the whole test needs)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      shapes["params"])


def test_scanned_text_tower_equals_unrolled():
  kw = dict(vocab_size=50, width=32, depth=3, num_heads=4, max_len=8)
  plain = text.TextTransformer(text.TextConfig(**kw))
  scanned = text.TextTransformer(text.TextConfig(**kw, scan=True,
                                                 remat="full"))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 50).at[:, 5].set(
      EOS_ID)
  p = _random_params(plain, ids)
  ps = dict(p)
  ps["encoder"] = {"blocks": {"block": _stack(
      [p["encoder"][f"block{i}"] for i in range(3)])}}
  want, _ = jax.jit(plain.apply)({"params": p}, ids)
  got, _ = jax.jit(scanned.apply)({"params": ps}, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The scanned init has exactly that layout.
  init = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), ids)[
      "params"])
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, ps)


def test_scanned_coswin_equals_unrolled():
  kw = dict(embed_dim=16, depths=(4,), num_heads=(2,), window_size=2,
            stem_kernel=3, stem_stride=2, drop_path_rate=0.0)
  plain = coswin.CoSwin(coswin.CoSwinConfig(**kw))
  scanned = coswin.CoSwin(coswin.CoSwinConfig(**kw, scan=True))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  p = _random_params(plain, images)
  ps = {k: v for k, v in p.items() if "_block" not in k}
  ps["stage0_pairs"] = {
      "plain": _stack([p["stage0_block0"], p["stage0_block2"]]),
      "shifted": _stack([p["stage0_block1"], p["stage0_block3"]])}
  want, _ = jax.jit(plain.apply)({"params": p}, images)
  got, _ = jax.jit(scanned.apply)({"params": ps}, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _analyse(remat):
  cfg = text.TextConfig(vocab_size=1024, width=768, depth=12, num_heads=12,
                        max_len=77, remat=remat, scan=True)
  model = text.TextTransformer(cfg)
  ids = jax.ShapeDtypeStruct((32, 77), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 77), jnp.int32)))

  def loss(p, ids):
    pooled, _ = model.apply(p, ids)
    return jnp.sum(pooled ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
  return (compiled.memory_analysis().temp_size_in_bytes,
          compiled.cost_analysis()["flops"])


def test_full_remat_halves_temp_memory_at_bounded_flops():
  temp_none, flops_none = _analyse("none")
  temp_full, flops_full = _analyse("full")
  assert temp_full <= 0.5 * temp_none, (temp_full, temp_none)
  assert flops_none < flops_full <= 1.4 * flops_none, (flops_full, flops_none)
