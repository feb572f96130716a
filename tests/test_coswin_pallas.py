"""CoSwin with the fused Pallas window attention (interpret mode on CPU)
gives the loss and gradients of the XLA reference, bias tables included."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax.models import coswin


def test_coswin_pallas_equals_xla():
  # 32 px: stage 1 has 8x8 tokens in shifted 4x4 windows (masked, N=16),
  # stage 2 4x4 tokens in one window.
  xla_cfg = coswin.CoSwinConfig(**coswin.PRESETS["tiny"])
  pallas_cfg = dataclasses.replace(xla_cfg, attention_impl="pallas")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = nn.unbox(coswin.CoSwin(xla_cfg).init(jax.random.key(1), images))
  target = jax.random.normal(jax.random.key(2), (2, 128))

  def loss(p, cfg):
    pooled, _ = coswin.CoSwin(cfg).apply(p, images)
    return jnp.sum((pooled - target) ** 2)

  want, want_grads = jax.value_and_grad(loss)(params, xla_cfg)
  got, got_grads = jax.value_and_grad(loss)(params, pallas_cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  flat_want = jax.tree_util.tree_flatten_with_path(want_grads)[0]
  flat_got = jax.tree.leaves(got_grads)
  tables = 0
  for (path, w), g in zip(flat_want, flat_got):
    scale = float(np.abs(w).max()) or 1.0
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
    tables += "relative_position_bias" in jax.tree_util.keystr(path)
  assert tables == 4  # every block's table got a (checked) gradient
