"""CLIP-like text transformer (Florence's language encoder).

Pre-LN transformer over token + learned position embeddings, causal or
bidirectional by config, pooled at the end-of-text token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.data.tokenizer import EOS_ID, PAD_ID
from florax.models import layers


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  max_len: int = 77
  mlp_ratio: float = 4.0
  causal: bool = True
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: str = "none"
  # nn.scan over the identical blocks: compile time stays flat in depth.
  # Parameters then live under "blocks" with a leading "layers" axis.
  scan: bool = False


# "florence": 12 layers as in the paper; width 1152 (18 heads of 64) with
# CLIP's 49,408-token vocabulary and 77 positions lands within 3% of the
# paper's 256M (the paper gives neither width nor vocabulary).
PRESETS = {
    "tiny": dict(width=64, depth=2, num_heads=2, max_len=16),
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=512, depth=12, num_heads=8),
    "L": dict(width=768, depth=12, num_heads=12),
    "florence": dict(width=1152, depth=12, num_heads=18),
}


def validate(cfg: TextConfig):
  if cfg.width % cfg.num_heads:
    raise ValueError(f"text width {cfg.width} is not divisible by "
                     f"{cfg.num_heads} heads")
  if cfg.max_len < 2:
    raise ValueError(f"text max_len must be >= 2, got {cfg.max_len}")
  layers.maybe_remat(nn.Module, cfg.remat)


class SelfAttention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = layers.dense((3, self.num_heads, head_dim),
                       ("embed", None, "heads", "kv"), dtype=self.dtype,
                       name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    logits = jnp.where(mask[:, None], logits, -1e9)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return layers.dense(width, ("heads", "kv", "embed"), dtype=self.dtype,
                        name="proj", axis=(-2, -1))(out)


class TextBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  dropout: float
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = layers.layer_norm(name="norm1")(x).astype(self.dtype)
    y = SelfAttention(self.num_heads, self.dtype, name="attn")(y, mask)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = layers.layer_norm(name="norm2")(x).astype(self.dtype)
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
                   self.dropout, name="mlp")(y, deterministic)
    return x + layers.DropPath(self.drop_path)(y, deterministic)


class _ScannedTextBlock(nn.Module):
  """One scan step: a (rematerialised) block whose drop-path rate is the
  scanned input, so every layer keeps its own stochastic-depth rate."""
  config: TextConfig
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rate, mask):
    cfg = self.config
    block_cls = layers.maybe_remat(TextBlock, cfg.remat, static_argnums=(3,))
    x = block_cls(cfg.num_heads, cfg.mlp_ratio, cfg.dropout, rate, self.dtype,
                  name="block")(x, mask, self.deterministic)
    return x, None


class TextTransformer(nn.Module):
  """Returns (feature at the eos token (B, width), aux with hidden states)."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, deterministic: bool = True):
    cfg = self.config
    b, length = ids.shape
    if length > cfg.max_len:
      raise ValueError(f"text length {length} exceeds max_len {cfg.max_len}")
    embed = nn.Embed(
        cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
        name="token_embed")
    pos = self.param(
        "pos_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                     (None, "embed")),
        (cfg.max_len, cfg.width), jnp.float32)
    x = embed(ids) + pos[None, :length].astype(self.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    keys_valid = ids != PAD_ID
    mask = jnp.broadcast_to(keys_valid[:, None, :], (b, length, length))
    if cfg.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
    # A row with no visible key (padding queries) must not produce NaNs.
    mask = mask | jnp.eye(length, dtype=bool)[None]
    rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depth)
    if cfg.scan:
      stack = nn.scan(
          _ScannedTextBlock, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=cfg.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, deterministic, self.dtype, name="blocks")(
          x, jnp.asarray(rates, jnp.float32), mask)
    else:
      block_cls = layers.maybe_remat(TextBlock, cfg.remat, static_argnums=(3,))
      for i in range(cfg.depth):
        x = block_cls(cfg.num_heads, cfg.mlp_ratio, cfg.dropout, rates[i],
                      self.dtype, name=f"block{i}")(x, mask, deterministic)
    x = layers.layer_norm(name="norm")(x)
    eos_pos = jnp.argmax(ids == EOS_ID, axis=-1)
    pooled = x[jnp.arange(b), eos_pos]
    return pooled, {"hidden": x}
