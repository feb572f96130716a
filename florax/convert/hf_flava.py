"""Hugging Face transformers' FLAVA -> florax (florax.models.flava,
florax.models.flava_codebook).

FlavaModel state dicts (`FlavaModel.state_dict()`, or FlavaForPreTraining's
with its 'flava.' prefix, which is removed) become florax's `Flava` params.
The table (`rules`), per tower T in image / text / multimodal:

  HF                                             florax
  T_model.encoder.layer.{i}.attention.attention.{query,key,value}
                                                 T_encoder/encoder/block{i}/attn/qkv
                                                 (fused: q, k, v on axis 1)
  ...attention.output.dense                      .../attn/proj (heads, head_dim, W)
  ...intermediate.dense / output.dense           .../mlp/fc1 / mlp/fc2
  ...layernorm_before / layernorm_after          .../norm1 / norm2
  T_model.layernorm                              T_encoder/norm
  T_model.pooler.dense                           T_pooler
  image_model.embeddings.patch_embeddings.projection
                                                 image_encoder/patch_embed (conv)
  image_model.embeddings.{cls,mask}_token        image_encoder/{cls,mask}_token
  image_model.embeddings.position_embeddings     image_encoder/pos_embed
  text_model.embeddings.word_embeddings          text_encoder/token_embed
  text_model.embeddings.position_embeddings      text_encoder/pos_embed
  text_model.embeddings.token_type_embeddings    text_encoder/type_embed
  text_model.embeddings.LayerNorm                text_encoder/embed_norm
  multimodal_model.cls_token                     multimodal_encoder/cls_token
  {image,text}_to_mm_projection, {image,text}_projection, logit_scale
                                                 the same names

Torch Linear weights are transposed, the patch conv goes OIHW -> HWIO. The
image position table is interpolated (bicubic, [CLS_I] kept) when the
model is built for another image size; at the checkpoint's own size every
value is copied exactly. The text tower's non-persistent buffers
(position_ids, token_type_ids: older checkpoints saved them) are ignored.
FlavaForPreTraining's heads (mim_head, mlm_head, itm_head, mmm_image_head,
mmm_text_head) and its image_codebook are not FlavaModel params: they are
listed as unmapped unless dropped with allow_missing (PRETRAINING_EXTRAS
drops them all); the codebook imports on its own with
`convert_codebook_state_dict` (the 'image_codebook.' prefix is removed).

The architecture comes from ARCHS ('full' = facebook/flava-full, HF's
default FlavaConfig) or from an HF config.json dict via `config_from_hf`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from florax.convert import common

# FlavaForPreTraining holds FlavaModel as `self.flava`.
WRAPPER_PREFIX = "flava."
CODEBOOK_PREFIX = "image_codebook."
# FlavaForPreTraining's tensors that are not FlavaModel's (fnmatch patterns
# for allow_missing; the FLAVA task brings its own heads).
PRETRAINING_EXTRAS = ("mim_head.*", "mlm_head.*", "itm_head.*",
                      "mmm_image_head.*", "mmm_text_head.*",
                      "image_codebook.*")
IGNORE = (r"text_model\.embeddings\.(position_ids|token_type_ids)",)
# HF FlavaImageProcessor's eval transform: resize to 224 x 224 (bicubic,
# aspect ratio not kept), centre crop 224 (then a no-op), OpenAI CLIP
# mean/std; and its codebook input: 112 x 112 (Lanczos), pixels in [0, 1]
# mapped to (1 - 2 * 0.1) x + 0.1.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CODEBOOK_IMAGE_SIZE = 112
CODEBOOK_PIXEL_EPS = 0.1

_TOWERS = (("image_model", "image_encoder"), ("text_model", "text_encoder"),
           ("multimodal_model", "multimodal_encoder"))


def _full_fields() -> dict:
  from florax.models import flava  # pylint: disable=g-import-not-at-top
  return dataclasses.asdict(flava.FlavaConfig())


def _test_fields() -> dict:
  """The small random FlavaModel of tests/fixtures/make_hf_flava.py: every
  width and MLP size different (image 32, text 40, multimodal 48,
  projections 24), so a transposed or misrouted tensor cannot fit."""
  from florax.models import flava, vit  # pylint: disable=g-import-not-at-top
  return dataclasses.asdict(flava.FlavaConfig(
      image=vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=2,
                          num_heads=2, mlp_dim=56, norm_eps=1e-12),
      text=flava.FlavaTextConfig(vocab_size=99, width=40, depth=2,
                                 num_heads=2, mlp_dim=72, max_len=16),
      multimodal=flava.FlavaMultimodalConfig(width=48, depth=2, num_heads=4,
                                             mlp_dim=80),
      embed_dim=24))


# arch name -> FlavaConfig fields (asdict); 'facebook/flava-full' is the
# hub name of 'full'.
ARCHS = {"full": _full_fields, "test": _test_fields}
_ALIASES = {"facebook/flava-full": "full", "flava-full": "full"}


def hf_config_file(arch: str) -> str | None:
  """`arch` as a Hugging Face config: a config.json file, or a local model
  directory holding one (e.g. a hub snapshot); None for an arch name."""
  path = os.path.join(arch, "config.json") if os.path.isdir(arch) else arch
  return path if path.endswith(".json") and os.path.isfile(path) else None


def read_hf_config(arch: str) -> dict | None:
  """The HF config dict `arch` names (hf_config_file), else None."""
  file = hf_config_file(arch)
  if file is None:
    return None
  try:
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
  except ValueError as e:
    raise ValueError(f"--arch {arch!r}: {file} is not JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("model_type", "flava") != "flava":
    raise ValueError(f"--arch {arch!r}: {file} is not a FLAVA config "
                     f"(model_type {hf.get('model_type')!r})"
                     if isinstance(hf, dict) else
                     f"--arch {arch!r}: {file} is not a config object")
  return hf


def arch_fields(arch: str) -> dict:
  """FlavaConfig fields of an arch name ('full', 'test') or of a FLAVA
  model's HF config.json (a file or its directory: any size imports)."""
  hf = read_hf_config(arch)
  if hf is not None:
    return dataclasses.asdict(config_from_hf(hf))
  name = _ALIASES.get(arch, arch)
  if name not in ARCHS:
    raise ValueError(f"unknown Hugging Face FLAVA arch {arch!r}; known: "
                     f"{', '.join(sorted(set(ARCHS) | set(_ALIASES)))}, or "
                     "the path of a FLAVA config.json (or its directory)")
  return ARCHS[name]()


def _sub(hf: Mapping, key: str) -> dict:
  sub = hf.get(key)
  return dict(sub) if sub else {}


def _act(name: str) -> str:
  # HF's "gelu" is the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" the
  # tanh approximation.
  acts = {"gelu": "gelu", "gelu_new": "gelu_tanh",
          "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
  if name not in acts:
    raise ValueError(f"FLAVA hidden_act {name!r} is not one florax has "
                     f"({', '.join(sorted(acts))})")
  return acts[name]


def _one(value, what):
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"FLAVA {what} {value!r}: florax builds square "
                       "images and patches")
    value = value[0]
  return int(value)


def config_from_hf(hf: Mapping[str, Any]):
  """florax FlavaConfig of an HF FlavaConfig dict (config.json or
  `FlavaConfig().to_dict()`); a sub-config left out takes HF's defaults."""
  from florax.models import flava, vit  # pylint: disable=g-import-not-at-top
  image, text, mm = (_sub(hf, "image_config"), _sub(hf, "text_config"),
                     _sub(hf, "multimodal_config"))
  d_image, d_text, d_mm = (flava.FlavaConfig().image, flava.FlavaTextConfig(),
                           flava.FlavaMultimodalConfig())
  for sub in (image, text, mm):
    if not sub.get("qkv_bias", True):
      raise ValueError("FLAVA without q/k/v biases (qkv_bias=False) is not "
                       "supported by this importer")
  return flava.FlavaConfig(
      image=vit.ViTConfig(
          image_size=_one(image.get("image_size", d_image.image_size),
                          "image_size"),
          patch_size=_one(image.get("patch_size", d_image.patch_size),
                          "patch_size"),
          width=image.get("hidden_size", d_image.width),
          depth=image.get("num_hidden_layers", d_image.depth),
          num_heads=image.get("num_attention_heads", d_image.num_heads),
          mlp_dim=image.get("intermediate_size", d_image.mlp_dim),
          act=_act(image.get("hidden_act", "gelu")),
          norm_eps=image.get("layer_norm_eps", d_image.norm_eps)),
      text=flava.FlavaTextConfig(
          vocab_size=text.get("vocab_size", d_text.vocab_size),
          width=text.get("hidden_size", d_text.width),
          depth=text.get("num_hidden_layers", d_text.depth),
          num_heads=text.get("num_attention_heads", d_text.num_heads),
          mlp_dim=text.get("intermediate_size", d_text.mlp_dim),
          max_len=text.get("max_position_embeddings", d_text.max_len),
          type_vocab_size=text.get("type_vocab_size", d_text.type_vocab_size),
          act=_act(text.get("hidden_act", "gelu")),
          norm_eps=text.get("layer_norm_eps", d_text.norm_eps)),
      multimodal=flava.FlavaMultimodalConfig(
          width=mm.get("hidden_size", d_mm.width),
          depth=mm.get("num_hidden_layers", d_mm.depth),
          num_heads=mm.get("num_attention_heads", d_mm.num_heads),
          mlp_dim=mm.get("intermediate_size", d_mm.mlp_dim),
          act=_act(mm.get("hidden_act", "gelu")),
          norm_eps=mm.get("layer_norm_eps", d_mm.norm_eps),
          class_token=mm.get("use_cls_token", True)),
      embed_dim=hf.get("projection_dim", 768),
      init_logit_scale=hf.get("logit_scale_init_value",
                              flava.INIT_LOGIT_SCALE),
      image_mask_token=image.get("mask_token", True))


def arch_config(arch: str, image_size: int | None = None):
  """The florax FlavaConfig of `arch`, at `image_size` if given."""
  from florax.models import flava  # pylint: disable=g-import-not-at-top
  cfg = flava.from_dict(arch_fields(arch))
  if image_size is not None:
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(
        cfg.image, image_size=int(image_size)))
  flava.validate(cfg)
  return cfg


def eval_transform(arch: str) -> dict:
  """crop_pct/mean/std as the other importers give them. HF resizes the
  whole image to 224 x 224 (aspect ratio not kept): a shorter-side resize
  with crop_pct 1.0 is the same for square images only."""
  del arch  # every FLAVA checkpoint shares FlavaImageProcessor's defaults
  return {"crop_pct": 1.0, "mean": MEAN, "std": STD}


# -- names ----------------------------------------------------------------------

def strip_prefix(state_dict: Mapping, prefix: str = WRAPPER_PREFIX) -> dict:
  """FlavaForPreTraining's 'flava.' removed (its heads keep their names)."""
  if any(k.startswith(prefix) for k in state_dict):
    return {(k[len(prefix):] if k.startswith(prefix) else k): v
            for k, v in state_dict.items()}
  return dict(state_dict)


_QUERY = re.compile(r"((?:image|text|multimodal)_model\.encoder\.layer\.\d+\."
                    r"attention\.attention\.)query\.(weight|bias)")


def canonical(state_dict: Mapping, shapes_only: bool = False) -> dict:
  """HF's separate query/key/value Linears fused into one
  `attention.attention.qkv` (common.fuse_qkv)."""
  return common.fuse_qkv(
      state_dict, _QUERY, [rf"\1{p}.\2" for p in ("query", "key", "value")],
      r"\1qkv.\2", shapes_only)


def rules() -> list[common.Rule]:
  """HF FlavaModel (canonical) names -> florax Flava flat names."""
  img, txt = r"image_model\.embeddings\.", r"text_model\.embeddings\."
  out = [
      common.Rule(img + r"patch_embeddings\.projection\.weight",
                  "image_encoder/patch_embed/kernel", common.CONV2D),
      common.Rule(img + r"patch_embeddings\.projection\.bias",
                  "image_encoder/patch_embed/bias"),
      common.Rule(img + r"cls_token", "image_encoder/cls_token"),
      common.Rule(img + r"mask_token", "image_encoder/mask_token"),
      # (1, 1 + g*g, W) -> (1 + g*g, W), interpolated at another size.
      common.Rule(img + r"position_embeddings", "image_encoder/pos_embed",
                  common.POS_EMBED),
      common.Rule(txt + r"word_embeddings\.weight",
                  "text_encoder/token_embed/embedding"),
      common.Rule(txt + r"position_embeddings\.weight",
                  "text_encoder/pos_embed"),
      common.Rule(txt + r"token_type_embeddings\.weight",
                  "text_encoder/type_embed"),
      common.Rule(txt + r"LayerNorm\.weight", "text_encoder/embed_norm/scale"),
      common.Rule(txt + r"LayerNorm\.bias", "text_encoder/embed_norm/bias"),
      common.Rule(r"multimodal_model\.cls_token",
                  "multimodal_encoder/cls_token"),
      common.Rule(r"logit_scale", "logit_scale"),
  ]
  for name in ("image_projection", "text_projection", "image_to_mm_projection",
               "text_to_mm_projection"):
    out += [common.Rule(name + r"\.weight", f"{name}/kernel", common.LINEAR),
            common.Rule(name + r"\.bias", f"{name}/bias")]
  for hf, fx in _TOWERS:
    blk = hf + r"\.encoder\.layer\.(\d+)\."
    dst = fx + r"/encoder/block\1/"
    out += [
        # (3W, W) -> (W, 3, heads, head_dim); (3W,) -> (3, heads, head_dim)
        common.Rule(blk + r"attention\.attention\.qkv\.weight",
                    dst + "attn/qkv/kernel", common.LINEAR),
        common.Rule(blk + r"attention\.attention\.qkv\.bias",
                    dst + "attn/qkv/bias", common.FLAT),
        # (W, W) -> (heads, head_dim, W)
        common.Rule(blk + r"attention\.output\.dense\.weight",
                    dst + "attn/proj/kernel", common.linear(2)),
        common.Rule(blk + r"attention\.output\.dense\.bias",
                    dst + "attn/proj/bias"),
        common.Rule(blk + r"layernorm_before\.weight", dst + "norm1/scale"),
        common.Rule(blk + r"layernorm_before\.bias", dst + "norm1/bias"),
        common.Rule(blk + r"layernorm_after\.weight", dst + "norm2/scale"),
        common.Rule(blk + r"layernorm_after\.bias", dst + "norm2/bias"),
        common.Rule(blk + r"intermediate\.dense\.weight",
                    dst + "mlp/fc1/kernel", common.LINEAR),
        common.Rule(blk + r"intermediate\.dense\.bias", dst + "mlp/fc1/bias"),
        common.Rule(blk + r"output\.dense\.weight", dst + "mlp/fc2/kernel",
                    common.LINEAR),
        common.Rule(blk + r"output\.dense\.bias", dst + "mlp/fc2/bias"),
        common.Rule(hf + r"\.layernorm\.weight", fx + "/norm/scale"),
        common.Rule(hf + r"\.layernorm\.bias", fx + "/norm/bias"),
        common.Rule(hf + r"\.pooler\.dense\.weight",
                    fx.replace("_encoder", "_pooler") + "/kernel",
                    common.LINEAR),
        common.Rule(hf + r"\.pooler\.dense\.bias",
                    fx.replace("_encoder", "_pooler") + "/bias"),
    ]
  return out


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  from florax.models import flava  # pylint: disable=g-import-not-at-top
  inputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                 for x in flava.init_inputs(cfg))
  return tuple(common.target_shapes(flava.Flava(cfg), inputs=inputs).items())


def target_shapes(cfg) -> dict[str, tuple]:
  """{flat name: shape} of florax's Flava(cfg) (eval_shape, cached)."""
  return dict(_target_shapes(cfg))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       shapes_only: bool = False, config=None):
  """An HF FlavaModel (or FlavaForPreTraining) state dict as florax Flava
  params.

  Args:
    state_dict: {HF name: array} (common.read_checkpoint); with
      shapes_only, anything with a .shape.
    arch: an ARCHS name ('full', 'facebook/flava-full', 'test'); ignored
      when `config` is given.
    image_size: build for this size (the image positions are
      interpolated); default: the arch's.
    allow_missing: fnmatch patterns (common.convert), e.g.
      PRETRAINING_EXTRAS for a FlavaForPreTraining checkpoint.
    shapes_only: check names and shapes only.
    config: a florax FlavaConfig to convert onto (e.g. `config_from_hf` of
      the checkpoint's config.json) instead of the arch's.

  Returns:
    (config: {'family': 'flava', 'flava': FlavaConfig fields, 'image_size',
     'max_len'}, {flat name: float32 array (or shape)}, common.Report).
  Raises:
    ValueError for an unknown arch; common.ConversionError listing every
    tensor that does not fit.
  """
  if config is None:
    cfg = arch_config(arch, image_size)
  else:
    cfg = config
    if image_size is not None:
      cfg = dataclasses.replace(cfg, image=dataclasses.replace(
          cfg.image, image_size=int(image_size)))
  state = canonical(strip_prefix(state_dict), shapes_only)
  params, report = common.convert(
      state, rules(), target_shapes(cfg), allow_missing=tuple(allow_missing),
      ignore=IGNORE, source=f"Hugging Face FLAVA {arch}",
      shapes_only=shapes_only)
  if not shapes_only:
    params = {k: np.asarray(v, order="C") for k, v in params.items()}
  config_dict = {"family": "flava", "flava": dataclasses.asdict(cfg),
                 "image_size": cfg.image_size, "max_len": cfg.max_len}
  return config_dict, params, report


# -- the image codebook (FlavaImageCodebook, DALL-E's dVAE encoder) ------------

def _codebook_full() -> dict:
  from florax.models import flava_codebook  # pylint: disable=g-import-not-at-top
  return dataclasses.asdict(flava_codebook.CodebookConfig())


def _codebook_test() -> dict:
  """The small random codebook of tests/fixtures/make_hf_flava.py."""
  return dict(hidden=8, num_blocks_per_group=1, vocab_size=32, image_size=16)


# 'full' = facebook/flava-image-codebook (HF's default
# FlavaImageCodebookConfig) at FLAVA's 112 px codebook input.
CODEBOOK_ARCHS = {"full": _codebook_full, "test": _codebook_test}
_CODEBOOK_ALIASES = {"facebook/flava-image-codebook": "full",
                     "flava-image-codebook": "full"}


def codebook_config_from_hf(hf: Mapping[str, Any],
                            image_size: int = CODEBOOK_IMAGE_SIZE):
  """florax CodebookConfig of an HF FlavaImageCodebookConfig dict."""
  from florax.models import flava_codebook  # pylint: disable=g-import-not-at-top
  if hf.get("num_groups", 4) != flava_codebook.NUM_GROUPS:
    raise ValueError(f"FlavaImageCodebook num_groups={hf['num_groups']}: "
                     "HF builds DALL-E's four groups whatever the field says "
                     "and only scales the residual gain by it; florax "
                     "imports num_groups=4 only")
  if hf.get("input_channels", 3) != 3:
    raise ValueError("FlavaImageCodebook input_channels must be 3")
  return flava_codebook.CodebookConfig(
      hidden=hf.get("hidden_size", 256),
      num_blocks_per_group=hf.get("num_blocks_per_group", 2),
      vocab_size=hf.get("vocab_size", 8192), image_size=int(image_size))


def codebook_arch_config(arch: str, image_size: int | None = None):
  """CodebookConfig of an arch name, or of an HF config.json: a
  FlavaForPreTraining's (its image_codebook_config; HF's defaults when it
  has none) or a FlavaImageCodebook's own."""
  from florax.models import flava_codebook  # pylint: disable=g-import-not-at-top
  file = hf_config_file(arch)
  if file is not None:
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
    sub = (hf if hf.get("model_type") == "flava_image_codebook" else
           hf.get("image_codebook_config") or {})
    cfg = codebook_config_from_hf(sub, image_size or CODEBOOK_IMAGE_SIZE)
    flava_codebook.validate(cfg)
    return cfg
  name = _CODEBOOK_ALIASES.get(arch, arch)
  if name not in CODEBOOK_ARCHS:
    raise ValueError(
        f"unknown FLAVA image codebook arch {arch!r}; known: "
        f"{', '.join(sorted(set(CODEBOOK_ARCHS) | set(_CODEBOOK_ALIASES)))}"
        ", or the path of a FLAVA config.json")
  fields = CODEBOOK_ARCHS[name]()
  if image_size is not None:
    fields["image_size"] = int(image_size)
  cfg = flava_codebook.CodebookConfig(**fields)
  flava_codebook.validate(cfg)
  return cfg


def codebook_rules() -> list[common.Rule]:
  """HF FlavaImageCodebook names -> florax ImageCodebook flat names."""
  blk = r"blocks\.group_(\d+)\.group\.block_(\d+)\."
  dst = r"group\1/block\2/"
  out = []
  for kind, layout in (("weight", common.CONV2D), ("bias", common.COPY)):
    leaf = "kernel" if kind == "weight" else "bias"
    out += [
        common.Rule(rf"blocks\.input\.{kind}", f"input/{leaf}", layout),
        common.Rule(blk + rf"id_path\.{kind}", dst + f"id_path/{leaf}",
                    layout),
        common.Rule(blk + rf"res_path\.path\.conv_(\d)\.{kind}",
                    dst + rf"res_path/conv\3/{leaf}", layout),
        common.Rule(rf"blocks\.output\.conv\.{kind}", f"output/{leaf}",
                    layout),
    ]
  return out


@functools.lru_cache(maxsize=8)
def _codebook_shapes(cfg) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from florax.models import flava_codebook  # pylint: disable=g-import-not-at-top
  s = cfg.image_size
  return tuple(common.target_shapes(
      flava_codebook.ImageCodebook(cfg),
      inputs=(jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),)).items())


def convert_codebook_state_dict(state_dict: Mapping[str, np.ndarray],
                                arch: str = "full",
                                image_size: int | None = None,
                                allow_missing: Iterable[str] = (), *,
                                shapes_only: bool = False, config=None):
  """An HF FlavaImageCodebook state dict as florax ImageCodebook params.

  A FlavaForPreTraining state dict works as is: only its
  'image_codebook.'-prefixed tensors are read (prefix removed).

  Returns:
    (config: {'family': 'flava_codebook', 'codebook': CodebookConfig
     fields, 'image_size'}, {flat name: float32 array (or shape)}, Report).
  """
  cfg = config if config is not None else codebook_arch_config(arch,
                                                               image_size)
  if any(k.startswith(CODEBOOK_PREFIX) for k in state_dict):
    state_dict = {k[len(CODEBOOK_PREFIX):]: v for k, v in state_dict.items()
                  if k.startswith(CODEBOOK_PREFIX)}
  params, report = common.convert(
      state_dict, codebook_rules(), dict(_codebook_shapes(cfg)),
      allow_missing=tuple(allow_missing),
      source=f"Hugging Face FlavaImageCodebook {arch}",
      shapes_only=shapes_only)
  if not shapes_only:
    params = {k: np.asarray(v, order="C") for k, v in params.items()}
  return ({"family": "flava_codebook", "codebook": dataclasses.asdict(cfg),
           "image_size": cfg.image_size}, params, report)
