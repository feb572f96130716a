"""One pre-LN transformer encoder for every family.

ViT (EVA, FLAVA, CLIP), BEiT-style blocks, the Multiway block of BEiT-3 and
Florence's text tower are this block with options, not copies of it:

  qkv_bias       "full" (ViT/CLIP), "qv" (BEiT/EVA: q and v biases, no k
                 bias), "none"
  layer_scale    None or the init value of per-channel residual scales
                 (CaiT/BEiT `gamma`, timm `ls1/ls2`)
  act            "gelu" (exact erf, torch nn.GELU), "quick_gelu" (OpenAI
                 CLIP), "gelu_tanh", "swiglu" (EVA-02: silu(gate) * up)
  sub_ln         an extra LayerNorm on the attention output before its
                 projection and on the MLP hidden before fc2 (EVA-02's
                 inner_attn_ln / ffn_ln, Magneto's sub-LN); "mlp" or "attn"
                 puts it in one place only (timm's EVA-02 classifiers:
                 scale_mlp without scale_attn_inner)
  rel_pos_bias   "none", "layer" (a BEiT table per block), "shared" (one
                 table for the whole encoder, BEiT's shared_rel_pos_bias)
  rope           2-D rotary embedding of the grid tokens (EVA-02)
  rope_ref_grid  None, or the (h, w) grid the rope positions are scaled to
                 (timm's ref_feat_shape): row i of an h-row grid sits at
                 i * ref_h / h, so a model pretrained on one grid keeps its
                 position scale at another resolution (EVA-02 at 448 px,
                 EVA02-CLIP-B/16's 14x14 grid on a 16x16 reference)
  remat, scan    as everywhere in florax

Masks are boolean, True = may attend, broadcastable to (B, heads, Q, K);
`causal_mask`, `prefix_lm_mask` (seq2seq: a bidirectional prefix, causal
after it) and `padding_mask` build them.

Autoregressive decoding: `Attention(..., kv_cache=, cache_index=)` writes
the new tokens' keys/values into a static-length cache ({'k', 'v'}, each
(B, L, heads, head_dim), `init_kv_cache`) at `cache_index` and attends over
the whole cache (the caller's mask hides the slots not yet written); it then
returns (out, new_cache). Without a cache nothing changes (same params, same
output). Position-dependent options need the
token layout (how many prefix tokens precede an h x w grid), given as a
static `TokenLayout`.

Parameter names (converters and layer-wise lr decay rely on them): blocks are
`block{i}` under the encoder, or `blocks` with a leading layer axis when
scanned (`layer_of` maps a flat name to its layer).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from florax.models import layers

QKV_BIAS = ("full", "qv", "none")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "swiglu")
# True = both places; a string = that place only.
SUB_LN = (False, True, "attn", "mlp")
REL_POS_BIAS = ("none", "layer", "shared")
# Finite, so a query row with no visible key gives a uniform softmax rather
# than NaN (a padding query; its output is never used).
_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  qkv_bias: str = "full"
  layer_scale: Optional[float] = None
  act: str = "gelu"
  sub_ln: bool | str = False
  norm_eps: float = 1e-5
  rel_pos_bias: str = "none"
  rope: bool = False
  rope_theta: float = 10000.0
  # None: positions are the grid indices (the native grid is the reference).
  rope_ref_grid: Optional[tuple[int, int]] = None
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: str = "none"
  # nn.scan over the identical blocks: compile time stays flat in depth.
  scan: bool = False
  # "xla" or "cudnn" (jax.nn.dot_product_attention's fused GPU kernel;
  # fp16/bf16 only).
  attention_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """`num_prefix` tokens (class, register) before a row-major h x w grid."""
  num_prefix: int = 0
  grid: Optional[tuple[int, int]] = None


def validate(cfg: EncoderConfig, layout: TokenLayout | None = None,
             where: str = "encoder"):
  """Raises ValueError naming the field at fault, before anything compiles."""
  if cfg.width % cfg.num_heads:
    raise ValueError(f"{where}: width {cfg.width} is not divisible by "
                     f"{cfg.num_heads} heads")
  for field, value, options in (("qkv_bias", cfg.qkv_bias, QKV_BIAS),
                                ("act", cfg.act, ACTIVATIONS),
                                ("rel_pos_bias", cfg.rel_pos_bias,
                                 REL_POS_BIAS),
                                ("attention_impl", cfg.attention_impl,
                                 ("xla", "cudnn"))):
    if value not in options:
      raise ValueError(f"{where}: {field}={value!r} is not one of {options}")
  if cfg.sub_ln not in SUB_LN:
    raise ValueError(f"{where}: sub_ln={cfg.sub_ln!r} is not one of {SUB_LN}")
  if cfg.depth < 1 or cfg.mlp_dim < 1:
    raise ValueError(f"{where}: depth and mlp_dim must be positive")
  layers.maybe_remat(nn.Module, cfg.remat)
  needs_grid = cfg.rope or cfg.rel_pos_bias != "none"
  if needs_grid and (layout is None or layout.grid is None):
    raise ValueError(f"{where}: rope / rel_pos_bias need a token grid (an "
                     "image tower); this encoder has none")
  if cfg.rope and (cfg.width // cfg.num_heads) % 4:
    raise ValueError(f"{where}: 2-D rope needs a head dim divisible by 4, "
                     f"got {cfg.width // cfg.num_heads}")
  if cfg.rope_ref_grid is not None:
    ref = cfg.rope_ref_grid
    if not cfg.rope:
      raise ValueError(f"{where}: rope_ref_grid={ref!r} is set but rope is "
                       "off")
    if (not isinstance(ref, (tuple, list)) or len(ref) != 2
        or not all(isinstance(r, (int, np.integer)) and not isinstance(
            r, bool) and r > 0 for r in ref)):
      raise ValueError(f"{where}: rope_ref_grid={ref!r} is not two positive "
                       "ints (rows, columns)")


def has_sub_ln(cfg: EncoderConfig, where: str) -> bool:
  """Whether the sub-LN sits in `where` ('attn' or 'mlp')."""
  if isinstance(cfg.sub_ln, str):
    return cfg.sub_ln == where
  return bool(cfg.sub_ln)


# -- masks --------------------------------------------------------------------

def causal_mask(length: int) -> jnp.ndarray:
  """(1, 1, L, L): query i sees keys j <= i."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def prefix_lm_mask(prefix_len, length: int) -> jnp.ndarray:
  """(B, 1, L, L) seq2seq mask: the first prefix_len[b] tokens see each
  other, every later token sees the prefix and itself causally."""
  prefix_len = jnp.asarray(prefix_len).reshape(-1, 1, 1)
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  return ((k <= q) | (k < prefix_len))[:, None]


def padding_mask(valid) -> jnp.ndarray:
  """(B, 1, 1, L) from (B, L) booleans: padding keys are never attended."""
  return jnp.asarray(valid, bool)[:, None, None, :]


# -- key/value cache ------------------------------------------------------------

def init_kv_cache(batch: int, length: int, num_heads: int, head_dim: int,
                  dtype=jnp.float32) -> dict:
  """An empty cache of `length` key/value slots for one attention layer."""
  shape = (batch, length, num_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def update_kv_cache(cache: dict, k, v, index):
  """Writes k, v (B, S, heads, head_dim) into slots [index, index + S) of
  `cache` (index may be traced: one program serves every decoding step);
  returns (all cached keys, all cached values, the new cache)."""
  if not isinstance(cache, dict) or set(cache) != {"k", "v"}:
    raise ValueError("kv_cache must be a dict with keys 'k' and 'v' "
                     "(transformer.init_kv_cache)")
  for name, new in (("k", k), ("v", v)):
    old = cache[name]
    if old.ndim != 4 or old.shape[0] != new.shape[0] or (
        old.shape[2:] != new.shape[2:]):
      raise ValueError(f"kv_cache['{name}'] of shape {old.shape} does not "
                       f"hold {new.shape[0]} sequences of {new.shape[2]} "
                       f"heads x {new.shape[3]}")
    if new.shape[1] > old.shape[1]:
      raise ValueError(f"kv_cache['{name}'] has {old.shape[1]} slots, fewer "
                       f"than the {new.shape[1]} tokens written")
  cache = {name: jax.lax.dynamic_update_slice_in_dim(
      cache[name], new.astype(cache[name].dtype), index, axis=1)
           for name, new in (("k", k), ("v", v))}
  return cache["k"], cache["v"], cache


# -- positions ----------------------------------------------------------------

def relative_position_index(grid: tuple[int, int], num_prefix: int
                            ) -> np.ndarray:
  """(N, N) indices into a BEiT table of (2h-1)(2w-1) + 3 rows: grid pairs
  by their (dy, dx) offset, then prefix->grid, grid->prefix and
  prefix->prefix (BEiT's three extra entries, shared by all prefix tokens)."""
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                    ).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
  n_rel = (2 * h - 1) * (2 * w - 1)
  n = num_prefix + h * w
  out = np.empty((n, n), np.int32)
  out[num_prefix:, num_prefix:] = index
  out[:num_prefix, :] = n_rel          # prefix (query) -> anything
  out[num_prefix:, :num_prefix] = n_rel + 1   # grid -> prefix
  out[:num_prefix, :num_prefix] = n_rel + 2
  return out


def relative_table_size(grid: tuple[int, int]) -> int:
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def rope_2d(grid: tuple[int, int], head_dim: int, num_prefix: int = 0,
            theta: float = 10000.0, ref_grid: tuple[int, int] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos), each (N, head_dim), of a 2-D rotary embedding: the first
  half of the head dim rotates with the row, the second with the column,
  in interleaved pairs (x0, x1), (x2, x3), ... at frequencies
  theta^(-2k/(head_dim/2)). Prefix tokens get angle 0 (no rotation).

  ref_grid: None (or equal to `grid`): row i is at position i. Otherwise
  positions are rescaled onto the reference grid as timm's EVA rope does
  (timm.layers.pos_embed_sincos._build_grid with ref_feat_shape): row i at
  i / h * ref_h, column j at j / w * ref_w."""
  h, w = grid
  quarter = head_dim // 4
  freqs = theta ** (-np.arange(quarter) / quarter)               # (d/4,)
  row_pos, col_pos = np.arange(h), np.arange(w)
  if ref_grid is not None and tuple(ref_grid) != (h, w):
    # Same order of operations as timm (divide, then multiply), in float64.
    row_pos = row_pos / h * ref_grid[0]
    col_pos = col_pos / w * ref_grid[1]
  rows, cols = np.meshgrid(row_pos, col_pos, indexing="ij")
  angles = np.concatenate([rows.reshape(-1, 1) * freqs,
                           cols.reshape(-1, 1) * freqs], axis=-1)  # (hw, d/2)
  angles = np.repeat(angles, 2, axis=-1)                          # (hw, d)
  angles = np.concatenate([np.zeros((num_prefix, head_dim)), angles])
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x, sin, cos):
  """x (B, N, heads, d) rotated pairwise: (x0, x1) -> (x0 c - x1 s,
  x1 c + x0 s)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
  sin = sin[None, :, None, :].astype(x.dtype)
  cos = cos[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def relative_position_bias(module: nn.Module, num_heads: int,
                           layout: TokenLayout):
  """BEiT's learned relative position bias, a param `relative_position_bias`
  of `module` ((2h-1)(2w-1)+3, heads), looked up -> (heads, N, N)."""
  table = module.param(
      "relative_position_bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("relpos", "heads")),
      (relative_table_size(layout.grid), num_heads), jnp.float32)
  index = relative_position_index(layout.grid, layout.num_prefix)
  return jnp.transpose(table[index], (2, 0, 1))


# -- the block ----------------------------------------------------------------

class Attention(nn.Module):
  config: EncoderConfig
  layout: TokenLayout = TokenLayout()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, bias=None, rope=None, kv_cache=None,
               cache_index=0):
    """out (B, N, width); with `kv_cache` (module docstring) the keys and
    values of x are cached at `cache_index`, the queries attend over the
    whole cache, and the result is (out, new_cache)."""
    cfg = self.config
    heads = cfg.num_heads
    head_dim = x.shape[-1] // heads
    qkv = layers.dense((3, heads, head_dim), ("embed", None, "heads", "kv"),
                       dtype=self.dtype, use_bias=cfg.qkv_bias == "full",
                       name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.qkv_bias == "qv":
      def bias_param(name):
        return self.param(name, nn.with_logical_partitioning(
            nn.initializers.zeros, ("heads", "kv")), (heads, head_dim),
                          jnp.float32).astype(self.dtype)
      q = q + bias_param("q_bias")
      v = v + bias_param("v_bias")
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if kv_cache is not None:
      if cfg.rel_pos_bias == "layer":
        raise ValueError("Attention: kv_cache does not support "
                         "rel_pos_bias='layer' (its table is laid out for "
                         "the full sequence)")
      k, v, kv_cache = update_kv_cache(kv_cache, k, v, cache_index)
    if cfg.rel_pos_bias == "layer":
      layer_bias = relative_position_bias(self, heads, self.layout)
      bias = layer_bias if bias is None else bias + layer_bias
    if bias is not None:
      bias = jnp.broadcast_to(bias, (1,) * (4 - bias.ndim) + bias.shape)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(q.dtype),
        mask=mask, scale=head_dim ** -0.5,
        implementation=None if cfg.attention_impl == "xla" else "cudnn")
    if has_sub_ln(cfg, "attn"):
      b, n = out.shape[:2]
      out = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(
          out.reshape(b, n, -1)).astype(self.dtype).reshape(out.shape)
    out = layers.dense(x.shape[-1], ("heads", "kv", "embed"),
                       dtype=self.dtype, name="proj", axis=(-2, -1))(out)
    return out if kv_cache is None else (out, kv_cache)


def activation(name: str):
  return {"gelu": lambda h: nn.gelu(h, approximate=False),
          "gelu_tanh": lambda h: nn.gelu(h, approximate=True),
          "quick_gelu": lambda h: h * jax.nn.sigmoid(1.702 * h)}[name]


class FeedForward(nn.Module):
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    width = x.shape[-1]
    h = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
                     name="fc1")(x)
    if cfg.act == "swiglu":
      gate = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
                          name="gate")(x)
      h = nn.silu(gate) * h
    else:
      h = activation(cfg.act)(h)
    if has_sub_ln(cfg, "mlp"):
      h = layers.layer_norm(name="norm", axis_name="mlp",
                            epsilon=cfg.norm_eps)(h).astype(self.dtype)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return layers.dense(width, ("mlp", "embed"), dtype=self.dtype,
                        name="fc2")(h)


class Block(nn.Module):
  """x + DropPath(ls1 * attn(norm1(x))); then the same with the MLP.
  The block's output is sown as intermediates/.../out (parity checks and
  feature extraction read it with mutable=['intermediates'])."""
  config: EncoderConfig
  drop_path: Any = 0.0
  layout: TokenLayout = TokenLayout()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, bias=None, rope=None,
               deterministic: bool = True):
    cfg = self.config
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = layers.layer_norm(name="norm1", epsilon=cfg.norm_eps)(x)
    y = Attention(cfg, self.layout, self.dtype, name="attn")(
        y.astype(self.dtype), mask, bias, rope)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    if cfg.layer_scale is not None:
      y = y * self._layer_scale("ls1", y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = layers.layer_norm(name="norm2", epsilon=cfg.norm_eps)(x)
    y = FeedForward(cfg, self.dtype, name="mlp")(y.astype(self.dtype),
                                                 deterministic)
    if cfg.layer_scale is not None:
      y = y * self._layer_scale("ls2", y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    self.sow("intermediates", "out", x)
    return x

  def _layer_scale(self, name, y):
    """Per-channel residual scale (CaiT/BEiT gamma, timm ls.gamma)."""
    return self.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(self.config.layer_scale), ("embed",)),
                      (y.shape[-1],), jnp.float32).astype(y.dtype)


class _ScannedBlock(nn.Module):
  """One scan step: a (rematerialised) block whose drop-path rate is the
  scanned input, so every layer keeps its own stochastic-depth rate."""
  config: EncoderConfig
  layout: TokenLayout
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rate, mask, bias, rope):
    block_cls = layers.maybe_remat(Block, self.config.remat,
                                   static_argnums=(5,))
    x = block_cls(self.config, rate, self.layout, self.dtype, name="block")(
        x, mask, bias, rope, self.deterministic)
    return x, None


class Encoder(nn.Module):
  """`depth` pre-LN blocks over (B, N, width) tokens; no final norm (a
  tower puts its own: final LN, fc_norm after pooling, ...)."""
  config: EncoderConfig
  layout: TokenLayout = TokenLayout()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    cfg = self.config
    if mask is not None and mask.ndim == 3:
      mask = mask[:, None]
    bias = None
    if cfg.rel_pos_bias == "shared":
      bias = relative_position_bias(self, cfg.num_heads, self.layout)
    rope = None
    if cfg.rope:
      rope = tuple(jnp.asarray(a) for a in rope_2d(
          self.layout.grid, cfg.width // cfg.num_heads,
          self.layout.num_prefix, cfg.rope_theta, cfg.rope_ref_grid))
    rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depth)
    if cfg.scan:
      stack = nn.scan(
          _ScannedBlock, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, self.layout, deterministic, self.dtype,
                   name="blocks")(x, jnp.asarray(rates, jnp.float32), mask,
                                  bias, rope)
      return x
    block_cls = layers.maybe_remat(Block, cfg.remat, static_argnums=(5,))
    for i in range(cfg.depth):
      x = block_cls(cfg, rates[i], self.layout, self.dtype,
                    name=f"block{i}")(x, mask, bias, rope, deterministic)
    return x


_BLOCK = re.compile(r"(^|/)encoder/block(\d+)/")
_SCANNED = re.compile(r"(^|/)encoder/blocks/")


def layer_of(name: str) -> int | str | None:
  """The encoder layer of a flat param name: the block number i for
  `.../encoder/block{i}/...`, 'scanned' for `.../encoder/blocks/...` (all
  layers stacked on axis 0), None outside the encoder's blocks."""
  m = _BLOCK.search(name)
  if m:
    return int(m.group(2))
  if _SCANNED.search(name):
    return "scanned"
  return None
