"""Analytic FLOPs of florax's models: the numerator of MFU.

Why closed forms: XLA's cost analysis of a compiled step counts a loop body
once, so any scanned encoder, gradient accumulation or gradient cache makes
it a lower bound, and it also counts elementwise work. The trainer's
TFLOP/s and MFU (and benchmarks/) use these counts instead; `tests/
test_flops.py` (and tests/test_flops_beit3.py: BEiT-3 MDM, VQ-KD;
tests/test_flops_flava.py: FLAVA's three kinds) pins them to the op-by-op
matmul count of each family's unrolled step (`hlo_matmul_flops`).

Conventions (PaLM, Chowdhery et al. 2022, appendix B: "model FLOPs"):
  * Only matmuls and convolutions count, 2 FLOPs per multiply-add:
    2·M·N·K per matmul (attention's QK^T and AV included); a convolution
    counts the multiply-adds that touch a real input pixel (taps on zero
    padding excluded, as XLA counts them), so its forward, input-gradient
    and weight-gradient convolutions all count the same. Norms, softmax,
    activations, the loss's elementwise arithmetic, embedding lookups
    (gathers) and the optimizer update are not counted.
  * A training step costs 3x the forward of every trained layer (forward,
    input gradient, weight gradient), except layers whose input needs no
    gradient (the stem convolution on pixels; a head after a
    stop_gradient): 2x. Frozen networks (EVA's teacher, a probe's tower)
    cost their forward, 1x.
  * Rematerialisation and the gradient cache recompute forwards, and the
    sharded global contrastive loss computes its logits once per
    direction; such recompute is NOT counted (model FLOPs, not hardware
    FLOPs), so MFU does not reward it.
  * Attention is dense: a causal or padding mask does not remove the
    masked scores (florax's kernels compute them), CoSwin's windows are
    counted over the padded grid they run on, and every Multiway token
    runs exactly one expert (dense FLOPs).

API (per example unless it says otherwise):
  Forward(flops, input_layer)          one forward pass; `.train()` is its
                                       training cost (3x flops - input_layer)
  dense(tokens, d_in, d_out)           a linear layer
  conv(size, kernel, stride, pad, c_in, c_out)   a square 2-D convolution
  encoder_forward(EncoderConfig, tokens)         the shared encoder
  vit_forward(ViTConfig)               ViT (patch conv + encoder)
  coswin_forward(CoSwinConfig, image_size)       CoSwin / Swin
  image_tower_forward(config.model, image_size)  by model.image.arch
  image_feature_width(config.model)    the tower's pooled width
  text_forward(TextConfig, length)     the text tower
  two_tower_forward(config.model, image_size, text_len)   towers +
                                       projections (no loss)
  contrastive_logits(global_batch, dim) the (B, B) logits matmul of a
                                       whole global batch (forward)
  multiway_forward(MultiwayConfig, images, text_len)  BEiT-3
  code_similarity(tokens, code_dim, codebook_size)  a nearest-code search
  vqkd_encoder_forward(VQKDConfig)     VQ-KD's encoder + encode head
  vqkd_decoder_forward(VQKDConfig)     VQ-KD's decoder + decode head
  vq_codes_forward(VQKDConfig)         a frozen tokenizer's codes (forward)
  flava_image_forward(FlavaConfig)     FLAVA's image encoder (a ViT)
  flava_text_forward(FlavaConfig, length)        its text encoder
  flava_multimodal_forward(FlavaConfig, text_len)  the to-mm projections +
                                       the multimodal encoder
  flava_masked_head(tokens, width, out)  its MIM/MLM/MMM head
  flava_codebook_forward(CodebookConfig)  its DALL-E image codebook
  flava_pretraining_forward(FlavaConfig, kind, text_len, num_codes)  one
                                       example of a FLAVA batch kind
                                       (trained network, heads included)
  resize_flops(size_in, size_out, channels)  jax.image.resize's matmuls
  hlo_matmul_flops(lowered or StableHLO text)  the op-by-op count of a
                                       lowered program (the cross-check)

Task-level: `Task.step_flops(kind, global_batch)` (florax/tasks/base.py)
gives one training step's FLOPs over the global batch; the trainer divides
by the mesh's device count.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from florax.models import coswin as coswin_lib
from florax.models import multiway as multiway_lib
from florax.models import text as text_lib
from florax.models import transformer
from florax.models import vit as vit_lib
from florax.models import windows


@dataclasses.dataclass(frozen=True)
class Forward:
  """Matmul FLOPs of one forward pass.

  Attributes:
    flops: all of them.
    input_layer: the part in layers whose input needs no gradient (pixels
      into a stem convolution, a head behind a stop_gradient): their
      backward computes the weight gradient only.
  """
  flops: float
  input_layer: float = 0.0

  def train(self) -> float:
    """Forward + backward FLOPs when every weight is trained."""
    return 3.0 * self.flops - self.input_layer

  def __add__(self, other: "Forward") -> "Forward":
    return Forward(self.flops + other.flops,
                   self.input_layer + other.input_layer)

  def __mul__(self, k: float) -> "Forward":
    return Forward(self.flops * k, self.input_layer * k)

  __rmul__ = __mul__


def dense(tokens: float, d_in: int, d_out: int) -> float:
  """A linear layer over `tokens` rows (the bias is elementwise)."""
  return 2.0 * tokens * d_in * d_out


def _valid_taps(size: int, kernel: int, stride: int, pad_lo: int,
                pad_hi: int) -> tuple[int, int]:
  """(output length, multiply-adds per channel pair that touch a real
  input element) along one axis of a convolution."""
  out = (size + pad_lo + pad_hi - kernel) // stride + 1
  starts = np.arange(out) * stride - pad_lo          # first tap's input index
  first = np.maximum(0, -starts)                     # first real tap
  last = np.minimum(kernel, size - starts)           # one past the last
  return out, int(np.sum(np.maximum(0, last - first)))


def conv(size: int, kernel: int, stride: int, pad: int, c_in: int,
         c_out: int) -> float:
  """A 2-D convolution of a size x size map with a square kernel and
  symmetric zero padding `pad`, per image."""
  _, taps = _valid_taps(size, kernel, stride, pad, pad)
  return 2.0 * taps * taps * c_in * c_out


def encoder_forward(cfg: transformer.EncoderConfig, tokens: int) -> float:
  """`cfg.depth` pre-LN blocks over `tokens` tokens, per example.

  Per block: qkv (3 W x W), scores QK^T and AV (N x N x W each: heads x
  head_dim = W), the output projection, and the MLP (fc1, fc2, plus the
  gate of a SwiGLU). Biases, rope, relative position biases, layer scale
  and sub-LNs are elementwise.
  """
  n, w, m = tokens, cfg.width, cfg.mlp_dim
  attention = dense(n, w, 3 * w) + 2 * 2.0 * n * n * w + dense(n, w, w)
  mlp = dense(n, w, m) * (3 if cfg.act == "swiglu" else 2)
  return cfg.depth * (attention + mlp)


def vit_forward(cfg: vit_lib.ViTConfig, in_channels: int = 3) -> Forward:
  """ViT per image: patch conv (kernel = stride = patch) + the encoder over
  the class token and the grid; pooling has no matmul. `in_channels`: of
  its input map (3 for pixels; VQ-KD's decoder reads a map of codes)."""
  patch = conv(cfg.image_size, cfg.patch_size, cfg.patch_size, 0,
               in_channels, cfg.width)
  tokens = cfg.num_prefix + cfg.grid ** 2
  return Forward(patch + encoder_forward(cfg.encoder(), tokens),
                 input_layer=patch)


def _swin_block(cfg: coswin_lib.CoSwinConfig, grid: int, width: int,
                shift: int) -> float:
  """One (shifted-)window block on a grid x grid map of `width` channels:
  qkv and proj on the real tokens, attention over the padded windows."""
  win, _ = windows.effective_window((grid, grid), cfg.window_size, shift)
  hp, wp = windows.padded_grid((grid, grid), win)
  n_win = (hp // win[0]) * (wp // win[1])
  per_window = win[0] * win[1]
  tokens = grid * grid
  attention = (dense(tokens, width, 3 * width)
               + 2 * 2.0 * n_win * per_window ** 2 * width
               + dense(tokens, width, width))
  hidden = int(width * cfg.mlp_ratio)
  return attention + 2 * dense(tokens, width, hidden)


def coswin_forward(cfg: coswin_lib.CoSwinConfig, image_size: int) -> Forward:
  """CoSwin (or Swin with stem/merge 'patch') per image."""
  coswin_lib.stage_grids(image_size, cfg)  # raises on a bad stride schedule
  if cfg.stem == "patch":
    k, pad = cfg.stem_stride, 0
  else:
    k, pad = cfg.stem_kernel, (cfg.stem_kernel - 1) // 2
  grid, _ = _valid_taps(image_size, k, cfg.stem_stride, pad, pad)
  stem = conv(image_size, k, cfg.stem_stride, pad, 3, cfg.embed_dim)
  total = stem
  for s, depth in enumerate(cfg.depths):
    width = cfg.embed_dim * 2 ** s
    if s > 0:
      prev = width // 2
      if cfg.merge == "patch":  # 2x2 concat -> bias-free linear
        grid //= 2
        total += dense(grid * grid, 4 * prev, width)
      else:
        k, pad = cfg.merge_kernel, (cfg.merge_kernel - 1) // 2
        total += conv(grid, k, cfg.merge_stride, pad, prev, width)
        grid, _ = _valid_taps(grid, k, cfg.merge_stride, pad, pad)
    for d in range(depth):
      total += _swin_block(cfg, grid, width,
                           0 if d % 2 == 0 else cfg.window_size // 2)
  return Forward(total, input_layer=stem)


def text_forward(cfg: text_lib.TextConfig, length: int) -> Forward:
  """The text tower over `length` tokens (the batch's, not max_len); the
  token embedding is a gather, the eos pooling an index."""
  return Forward(encoder_forward(cfg.encoder(), length))


def image_tower_forward(model_cfg: Any, image_size: int) -> Forward:
  """The image tower `config.model.image` describes (arch vit/coswin/
  multiway: the Multiway image-only, its mean pooling and fc_norm have no
  matmul)."""
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  cfg = two_tower.image_config(model_cfg)
  if isinstance(cfg, vit_lib.ViTConfig):
    return vit_forward(cfg)
  if isinstance(cfg, multiway_lib.MultiwayConfig):
    return multiway_forward(cfg, images=True)
  return coswin_forward(cfg, image_size)


def image_feature_width(model_cfg: Any) -> int:
  """Width of the tower's pooled feature (CoSwin: its last stage)."""
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  cfg = two_tower.image_config(model_cfg)
  if isinstance(cfg, (vit_lib.ViTConfig, multiway_lib.MultiwayConfig)):
    return cfg.width
  return cfg.embed_dim * 2 ** (len(cfg.depths) - 1)


def two_tower_forward(model_cfg: Any, image_size: int,
                      text_len: int) -> Forward:
  """One image-text pair through `two_tower.from_config(model_cfg)`: both
  towers and both projections (per example; the loss's logits matmul
  depends on the batch: `contrastive_logits`)."""
  out = image_tower_forward(model_cfg, image_size)
  embed = model_cfg.embed_dim
  if embed:
    out += Forward(dense(1, image_feature_width(model_cfg), embed))
  if model_cfg.get("text") is not None:
    text_cfg = text_lib.TextConfig(**dict(model_cfg.text))
    out += text_forward(text_cfg, text_len)
    out += Forward(dense(1, text_cfg.width, embed))
  return out


def contrastive_logits(global_batch: int, dim: int) -> float:
  """Forward FLOPs of the (B, B) image-text logits of a global batch:
  every image against every text, 2·B·B·D, once. florax's sharded global
  loss (florax.losses.global_contrastive) scores each device's image rows
  and its text rows apart, i.e. the logits once per direction: like
  recompute, that duplicate (another 3·2·B·B·D per step) is not counted."""
  return 2.0 * global_batch * global_batch * dim


def multiway_forward(cfg: Any, images: bool = True,
                     text_len: int = 0) -> Forward:
  """BEiT-3's Multiway Transformer per example: an image (cls + patches),
  a text of `text_len` tokens, or a pair. Each token runs one expert, so
  the blocks cost a dense encoder over all the tokens."""
  if not images and text_len <= 0:
    raise ValueError("multiway_forward needs images, text or both")
  tokens = text_len
  patch = 0.0
  if images:
    patch = conv(cfg.image_size, cfg.patch_size, cfg.patch_size, 0, 3,
                 cfg.width)
    tokens += cfg.num_image_tokens
  return Forward(patch + encoder_forward(cfg.encoder(), tokens),
                 input_layer=patch)


def code_similarity(tokens: float, code_dim: int,
                    codebook_size: int) -> float:
  """The (tokens, K) cosine similarities of `tokens` vectors of `code_dim`
  to every code of a codebook of K (a vector quantiser's nearest-code
  search, florax.models.vqkd.cosine_similarity): one matmul. Its result
  only feeds an argmax (or sits behind a stop_gradient), so it has no
  backward: a training step counts it once, like a frozen network."""
  return dense(tokens, code_dim, codebook_size)


def vqkd_encoder_forward(cfg: Any) -> Forward:
  """VQ-KD's encoder per image (florax.models.vqkd.VQKD.project): the ViT
  (its patch conv on pixels is the input layer) and the encode head,
  Linear(width, width) -> Tanh -> Linear(width, code_dim), on the grid's
  tokens (not the class token). The codebook search is `code_similarity`;
  the l2 normalisations are elementwise."""
  enc = cfg.encoder
  n = cfg.grid ** 2
  head = dense(n, enc.width, enc.width) + dense(n, enc.width, cfg.code_dim)
  return vit_forward(enc) + Forward(head)


def vqkd_decoder_forward(cfg: Any) -> Forward:
  """VQ-KD's training decoder per image (VQKD.decode): a ViT over the
  grid x grid map of `code_dim` codes (a 1x1 patch conv, class token) and
  the decode head, Linear(dw, dw) -> Tanh -> Linear(dw, target_width), on
  the grid's tokens. Its input (the straight-through codes) carries the
  encoder's gradient, so no layer of it is an input layer."""
  dec = cfg.decoder
  n = cfg.grid ** 2
  w = cfg.decoder_width
  head = dense(n, w, w) + dense(n, w, cfg.target_width)
  return Forward(vit_forward(dec, in_channels=cfg.code_dim).flops + head)


def vq_codes_forward(cfg: Any) -> float:
  """A frozen VQ-KD tokenizer's codes of one image at its own resolution
  (florax.tasks.vq_tokenizer.FrozenVQTokenizer.codes): encoder, encode
  head and the nearest-code search, forward only; no decoder. A resize of
  the consumer's pixels to the tokenizer's resolution is `resize_flops`."""
  return (vqkd_encoder_forward(cfg).flops
          + code_similarity(cfg.grid ** 2, cfg.code_dim, cfg.codebook_size))


def resize_flops(size_in: int, size_out: int, channels: int = 3) -> float:
  """jax.image.resize of a square image, per image: one interpolation
  matmul per spatial axis (rows first), 0 when the size is unchanged."""
  if size_in == size_out:
    return 0.0
  return (dense(size_out * size_in * channels, size_in, 1)
          + dense(size_out * size_out * channels, size_in, 1))


def flava_codebook_forward(cfg: Any) -> float:
  """FLAVA's DALL-E image codebook (florax.models.flava_codebook) per image
  at its input size: the 7x7 input conv, four groups of residual blocks
  (a 1x1 id_path where the width changes; res_path 3x3 -> w/4, 3x3, 3x3,
  1x1 -> w) at S, S/2, S/4, S/8 (max-pools between), the 1x1 output conv to
  the vocabulary. Frozen: forward only."""
  size, h = cfg.image_size, cfg.hidden
  total = conv(size, 7, 1, 3, 3, h)
  width = h
  for g in range(4):
    out, q = h * 2 ** g, h * 2 ** g // 4
    for _ in range(cfg.num_blocks_per_group):
      if width != out:
        total += conv(size, 1, 1, 0, width, out)
      total += (conv(size, 3, 1, 1, width, q) + 2 * conv(size, 3, 1, 1, q, q)
                + conv(size, 1, 1, 0, q, out))
      width = out
    if g < 3:
      size //= 2
  return total + conv(size, 1, 1, 0, width, cfg.vocab_size)


# -- FLAVA (florax.models.flava, florax.tasks.flava) ---------------------------
# A FlavaConfig is read by its fields only (no import of the model here).
# The poolers (dense + tanh on a first token) of the image and text
# encoders feed nothing the pre-training losses read, so the lowered step
# drops them (jit's dead-code elimination) and they are not counted; the
# multimodal pooler feeds ITM and is.


def flava_image_forward(cfg: Any) -> Forward:
  """FLAVA's image encoder per image: the ViT (patch conv on pixels, the
  input layer; [CLS_I] + patches through the blocks). A MIM / MMM mask
  swaps masked patch embeddings for [MASK] after the conv (a `where`), so
  a masked image costs what an unmasked one does."""
  return vit_forward(cfg.image)


def flava_text_forward(cfg: Any, length: int) -> Forward:
  """FLAVA's text encoder over `length` tokens (BERT embeddings: gathers
  and a LayerNorm, no matmul; then the blocks)."""
  return Forward(encoder_forward(cfg.text.encoder(), length))


def flava_multimodal_forward(cfg: Any, text_len: int) -> Forward:
  """FLAVA's multimodal pass per pair: image_to_mm_projection on the 1+N
  image states, text_to_mm_projection on the `text_len` text states, and
  the multimodal encoder over [CLS_M] + (1+N) + text_len tokens (poolers
  and heads apart)."""
  mm = cfg.multimodal
  n_image = cfg.image.num_prefix + cfg.image.grid ** 2
  proj = (dense(n_image, cfg.image.width, mm.width)
          + dense(text_len, cfg.text.width, mm.width))
  tokens = int(mm.class_token) + n_image + text_len
  return Forward(proj + encoder_forward(mm.encoder(), tokens))


def flava_masked_head(tokens: float, width: int, out: int) -> float:
  """FLAVA's MaskedHead (BERT's prediction head) on `tokens` tokens:
  dense(width, width) -> GELU -> LayerNorm -> dense(width, out). It runs
  on every token of its span; the loss keeps the masked ones."""
  return dense(tokens, width, width) + dense(tokens, width, out)


def flava_pretraining_forward(cfg: Any, kind: str, text_len: int,
                              num_codes: int) -> Forward:
  """One example of a FLAVA pre-training batch kind through the trained
  network (florax.tasks.flava.FlavaPretraining), forward, heads included:

    image  the image encoder (masked) + the MIM head (width -> codes) on
           the N patch tokens.
    text   the text encoder + the MLM head (width -> vocab) on all
           `text_len` tokens.
    pair   the contrastive pass (unmasked image and text encoders, the
           image and text projections of h_CLS to embed_dim) and the
           masked pass (image and text encoders again, the multimodal
           pass, its pooler and the ITM head (width -> 2) on h_CLS,M, the
           MMM image head on the N patch tokens and the MMM text head on
           the `text_len` text tokens of the multimodal output).

  Not included: the pair's (B, B) contrastive logits (`contrastive_logits`
  of the global batch) and the frozen tokenizer (`vq_codes_forward`)."""
  n, length = cfg.image.grid ** 2, text_len
  wi, wt, wm = cfg.image.width, cfg.text.width, cfg.multimodal.width
  image = flava_image_forward(cfg)
  text = flava_text_forward(cfg, length)
  if kind == "image":
    return image + Forward(flava_masked_head(n, wi, num_codes))
  if kind == "text":
    return text + Forward(flava_masked_head(length, wt,
                                            cfg.text.vocab_size))
  if kind == "pair":
    contrastive = Forward(dense(1, wi, cfg.embed_dim)
                          + dense(1, wt, cfg.embed_dim))
    heads = (dense(1, wm, wm) + dense(1, wm, 2)       # pooler, ITM
             + flava_masked_head(n, wm, num_codes)
             + flava_masked_head(length, wm, cfg.text.vocab_size))
    return (2 * (image + text) + contrastive
            + flava_multimodal_forward(cfg, length) + Forward(heads))
  raise ValueError(f"unknown FLAVA batch kind {kind!r}: image, text or pair")


# -- the op-by-op count of a lowered program ----------------------------------

_TENSOR = re.compile(r"tensor<([^>]*)>")
# A symbol is @name or @"quoted name" (jax quotes e.g. @"<lambda>").
_SYMBOL = r"@(\"[^\"]*\"|[\w.$\-]+)"
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?" + _SYMBOL)
_CALL = re.compile(r"\bcall " + _SYMBOL + r"\(")


def _shape(tensor: str) -> tuple[int, ...]:
  """'2x3x4xf32' -> (2, 3, 4); 'f32' -> ()."""
  *dims, _ = tensor.split("x")
  return tuple(int(d) for d in dims)


def _types(line: str) -> list[tuple[int, ...]]:
  """Shapes of the operand and result types after the op's last ' : '."""
  return [_shape(t) for t in _TENSOR.findall(line.rsplit(" : ", 1)[-1])]


def _ints(text: str) -> list[int]:
  return [int(v) for v in re.findall(r"-?\d+", text)]


def _dot_flops(line: str) -> float:
  lhs, _, result = _types(line)[:3]
  m = re.search(r"contracting_dims = \[([^\]]*)\] x", line)
  contract = _ints(m.group(1)) if m else []
  return 2.0 * float(np.prod(result)) * float(
      np.prod([lhs[d] for d in contract]))


def _conv_flops(line: str) -> float:
  """2 x output batch x output features x rhs input features x the
  multiply-adds per axis that touch a real (unpadded, undilated) input
  element: XLA's own count (HloCostAnalysis), independent of the model."""
  lhs, rhs, out = _types(line)[:3]
  m = re.search(r"dim_numbers = \[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]",
                line)
  if not m:
    raise ValueError(f"unparsed convolution: {line.strip()[:200]}")
  labels = [[s.strip() for s in g.split(",")] for g in m.groups()]
  spatial = [s for s in labels[0] if s.isdigit()]
  n = len(spatial)

  def window(name, default):
    w = re.search(name + r" = (\[(?:[^\[\]]|\[[^\[\]]*\])*\])", line)
    return _ints(w.group(1)) if w else default
  stride = window("stride", [1] * n)
  pad = window("pad", [0] * (2 * n))
  lhs_dil = window("lhs_dilate", [1] * n)
  rhs_dil = window("rhs_dilate", [1] * n)
  total = 2.0 * out[labels[2].index("b")] * out[labels[2].index("f")]
  total *= rhs[labels[1].index("i")]
  for i, s in enumerate(spatial):
    size = lhs[labels[0].index(s)]
    kernel = rhs[labels[1].index(s)]
    o = np.arange(out[labels[2].index(s)])[:, None]
    k = np.arange(kernel)[None, :]
    p = o * stride[i] + k * rhs_dil[i] - pad[2 * i]
    real = (p >= 0) & (p <= (size - 1) * lhs_dil[i]) & (p % lhs_dil[i] == 0)
    total *= float(real.sum())
  return total


def hlo_matmul_flops(program: Any, allow_loops: bool = False) -> float:
  """FLOPs of every `stablehlo.dot_general` and `stablehlo.convolution` of
  a lowered program (`jax.jit(f).lower(...)` or its `.as_text()`), each
  counted as many times as its function is called.

  Raises ValueError if a matmul sits inside a `stablehlo.while` (a loop
  body runs an unknown number of times) unless `allow_loops`, in which
  case it is counted once (a lower bound).
  """
  text = program if isinstance(program, str) else program.as_text()
  own: dict[str, float] = {}
  calls: dict[str, list[tuple[str, bool]]] = {}
  func, depth, loops = None, 0, []
  for line in text.splitlines():
    m = _FUNC.search(line)
    if m:
      func, depth, loops = m.group(1), 0, []
      own[func], calls[func] = 0.0, []
    if func is None:
      continue
    in_loop = bool(loops)
    if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
      if in_loop and not allow_loops:
        raise ValueError(f"a matmul inside a loop in @{func}: unroll the "
                         "program (no scan) to count it")
      own[func] += (_dot_flops(line) if "dot_general" in line
                    else _conv_flops(line))
    for callee in _CALL.findall(line):
      calls[func].append((callee, in_loop))
    if "stablehlo.while" in line:
      loops.append(depth)
    depth += line.count("{") - line.count("}")
    while loops and depth <= loops[-1] and not (
        "stablehlo.while" in line and depth == loops[-1]):
      loops.pop()

  memo: dict[str, float] = {}

  def total(name: str) -> float:
    if name not in memo:
      value = own.get(name, 0.0)
      for callee, in_loop in calls.get(name, ()):
        sub = total(callee)
        if in_loop and sub and not allow_loops:
          raise ValueError(f"@{name} calls @{callee}, which has matmuls, "
                           "inside a loop: unroll the program to count it")
        value += sub
      memo[name] = value
    return memo[name]

  if "main" not in own:
    raise ValueError("no @main function in the program")
  return total("main")
