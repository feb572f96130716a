"""BEiT v2's VQ-KD visual tokenizer: vector-quantised knowledge distillation.

VQ-KD (Peng et al. 2022, §2.2) turns an image into a grid of discrete codes
whose meaning is a frozen teacher's (CLIP's) patch features:

  encoder  a ViT; its normed patch tokens go through Linear-Tanh-Linear to
           `code_dim` (32) and are l2-normalised: h (B, N, code_dim)
  codebook `codebook_size` (8192) vectors, l2-normalised when used; each
           token takes the code of highest cosine similarity (for unit
           vectors: the nearest in l2), z = e[argmax_k <h, e_k>]
  decoder  a small ViT (3 blocks) over the grid of codes (its "patches" are
           1x1: one token per code), then Linear-Tanh-Linear to the
           teacher's width: the reconstruction r (B, N, teacher width)
  loss     -cos(r, teacher) + ||sg[h] - z||^2 + ||h - sg[z]||^2 (mean over
           tokens), the decoder seeing h + sg[z - h] (straight-through: the
           encoder gets the decoder's gradient as if it had output z).

Codebook updates. BEiT v2 moves the codes by an EMA of their assigned
features (decay 0.99) after a k-means initialisation on the first batch;
florax's trainer applies optimizer updates to params and has no mutable
state, so here the codebook is a param trained by the gradient of the
codebook term ||sg[h] - z||^2 (the issue allows "EMA or straight-through
updates"). The EMA and this term have the same fixed point (a code at the
normalised mean of its features); the gradient version needs no state.

Two things replace the k-means initialisation and keep codes in use:
  * codes are used l2-normalised, so a raw code's norm is free: Adam moves
    every coordinate by about lr per step, i.e. a code's direction by about
    lr / codebook_init_std radians. A small init (0.02) makes the codebook
    fast at first; as its norm grows by every (tangential) step it anneals
    itself, like an EMA whose decay rises.
  * dead codes (unused in the batch) get a pull term ||e_k - sg[h_j(k)]||^2
    towards h_j(k), the batch's encoder output most cosine-similar to the
    code: the gradient form of re-initialising a dead code on the data (as
    vqtorch's / CVQ-VAE's restarts do; CVQ-VAE found the closest feature
    the best anchor). It reaches unused codes only (exactly zero gradient
    for the others and for the encoder), so it never competes with the
    codebook term; a dead code moves onto the data manifold, where it ends
    up nearest to some tokens, splits a crowded cell and the ordinary
    codebook term takes over. (A random batch output as the target, a fresh
    one each step, was worse: the pulls average out and park every dead
    code at the data's mean direction, equally far from everything.)
Low-dimensional (32-d) normalised codes already keep BEiT v2's usage high
(97-100% of 8192); the dead-code term makes it so from a random init.

Usage metrics: the per-batch code histogram gives the perplexity exp(H(p))
(p = counts / tokens; K when all codes are equally used) and the number of
codes used at least once.

Params: `encoder` (a florax ViT), `encode_head`, `codebook` (the tokenizer:
what florax.tasks.vq_tokenizer loads), `decoder`, `decode_head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from florax.losses import masked_cosine
from florax.models import layers, transformer, vit


@dataclasses.dataclass(frozen=True)
class VQKDConfig:
  """The tokenizer (encoder + codebook) and its training decoder.

  Attributes:
    encoder: the ViT encoder (BEiT v2: ViT-B/16).
    codebook_size: number of codes K (8192).
    code_dim: dimension of the codes (32).
    decoder_depth, decoder_width, decoder_heads, decoder_mlp_dim: the
      decoder transformer over the code grid (3 x 768 x 12 x 3072).
    target_width: the teacher's feature width (the decoder's output).
    codebook_init_std: std of the raw codes at init (sets the codebook's
      effective step size; see the module docstring).
  """
  encoder: vit.ViTConfig
  codebook_size: int = 8192
  code_dim: int = 32
  decoder_depth: int = 3
  decoder_width: int = 768
  decoder_heads: int = 12
  decoder_mlp_dim: int = 3072
  target_width: int = 768
  codebook_init_std: float = 0.02

  @property
  def grid(self) -> int:
    return self.encoder.grid

  @property
  def decoder(self) -> vit.ViTConfig:
    """A ViT over the (grid x grid x code_dim) map of codes, patch 1 (BEiT
    v2's decoder: img_size = grid, patch_size 1, in_chans = code_dim)."""
    e = self.encoder
    return vit.ViTConfig(
        image_size=self.grid, patch_size=1, width=self.decoder_width,
        depth=self.decoder_depth, num_heads=self.decoder_heads,
        mlp_dim=self.decoder_mlp_dim, class_token=True, pool="cls",
        qkv_bias=e.qkv_bias, act=e.act, norm_eps=e.norm_eps,
        layer_scale=e.layer_scale, remat=e.remat,
        attention_impl=e.attention_impl)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(cfg: VQKDConfig, image_size: int | None = None,
             where: str = "model"):
  """Raises ValueError naming the field at fault, before anything compiles."""
  for field in ("codebook_size", "code_dim", "decoder_depth", "decoder_width",
                "decoder_heads", "decoder_mlp_dim", "target_width"):
    value = getattr(cfg, field)
    if not _positive_int(value):
      raise ValueError(f"{where}.{field} must be a positive integer, got "
                       f"{value!r}")
  if cfg.codebook_size < 2:
    raise ValueError(f"{where}.codebook_size must be at least 2, got "
                     f"{cfg.codebook_size}")
  if not (isinstance(cfg.codebook_init_std, (int, float))
          and cfg.codebook_init_std > 0):
    raise ValueError(f"{where}.codebook_init_std must be > 0, got "
                     f"{cfg.codebook_init_std!r}")
  vit.validate(cfg.encoder, image_size)
  if cfg.decoder_width % cfg.decoder_heads:
    raise ValueError(f"{where}.decoder_width {cfg.decoder_width} is not "
                     f"divisible by decoder_heads {cfg.decoder_heads}")
  transformer.validate(cfg.decoder.encoder(), cfg.decoder.layout(),
                       where="VQ-KD decoder")


# -- pure functions ------------------------------------------------------------


def l2_normalize(x, eps: float = 1e-6):
  """x / max(||x||, eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity(h, codebook):
  """(..., K) cosine similarity of every row of h (..., D) to every code."""
  return jnp.einsum("...d,kd->...k", l2_normalize(h), l2_normalize(codebook),
                    precision=jax.lax.Precision.HIGHEST)


def nearest_code(h, codebook):
  """int32 (...,) index of the code most cosine-similar to each row of h
  (the first on ties)."""
  return jnp.argmax(cosine_similarity(h, codebook), axis=-1).astype(jnp.int32)


def straight_through(h, z):
  """z in the forward pass, the identity to h in the backward pass."""
  return h + jax.lax.stop_gradient(z - h)


def code_histogram(indices, num_codes: int):
  """float32 (K,) count of each code in `indices` (any shape)."""
  flat = indices.reshape(-1)
  return jnp.zeros((num_codes,), jnp.float32).at[flat].add(1.0)


def usage_metrics(counts) -> dict[str, jax.Array]:
  """{'perplexity': exp(H(p)), 'used_codes': #codes with count > 0} of a
  code histogram, p = counts / sum(counts) (0 log 0 = 0)."""
  counts = counts.astype(jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)),
                               0.0))
  return {"perplexity": jnp.exp(entropy),
          "used_codes": jnp.sum(counts > 0).astype(jnp.float32)}


def dead_code_targets(h_flat, codebook):
  """int32 (K,): for each code, the row of h_flat (T, D) most cosine-similar
  to it (the token a dead code is pulled to)."""
  sim = cosine_similarity(jax.lax.stop_gradient(h_flat),
                          jax.lax.stop_gradient(codebook))
  return jnp.argmax(sim, axis=0).astype(jnp.int32)


def dead_code_loss(codebook, counts, h_flat, picks):
  """sum over codes unused in the batch of ||l2(e_k) - sg[h_picks[k]]||^2,
  over K. Zero gradient (exactly) for used codes and for the encoder."""
  codes = l2_normalize(codebook)
  target = jax.lax.stop_gradient(jnp.take(h_flat, picks, axis=0))
  per_code = jnp.sum(jnp.square(codes - target), axis=-1)
  return jnp.sum(jnp.where(counts == 0, per_code, 0.0)) / codebook.shape[0]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  codebook: float = 1.0     # ||sg[h] - z||^2 (moves the codes)
  commitment: float = 1.0   # ||h - sg[z]||^2 (BEiT v2's beta = 1)
  dead_code: float = 1.0    # the dead-code pull


def vqkd_loss(rec, target, h, z, indices, codebook, picks,
              weights: LossWeights = LossWeights()):
  """The VQ-KD objective of one batch.

  Args:
    rec: (B, N, C) the decoder's reconstruction.
    target: (B, N, C) the teacher's features (gradient stopped).
    h: (B, N, D) l2-normalised encoder outputs.
    z: (B, N, D) their l2-normalised codes (codebook rows `indices`).
    indices: int (B, N) the codes.
    codebook: (K, D) raw codebook (the param).
    picks: int (K,) dead-code targets (`dead_code_targets`).
  Returns:
    (loss, metrics).
  """
  rec_loss, cosine = masked_cosine.masked_negative_cosine(
      rec, target, jnp.ones(rec.shape[:2], bool))
  sq = lambda a: jnp.mean(jnp.sum(jnp.square(a), axis=-1))
  codebook_loss = sq(jax.lax.stop_gradient(h) - z)
  commitment = sq(h - jax.lax.stop_gradient(z))
  counts = code_histogram(indices, codebook.shape[0])
  dead = dead_code_loss(codebook, counts, h.reshape(-1, h.shape[-1]), picks)
  loss = (rec_loss + weights.codebook * codebook_loss
          + weights.commitment * commitment + weights.dead_code * dead)
  usage = usage_metrics(counts)
  return loss, {"cosine": cosine, "codebook_loss": codebook_loss,
                "commitment": commitment, "dead_code_loss": dead,
                "codebook/perplexity": usage["perplexity"],
                "codebook/used_codes": usage["used_codes"]}


# -- the module ----------------------------------------------------------------


class TaskLayer(nn.Module):
  """BEiT v2's encode/decode task layer: Linear -> Tanh -> Linear (fp32)."""
  hidden: int
  features: int
  out_axis: str

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.hidden, ("embed", "mlp"), name="fc1")(
        x.astype(jnp.float32))
    return layers.dense(self.features, ("mlp", self.out_axis),
                        name="fc2")(jnp.tanh(x))


def _tokens_normed(cfg: vit.ViTConfig) -> bool:
  # A ViT pooling by the normed mean (fc_norm) leaves its tokens unnormed.
  return not (cfg.pool == "mean" and cfg.fc_norm)


class VQKD(nn.Module):
  """The tokenizer and its decoder (see the module docstring)."""
  config: VQKDConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = vit.ViT(cfg.encoder, self.dtype)
    if not _tokens_normed(cfg.encoder):
      self.encoder_norm = layers.layer_norm(epsilon=cfg.encoder.norm_eps)
    self.encode_head = TaskLayer(cfg.encoder.width, cfg.code_dim, "code")
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.codebook_init_std), ("vocab", "code")),
        (cfg.codebook_size, cfg.code_dim), jnp.float32)
    # Created on first call: a model initialised through `encode` has no
    # decoder params (the frozen tokenizer's spec).
    self.decoder = vit.ViT(cfg.decoder, self.dtype)
    self.decode_head = TaskLayer(cfg.decoder_width, cfg.target_width, "proj")

  def project(self, images, deterministic: bool = True):
    """(B, N, code_dim) l2-normalised encoder outputs h."""
    cfg = self.config.encoder
    _, aux = self.encoder(images, deterministic)
    x = aux["tokens"][:, cfg.num_prefix:]
    if not _tokens_normed(cfg):
      x = self.encoder_norm(x)
    return l2_normalize(self.encode_head(x))

  def encode(self, images):
    """(h (B, N, code_dim) l2-normalised, indices int32 (B, N)): what the
    tokenizer gives a downstream task (only the encoder and the codebook
    are created when a model is initialised with this method)."""
    h = self.project(images, True)
    return h, nearest_code(h, self.codebook)

  def decode(self, z, deterministic: bool = True):
    """(B, N, target_width) reconstruction of the teacher's features from
    the codes z (B, N, code_dim)."""
    cfg = self.config
    b, _, d = z.shape
    _, aux = self.decoder(z.reshape(b, cfg.grid, cfg.grid, d), deterministic)
    return self.decode_head(aux["tokens"][:, cfg.decoder.num_prefix:])

  def __call__(self, images, deterministic: bool = True):
    """{'h', 'z', 'indices', 'rec'}: encoder outputs, their codes, the code
    indices and the decoder's reconstruction from h + sg[z - h]."""
    h = self.project(images, deterministic)
    codes = l2_normalize(self.codebook)
    indices = nearest_code(h, codes)
    z = jnp.take(codes, indices, axis=0)
    rec = self.decode(straight_through(h, z), deterministic)
    return {"h": h, "z": z, "indices": indices, "rec": rec}
