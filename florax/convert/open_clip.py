"""open_clip's CLIP and EVA-CLIP (ViT image tower + text transformer) ->
florax TwoTower.

open_clip state dicts (`model.state_dict()`, the hub's
open_clip_model.safetensors / open_clip_pytorch_model.bin, and OpenAI's
original checkpoints, which use the same names) become a florax two-tower
model: the ViT under 'image_encoder/', the text transformer under
'text_encoder/', the projections 'image_proj/kernel' and 'text_proj/kernel'
(open_clip's `visual.proj` and `text_projection` are already (in, out)) and
'logit_scale' (open_clip's is already the log of the scale).

The architecture comes from an explicit table (ARCHS) holding the numbers of
open_clip's own model configs (open_clip/model_configs/*.json); the
'-quickgelu' names are the ones OpenAI's weights were trained with (QuickGELU,
x * sigmoid(1.702 x)); the others use exact GELU. open_clip cannot tell the
two apart from a state dict and neither can florax: import OpenAI's weights
with a '-quickgelu' arch.

Numerics: both towers are florax's shared pre-LN encoder. The image tower is
conv1 (no bias) + class embedding + position embedding, ln_pre, the blocks,
ln_post on every token and the class token pooled. The text tower adds
token and position embeddings, runs causally (the attn_mask buffer is
rebuilt by florax, not read), applies ln_final and pools at the end-of-text
token: open_clip pools at the argmax of the ids, which is the first
end_of_text id for its tokenizer (49407 is the largest id).

EVA-CLIP (EVA01-g-14, EVA02-B-16, EVA02-L-14, ...: open_clip's
CustomTextCLIP with a timm trunk) keeps the same text tower under 'text.'
and a timm Eva as `visual.trunk`, converted by florax.convert.timm_eva's
table (q/v bias, separate or fused q/k/v, SwiGLU, sub-LN, 2-D rope on
timm's reference grid). open_clip's EVA configs set timm_pool='token' and
timm_proj=None, so the trunk's own classifier `head` (a Linear *with* a
bias) is the CLIP image projection: the imported TwoTower is built with
`model.image_proj_bias` true and `visual.trunk.head.weight/bias` become
'image_proj/kernel' and 'image_proj/bias' as they are, so the tower's
normed tokens (a frozen teacher's features, e.g. for EVA MIM) are timm's.
EVA02-E-14(-plus) need residual post-norm blocks, which florax lacks: they
are named in ARCHS and refused with that reason.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common, timm_eva

IMAGE = "image_encoder"
TEXT = "text_encoder"

# OpenAI CLIP's eval transform: resize the shorter side to the image size
# (bicubic), centre crop, normalise with these.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's tokenizer ends its vocabulary with <start_of_text>,
# <end_of_text> (49406, 49407 for OpenAI's): the default eos is the last id.


def _clip(embed_dim, image_size, patch_size, width, layers, text_width,
          text_heads, text_layers, head_width=64, mlp_ratio=4.0,
          context_length=77, vocab_size=49408, quick_gelu=False,
          text_mlp_ratio=4.0):
  """An entry in open_clip's own terms (its model_configs JSON fields)."""
  return dict(embed_dim=embed_dim, quick_gelu=quick_gelu,
              vision=dict(image_size=image_size, patch_size=patch_size,
                          width=width, layers=layers, head_width=head_width,
                          mlp_ratio=mlp_ratio),
              text=dict(context_length=context_length, vocab_size=vocab_size,
                        width=text_width, heads=text_heads,
                        layers=text_layers, mlp_ratio=text_mlp_ratio))


_BASES = {
    "ViT-B-32": _clip(512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-16": _clip(512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-L-14": _clip(768, 224, 14, 1024, 24, 768, 12, 12),
    "ViT-L-14-336": _clip(768, 336, 14, 1024, 24, 768, 12, 12),
    "ViT-H-14": _clip(1024, 224, 14, 1280, 32, 1024, 16, 24, head_width=80),
    "ViT-g-14": _clip(1024, 224, 14, 1408, 40, 1024, 16, 24, head_width=88,
                      mlp_ratio=4.3637),
    "ViT-bigG-14": _clip(1280, 224, 14, 1664, 48, 1280, 20, 32,
                         head_width=104, mlp_ratio=4.9231),
}
# open_clip registers a '-quickgelu' twin of these (same shapes).
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
              "ViT-bigG-14")

# open_clip model name -> its config. tests/test_convert_open_clip.py checks
# every entry against open_clip.get_model_config when open_clip is
# installed.
ARCHS = dict(_BASES)
ARCHS.update({f"{n}-quickgelu": dict(_BASES[n], quick_gelu=True)
              for n in _QUICKGELU})
# The small random CLIP of tests/fixtures/ref_open_clip.py: tiny towers, a
# 1615-id vocabulary (open_clip's tokenizer on the fixture's own small merges
# file: OpenAI's 49408 x width embedding would not fit a fixture), QuickGELU
# as OpenAI's weights, and an mlp_ratio of 2 so that a transposed MLP weight
# cannot go unnoticed.
ARCHS["ViT-test"] = _clip(32, 32, 8, 64, 2, 64, 2, 2, head_width=32,
                          mlp_ratio=2.0, context_length=16, vocab_size=1615,
                          quick_gelu=True, text_mlp_ratio=2.0)


def _eva_clip(embed_dim, timm_model_name, text_width, text_heads,
              text_layers, image_size=224, context_length=77,
              vocab_size=49408, text_mlp_ratio=4.0):
  """An EVA-CLIP entry in open_clip's terms (its model_configs JSON): a
  timm trunk with token pooling whose head is the projection, and the CLIP
  text tower with exact GELU (quick_gelu false)."""
  return dict(embed_dim=embed_dim, quick_gelu=False, custom_text=True,
              vision=dict(image_size=image_size,
                          timm_model_name=timm_model_name,
                          timm_model_pretrained=False, timm_pool="token",
                          timm_proj=None),
              text=dict(context_length=context_length, vocab_size=vocab_size,
                        width=text_width, heads=text_heads,
                        layers=text_layers, mlp_ratio=text_mlp_ratio))


# open_clip's EVA-CLIP model configs (EVA*.json). EVA01-g-14 uses timm's
# eva_giant_patch14_224 with open_clip's global_pool='token' (the same
# network as eva_giant_patch14_clip_224). The EVA02-E trunk
# (eva02_enormous_patch14_clip_224) is in timm_eva.UNSUPPORTED: importing
# it raises a ValueError naming the missing block type.
EVA_ARCHS = {
    "EVA01-g-14": _eva_clip(1024, "eva_giant_patch14_224", 768, 12, 12),
    "EVA01-g-14-plus": _eva_clip(1024, "eva_giant_patch14_224", 1024, 16,
                                 24),
    "EVA02-B-16": _eva_clip(512, "eva02_base_patch16_clip_224", 512, 8, 12),
    "EVA02-L-14": _eva_clip(768, "eva02_large_patch14_clip_224", 768, 12,
                            12),
    "EVA02-L-14-336": _eva_clip(768, "eva02_large_patch14_clip_336", 768,
                                12, 12, image_size=336),
    "EVA02-E-14": _eva_clip(1024, "eva02_enormous_patch14_clip_224", 1024,
                            16, 24),
    "EVA02-E-14-plus": _eva_clip(1024, "eva02_enormous_patch14_clip_224",
                                 1280, 20, 32),
    # The small random EVA-CLIP of tests/fixtures/ref_eva_clip.py: timm
    # trunk 'eva02_clip_test' (timm_eva.ARCHS: 32 px, patch 8, a 4x4 grid
    # on a 5x5 rope reference, like B/16's 14 on 16), the open_clip
    # fixture's 1615-id vocabulary.
    "EVA02-test": _eva_clip(16, "eva02_clip_test", 32, 2, 2, image_size=32,
                            context_length=16, vocab_size=1615),
}
ARCHS.update(EVA_ARCHS)

# Buffers and bookkeeping entries that are not parameters: the causal mask
# (florax builds its own) and the integers OpenAI's checkpoints carry.
IGNORE = (r"attn_mask", r"visual\.attn_mask", r"input_resolution",
          r"context_length", r"vocab_size")


def is_eva(entry: dict) -> bool:
  """Whether an ARCHS entry is an EVA-CLIP (a timm trunk)."""
  return "timm_model_name" in entry["vision"]


def arch_entry(arch: str) -> dict:
  """The ARCHS entry of an open_clip model name; a ValueError naming the
  missing florax feature for an arch florax cannot express."""
  if arch not in ARCHS:
    raise ValueError(f"unknown open_clip arch {arch!r}; known: "
                     f"{', '.join(sorted(ARCHS))} (OpenAI's weights need a "
                     "'-quickgelu' name)")
  entry = ARCHS[arch]
  trunk = entry["vision"].get("timm_model_name")
  if trunk in timm_eva.UNSUPPORTED:
    raise timm_eva.unsupported_error(
        trunk, f"open_clip {arch} (image tower: timm {trunk})",
        supported=[a for a, e in EVA_ARCHS.items() if "test" not in a
                   and e["vision"]["timm_model_name"]
                   not in timm_eva.UNSUPPORTED])
  return entry


def _text_config(entry: dict, eos_id: int | None):
  from florax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  t = entry["text"]
  text = text_lib.TextConfig(
      vocab_size=t["vocab_size"], width=t["width"], depth=t["layers"],
      num_heads=t["heads"], max_len=t["context_length"],
      mlp_ratio=t["mlp_ratio"], causal=True,
      eos_id=int(t["vocab_size"] - 1 if eos_id is None else eos_id),
      pad_id=None, act="quick_gelu" if entry["quick_gelu"] else "gelu",
      norm_eps=1e-5, qkv_bias="full")
  text_lib.validate(text)
  return text


def _eva_image_config(arch: str, entry: dict, image_size: int | None):
  """The ViTConfig of an EVA-CLIP's timm trunk (timm_eva's table), with
  open_clip's pooling."""
  v = entry["vision"]
  if v["timm_pool"] != "token" or v["timm_proj"] is not None:
    raise ValueError(f"open_clip {arch}: timm_pool={v['timm_pool']!r}, "
                     f"timm_proj={v['timm_proj']!r}; florax imports EVA-CLIP "
                     "with token pooling and the trunk's head as projection")
  image, _ = timm_eva.arch_config(v["timm_model_name"],
                                  image_size or v["image_size"],
                                  **timm_eva.TOKEN_POOL)
  return image


def arch_config(arch: str, image_size: int | None = None,
                eos_id: int | None = None):
  """(ViTConfig, TextConfig, embed_dim) of an open_clip model name (an
  EVA-CLIP's ViTConfig is its timm trunk's, from timm_eva's table, with
  token pooling); `image_size` overrides the pretrained resolution;
  `eos_id` (default the vocabulary's last id, open_clip's <end_of_text>)
  is where text pools."""
  # Model code (jax) only here: the tables above load without it.
  from florax.models import vit  # pylint: disable=g-import-not-at-top
  entry = arch_entry(arch)
  if is_eva(entry):
    return (_eva_image_config(arch, entry, image_size),
            _text_config(entry, eos_id), entry["embed_dim"])
  v = entry["vision"]
  act = "quick_gelu" if entry["quick_gelu"] else "gelu"
  image = vit.ViTConfig(
      image_size=int(image_size or v["image_size"]),
      patch_size=v["patch_size"], width=v["width"], depth=v["layers"],
      num_heads=v["width"] // v["head_width"],
      # open_clip: mlp_width = int(width * mlp_ratio)
      mlp_dim=int(v["width"] * v["mlp_ratio"]), class_token=True,
      pre_norm=True, patch_bias=False, pool="cls", fc_norm=False,
      qkv_bias="full", layer_scale=None, act=act, norm_eps=1e-5)
  vit.validate(image)
  return image, _text_config(entry, eos_id), entry["embed_dim"]


def _tower_rules(src: str, dst: str) -> list[common.Rule]:
  """open_clip's `Transformer.resblocks` (torch MultiheadAttention) ->
  florax encoder blocks."""
  blk = src + r"transformer\.resblocks\.(\d+)\."
  out = dst + r"/encoder/block\1/"
  return [
      common.Rule(blk + r"ln_1\.weight", out + "norm1/scale"),
      common.Rule(blk + r"ln_1\.bias", out + "norm1/bias"),
      # MultiheadAttention's fused in_proj (3D, D): q, k, v stacked, each
      # with its heads in (heads, head_dim) order -> (D, 3, heads, head_dim).
      common.Rule(blk + r"attn\.in_proj_weight", out + "attn/qkv/kernel",
                  common.LINEAR),
      common.Rule(blk + r"attn\.in_proj_bias", out + "attn/qkv/bias",
                  common.FLAT),
      common.Rule(blk + r"attn\.out_proj\.weight", out + "attn/proj/kernel",
                  common.linear(2)),
      common.Rule(blk + r"attn\.out_proj\.bias", out + "attn/proj/bias"),
      common.Rule(blk + r"ls_1\.gamma", out + "ls1"),
      common.Rule(blk + r"ln_2\.weight", out + "norm2/scale"),
      common.Rule(blk + r"ln_2\.bias", out + "norm2/bias"),
      common.Rule(blk + r"mlp\.c_fc\.weight", out + "mlp/fc1/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.c_fc\.bias", out + "mlp/fc1/bias"),
      common.Rule(blk + r"mlp\.c_proj\.weight", out + "mlp/fc2/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.c_proj\.bias", out + "mlp/fc2/bias"),
      common.Rule(blk + r"ls_2\.gamma", out + "ls2"),
  ]


def text_rules(src: str = "") -> list[common.Rule]:
  """open_clip's TextTransformer (CLIP: at the top level; CustomTextCLIP,
  e.g. EVA-CLIP: under src='text.') -> florax's text tower and text_proj."""
  t = TEXT
  return [
      common.Rule(src + r"token_embedding\.weight",
                  f"{t}/token_embed/embedding"),
      # A sequence, not a grid: never interpolated (a mismatch is an error).
      common.Rule(src + r"positional_embedding", f"{t}/pos_embed"),
      *_tower_rules(src, t),
      common.Rule(src + r"ln_final\.weight", f"{t}/norm/scale"),
      common.Rule(src + r"ln_final\.bias", f"{t}/norm/bias"),
      common.Rule(src + r"text_projection", "text_proj/kernel"),
  ]


def eva_rules(image) -> list[common.Rule]:
  """EVA-CLIP: timm_eva's table under 'visual.trunk.' (its head, bias
  included, -> the image projection), the text tower under 'text.', the
  logit scale."""
  trunk = [common.Rule(r"visual\.trunk\." + r.source, r.target, r.layout)
           for r in timm_eva.rules(image, head="image_proj")]
  return trunk + text_rules(r"text\.") + [
      common.Rule(r"logit_scale", "logit_scale")]


def rules() -> list[common.Rule]:
  """The mapping table from open_clip CLIP names to florax flat names."""
  i = IMAGE
  return [
      common.Rule(r"visual\.conv1\.weight", f"{i}/patch_embed/kernel",
                  common.CONV2D),
      # (D,) -> (1, 1, D)
      common.Rule(r"visual\.class_embedding", f"{i}/cls_token", common.FLAT),
      # (1 + g*g, D), the class position first; interpolated at another
      # resolution.
      common.Rule(r"visual\.positional_embedding", f"{i}/pos_embed",
                  common.POS_EMBED_2D),
      common.Rule(r"visual\.ln_pre\.weight", f"{i}/norm_pre/scale"),
      common.Rule(r"visual\.ln_pre\.bias", f"{i}/norm_pre/bias"),
      *_tower_rules(r"visual\.", i),
      common.Rule(r"visual\.ln_post\.weight", f"{i}/norm/scale"),
      common.Rule(r"visual\.ln_post\.bias", f"{i}/norm/bias"),
      common.Rule(r"visual\.proj", "image_proj/kernel"),
      *text_rules(),
      common.Rule(r"logit_scale", "logit_scale"),
  ]


def model_config(image, text, embed_dim: int,
                 image_proj_bias: bool = False) -> dict:
  """`config.model` of the florax TwoTower (florax.models.two_tower) from a
  ViTConfig and a TextConfig; `image_proj_bias` for EVA-CLIP, whose image
  projection (the timm trunk's head) has a bias."""
  return {"image": dict(arch="vit", **dataclasses.asdict(image)),
          "text": dataclasses.asdict(text), "embed_dim": int(embed_dim),
          "image_proj_bias": bool(image_proj_bias),
          # Irrelevant once logit_scale is loaded; kept for init.
          "init_temperature": 0.07, "dtype": "float32", "num_classes": 0}


def target_shapes(model_cfg: dict) -> dict[str, tuple]:
  """{flat name: shape} of the TwoTower `model_cfg` describes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  model = two_tower.from_config(ml_collections.ConfigDict(model_cfg))
  s, length = model_cfg["image"]["image_size"], model_cfg["text"]["max_len"]
  return common.target_shapes(model, inputs=(
      jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, length), jnp.int32)))


# Where open_clip's TimmModel keeps the timm model.
_TRUNK = "visual.trunk."


def _eva_canonical(state_dict, swiglu: bool, shapes_only: bool) -> dict:
  """timm_eva.canonical on the trunk's names (separate q/k/v fused, a
  packed SwiGLU fc1 split), the rest as it is."""
  trunk = {k[len(_TRUNK):]: v for k, v in state_dict.items()
           if k.startswith(_TRUNK)}
  out = {k: v for k, v in state_dict.items() if not k.startswith(_TRUNK)}
  out.update({_TRUNK + k: v for k, v in timm_eva.canonical(
      trunk, swiglu, shapes_only).items()})
  return out


def _convert_eva(state_dict, arch, image, model, allow_missing, shapes_only):
  """EVA-CLIP through timm_eva's rules (the trunk's names canonicalised)."""
  state = _eva_canonical(state_dict, image.act == "swiglu", shapes_only)
  return common.convert(
      state, eva_rules(image), target_shapes(model),
      allow_missing=allow_missing, ignore=IGNORE, source=f"open_clip {arch}",
      shapes_only=shapes_only)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       eos_id: int | None = None, shapes_only: bool = False):
  """An open_clip CLIP or EVA-CLIP state dict as florax params.

  Args:
    state_dict: {open_clip name: array} (`common.read_checkpoint`).
    arch: an open_clip model name (ARCHS), e.g. 'ViT-B-16',
      'ViT-B-16-quickgelu' (OpenAI's weights) or 'EVA02-B-16'.
    image_size: the resolution to build for (default: the arch's); the
      image position embedding is interpolated when it differs (an EVA-02
      trunk keeps its rope reference grid, as timm does).
    allow_missing: fnmatch patterns over open_clip names to drop and florax
      names to leave freshly initialised.
    eos_id: the tokenizer's end-of-text id, where the text tower pools
      (default: the vocabulary's last id, open_clip's <end_of_text>).
    shapes_only: check names and shapes only; the params are then
      {name: shape}.

  Returns:
    (model config dict, {florax flat name: float32 array}, common.Report).
    The config dict holds 'family' ('clip'), 'model' (`config.model` of the
    TwoTower), 'image_size' and 'max_len'.
  Raises:
    ValueError for an unknown arch or one florax cannot express (EVA02-E);
    common.ConversionError when the state dict does not fit the arch.
  """
  image, text, embed_dim = arch_config(arch, image_size, eos_id)
  eva = is_eva(ARCHS[arch])
  model = model_config(image, text, embed_dim, image_proj_bias=eva)
  allow_missing = tuple(allow_missing)
  if eva:
    params, report = _convert_eva(state_dict, arch, image, model,
                                  allow_missing, shapes_only)
  else:
    params, report = common.convert(
        state_dict, rules(), target_shapes(model),
        allow_missing=allow_missing, ignore=IGNORE,
        source=f"open_clip {arch}", shapes_only=shapes_only)
  # C order: safetensors.numpy.save_file writes a Fortran-ordered array
  # (a transposed torch weight) as its raw memory, i.e. transposed back.
  params = {k: np.asarray(v, order="C") if isinstance(v, np.ndarray) else v
            for k, v in params.items()}
  config = {"family": "clip", "model": model,
            "image_size": image.image_size, "max_len": text.max_len}
  return config, params, report
