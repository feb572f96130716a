"""UniCL (Florence eqs. 1-3) against an independent numpy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.losses import contrastive


def numpy_unicl(u, v, y, tau):
  """Literal transcription of eqs. 1-3 with python loops (divided by |B|)."""
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  b = len(y)
  s = tau * u @ v.T
  l_i2t = 0.0
  for i in range(b):
    p = [k for k in range(b) if y[k] == y[i]]
    denom = sum(np.exp(s[i, j]) for j in range(b))
    l_i2t -= sum(np.log(np.exp(s[i, k]) / denom) for k in p) / len(p)
  l_t2i = 0.0
  for j in range(b):
    q = [k for k in range(b) if y[k] == y[j]]
    denom = sum(np.exp(s[i, j]) for i in range(b))
    l_t2i -= sum(np.log(np.exp(s[k, j]) / denom) for k in q) / len(q)
  return (l_i2t + l_t2i) / b


@pytest.mark.parametrize("labels", [
    [0, 1, 2, 3, 4, 5],          # all distinct: CLIP
    [7, 7, 3, 3, 3, 9],          # shared descriptions
    [5, 5, 5, 5, 5, 5],          # one description for the whole batch
])
def test_unicl_matches_numpy(labels):
  rng = np.random.default_rng(0)
  u = rng.normal(size=(6, 5))
  v = rng.normal(size=(6, 5))
  y = np.asarray(labels)
  got, _ = contrastive.unicl_loss(jnp.asarray(u), jnp.asarray(v),
                                  jnp.asarray(y), jnp.asarray(3.7))
  np.testing.assert_allclose(float(got), numpy_unicl(u, v, y, 3.7),
                             rtol=1e-5)


def test_clip_special_case_is_symmetric_cross_entropy():
  """With distinct labels UniCL is CLIP's loss: CE(rows) + CE(columns)."""
  rng = np.random.default_rng(1)
  u = rng.normal(size=(8, 4))
  v = rng.normal(size=(8, 4))
  un = u / np.linalg.norm(u, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  logits = 10.0 * un @ vn.T

  def ce(x):  # mean cross-entropy with targets on the diagonal
    x = x - x.max(1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    return -np.mean(np.diag(logp))

  expected = ce(logits) + ce(logits.T)
  got, _ = contrastive.clip_loss(jnp.asarray(u), jnp.asarray(v),
                                 jnp.asarray(10.0))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  u = rng.normal(size=(5, 3))
  v = rng.normal(size=(5, 3))
  y = np.asarray([1, 1, 2, 3, 3])
  g = jax.grad(lambda a: contrastive.unicl_loss(a, jnp.asarray(v), y,
                                                jnp.asarray(2.0))[0])(
                                                    jnp.asarray(u))
  eps = 1e-4
  i, j = 2, 1
  up, um = u.copy(), u.copy()
  up[i, j] += eps
  um[i, j] -= eps
  fd = (numpy_unicl(up, v, y, 2.0) - numpy_unicl(um, v, y, 2.0)) / (2 * eps)
  np.testing.assert_allclose(float(g[i, j]), fd, rtol=1e-3, atol=1e-6)
