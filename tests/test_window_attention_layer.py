"""CoSwin's window attention layer against a naive per-window loop.

The reference never partitions, rolls or builds masks: it decides for every
pair of tokens whether they share a shifted window and are not separated by
the cyclic wrap-around, exactly as Swin's shifted windows are defined.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.models import coswin


def naive_window_attention(x, params, heads, window, shift):
  b, h, w, c = x.shape
  d = c // heads
  wk = np.asarray(params["qkv"]["kernel"])            # (c, 3, heads, d)
  bk = np.asarray(params["qkv"]["bias"])              # (3, heads, d)
  table = np.asarray(params["relative_position_bias"])
  pk = np.asarray(params["proj"]["kernel"])           # (heads, d, c)
  pb = np.asarray(params["proj"]["bias"])
  qkv = np.einsum("byxc,ctnd->byxtnd", x, wk) + bk
  win = (min(window, h), min(window, w))
  sh = shift if h > window else 0
  sw = shift if w > window else 0
  hp, wp = -(-h // win[0]) * win[0], -(-w // win[1]) * win[1]
  out = np.zeros((b, h, w, heads, d))
  # Rolled coordinates r of an original row y: r = (y - sh) mod hp.
  def rolled(y, s, n):
    return (y - s) % n
  for bi in range(b):
    for y in range(h):
      for xx in range(w):
        ry, rx = rolled(y, sh, hp), rolled(xx, sw, wp)
        q = qkv[bi, y, xx, 0]                          # (heads, d)
        logits, values = [], []
        for ky in range(h):
          for kx in range(w):
            rky, rkx = rolled(ky, sh, hp), rolled(kx, sw, wp)
            if ry // win[0] != rky // win[0] or rx // win[1] != rkx // win[1]:
              continue  # different window
            # The last window row/col holds wrapped tokens (rolled index past
            # hp - shift) next to unwrapped ones; they must not see each other.
            if sh and (ry >= hp - sh) != (rky >= hp - sh):
              continue
            if sw and (rx >= wp - sw) != (rkx >= wp - sw):
              continue
            dy = (ry % win[0]) - (rky % win[0]) + window - 1
            dx = (rx % win[1]) - (rkx % win[1]) + window - 1
            bias = table[dy * (2 * window - 1) + dx]   # (heads,)
            logits.append(np.sum(q * qkv[bi, ky, kx, 1], -1) * d ** -0.5 + bias)
            values.append(qkv[bi, ky, kx, 2])
        logits = np.stack(logits)                      # (keys, heads)
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        out[bi, y, xx] = np.einsum("kh,khd->hd", p, np.stack(values))
  return np.einsum("byxnd,ndc->byxc", out, pk) + pb


@pytest.mark.parametrize("grid,shift", [((8, 8), 0), ((8, 8), 2), ((10, 9), 0),
                                        ((10, 9), 2), ((3, 10), 2)])
def test_matches_naive_loop(grid, shift):
  """Includes grids the window (4) does not divide, and one smaller than it."""
  heads, window, c = 2, 4, 8
  layer = coswin.WindowAttention(heads, window, shift)
  x = jax.random.normal(jax.random.key(0), (2, *grid, c))
  params = jax.tree.map(lambda a: a, layer.init(jax.random.key(1), x)["params"])
  params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(params))
  # A non-trivial bias table, so a wrong relative index shows up.
  params["relative_position_bias"] = np.asarray(
      jax.random.normal(jax.random.key(2), params["relative_position_bias"].shape))
  got = layer.apply({"params": params}, x)
  want = naive_window_attention(np.asarray(x, np.float64), params, heads,
                                window, shift)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_shift_mask_blocks_attention_across_the_wrap_boundary():
  """Token (0,0) is rolled into the bottom-right window next to (7,7); with
  the mask, changing (0,0) changes nothing there, only its own region."""
  layer = coswin.WindowAttention(num_heads=2, window_size=4, shift=2)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
  params = layer.init(jax.random.key(1), x)
  base = np.asarray(layer.apply(params, x))
  moved = np.asarray(layer.apply(params, x.at[0, 0, 0].add(5.0)))
  changed = np.abs(moved - base).max(-1)[0] > 1e-6
  # Same shifted window, other side of the wrap: must not change.
  for pos in [(7, 7), (6, 7), (7, 6), (0, 7), (7, 0), (1, 6), (6, 1)]:
    assert not changed[pos], pos
  # Same region of the same window: must change.
  for pos in [(0, 1), (1, 0), (1, 1)]:
    assert changed[pos], pos
  # Exactly the 2x2 region of wrapped tokens changes.
  assert changed.sum() == 4
