"""Window-attention kernels against the XLA reference and a numpy loop.

The Pallas kernels run through the Pallas interpreter on CPU (the same tiling,
padding and masked loads as on GPU), so shapes are tiny: two images, a few
windows, 2 heads, head_dim 8 (padded to 16 inside the kernel, so the column
masking is exercised too). The shift masks are real Swin masks, built here by
labelling the regions of a rolled image with a numpy loop; 3-D windows
(2x7x7 = 98 tokens) use the same construction in three dimensions.
"""

from __future__ import annotations

import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import window_attention as wa
from kernels import window_attention_pallas as wap

# N -> (window, resolution, shift); resolution / window windows per image.
_WINDOWS = {
    49: ((7, 7), (14, 14), (3, 3)),
    98: ((2, 7, 7), (2, 14, 14), (1, 3, 3)),
    144: ((12, 12), (24, 12), (6, 6)),
}
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def swin_shift_mask(window, resolution, shift, neg=-100.0):
  """(windows, N, N) additive mask of a cyclically shifted image.

  Tokens are labelled by which of the (up to) 3 slices per axis of the rolled
  image they fall in; two tokens of a window may attend to each other only
  if their labels match.
  """
  labels = np.zeros(resolution, np.int64)
  per_axis = []
  for r, w, s in zip(resolution, window, shift):
    ids = np.zeros(r, np.int64)
    ids[r - w:r - s] = 1
    ids[r - s:] = 2
    per_axis.append(ids)
  for idx in itertools.product(*(range(r) for r in resolution)):
    labels[idx] = sum(per_axis[a][i] * 3 ** a for a, i in enumerate(idx))
  wins = []
  for start in itertools.product(
      *(range(0, r, w) for r, w in zip(resolution, window))):
    block = labels[tuple(slice(s, s + w) for s, w in zip(start, window))]
    wins.append(block.reshape(-1))
  wins = np.stack(wins)
  return np.where(wins[:, :, None] == wins[:, None, :], 0.0, neg).astype(
      np.float32)


def _inputs(n, dtype, with_mask, images=2, heads=2, head_dim=8, seed=0):
  window, resolution, shift = _WINDOWS[n]
  mask = jnp.asarray(swin_shift_mask(window, resolution, shift))
  nw = mask.shape[0]
  ks = jax.random.split(jax.random.PRNGKey(seed + n), 5)
  shape = (images * nw, n, heads, head_dim)
  q, k, v, do = (jax.random.normal(ks[i], shape, jnp.float32).astype(dtype)
                 for i in range(4))
  bias = jax.random.normal(ks[4], (heads, n, n), jnp.float32)
  return q, k, v, bias, (mask if with_mask else None), do


def _rel(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.partial(jax.jit, static_argnames="implementation")
def _fwd_bwd(q, k, v, bias, mask, do, implementation):
  f = lambda q, k, v, bias: wa.window_attention(
      q, k, v, bias, mask, implementation=implementation)
  out, vjp = jax.vjp(f, q, k, v, bias)
  return (out, *vjp(do))


def test_shift_mask_builder_matches_hand_count():
  # 14x14 image, window 7, shift 3: window 0 is one region, the last window
  # has 4 regions of sizes 4x4, 4x3, 3x4, 3x3 -> allowed pairs 16^2+12^2+...
  m = swin_shift_mask((7, 7), (14, 14), (3, 3))
  assert m.shape == (4, 49, 49)
  assert (m[0] == 0).all()
  assert int((m[3] == 0).sum()) == 16**2 + 12**2 + 12**2 + 9**2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "shift"])
@pytest.mark.parametrize("n", [49, 98, 144])
def test_pallas_matches_xla(n, with_mask, dtype):
  q, k, v, bias, mask, do = _inputs(n, dtype, with_mask)
  got = _fwd_bwd(q, k, v, bias, mask, do, "pallas")
  want = _fwd_bwd(q, k, v, bias, mask, do, "xla")
  for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert np.isfinite(np.asarray(g, np.float32)).all(), name
    assert _rel(g, w) <= _TOL[dtype], (name, _rel(g, w))


def test_xla_reference_matches_numpy_loop():
  # The reference itself against a per-window, per-head numpy loop.
  q, k, v, bias, mask, _ = _inputs(49, jnp.float32, True)
  out = wa.window_attention(q, k, v, bias, mask, implementation="xla")
  qn, kn, vn, bn, mn = (np.asarray(x, np.float64) for x in (q, k, v, bias,
                                                              mask))
  want = np.zeros_like(qn)
  for b in range(qn.shape[0]):
    for h in range(qn.shape[2]):
      s = qn[b, :, h] @ kn[b, :, h].T / np.sqrt(qn.shape[-1])
      s = s + bn[h] + mn[b % mn.shape[0]]
      p = np.exp(s - s.max(1, keepdims=True))
      want[b, :, h] = (p / p.sum(1, keepdims=True)) @ vn[b, :, h]
  assert _rel(out, want) <= 1e-5


def _loss_and_grads(f, q, k, v, bias, do):
  loss = lambda q, k, v, bias: jnp.sum(f(q, k, v, bias) * do)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      q, k, v, bias)


def test_pallas_under_jit_with_several_query_blocks_and_window_blocks():
  # block_q=16 splits N=49 into 4 query blocks (atomic dbias path), and
  # windows_per_block=2 makes 4 programs per head loop over 2 windows each.
  q, k, v, bias, mask, do = _inputs(49, jnp.float32, True)
  got = _loss_and_grads(
      lambda q, k, v, bias: wap.window_attention_pallas(
          q, k, v, bias, mask, block_q=16, windows_per_block=2, scale=0.3),
      q, k, v, bias, do)
  want = _loss_and_grads(
      lambda q, k, v, bias: wa.window_attention_xla(
          q, k, v, bias, mask, scale=0.3), q, k, v, bias, do)
  assert abs(float(got[0]) - float(want[0])) <= 1e-4 * abs(float(want[0]))
  for g, w in zip(got[1], want[1]):
    assert _rel(g, w) <= 1e-5


def test_plan_pads_to_powers_of_two_and_tiles_queries():
  plan = wap.make_plan((8, 49, 4, 32), 4, platform="gpu")
  assert (plan.n_pad, plan.d_pad, plan.block_q) == (64, 32, 64)
  assert plan.windows_per_block == 4 and not plan.interpret
  plan = wap.make_plan((256, 392, 4, 32), 128, platform="gpu")
  assert (plan.n_pad, plan.block_q, plan.num_q_blocks) == (512, 32, 16)
  with pytest.raises(wap.UnsupportedShape, match="block_q"):
    wap.make_plan((8, 49, 4, 32), 0, platform="gpu", block_q=48)


def test_tpu_layout_interpreted_matches_xla():
  # The TPU plan (unpadded blocks, heads as lane blocks of (BW, N, H*D)) run
  # through the interpreter: one head, so the lane rule holds for head_dim 8.
  q, k, v, bias, _, do = _inputs(49, jnp.float32, False, heads=1)
  plan = wap.make_plan(q.shape, 0, platform="tpu", interpret=True)
  assert plan.flat_heads and plan.n_pad == 49
  got = _loss_and_grads(
      lambda q, k, v, bias: wap.window_attention_pallas(
          q, k, v, bias, plan=plan), q, k, v, bias, do)
  want = _loss_and_grads(wa.window_attention_xla, q, k, v, bias, do)
  for g, w in zip(got[1], want[1]):
    assert _rel(g, w) <= 1e-5


def test_tpu_falls_back_to_xla_with_logged_reason(monkeypatch, caplog):
  q, k, v, bias, mask, _ = _inputs(49, jnp.float32, True)
  monkeypatch.setattr(wa, "_backend", lambda: "tpu")
  with caplog.at_level(logging.WARNING, logger=wa.__name__):
    out = wa.window_attention(q, k, v, bias, mask, implementation="pallas")
  assert "head_dim" in caplog.text and "xla" in caplog.text
  want = wa.window_attention_xla(q, k, v, bias, mask)
  assert _rel(out, want) == 0.0


def test_unknown_implementation_is_a_clear_error():
  q, k, v, bias, mask, _ = _inputs(49, jnp.float32, False)
  with pytest.raises(ValueError, match=r"'triton'.*xla.*pallas.*cudnn"):
    wa.window_attention(q, k, v, bias, mask, implementation="triton")


def test_bad_mask_shape_is_a_clear_error():
  q, k, v, bias, _, _ = _inputs(49, jnp.float32, False)
  with pytest.raises(ValueError, match="multiple of the mask"):
    wa.window_attention(q, k, v, bias, jnp.zeros((3, 49, 49)),
                        implementation="pallas")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU/TPU check")
def test_cudnn_off_gpu_raises():
  q, k, v, bias, _, _ = _inputs(49, jnp.bfloat16, False)
  with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
    wa.window_attention(q, k, v, bias, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("n", [49, 98])
def test_cudnn_matches_xla_on_gpu(n):
  q, k, v, bias, mask, do = _inputs(n, jnp.bfloat16, True, head_dim=16)
  got = _fwd_bwd(q, k, v, bias, mask, do, "cudnn")
  want = _fwd_bwd(q, k, v, bias, mask, do, "xla")
  for g, w in zip(got, want):
    assert _rel(g, w) <= 1e-2


@pytest.mark.parametrize("n,mask_windows,dtype", [
    (49, 64, jnp.bfloat16),    # Swin stage 1: one query block per window
    (392, 128, jnp.float32),   # video 8x7x7: 16 query blocks, atomic dbias
])
def test_gpu_kernels_lower_to_triton_without_a_gpu(n, mask_windows, dtype):
  # Cross-lowering for CUDA runs the Pallas->Triton lowering here, which
  # rejects what Triton cannot express (non power-of-two blocks, batched
  # dots, unmasked out-of-range access patterns it cannot index).
  from jax import export  # pylint: disable=g-import-not-at-top
  shape = (2 * mask_windows, n, 4, 32)
  plan = wap.make_plan(shape, mask_windows, platform="gpu")
  x = jax.ShapeDtypeStruct(shape, dtype)
  b = jax.ShapeDtypeStruct((4, n, n), jnp.float32)
  m = jax.ShapeDtypeStruct((mask_windows, n, n), jnp.float32)

  def fwd_bwd(q, k, v, bias, mask, do):
    f = lambda *a: wap.window_attention_pallas(*a, mask, plan=plan)
    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(do)

  exported = export.export(
      jax.jit(fwd_bwd), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "__gpu$xla.gpu.triton")])(x, x, x, b, m, x)
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2
