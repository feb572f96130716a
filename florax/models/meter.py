"""METER's co-attention fusion (Dou et al. 2022), Florence's V+L adapter
(Florence §2.5, Figure 4): CoSwin image tokens and text-tower tokens, each
linearly projected to the fusion width with a modality-type embedding
added, then `depth` co-attention layers on each stream:

  x = LN(x + SelfAttention(x))          (BERT's post-LN, as METER's
  x = LN(x + CrossAttention(x, other))   BertCrossLayer)
  x = LN(x + FFN(x))

The two streams advance together: layer i of the text stream attends to
layer i-1's image stream and vice versa. Padding keys of the text are
masked in the text stream's self-attention and in the image stream's
cross-attention. Pooled features as METER with a Swin/CoSwin encoder: the
text stream's summary token and the image stream's token mean, each through
dense -> tanh, concatenated (2 x width): `pooled`. The summary token is
METER's first token ([CLS] of its bidirectional RoBERTa) by default;
`text_pool_index` (B,) picks another: florax's text tower is causal by
default (CLIP's), its first token sees only itself and its end-of-text
token summarises the text (where UniCL pools), so the METER tasks pass the
end-of-text position. Pooling a causal tower's first token left ITM at
chance on the digits (held-out ITM accuracy 0.500 after 1500 steps).

Params (under `fusion/`): text_proj, image_proj, type_embed (2, width: 0
text, 1 image), {text,image}_layer{i}/{self_attn (florax.models.
transformer.Attention: qkv, proj), norm1, cross_attn (query, key_value,
proj), norm2, mlp (fc1, fc2), norm3}, text_pooler, image_pooler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.models import layers, transformer


@dataclasses.dataclass(frozen=True)
class MeterConfig:
  width: int = 768
  depth: int = 6      # M_co: co-attention layers per stream
  num_heads: int = 12
  mlp_dim: int = 3072
  norm_eps: float = 1e-12  # BERT's
  dropout: float = 0.1
  act: str = "gelu"

  def encoder(self) -> transformer.EncoderConfig:
    return transformer.EncoderConfig(
        width=self.width, depth=1, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps,
        dropout=self.dropout)


PRESETS = {
    "tiny": dict(width=64, depth=2, num_heads=2, mlp_dim=128, dropout=0.0),
    # METER-CoSwin-B's fusion (6 layers of BERT-base width per stream).
    "base": dict(),
}


def config_for(name: str, **overrides) -> MeterConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown METER preset {name!r}; one of {sorted(PRESETS)}")
  return MeterConfig(**{**PRESETS[name], **overrides})


def validate(cfg: MeterConfig):
  if cfg.depth < 1:
    raise ValueError(f"model.meter.depth must be >= 1, got {cfg.depth}")
  if cfg.width % cfg.num_heads:
    raise ValueError(f"model.meter.width {cfg.width} is not divisible by "
                     f"num_heads {cfg.num_heads}")
  if not 0 <= cfg.dropout < 1:
    raise ValueError(f"model.meter.dropout must be in [0, 1), got "
                     f"{cfg.dropout}")


class CrossAttention(nn.Module):
  """Queries from x, keys and values from y; `mask` (B, 1, 1, M): False =
  a key of y never attended."""
  config: MeterConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y, mask=None):
    heads = self.config.num_heads
    head_dim = x.shape[-1] // heads
    q = layers.dense((heads, head_dim), ("embed", "heads", "kv"),
                     dtype=self.dtype, name="query")(x)
    kv = layers.dense((2, heads, head_dim), ("embed", None, "heads", "kv"),
                      dtype=self.dtype, name="key_value")(y)
    out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=mask,
                                       scale=head_dim ** -0.5)
    return layers.dense(x.shape[-1], ("heads", "kv", "embed"),
                        dtype=self.dtype, name="proj", axis=(-2, -1))(out)


class CoAttentionLayer(nn.Module):
  """One stream's layer (module docstring): x attends to itself, then to
  `other`, then the FFN, each with a residual and a post-LN."""
  config: MeterConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, other, self_mask=None, other_mask=None,
               deterministic: bool = True):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout)

    def norm(name):
      return layers.layer_norm(name=name, epsilon=cfg.norm_eps)

    a = transformer.Attention(cfg.encoder(), dtype=self.dtype,
                              name="self_attn")(x, mask=self_mask)
    x = norm("norm1")(x + drop(a, deterministic=deterministic)).astype(
        self.dtype)
    c = CrossAttention(cfg, self.dtype, name="cross_attn")(x, other,
                                                           other_mask)
    x = norm("norm2")(x + drop(c, deterministic=deterministic)).astype(
        self.dtype)
    f = transformer.FeedForward(cfg.encoder(), self.dtype, name="mlp")(
        x, deterministic)
    return norm("norm3")(x + drop(f, deterministic=deterministic)).astype(
        self.dtype)


class MeterFusion(nn.Module):
  """(text tokens (B, L, W_t), text valid (B, L), image tokens (B, N, W_i))
  -> (text stream (B, L, W), image stream (B, N, W), pooled (B, 2W))."""
  config: MeterConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text, text_valid, image, deterministic: bool = True,
               text_pool_index=None):
    cfg = self.config
    types = self.param("type_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (2, cfg.width),
                       jnp.float32).astype(self.dtype)
    t = layers.dense(cfg.width, ("mlp", "embed"), dtype=self.dtype,
                     name="text_proj")(text.astype(self.dtype)) + types[0]
    v = layers.dense(cfg.width, ("mlp", "embed"), dtype=self.dtype,
                     name="image_proj")(image.astype(self.dtype)) + types[1]
    text_mask = transformer.padding_mask(text_valid)
    for i in range(cfg.depth):
      t_next = CoAttentionLayer(cfg, self.dtype, name=f"text_layer{i}")(
          t, v, text_mask, None, deterministic)
      v = CoAttentionLayer(cfg, self.dtype, name=f"image_layer{i}")(
          v, t, None, text_mask, deterministic)
      t = t_next

    def pooler(name, x):
      return jnp.tanh(layers.dense(cfg.width, ("embed", "mlp"),
                                   dtype=self.dtype, name=name)(x))
    summary = (t[:, 0] if text_pool_index is None else
               jnp.take_along_axis(t, text_pool_index[:, None, None],
                                   axis=1)[:, 0])
    pooled = jnp.concatenate(
        [pooler("text_pooler", summary),
         pooler("image_pooler", jnp.mean(v, axis=1))], -1)
    return t, v, pooled.astype(jnp.float32)
