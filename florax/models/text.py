"""CLIP-like text transformer (Florence's language encoder, CLIP's text
tower).

The shared pre-LN encoder (florax.models.transformer) over token + learned
position embeddings, causal or bidirectional by config, final LayerNorm,
pooled at the first end-of-text token. `eos_id`/`pad_id` default to florax's
own tokenizer; an imported CLIP sets eos_id to its end_of_text id and
pad_id=None (CLIP pads with id 0, a real token, and relies on the causal
mask alone).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from florax.data.tokenizer import EOS_ID, PAD_ID
from florax.models import layers, transformer


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
  # Parameters then live under "encoder/blocks" with a leading "layers" axis.
  scan: bool = False
  eos_id: int = EOS_ID
  # None: no key-padding mask (CLIP: causal, padding after eos is unseen).
  pad_id: Optional[int] = PAD_ID
  act: str = "gelu"
  norm_eps: float = 1e-5
  qkv_bias: str = "full"

  def encoder(self) -> transformer.EncoderConfig:
    return transformer.EncoderConfig(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=int(self.width * self.mlp_ratio), qkv_bias=self.qkv_bias,
        act=self.act, norm_eps=self.norm_eps, dropout=self.dropout,
        drop_path_rate=self.drop_path_rate, remat=self.remat, scan=self.scan)


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
  if cfg.max_len < 2:
    raise ValueError(f"text max_len must be >= 2, got {cfg.max_len}")
  if not 0 <= cfg.eos_id < cfg.vocab_size:
    raise ValueError(f"text eos_id {cfg.eos_id} is outside the vocabulary "
                     f"of {cfg.vocab_size}")
  transformer.validate(cfg.encoder(), where="text tower")


class TextTransformer(nn.Module):
  """Returns (feature at the eos token (B, width), aux with hidden states)."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, deterministic: bool = True,
               mask_id: Optional[int] = None):
    """`mask_id`: ids equal to it (masked language modeling's [MASK], e.g.
    one past a pretrained tower's vocabulary) embed as a learned
    `mask_embed` vector instead (created only by a model that masks, so a
    pretrained tower's params load unchanged)."""
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
    if mask_id is None:
      tokens = embed(ids)
    else:
      is_mask = ids == mask_id
      mask_embed = self.param(
          "mask_embed", nn.with_logical_partitioning(
              nn.initializers.normal(0.02), ("embed",)), (cfg.width,),
          jnp.float32)
      tokens = jnp.where(is_mask[..., None], mask_embed.astype(self.dtype),
                         embed(jnp.where(is_mask, 0, ids)))
    x = tokens + pos[None, :length].astype(self.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = None
    if cfg.pad_id is not None:
      mask = transformer.padding_mask(ids != cfg.pad_id)
    if cfg.causal:
      causal = transformer.causal_mask(length)
      mask = causal if mask is None else mask & causal
    if mask is not None:
      # A row with no visible key (padding queries) must not produce NaNs.
      mask = mask | jnp.eye(length, dtype=bool)[None, None]
    x = transformer.Encoder(cfg.encoder(), dtype=self.dtype, name="encoder")(
        x, mask, deterministic)
    x = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(x)
    eos_pos = jnp.argmax(ids == cfg.eos_id, axis=-1)
    pooled = x[jnp.arange(b), eos_pos]
    return pooled, {"hidden": x}
