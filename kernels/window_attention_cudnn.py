"""Window attention through cuDNN's fused attention (GPU only).

`jax.nn.dot_product_attention(..., implementation='cudnn')` takes the florax
layout (BW, N, heads, head_dim) as is ("BTNH"). Its rules shape this wrapper:

  * bf16/fp16 only: fp32 inputs raise (use 'pallas' or 'xla').
  * head_dim a multiple of 8 (<= 128, <= 256 on Hopper): checked by jax.
  * The bias must broadcast to (BW, heads, N, N). The relative-position bias
    (heads, N, N) does; the shift mask (windows, N, N) does not broadcast over
    BW = batch*windows, so with a mask the sum bias + mask is materialized at
    (BW, heads, N, N) in q's dtype. That costs BW*heads*N*N*2 bytes of extra
    reads (and the same again for its gradient, which XLA then sums back to
    (heads, N, N)): 157 MB for Swin-B stage 1, about 40% of q, k, v, o.
  * A biased backward needs even sequence lengths. Odd N (49, 147, ...) is
    padded by one token: q, k, v get a zero row, the bias a large negative
    column for the padded key (so it gets no probability) and a zero row for
    the padded query, whose output is sliced off. The padded query's
    cotangent is zero, so it adds nothing to dk, dv or dbias. This pads in
    HBM (unlike the Pallas kernel), which costs an extra copy of q, k, v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# cuDNN mishandles the difference of two huge negatives (see jax's own
# get_large_negative_number); -2**41 is what jax uses for bf16.
_PAD_LOGIT = -float(2 << 40)


def window_attention_cudnn(q, k, v, bias=None, mask=None, *, scale=None):
  """Window attention via cuDNN flash attention.

  Args:
    q, k, v: (batch*windows, N, heads, head_dim) in bf16 or fp16.
    bias: (heads, N, N) or None.
    mask: (windows, N, N) additive mask or None.
    scale: logit scale; head_dim**-0.5 when None.
  Returns:
    (batch*windows, N, heads, head_dim) in q's dtype.
  Raises:
    RuntimeError: not running on a GPU.
    ValueError: dtype not supported by cuDNN.
  """
  if jax.default_backend() != "gpu":
    raise RuntimeError(
        "window attention implementation 'cudnn' needs an NVIDIA GPU with "
        f"cuDNN; the JAX backend is {jax.default_backend()!r}. Use 'pallas' "
        "or 'xla'.")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"cuDNN fused attention supports only bf16/fp16 inputs, got "
        f"{q.dtype}; use implementation='pallas' or 'xla' for fp32")
  bw, n, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  full = None
  if bias is not None:
    full = bias.astype(jnp.float32)[None]                    # (1, H, N, N)
  if mask is not None:
    nw = mask.shape[0]
    m = mask.astype(jnp.float32)[None, :, None]              # (1, nW, 1, N, N)
    b = full[:, None] if full is not None else jnp.zeros((1, 1, h, n, n))
    full = jnp.broadcast_to(b + m, (bw // nw, nw, h, n, n)).reshape(
        bw, h, n, n)
  pad = n % 2 if full is not None else 0
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    full = jnp.pad(full, ((0, 0), (0, 0), (0, pad), (0, 0)))
    full = jnp.pad(full, ((0, 0), (0, 0), (0, 0), (0, pad)),
                   constant_values=_PAD_LOGIT)
  if full is not None:
    full = full.astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=full, scale=scale,
                                     implementation="cudnn")
  return out[:, :n]
