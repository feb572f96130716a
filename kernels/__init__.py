"""Hand-written kernels and their dispatchers.

window_attention          the entry point (`window_attention(...)`) and the
                          xla reference
window_attention_pallas   fused Pallas forward/backward kernels
window_attention_cudnn    cuDNN fused attention wrapper (GPU only)
bench_window_attention    `python -m kernels.bench_window_attention`

Submodules are not re-exported: `kernels.window_attention` must stay the
module (the function has the same name).
"""

from __future__ import annotations
