"""BEiT-3's Multiway Transformer (Wang et al. 2022, "Image as a Foreign
Language", §2.1), on the shared encoder library.

Each block is the pre-LN block of florax.models.transformer with ONE shared
self-attention (`transformer.Attention`, sub-LN inside it, q/k/v biases) and
a pool of modality experts, each a pre-attention LayerNorm `norm1_<e>`, a
pre-FFN LayerNorm `norm2_<e>` and a sub-LN FFN `mlp_<e>`
(`transformer.FeedForward`: fc1 -> GELU -> LayerNorm -> fc2):

  v   vision expert, every layer
  l   language expert, every layer
  vl  vision-language expert, only in the top `num_vl_layers` layers

Routing is by a static split position, as torchscale's MultiwayNetwork does:
a sequence is [image tokens (cls + patches), text tokens]; the first
`split` tokens go through `v`, the rest through `l` (image-only: split = N,
text-only: split = 0). An image+text (fusion) input uses `vl` for all tokens
in the top `num_vl_layers` layers (BEiT-3 / VLMo); image-only and text-only
inputs use `v` / `l` in every layer, so `vl` is unused by them. The split is
a property of the input kind (a Python int, fixed per compiled shape), never
of an example, so a batch is one program. FLOP cost: each token runs exactly
one expert, i.e. the same FLOPs as a dense transformer of the same shape
(a one-hot combine would run every expert on every token: 2-3x the FFN
FLOPs). The price is that one call holds one input kind; a batch mixing
images, texts and pairs is three calls.

The final LayerNorm is per modality as well (`norm_v` on image tokens,
`norm_l` on text tokens, split the same way). `normalize_output=False`
drops it, as torchscale's `args.normalize_output` (its Encoder builds the
final norm only when `encoder_normalize_before and normalize_output`): the
output tokens are the last block's, and norm_v/norm_l are not created at
all. unilm's BEiT-3 image classification and VQA fine-tuning factories set
it False (beit3/modeling_finetune.py; each head brings its own LayerNorm:
the classifier's fc_norm, the VQA pooler's norm); NLVR2, retrieval,
captioning and the pretraining wrapper keep torchscale's default True. An
init_from of a pretrained checkpoint into a False model then skips
norm_{v,l}, as unilm's strict=False load ignores encoder.layer_norm.

Shared or per-modality attention. The paper (§2.1) shares the
self-attention; torchscale's code (the released BEiT-3 checkpoints) does not:
its MultiwayWrapper also wraps q/k/v/out_proj and the attention sub-LN, so
each modality has its own projections (A: vision, B: language; one softmax
over all tokens). `multiway_attention=True` is that layout: the block's
`attn` holds qkv_{v,l}, norm_{v,l}, proj_{v,l}, routed by the same split
(a VL layer's pair still splits its attention: there is no VL copy). The
florax default keeps the paper's shared attention; importers of torchscale
set `multiway_attention=True, num_vl_layers=0` (torchscale has no VL
expert: a pair is split v/l in every layer).

Parameter layout (florax.convert.torchscale_beit3 maps it):

  florax                          torchscale (encoder.layers.{i}.)
  block{i}/attn/qkv  (W,3,H,D)    self_attn.{q,k,v}_proj.{A,B}  (shared)
  block{i}/attn/qkv_{v,l}         self_attn.{q,k,v}_proj.{A,B}  (multiway)
  block{i}/attn/norm[_{v,l}]      self_attn.inner_attn_ln.{A,B}
  block{i}/attn/proj[_{v,l}]      self_attn.out_proj.{A,B}
  block{i}/norm1_{v,l}            self_attn_layer_norm.{A,B}
  block{i}/norm2_{v,l}            final_layer_norm.{A,B}
  block{i}/mlp_{v,l}/fc1,norm,fc2 ffn.{A,B}.fc1, ffn_layernorm, fc2
  block{i}/{norm1,norm2,mlp}_vl   (none: torchscale has no VL expert)
  norm_{v,l}                      encoder.layer_norm.{A,B}  (if
                                  normalize_output)
  vision_embed/patch_embed        vision_embed.proj
  vision_embed/{cls,mask}_token   vision_embed.{cls,mask}_token
  vision_embed/pos_embed          encoder.embed_positions.A.weight[2:]
  text_embed/token_embed          text_embed.weight
  text_embed/pos_embed            encoder.embed_positions.B.weight[2:]

torchscale's position tables start at row 2 (Fairseq's offset; rows 0-1 are
never read); florax's start at row 0. In an image+text sequence the text
positions restart at 0 (torchscale splits the position lookup like every
other multiway module). The rest of the maths is torchscale's as is: LayerNorm
eps 1e-5, q scaled by head_dim^-0.5, exact GELU, padded text tokens zeroed
after their positions are added and masked as keys, per-modality final norm.

Vision-only (`vision_only=True`): the image-only backbone of a BEiT-3
image classifier whose checkpoint holds only the vision branch (timm's
beit3_* models, florax.convert.timm_beit3). Only what an image-only forward
reads is created: vision_embed (without the MIM `mask_token`), each block's
norm1_v, attention (the shared `attn` or the v copy of a multiway one),
norm2_v, mlp_v, and norm_v (if normalize_output); no text embedding, no
language or vision-language experts (`num_vl_layers` is then ignored), no
norm_l. Text input and image masks are refused with a ValueError. The
names are those of the full model, so a vision-only checkpoint is the
vision subset of a full one of the same attention layout (init_from loads
it into such a model, whose l/vl params stay fresh) and layer decay finds
it by `vision_embed`.

Image captioning (BEiT-3 §3.1, unilm's BEiT3ForCaptioning): an image+text
call with `seq2seq=True` uses the seq2seq mask (`seq2seq_mask`): image
tokens attend to each other only (bidirectionally, never to the caption),
caption tokens attend to every image token and causally to the caption.
`CaptionModel` adds the vocabulary head (`mlm_head`, untied from the word
embedding, named as in the BEiT-3 MDM model so its checkpoint loads as is).

Incremental decoding: `init_cache` makes a static-length cache (per block
the attention's keys/values for image + caption slots, plus which slots are
valid keys); a call with `cache=` writes the keys/values of the tokens it is
given at `cache_index` (the slot of its first token) and attends over the
cache. A prefill call holds the image (and any caption prompt) at slot 0; a
decoding step holds only the new caption token(s), at slot
num_image_tokens + text position, so a step costs O(its tokens x cached
slots), not a re-run. The image's keys/values never change after the
prefill: image tokens do not attend to the caption. A cached call is always
the fused pair (the `vl` experts in the VL layers) with the seq2seq mask.
florax.models.decoding runs greedy and beam search over it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.data.tokenizer import PAD_ID
from florax.models import layers, transformer

EXPERTS = ("v", "l", "vl")


@dataclasses.dataclass(frozen=True)
class MultiwayConfig:
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  # The top `num_vl_layers` layers also hold a vision-language expert.
  num_vl_layers: int = 2
  # BEiT-3's SentencePiece vocabulary (64k pieces + specials, [MASK] among
  # them: the masking task takes its id from the tokenizer).
  vocab_size: int = 64010
  # torchscale's 1024-row text position table less its two offset rows.
  max_text_len: int = 1022
  # None: no key-padding mask for text.
  pad_id: Optional[int] = PAD_ID
  image_size: int = 224
  patch_size: int = 16
  act: str = "gelu"
  norm_eps: float = 1e-5
  sub_ln: bool | str = True
  # torchscale's per-modality attention projections (module docstring);
  # False: the paper's shared attention.
  multiway_attention: bool = False
  # torchscale's normalize_output: False drops the final norm_v/norm_l
  # (unilm's image classification and VQA models; module docstring).
  normalize_output: bool = True
  # Only the vision branch (module docstring): no text embedding, no l/vl
  # experts, no norm_l, no mask token; text input is refused.
  vision_only: bool = False
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: str = "none"
  attention_impl: str = "xla"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_image_tokens(self) -> int:
    """cls + patches: the split position of an image+text sequence."""
    return 1 + self.grid ** 2

  def encoder(self) -> transformer.EncoderConfig:
    """The shared library's config of one block (attention and each FFN)."""
    return transformer.EncoderConfig(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, qkv_bias="full", act=self.act,
        sub_ln=self.sub_ln, norm_eps=self.norm_eps, dropout=self.dropout,
        drop_path_rate=self.drop_path_rate, remat=self.remat,
        attention_impl=self.attention_impl)

  def is_vl_layer(self, i: int) -> bool:
    return not self.vision_only and i >= self.depth - self.num_vl_layers

  @property
  def experts(self) -> tuple[str, ...]:
    """The per-modality experts every block holds ('vl' comes on top in
    the VL layers)."""
    return ("v",) if self.vision_only else ("v", "l")


# (width, depth, mlp_dim, heads, patch, num_vl_layers). base/large as the
# released BEiT-3 (torchscale's beit3_base/large: 12 x 768, 24 x 1024; the
# paper gives no VL-layer count below giant, VLMo uses 2 of 12);
# giant is the paper's §2.3: 40 x 1408 x 6144 x 16, patch 14, 3 VL layers.
PRESETS = {
    "tiny": dict(width=64, depth=3, num_heads=2, mlp_dim=128, num_vl_layers=1,
                 vocab_size=128, max_text_len=16, image_size=32,
                 patch_size=8),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                 num_vl_layers=2, patch_size=16),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                  num_vl_layers=3, patch_size=16),
    "giant": dict(width=1408, depth=40, num_heads=16, mlp_dim=6144,
                  num_vl_layers=3, patch_size=14),
}


def config_for(name: str, **overrides) -> MultiwayConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown Multiway preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  return MultiwayConfig(**{**PRESETS[name], **overrides})


def validate(cfg: MultiwayConfig):
  """Raises ValueError naming the field at fault, before anything compiles."""
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"Multiway image_size {cfg.image_size} is not a multiple "
                     f"of patch_size {cfg.patch_size}")
  if not 0 <= cfg.num_vl_layers <= cfg.depth:
    raise ValueError(f"Multiway num_vl_layers={cfg.num_vl_layers} is not in "
                     f"[0, depth={cfg.depth}]")
  if cfg.max_text_len < 1:
    raise ValueError(f"Multiway max_text_len must be >= 1, got "
                     f"{cfg.max_text_len}")
  if cfg.pad_id is not None and not 0 <= cfg.pad_id < cfg.vocab_size:
    raise ValueError(f"Multiway pad_id {cfg.pad_id} is outside the "
                     f"vocabulary of {cfg.vocab_size}")
  if not isinstance(cfg.multiway_attention, bool):
    raise ValueError(f"Multiway multiway_attention must be true or false, "
                     f"got {cfg.multiway_attention!r}")
  # A truthy string such as "false" would silently keep the norms.
  if not isinstance(cfg.normalize_output, bool):
    raise ValueError(f"Multiway normalize_output must be true or false, "
                     f"got {cfg.normalize_output!r}")
  if not isinstance(cfg.vision_only, bool):
    raise ValueError(f"Multiway vision_only must be true or false, got "
                     f"{cfg.vision_only!r}")
  transformer.validate(cfg.encoder(), where="Multiway")


def seq2seq_mask(num_image_tokens: int, text_valid) -> jnp.ndarray:
  """(B, 1, N + L, N + L) captioning mask of N image tokens followed by
  L caption tokens (text_valid (B, L), False at padding): image tokens see
  the image bidirectionally and never the caption; caption token t sees all
  image tokens and caption tokens <= t; padding is never a key."""
  text_valid = jnp.asarray(text_valid, bool)
  b, length = text_valid.shape
  valid = jnp.concatenate(
      [jnp.ones((b, num_image_tokens), bool), text_valid], axis=1)
  return (transformer.prefix_lm_mask(num_image_tokens,
                                     num_image_tokens + length)
          & transformer.padding_mask(valid))


def init_cache(cfg: MultiwayConfig, batch: int, text_len: int,
               dtype=jnp.float32) -> dict:
  """An empty decoding cache for `batch` captions of up to `text_len` tokens
  after the image: {'valid': (B, N + text_len) bool, 'block{i}': {'k', 'v'}
  (B, N + text_len, heads, head_dim)} (module docstring)."""
  if not 1 <= text_len <= cfg.max_text_len:
    raise ValueError(f"Multiway cache of {text_len} caption slots: must be in "
                     f"[1, max_text_len={cfg.max_text_len}]")
  length = cfg.num_image_tokens + text_len
  cache = {"valid": jnp.zeros((batch, length), bool)}
  for i in range(cfg.depth):
    cache[f"block{i}"] = transformer.init_kv_cache(
        batch, length, cfg.num_heads, cfg.width // cfg.num_heads, dtype)
  return cache


def _route(modules, y, split: int, *args):
  """Runs modules['v'] on y[:, :split] and modules['l'] on the rest (the
  static split of the module docstring), skipping an empty side."""
  n = y.shape[1]
  if split >= n:
    return modules["v"](y, *args)
  if split <= 0:
    return modules["l"](y, *args)
  return jnp.concatenate([modules["v"](y[:, :split], *args),
                          modules["l"](y[:, split:], *args)], axis=1)


class MultiwayAttention(nn.Module):
  """torchscale's multiway self-attention: q/k/v projections, the sub-LN
  and the output projection per modality (qkv_v/qkv_l, ...: the v copy on
  the first `split` tokens, l on the rest), one softmax over all tokens.
  The maths of transformer.Attention otherwise (q/k/v biases, head_dim^-0.5
  scaling, sub-LN on the concatenated heads)."""
  config: MultiwayConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, split: int = 0, kv_cache=None,
               cache_index=0):
    """As transformer.Attention: with `kv_cache` returns (out, new_cache)."""
    cfg = self.config
    enc = cfg.encoder()
    heads = cfg.num_heads
    head_dim = cfg.width // heads
    experts = cfg.experts
    qkv = {e: layers.dense((3, heads, head_dim),
                           ("embed", None, "heads", "kv"), dtype=self.dtype,
                           name=f"qkv_{e}") for e in experts}
    sub_ln = transformer.has_sub_ln(enc, "attn")
    norm = {e: layers.layer_norm(name=f"norm_{e}", epsilon=cfg.norm_eps)
            for e in experts} if sub_ln else {}
    proj = {e: layers.dense(cfg.width, ("heads", "kv", "embed"),
                            dtype=self.dtype, name=f"proj_{e}",
                            axis=(-2, -1)) for e in experts}
    if self.is_initializing():
      empty = x[:, :0]
      for e in experts:  # every copy's params, whatever the input kind
        h = qkv[e](empty)[:, :, 0]
        if sub_ln:
          h = norm[e](h.reshape(h.shape[0], 0, cfg.width)).reshape(h.shape)
        proj[e](h)
    q, k, v = jnp.moveaxis(_route(qkv, x, split), 2, 0)
    if kv_cache is not None:
      k, v, kv_cache = transformer.update_kv_cache(kv_cache, k, v,
                                                   cache_index)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=head_dim ** -0.5,
        implementation=None if cfg.attention_impl == "xla" else "cudnn")
    if sub_ln:  # on the concatenated heads, as transformer.Attention
      def ln(e):
        return lambda h: norm[e](h.reshape(*h.shape[:2], cfg.width)
                                 ).astype(self.dtype).reshape(h.shape)
      out = _route({e: ln(e) for e in experts}, out, split)
    out = _route(proj, out, split)
    return out if kv_cache is None else (out, kv_cache)


class MultiwayBlock(nn.Module):
  """x + DropPath(attn(norm1_e(x))); x + DropPath(mlp_e(norm2_e(x))), the
  expert e chosen per token span by the static `split` (see the module
  docstring); `fusion` (static) selects `vl` in a VL layer."""
  config: MultiwayConfig
  has_vl: bool = False
  drop_path: Any = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, split: int = 0, fusion: bool = False,
               deterministic: bool = True, kv_cache=None, cache_index=0):
    """x, or (x, new_cache) with a `kv_cache` for its attention."""
    cfg = self.config
    enc = cfg.encoder()
    names = ("vl",) if self.has_vl else ()
    norm1 = {e: layers.layer_norm(name=f"norm1_{e}", epsilon=cfg.norm_eps)
             for e in cfg.experts + names}
    norm2 = {e: layers.layer_norm(name=f"norm2_{e}", epsilon=cfg.norm_eps)
             for e in cfg.experts + names}
    mlp = {e: transformer.FeedForward(enc, self.dtype, name=f"mlp_{e}")
           for e in cfg.experts + names}
    if fusion and not self.has_vl:
      fusion = False  # below the VL layers a pair is split like torchscale
    if self.is_initializing():
      # Create every expert's params whatever the input kind, on an empty
      # token span (no FLOPs): one init covers image, text and pair calls.
      empty = x[:, :0]
      for e in norm1:
        mlp[e](norm2[e](norm1[e](empty)).astype(self.dtype))

    def route(modules, y, *args):
      if fusion:
        return modules["vl"](y, *args)
      return _route(modules, y, split, *args)

    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = route(norm1, x)
    if cfg.multiway_attention:
      y = MultiwayAttention(cfg, self.dtype, name="attn")(
          y.astype(self.dtype), mask, split, kv_cache, cache_index)
    else:
      y = transformer.Attention(enc, dtype=self.dtype, name="attn")(
          y.astype(self.dtype), mask, kv_cache=kv_cache,
          cache_index=cache_index)
    if kv_cache is not None:
      y, kv_cache = y
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = route(norm2, x)
    y = route(mlp, y.astype(self.dtype), deterministic)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    self.sow("intermediates", "out", x)
    return x if kv_cache is None else (x, kv_cache)


class VisionEmbed(nn.Module):
  """Patch conv + [cls] + learned positions; masked patches (MIM) become a
  learned mask token before the positions are added."""
  config: MultiwayConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, mask=None):
    cfg = self.config
    b, height, width, _ = images.shape
    if (height, width) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"Multiway built for {cfg.image_size}px images got "
                       f"{height}x{width} (set image_size)")
    x = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
        padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            layers.default_kernel_init, (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("embed",)),
        name="patch_embed")(images.astype(self.dtype))
    x = x.reshape(b, -1, cfg.width)
    if cfg.vision_only:
      # No mask token (an image classifier's backbone: timm drops it).
      if mask is not None:
        raise ValueError("a vision_only Multiway has no mask token: it takes "
                         "no image_mask")
    else:
      # Always created (torchscale's contain_mask_token=True), so a MIM task
      # and a plain encoder share one param tree.
      token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, cfg.width), jnp.float32)
    if mask is not None:
      if mask.shape != x.shape[:2]:
        raise ValueError(f"Multiway image mask of shape {mask.shape} does not "
                         f"cover the {x.shape[1]} patches of {b} images")
      x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, cfg.width), jnp.float32)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], 1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.num_image_tokens, cfg.width), jnp.float32)
    return x + pos[None].astype(x.dtype)


class TextEmbed(nn.Module):
  """Token embedding + learned positions; returns (x, valid (B, L)). Padding
  tokens are zeroed as torchscale does (and masked as keys)."""
  config: MultiwayConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, start=0):
    """`start`: the position of ids[:, 0] (a decoding step's offset; may be
    traced, then the caller keeps start + length <= max_text_len)."""
    cfg = self.config
    length = ids.shape[1]
    static = isinstance(start, int)
    if length + (start if static else 0) > cfg.max_text_len:
      raise ValueError(f"Multiway text positions up to "
                       f"{length + (start if static else 0)} exceed "
                       f"max_text_len {cfg.max_text_len}")
    x = nn.Embed(
        cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
        name="token_embed")(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.max_text_len, cfg.width), jnp.float32)
    if static:
      pos = pos[start:start + length]
    else:
      pos = jax.lax.dynamic_slice_in_dim(pos, start, length, axis=0)
    x = x + pos[None].astype(x.dtype)
    if cfg.pad_id is None:
      valid = jnp.ones(ids.shape, bool)
    else:
      valid = ids != cfg.pad_id
    return x * valid[..., None].astype(x.dtype), valid


class Multiway(nn.Module):
  """The BEiT-3 backbone. `__call__(images=None, text=None, image_mask=None)`
  or the named methods return (tokens (B, N, width) after the final norms
  norm_v/norm_l, or straight from the last block when
  `config.normalize_output` is False; valid (B, N) bool: False at text
  padding). For an image+text call the
  first `config.num_image_tokens` tokens are the image's.

  `seq2seq=True` (image+text only): the captioning mask (`seq2seq_mask`).
  `cache=` (from `init_cache`): incremental decoding (module docstring);
  returns (tokens, valid, new_cache), tokens being those of this call only.

  Init with images AND text to create every param (the block creates all
  its experts at init whatever the input kind, the embeddings only when
  their input is given); a `vision_only` config takes images only and has
  only the vision params (module docstring)."""
  config: MultiwayConfig
  dtype: Any = jnp.float32

  def encode_image(self, images, image_mask=None, deterministic=True):
    return self(images=images, image_mask=image_mask,
                deterministic=deterministic)

  def encode_text(self, text, deterministic=True):
    return self(text=text, deterministic=deterministic)

  def encode_pair(self, images, text, image_mask=None, deterministic=True):
    return self(images=images, text=text, image_mask=image_mask,
                deterministic=deterministic)

  def encode_caption(self, images, text, image_mask=None,
                     deterministic=True):
    """An image+caption pair under the seq2seq mask (module docstring)."""
    return self(images=images, text=text, image_mask=image_mask,
                deterministic=deterministic, seq2seq=True)

  @nn.compact
  def __call__(self, images=None, text=None, image_mask=None,
               deterministic: bool = True, seq2seq: bool = False,
               cache=None, cache_index=0):
    cfg = self.config
    if images is None and text is None:
      raise ValueError("Multiway needs images, text or both")
    if cfg.vision_only and text is not None:
      raise ValueError("this Multiway is vision_only (an image classifier's "
                       "backbone, e.g. imported from timm's beit3_*): it "
                       "has no text embedding or language experts and takes "
                       "images only")
    if seq2seq and (images is None or text is None) and cache is None:
      raise ValueError("Multiway seq2seq (captioning) mask needs images and "
                       "text")
    num_image = cfg.num_image_tokens
    if cache is not None:
      if images is not None and not (isinstance(cache_index, int)
                                     and cache_index == 0):
        raise ValueError(f"Multiway cached call with images (a prefill) "
                         f"writes at slot 0, got cache_index={cache_index}")
      if images is None and isinstance(cache_index, int) and (
          cache_index < num_image):
        raise ValueError(f"Multiway cached text-only call (a decoding step) "
                         f"at cache_index={cache_index}: slots below "
                         f"{num_image} hold the image")
    parts, valid = [], []
    if images is not None:
      x = VisionEmbed(cfg, self.dtype, name="vision_embed")(images,
                                                            image_mask)
      parts.append(x)
      valid.append(jnp.ones(x.shape[:2], bool))
    elif image_mask is not None:
      raise ValueError("Multiway got image_mask without images")
    if text is not None:
      # A decoding step's text starts at caption position cache_index - N.
      start = 0 if cache is None or images is not None else (
          cache_index - num_image)
      x, text_valid = TextEmbed(cfg, self.dtype, name="text_embed")(text,
                                                                    start)
      parts.append(x)
      valid.append(text_valid)
    if images is not None and text is not None and parts[0].shape[0] != (
        parts[1].shape[0]):
      raise ValueError(f"Multiway pair of {parts[0].shape[0]} images and "
                       f"{parts[1].shape[0]} texts")
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    valid = jnp.concatenate(valid, axis=1) if len(valid) > 1 else valid[0]
    split = parts[0].shape[1] if images is not None else 0
    # A cached call is always (part of) an image+caption pair.
    fusion = cache is not None or (images is not None and text is not None)
    if cache is not None:
      mask, cache = self._cache_mask(cache, valid, cache_index)
    elif seq2seq:
      mask = seq2seq_mask(split, valid[:, split:])
    else:
      mask = None if text is None else transformer.padding_mask(valid)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depth)
    # self=0, x=1, mask=2, split=3, fusion=4, deterministic=5
    block_cls = layers.maybe_remat(MultiwayBlock, cfg.remat,
                                   static_argnums=(3, 4, 5))
    for i in range(cfg.depth):
      block = block_cls(cfg, cfg.is_vl_layer(i), rates[i], self.dtype,
                        name=f"block{i}")
      if cache is None:
        x = block(x, mask, split, fusion, deterministic)
      else:
        x, cache[f"block{i}"] = block(x, mask, split, fusion, deterministic,
                                      cache[f"block{i}"], cache_index)
    # normalize_output=False: no final norm, and norm_v/norm_l are never
    # created (not even by the init-time calls below).
    if cfg.normalize_output:
      norm_v = layers.layer_norm(name="norm_v", epsilon=cfg.norm_eps)
      if cfg.vision_only:
        norm_l = None
      else:
        norm_l = layers.layer_norm(name="norm_l", epsilon=cfg.norm_eps)
        # Both norms exist after an init of any input kind, so that a
        # checkpoint's encoder.layer_norm.{A,B} always has a home.
        if self.is_initializing():
          norm_v(x[:, :0]), norm_l(x[:, :0])
      if text is None:
        x = norm_v(x)
      elif images is None:
        x = norm_l(x)
      else:
        x = jnp.concatenate([norm_v(x[:, :split]), norm_l(x[:, split:])], 1)
    if cache is not None:
      return x, valid, cache
    return x, valid

  def _cache_mask(self, cache, valid, cache_index):
    """The seq2seq mask of this call's tokens (slots cache_index + j) over
    every cache slot, after marking this call's slots valid or padding;
    returns (mask (B, 1, n, slots), the cache with 'valid' updated)."""
    cfg = self.config
    expected = {"valid"} | {f"block{i}" for i in range(cfg.depth)}
    if not isinstance(cache, dict) or set(cache) != expected:
      raise ValueError(f"Multiway cache must have keys {sorted(expected)} "
                       "(multiway.init_cache)")
    slots = cache["valid"].shape[1]
    b, n = valid.shape
    if cache["valid"].shape[0] != b or n > slots:
      raise ValueError(f"Multiway cache of shape {cache['valid'].shape} "
                       f"cannot take {n} tokens of {b} sequences")
    cache = dict(cache)
    cache["valid"] = jax.lax.dynamic_update_slice_in_dim(
        cache["valid"], valid, cache_index, axis=1)
    q = cache_index + jnp.arange(n)[:, None]
    k = jnp.arange(slots)[None, :]
    causal = (k <= q) | (k < cfg.num_image_tokens)
    return causal[None, None] & transformer.padding_mask(cache["valid"]), (
        cache)


class CaptionModel(nn.Module):
  """BEiT-3 image captioning: the Multiway backbone (`multiway`) under the
  seq2seq mask and a vocabulary head `mlm_head` (width -> vocab, with bias,
  NOT tied to the word embedding, as unilm's BEiT3ForCaptioning and the
  florax MDM model: an MDM checkpoint's multiway/ and mlm_head/ load as is).
  unilm's captioner keeps the final norm: leave `normalize_output` True.

  `__call__(images, text)` -> caption logits (B, L, vocab) float32, one per
  caption token (what the MLM fine-tuning objective and the no-cache
  reference read). `prefill` / `step` are the cached decoding calls
  (florax.models.decoding), each returning the logits of its LAST token
  (B, vocab) and the new cache."""
  config: MultiwayConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.multiway = Multiway(self.config, self.dtype)
    self.mlm_head = layers.dense(self.config.vocab_size, ("embed", "vocab"),
                                 dtype=self.dtype)

  def __call__(self, images, text, image_mask=None,
               deterministic: bool = True):
    tokens, _ = self.multiway(images=images, text=text, image_mask=image_mask,
                              deterministic=deterministic, seq2seq=True)
    return self.mlm_head(tokens[:, self.config.num_image_tokens:]).astype(
        jnp.float32)

  def prefill(self, images, text, cache):
    """Image + caption prompt written at slot 0 of `cache`."""
    tokens, _, cache = self.multiway(images=images, text=text, cache=cache,
                                     cache_index=0)
    return self.mlm_head(tokens[:, -1]).astype(jnp.float32), cache

  def step(self, text, cache, position):
    """Caption tokens (B, S) at caption positions [position, position + S)
    (position may be traced)."""
    tokens, _, cache = self.multiway(
        text=text, cache=cache,
        cache_index=position + self.config.num_image_tokens)
    return self.mlm_head(tokens[:, -1]).astype(jnp.float32), cache
