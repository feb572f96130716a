"""Window self-attention: one entry point, several implementations.

Every window-attention call in florax goes through `window_attention`, so a
model never knows which implementation runs. Layout is "by window":

  q, k, v : (batch * windows, tokens_per_window, heads, head_dim)
  bias    : (heads, N, N)   relative position bias gathered from its table
  mask    : (windows, N, N) additive mask (0 or a large negative), or None;
            window w of every image uses mask[w], so batch*windows must be a
            multiple of windows.

The softmax is always computed in fp32, whatever the input dtype.

Implementations:
  xla     the reference below (einsum + fp32 softmax).
  pallas  fused forward/backward kernels (window_attention_pallas.py); GPU via
          the Triton lowering, CPU through the Pallas interpreter, TPU where
          Mosaic's block rules hold and otherwise the xla path, with the
          reason logged.
  cudnn   jax.nn.dot_product_attention(implementation='cudnn'); GPU only,
          bf16/fp16 only (window_attention_cudnn.py).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")

_log = logging.getLogger(__name__)


def _backend() -> str:
  return jax.default_backend()


def _check_shapes(q, k, v, bias, mask):
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(
        "window_attention wants q, k, v of one shape (batch*windows, tokens, "
        f"heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
  _, n, h, _ = q.shape
  if bias is not None and bias.shape != (h, n, n):
    raise ValueError(f"bias must be (heads, N, N) = {(h, n, n)}, got {bias.shape}")
  if mask is not None:
    if mask.ndim != 3 or mask.shape[1:] != (n, n):
      raise ValueError(f"mask must be (windows, {n}, {n}), got {mask.shape}")
    if q.shape[0] % mask.shape[0]:
      raise ValueError(
          f"batch*windows={q.shape[0]} is not a multiple of the mask's "
          f"windows={mask.shape[0]}")


def window_attention_xla(q, k, v, bias=None, mask=None, *, scale=None):
  """Reference implementation: einsum + fp32 softmax (XLA fuses what it can)."""
  _check_shapes(q, k, v, bias, mask)
  bw, n, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[None]
  if mask is not None:
    nw = mask.shape[0]
    logits = logits.reshape(bw // nw, nw, h, n, n)
    logits = logits + mask.astype(jnp.float32)[None, :, None]
    logits = logits.reshape(bw, h, n, n)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def window_attention(q, k, v, bias=None, mask=None, *, implementation="xla",
                     scale=None):
  """Attention inside each window; see the module docstring for layouts.

  Args:
    q, k, v: (batch*windows, N, heads, head_dim).
    bias: (heads, N, N) or None.
    mask: (windows, N, N) additive mask or None.
    implementation: one of `IMPLEMENTATIONS`.
    scale: logit scale; head_dim**-0.5 when None.
  Returns:
    (batch*windows, N, heads, head_dim) in q's dtype.
  """
  if implementation == "xla":
    return window_attention_xla(q, k, v, bias, mask, scale=scale)
  if implementation == "pallas":
    # Imported here so the xla path never pays for importing Pallas.
    from kernels import window_attention_pallas as wap
    _check_shapes(q, k, v, bias, mask)
    backend = _backend()
    try:
      plan = wap.make_plan(q.shape, 0 if mask is None else mask.shape[0],
                           platform=backend)
    except wap.UnsupportedShape as e:
      if backend != "tpu":
        raise
      _log.warning("window_attention: pallas kernel not used on TPU for q %s "
                   "(%s); running the xla implementation", q.shape, e)
      return window_attention_xla(q, k, v, bias, mask, scale=scale)
    return wap.window_attention_pallas(q, k, v, bias, mask, scale=scale,
                                       plan=plan)
  if implementation == "cudnn":
    from kernels import window_attention_cudnn
    _check_shapes(q, k, v, bias, mask)
    return window_attention_cudnn.window_attention_cudnn(
        q, k, v, bias, mask, scale=scale)
  raise ValueError(
      f"unknown window attention implementation {implementation!r}; "
      f"choose one of {IMPLEMENTATIONS}")
