"""FLAVA (Singh et al. 2022, "FLAVA: A Foundational Language And Vision
Alignment Model", §3.1) on the shared encoder library.

Three pre-LN transformers (florax.models.transformer blocks), two learned
projections into the multimodal stream and two contrastive projections:

  image encoder       florax.models.vit.ViT: patch conv, [CLS_I], learned
                      positions, blocks, final LayerNorm (ViT-B/16)
  text encoder        `TextEncoder`: word + position + token-type
                      embeddings, an embedding LayerNorm, the same blocks,
                      final LayerNorm; [CLS_T] is the first token
  multimodal encoder  `MultimodalEncoder`: [CLS_M] + the concatenation
                      [image_to_mm_projection(h_I), text_to_mm_projection(h_T)],
                      the same blocks, final LayerNorm (6 layers released)
  poolers             dense + tanh on each encoder's first token (after its
                      final LayerNorm), as HF's FlavaPooler
  image_projection,   the contrastive heads: applied to h_CLS (after the
  text_projection     final LayerNorm), then L2-normalised
  logit_scale         log of the contrastive temperature's inverse

Where the released model (Hugging Face transformers' FlavaModel, which is
what facebook/flava-full loads into) fills in what the paper leaves open:

* The multimodal encoder reads the unimodal encoders' hidden states
  *before* their final LayerNorm (HF: `hidden_states[-1]`, "these states
  don't use final layernorm"); the contrastive projections and the poolers
  read the states *after* it.
* The text encoder is the ViT block stack, but its embeddings are BERT's:
  word + absolute position (512) + token type (2), summed and LayerNorm-ed
  (the image side has no embedding LayerNorm). Padding is a key mask from
  the caller's `valid` (HF's attention_mask), not from a pad id; padded
  queries still attend to the valid keys.
* The multimodal sequence is [CLS_M, CLS_I, image patches, CLS_T, text
  tokens]; the text mask is extended with ones for CLS_M and the image
  tokens (HF FlavaModel.forward).
* Contrastive embeddings: HF's FlavaForPreTraining uses
  normalize(image_projection(h_I[:, 0])) (likewise text); FlavaModel's own
  get_image_features / get_text_features return the *unnormalised*
  projection of every token (`project_image` / `project_text` here).
* LayerNorm eps 1e-12 everywhere, exact (erf) GELU, q/k/v biases, the
  softmax scale head_dim^-0.5, no LayerScale, no dropout by default.
* The image encoder always carries the MIM [MASK] token (HF's
  `mask_token=True`): a call without a mask passes an all-False one, which
  leaves the patches untouched and keeps one param tree for the
  contrastive and masked paths.

Parameter layout (florax.convert.hf_flava maps HF's names onto it):

  image_encoder/...              the ViT's (patch_embed, cls_token,
                                 mask_token, pos_embed, encoder/block{i},
                                 norm), so florax ViT checkpoints seed it
  text_encoder/token_embed, pos_embed, type_embed, embed_norm,
                 encoder/block{i}, norm
  multimodal_encoder/cls_token, encoder/block{i}, norm
  {image,text,multimodal}_pooler
  image_to_mm_projection, text_to_mm_projection
  image_projection, text_projection, logit_scale

Heads (MIM and MMM-image over codebook ids, MLM and MMM-text over the
vocabulary, ITM on h_CLS,M) are not here: they belong to the FLAVA task,
which applies them to the token outputs this module returns
(`image_tokens`, `text_tokens`, `multimodal_tokens`) under names of their
own, so this param tree stays that of HF's FlavaModel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from florax.models import layers, transformer, vit

# HF's FlavaConfig.logit_scale_init_value (= log(1 / 0.07)), and the range
# FlavaForPreTraining clamps the param to while training.
INIT_LOGIT_SCALE = 2.6592
LOGIT_SCALE_RANGE = (0.0, 4.6052)


@dataclasses.dataclass(frozen=True)
class _EncoderFields:
  """The pre-LN block stack a text or multimodal encoder configures."""
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  norm_eps: float = 1e-12
  act: str = "gelu"
  qkv_bias: str = "full"
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: str = "none"
  scan: bool = False
  attention_impl: str = "xla"

  def encoder(self) -> transformer.EncoderConfig:
    """The shared library's config of the encoder's blocks."""
    return transformer.EncoderConfig(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias, act=self.act,
        norm_eps=self.norm_eps, dropout=self.dropout,
        drop_path_rate=self.drop_path_rate, remat=self.remat, scan=self.scan,
        attention_impl=self.attention_impl)


@dataclasses.dataclass(frozen=True)
class FlavaTextConfig(_EncoderFields):
  vocab_size: int = 30522
  max_len: int = 512
  type_vocab_size: int = 2


@dataclasses.dataclass(frozen=True)
class FlavaMultimodalConfig(_EncoderFields):
  depth: int = 6
  # [CLS_M] (HF's use_cls_token).
  class_token: bool = True


# ViT-B/16 as HF's FlavaImageConfig: LayerNorm eps 1e-12, class-token pooling.
_FULL_IMAGE = vit.config_for("B/16", image_size=224, norm_eps=1e-12)


@dataclasses.dataclass(frozen=True)
class FlavaConfig:
  image: vit.ViTConfig = _FULL_IMAGE
  text: FlavaTextConfig = FlavaTextConfig()
  multimodal: FlavaMultimodalConfig = FlavaMultimodalConfig()
  # The contrastive projection width (HF's projection_dim).
  embed_dim: int = 768
  init_logit_scale: float = INIT_LOGIT_SCALE
  # The image encoder's MIM [MASK] token (HF's FlavaImageConfig.mask_token).
  image_mask_token: bool = True

  @property
  def image_size(self) -> int:
    return self.image.image_size

  @property
  def max_len(self) -> int:
    return self.text.max_len

  @property
  def num_image_tokens(self) -> int:
    return self.image.num_prefix + self.image.grid ** 2


def _tuples(d: Mapping) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def from_dict(d: Mapping) -> FlavaConfig:
  """FlavaConfig from `dataclasses.asdict(cfg)` (or a JSON round trip of it,
  or an ml_collections ConfigDict of the same shape)."""
  d = dict(d)
  return FlavaConfig(
      image=vit.ViTConfig(**_tuples(dict(d.pop("image")))),
      text=FlavaTextConfig(**dict(d.pop("text"))),
      multimodal=FlavaMultimodalConfig(**dict(d.pop("multimodal"))),
      **d)


def _tiny() -> FlavaConfig:
  # Digits-sized: 8x8 digits upsampled to 32 px, a ~100-piece tokenizer.
  return FlavaConfig(
      image=vit.config_for("tiny/8", image_size=32, norm_eps=1e-12),
      text=FlavaTextConfig(vocab_size=128, width=64, depth=2, num_heads=2,
                           mlp_dim=128, max_len=16),
      multimodal=FlavaMultimodalConfig(width=64, depth=2, num_heads=2,
                                       mlp_dim=128),
      embed_dim=64)


# 'full': facebook/flava-full's architecture (HF's default FlavaConfig):
# FlavaModel's 241,356,289 params (tests/test_flava_model.py).
PRESETS = {"full": FlavaConfig, "tiny": _tiny}


def config_for(name: str, **overrides) -> FlavaConfig:
  """The FlavaConfig of a preset ('full', 'tiny'), top-level fields
  replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown FLAVA preset {name!r}; known: "
                     f"{', '.join(sorted(PRESETS))}")
  return dataclasses.replace(PRESETS[name](), **overrides)


def validate(cfg: FlavaConfig, image_size: int | None = None):
  """Raises ValueError naming the field at fault, before anything compiles."""
  vit.validate(cfg.image, image_size)
  if not cfg.image.class_token or cfg.image.pool != "cls":
    raise ValueError("FLAVA's image encoder needs its [CLS_I] token: "
                     "image.class_token=True and image.pool='cls'")
  if cfg.text.max_len < 1 or cfg.text.type_vocab_size < 1:
    raise ValueError("FLAVA text: max_len and type_vocab_size must be "
                     "positive")
  transformer.validate(cfg.text.encoder(), where="FLAVA text encoder")
  transformer.validate(cfg.multimodal.encoder(),
                       where="FLAVA multimodal encoder")
  if cfg.embed_dim < 1:
    raise ValueError(f"FLAVA embed_dim must be positive, got {cfg.embed_dim}")


def l2_normalize(x, eps: float = 1e-12):
  """x / max(|x|, eps) in fp32 (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class TextEncoder(nn.Module):
  """Returns (the [CLS_T] token (B, width), aux {"tokens": after the final
  norm, "pre_norm_tokens": before it})."""
  config: FlavaTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, valid=None, token_types=None,
               deterministic: bool = True):
    """ids (B, L) int; valid: optional (B, L) bool/0-1, False = padding
    (never attended to as a key); token_types: optional (B, L) segment ids
    (default 0)."""
    cfg = self.config
    length = ids.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"FLAVA text length {length} exceeds max_len "
                       f"{cfg.max_len}")
    x = nn.Embed(
        cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
        name="token_embed")(ids)
    types = self.param("type_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")),
                       (cfg.type_vocab_size, cfg.width), jnp.float32)
    if token_types is None:
      x = x + types[0].astype(x.dtype)
    else:
      x = x + jnp.take(types, token_types, axis=0).astype(x.dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.max_len, cfg.width), jnp.float32)
    x = x + pos[None, :length].astype(x.dtype)
    x = layers.layer_norm(name="embed_norm", epsilon=cfg.norm_eps)(x).astype(
        self.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = None if valid is None else transformer.padding_mask(valid)
    x = transformer.Encoder(cfg.encoder(), dtype=self.dtype, name="encoder")(
        x, mask, deterministic)
    pre_norm = x
    x = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(x)
    return x[:, 0], {"tokens": x, "pre_norm_tokens": pre_norm}


class MultimodalEncoder(nn.Module):
  """[CLS_M] + the given (already projected) tokens through the blocks and a
  final norm. Returns (h_CLS,M (B, width), aux {"tokens"})."""
  config: FlavaMultimodalConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, valid=None, deterministic: bool = True):
    cfg = self.config
    b = x.shape[0]
    x = x.astype(self.dtype)
    if cfg.class_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, 1, cfg.width), jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], 1)
      if valid is not None:
        valid = jnp.concatenate([jnp.ones((b, 1), bool),
                                 jnp.asarray(valid, bool)], 1)
    mask = None if valid is None else transformer.padding_mask(valid)
    x = transformer.Encoder(cfg.encoder(), dtype=self.dtype, name="encoder")(
        x, mask, deterministic)
    x = layers.layer_norm(name="norm", epsilon=cfg.norm_eps)(x)
    return x[:, 0], {"tokens": x}


class Flava(nn.Module):
  """FLAVA's three encoders and projections (module docstring).

  `__call__(images, text, ...)` returns (out, aux):
    out["image_tokens"]       (B, 1+N, W_I) h_I after the final norm (HF
                              FlavaModel's image_embeddings)
    out["text_tokens"]        (B, L, W_T) h_T (HF text_embeddings)
    out["multimodal_tokens"]  (B, 1+(1+N)+L, W_M) h_M (HF
                              multimodal_embeddings); absent when either
                              input is, or with skip_multimodal
    out["{image,text,multimodal}_pooled"]  the poolers' outputs
    out["image_embedding"], out["text_embedding"]  (B, embed_dim),
                              L2-normalised contrastive embeddings
    out["logit_scale"]        exp(the clamped log scale), a scalar
    aux["image_pre_norm_tokens"], aux["text_pre_norm_tokens"]: the unimodal
                              states the multimodal encoder reads
  """
  config: FlavaConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.image_encoder = vit.ViT(cfg.image, self.dtype)
    self.text_encoder = TextEncoder(cfg.text, self.dtype)
    self.multimodal_encoder = MultimodalEncoder(cfg.multimodal, self.dtype)
    pooler = lambda width: layers.dense(width, ("embed", "proj"),
                                        dtype=self.dtype)
    self.image_pooler = pooler(cfg.image.width)
    self.text_pooler = pooler(cfg.text.width)
    self.multimodal_pooler = pooler(cfg.multimodal.width)
    to_mm = lambda: layers.dense(cfg.multimodal.width, ("embed", "proj"),
                                 dtype=self.dtype)
    self.image_to_mm_projection = to_mm()
    self.text_to_mm_projection = to_mm()
    self.image_projection = layers.dense(cfg.embed_dim, ("embed", "proj"),
                                         dtype=self.dtype)
    self.text_projection = layers.dense(cfg.embed_dim, ("embed", "proj"),
                                        dtype=self.dtype)
    self.log_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.init_logit_scale), ()), (),
        jnp.float32)

  # -- the encoders -----------------------------------------------------------

  def encode_image(self, images, mask=None, deterministic: bool = True,
                   pool: bool = True):
    """images (B, S, S, 3); mask: optional bool (B, grid*grid), True =
    replaced by [MASK] (MIM / MMM). Returns (h_I (B, 1+N, W_I) after the
    final norm, aux {"pre_norm_tokens", "pooled"}); `pool=False` skips the
    pooler (a classifier on h_CLS,I creates no pooler params)."""
    if mask is None and self.config.image_mask_token:
      grid = self.config.image.grid
      mask = jnp.zeros((images.shape[0], grid * grid), bool)
    _, aux = self.image_encoder(images, deterministic, mask,
                                pre_norm_tokens=True)
    tokens = aux["tokens"]
    out = {"pre_norm_tokens": aux["pre_norm_tokens"]}
    if pool:
      out["pooled"] = jnp.tanh(self.image_pooler(tokens[:, 0]))
    return tokens, out

  def encode_text(self, ids, valid=None, token_types=None,
                  deterministic: bool = True, pool: bool = True):
    """ids (B, L); valid: optional (B, L), False = padding; token_types:
    optional segment ids. Returns (h_T (B, L, W_T), aux {"pre_norm_tokens",
    "pooled"})."""
    _, aux = self.text_encoder(ids, valid, token_types, deterministic)
    tokens = aux["tokens"]
    out = {"pre_norm_tokens": aux["pre_norm_tokens"]}
    if pool:
      out["pooled"] = jnp.tanh(self.text_pooler(tokens[:, 0]))
    return tokens, out

  def multimodal(self, image_pre_norm, text_pre_norm, text_valid=None,
                 deterministic: bool = True, pool: bool = True):
    """The multimodal encoder over the unimodal states *before* their final
    norms (aux["pre_norm_tokens"] of encode_image / encode_text). Returns
    (h_M (B, 1 + N_I + L, W_M), aux {"pooled"})."""
    image = self.image_to_mm_projection(image_pre_norm)
    text = self.text_to_mm_projection(text_pre_norm)
    valid = None
    if text_valid is not None:
      valid = jnp.concatenate(
          [jnp.ones(image.shape[:2], bool), jnp.asarray(text_valid, bool)], 1)
    _, aux = self.multimodal_encoder(jnp.concatenate([image, text], 1), valid,
                                     deterministic)
    tokens = aux["tokens"]
    if not pool:
      return tokens, {}
    return tokens, {"pooled": jnp.tanh(self.multimodal_pooler(tokens[:, 0]))}

  # -- contrastive --------------------------------------------------------------

  def project_image(self, image_tokens):
    """image_projection of (final-norm) image tokens, unnormalised (HF
    get_image_features on every token)."""
    return self.image_projection(image_tokens)

  def project_text(self, text_tokens):
    return self.text_projection(text_tokens)

  def image_embedding(self, images, deterministic: bool = True):
    """normalize(image_projection(h_CLS,I)) (B, embed_dim): zero-shot
    retrieval and the global contrastive loss."""
    tokens, _ = self.encode_image(images, deterministic=deterministic)
    return l2_normalize(self.project_image(tokens[:, 0]))

  def text_embedding(self, ids, valid=None, token_types=None,
                     deterministic: bool = True):
    tokens, _ = self.encode_text(ids, valid, token_types, deterministic)
    return l2_normalize(self.project_text(tokens[:, 0]))

  def logit_scale(self):
    """exp(log scale) with the log scale clamped to HF's training range
    [0, log 100]."""
    return jnp.exp(jnp.clip(self.log_scale, *LOGIT_SCALE_RANGE))

  def __call__(self, images=None, text=None, text_valid=None,
               token_types=None, image_mask=None,
               skip_multimodal: bool = False, deterministic: bool = True):
    if images is None and text is None:
      raise ValueError("FLAVA needs images, text or both")
    out = {"logit_scale": self.logit_scale()}
    aux = {}
    if images is not None:
      tokens, a = self.encode_image(images, image_mask, deterministic)
      out["image_tokens"], out["image_pooled"] = tokens, a["pooled"]
      out["image_embedding"] = l2_normalize(self.project_image(tokens[:, 0]))
      aux["image_pre_norm_tokens"] = a["pre_norm_tokens"]
    if text is not None:
      tokens, a = self.encode_text(text, text_valid, token_types,
                                   deterministic)
      out["text_tokens"], out["text_pooled"] = tokens, a["pooled"]
      out["text_embedding"] = l2_normalize(self.project_text(tokens[:, 0]))
      aux["text_pre_norm_tokens"] = a["pre_norm_tokens"]
    if images is not None and text is not None and not skip_multimodal:
      tokens, a = self.multimodal(aux["image_pre_norm_tokens"],
                                  aux["text_pre_norm_tokens"], text_valid,
                                  deterministic)
      out["multimodal_tokens"], out["multimodal_pooled"] = tokens, a["pooled"]
    return out, aux


def init_inputs(cfg: FlavaConfig, batch: int = 1, length: Optional[int] = None):
  """Zero inputs that create every param: (images, text)."""
  s = cfg.image.image_size
  length = min(cfg.text.max_len, 8) if length is None else length
  return (jnp.zeros((batch, s, s, 3), jnp.float32),
          jnp.zeros((batch, length), jnp.int32))


def param_count(cfg: FlavaConfig) -> int:
  """The number of params of Flava(cfg), from jax.eval_shape (nothing is
  allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda r, *x: Flava(cfg).init(r, *x),
                          jax.random.key(0), *init_inputs(cfg))
  return int(sum(np.prod(x.shape) for x in
                 jax.tree.leaves(nn.meta.unbox(shapes["params"]))))
