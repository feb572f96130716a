"""torchscale's BEiT3 (torchscale.model.BEiT3.BEiT3) -> florax's Multiway.

BEiT-3's released weights were trained with torchscale's code, whose
MultiwayWrapper puts an A (vision) and a B (language) copy around every
LayerNorm, the FFN *and* the attention projections (q/k/v/out_proj and the
attention sub-LN; the paper shares the attention). The florax model is
therefore built with `multiway_attention=True` and `num_vl_layers=0`
(torchscale has no vision-language expert: a pair runs v on the image
tokens and l on the text tokens in every layer), and the XLM-R / fairseq
pad id 1 of BEiT-3's tokenizer (unilm passes `ids == 1` as torchscale's
`text_padding_position`). The table (`rules`):

  torchscale                                 florax
  text_embed.weight                          text_embed/token_embed/embedding
  vision_embed.proj                          vision_embed/patch_embed (conv)
  vision_embed.{cls,mask}_token              vision_embed/{cls,mask}_token
  encoder.embed_positions.A.weight[2:]       vision_embed/pos_embed
  encoder.embed_positions.B.weight[2:]       text_embed/pos_embed
  encoder.layers.{i}.self_attn.{q,k,v}_proj.{A,B}
                                             block{i}/attn/qkv_{v,l} (fused)
  ...self_attn.inner_attn_ln.{A,B}           block{i}/attn/norm_{v,l}
  ...self_attn.out_proj.{A,B}                block{i}/attn/proj_{v,l}
  ...self_attn_layer_norm.{A,B}              block{i}/norm1_{v,l}
  ...final_layer_norm.{A,B}                  block{i}/norm2_{v,l}
  ...ffn.{A,B}.{fc1,ffn_layernorm,fc2}       block{i}/mlp_{v,l}/{fc1,norm,fc2}
  encoder.layer_norm.{A,B}                   norm_{v,l}

Rows 0 and 1 of both position tables are Fairseq's offset: BEiT3's forward
never reads them, so they are dropped (and the vision table is interpolated
when the model is built for another image size). unilm's fine-tuning
wrappers (BEiT3ForImageClassification, ...) prefix every backbone name with
'beit3.'; that prefix is removed, and their heads (fc_norm, head, pooler,
...) are listed as unmapped unless `allow_missing` drops them, as is an MLM
`encoder.output_projection`. Shapes come from ARCHS (unilm's
beit3_{base,large}_patch16_* configs and the paper's giant) and the image
size from the checkpoint's vision position table, so a 384 px fine-tune
imports at 384 px without --image_size.

timm also ships BEiT-3 (timm.models.vision_transformer's beit3_* models and
its `_convert_beit3`): only the vision branch, remapped to a plain ViT
(branch A kept, q/k/v fused, pos_embed without the offset rows). Those
checkpoints are imported by florax.convert.timm_beit3 (--source timm) as an
image-only classifier: a `vision_only` Multiway under the same names as the
vision half of this module's import, pooled by fc_norm, with timm's head.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common

# unilm's fine-tuning wrappers hold the backbone as `self.beit3`.
WRAPPER_PREFIX = "beit3."
# torchscale's PositionalEmbedding starts at row 2 (Fairseq's convention).
POSITION_OFFSET = 2
# BEiT-3's tokenizer is XLM-R's SentencePiece with the fairseq dictionary:
# <s>=0, <pad>=1, </s>=2, <unk>=3 (florax's 'sentencepiece_fairseq').
PAD_ID = 1
# What a torchscale import always is (module docstring).
_TORCHSCALE = dict(multiway_attention=True, num_vl_layers=0, pad_id=PAD_ID,
                   vocab_size=64010, max_text_len=1024 - POSITION_OFFSET,
                   norm_eps=1e-5, sub_ln=True, act="gelu")

# unilm beit3 _get_{base,large}_config and the paper's giant (§2.3; unilm
# released no giant weights, so its text table length is unilm's 1024).
ARCHS = {
    "base": dict(_TORCHSCALE, width=768, depth=12, num_heads=12,
                 mlp_dim=3072, image_size=224, patch_size=16),
    "large": dict(_TORCHSCALE, width=1024, depth=24, num_heads=16,
                  mlp_dim=4096, image_size=224, patch_size=16),
    "giant": dict(_TORCHSCALE, width=1408, depth=40, num_heads=16,
                  mlp_dim=6144, image_size=224, patch_size=14),
    # The small random torchscale BEiT3 of tests/test_convert_torchscale.py.
    "test": dict(_TORCHSCALE, width=64, depth=2, num_heads=4, mlp_dim=128,
                 image_size=32, patch_size=8, vocab_size=100,
                 max_text_len=16),
}
# unilm's model names (beit3_base_patch16_224, beit3_large_patch16_384, ...).
_UNILM_NAME = re.compile(r"beit3_(base|large|giant)_patch(\d+)_(\d+)")

IGNORE = ()


def arch_fields(arch: str) -> dict:
  """MultiwayConfig fields of an arch: 'base', 'large', 'giant', 'test' or
  a unilm name such as 'beit3_large_patch16_384' (its image size)."""
  m = _UNILM_NAME.fullmatch(arch)
  if m:
    size, patch, image = m.group(1), int(m.group(2)), int(m.group(3))
    fields = dict(ARCHS[size])
    if patch != fields["patch_size"]:
      raise ValueError(f"torchscale arch {arch!r}: BEiT-3 {size} has patch "
                       f"size {fields['patch_size']}, not {patch}")
    fields["image_size"] = image
    return fields
  if arch not in ARCHS:
    raise ValueError(
        f"unknown torchscale BEiT3 arch {arch!r}; known: "
        f"{', '.join(sorted(a for a in ARCHS if a != 'test'))} or a unilm "
        "name such as beit3_base_patch16_224 / beit3_large_patch16_384")
  return dict(ARCHS[arch])


def is_known_arch(arch: str) -> bool:
  try:
    arch_fields(arch)
  except ValueError:
    return False
  return True


def strip_prefix(state_dict: Mapping) -> dict:
  """unilm's 'beit3.' wrapper prefix removed (its heads keep their names)."""
  if any(k.startswith(WRAPPER_PREFIX) for k in state_dict):
    return {(k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k):
            v for k, v in state_dict.items()}
  return dict(state_dict)


def checkpoint_image_size(state_dict: Mapping, patch_size: int
                          ) -> int | None:
  """The image size of a checkpoint's vision position table (cls + grid^2
  + the 2 offset rows), or None when it has none or is not square."""
  table = state_dict.get("encoder.embed_positions.A.weight")
  if table is None or len(table.shape) != 2:
    return None
  grid2 = table.shape[0] - POSITION_OFFSET - 1
  grid = int(round(grid2 ** 0.5))
  return grid * patch_size if grid > 0 and grid * grid == grid2 else None


def arch_config(arch: str, image_size: int | None = None,
                state_dict: Mapping | None = None):
  """The MultiwayConfig of `arch` at `image_size` (default: the size of the
  checkpoint's vision position table, else the arch's); a checkpoint without
  `encoder.layer_norm` (unilm's classification / VQA fine-tunes) gives
  normalize_output=False."""
  from florax.models import multiway  # pylint: disable=g-import-not-at-top
  fields = arch_fields(arch)
  if image_size is None and state_dict is not None:
    image_size = checkpoint_image_size(state_dict, fields["patch_size"])
  if image_size is not None:
    fields["image_size"] = int(image_size)
  if state_dict is not None and not any(
      k.startswith("encoder.layer_norm.") for k in strip_prefix(state_dict)):
    # unilm's classification and VQA models are built with
    # normalize_output=False: no final norm in their checkpoints, and none
    # applied, so none in the converted model either.
    fields["normalize_output"] = False
  cfg = multiway.MultiwayConfig(**fields)
  multiway.validate(cfg)
  return cfg


# q_proj of one branch of one layer; its k/v and the fused name (module
# docstring's table).
_QUERY = re.compile(r"(encoder\.layers\.\d+\.self_attn\.)q_proj\.([AB])\."
                    r"(weight|bias)")


def canonical(state_dict: Mapping, shapes_only: bool = False) -> dict:
  """torchscale's separate q/k/v projections fused per branch into one
  `self_attn.qkv_proj.{A,B}` (common.fuse_qkv)."""
  return common.fuse_qkv(
      state_dict, _QUERY, [rf"\1{p}_proj.\2.\3" for p in "qkv"],
      r"\1qkv_proj.\2.\3", shapes_only)


def _drop_offset(v, t):
  return v[POSITION_OFFSET:].reshape(t)


def _resize_offset(v, t, name):
  if v.ndim != 2 or v.shape[0] <= POSITION_OFFSET:
    return None
  return common._resize_via_init_from(  # pylint: disable=protected-access
      v[POSITION_OFFSET:], t, name)


# torchscale's (rows + 2, W) position table -> florax's (rows, W); a vision
# table of another grid is interpolated (init_from.resize_to decides from
# the florax name: a text table is never resized).
POSITIONS = common.Layout(
    "positions[2:]", lambda t: (t[0] + POSITION_OFFSET,) + tuple(t[1:]),
    _drop_offset, _resize_offset)


def rules() -> list[common.Rule]:
  """torchscale (canonical) names -> florax Multiway flat names."""
  out = [
      common.Rule(r"text_embed\.weight", "text_embed/token_embed/embedding"),
      common.Rule(r"vision_embed\.proj\.weight",
                  "vision_embed/patch_embed/kernel", common.CONV2D),
      common.Rule(r"vision_embed\.proj\.bias", "vision_embed/patch_embed/bias"),
      common.Rule(r"vision_embed\.cls_token", "vision_embed/cls_token"),
      common.Rule(r"vision_embed\.mask_token", "vision_embed/mask_token"),
      common.Rule(r"encoder\.embed_positions\.A\.weight",
                  "vision_embed/pos_embed", POSITIONS),
      common.Rule(r"encoder\.embed_positions\.B\.weight",
                  "text_embed/pos_embed", POSITIONS),
  ]
  blk = r"encoder\.layers\.(\d+)\."
  dst = r"block\1/"
  for branch, e in (("A", "v"), ("B", "l")):
    b = rf"\.{branch}\."
    out += [
        # (3W, W) -> (W, 3, heads, head_dim); (3W,) -> (3, heads, head_dim)
        common.Rule(blk + r"self_attn\.qkv_proj" + b + "weight",
                    dst + f"attn/qkv_{e}/kernel", common.LINEAR),
        common.Rule(blk + r"self_attn\.qkv_proj" + b + "bias",
                    dst + f"attn/qkv_{e}/bias", common.FLAT),
        common.Rule(blk + r"self_attn\.inner_attn_ln" + b + "weight",
                    dst + f"attn/norm_{e}/scale"),
        common.Rule(blk + r"self_attn\.inner_attn_ln" + b + "bias",
                    dst + f"attn/norm_{e}/bias"),
        # (W, W) -> (heads, head_dim, W)
        common.Rule(blk + r"self_attn\.out_proj" + b + "weight",
                    dst + f"attn/proj_{e}/kernel", common.linear(2)),
        common.Rule(blk + r"self_attn\.out_proj" + b + "bias",
                    dst + f"attn/proj_{e}/bias"),
        common.Rule(blk + r"self_attn_layer_norm" + b + "weight",
                    dst + f"norm1_{e}/scale"),
        common.Rule(blk + r"self_attn_layer_norm" + b + "bias",
                    dst + f"norm1_{e}/bias"),
        common.Rule(blk + r"final_layer_norm" + b + "weight",
                    dst + f"norm2_{e}/scale"),
        common.Rule(blk + r"final_layer_norm" + b + "bias",
                    dst + f"norm2_{e}/bias"),
        common.Rule(blk + r"ffn" + b + r"fc1\.weight",
                    dst + f"mlp_{e}/fc1/kernel", common.LINEAR),
        common.Rule(blk + r"ffn" + b + r"fc1\.bias", dst + f"mlp_{e}/fc1/bias"),
        common.Rule(blk + r"ffn" + b + r"ffn_layernorm\.weight",
                    dst + f"mlp_{e}/norm/scale"),
        common.Rule(blk + r"ffn" + b + r"ffn_layernorm\.bias",
                    dst + f"mlp_{e}/norm/bias"),
        common.Rule(blk + r"ffn" + b + r"fc2\.weight",
                    dst + f"mlp_{e}/fc2/kernel", common.LINEAR),
        common.Rule(blk + r"ffn" + b + r"fc2\.bias", dst + f"mlp_{e}/fc2/bias"),
        common.Rule(r"encoder\.layer_norm" + b + "weight", f"norm_{e}/scale"),
        common.Rule(r"encoder\.layer_norm" + b + "bias", f"norm_{e}/bias"),
    ]
  return out


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg) -> tuple:
  return tuple(_trace_shapes(cfg).items())


def target_shapes(cfg) -> dict[str, tuple]:
  """{flat name: shape} of the florax Multiway of `cfg` (eval_shape, cached
  per config: tracing a full-size model takes seconds)."""
  return dict(_target_shapes(cfg))


def _trace_shapes(cfg) -> dict[str, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from florax.models import multiway  # pylint: disable=g-import-not-at-top
  s = cfg.image_size
  return common.target_shapes(
      multiway.Multiway(cfg),
      inputs=(jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
              jax.ShapeDtypeStruct((1, 2), jnp.int32)))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       shapes_only: bool = False):
  """A torchscale BEiT3 state dict (or unilm's 'beit3.'-prefixed one) as
  florax Multiway params.

  Args:
    state_dict: {name: array} (common.read_checkpoint); with shapes_only,
      anything with a .shape.
    arch: see `arch_fields`.
    image_size: build for this size (the vision positions are
      interpolated); default: the checkpoint's own.
    allow_missing: fnmatch patterns (common.convert), e.g. 'head.*'.
    shapes_only: check names and shapes only.

  Returns:
    (config: {'family': 'multiway', 'multiway': MultiwayConfig fields,
     'image_size', 'max_len'}, {flat name: array (or shape)}, Report).
  Raises:
    ValueError for an unknown arch; common.ConversionError listing every
    tensor that does not fit.
  """
  state_dict = strip_prefix(state_dict)
  cfg = arch_config(arch, image_size, state_dict)
  state = canonical(state_dict, shapes_only)
  params, report = common.convert(
      state, rules(), target_shapes(cfg), allow_missing=tuple(allow_missing),
      ignore=IGNORE, source=f"torchscale BEiT3 {arch}",
      shapes_only=shapes_only)
  report.notes.append(
      f"position tables: torchscale's first {POSITION_OFFSET} rows "
      "(Fairseq's offset, never read by BEiT3) dropped")
  if not shapes_only:
    params = {k: np.asarray(v, order="C") for k, v in params.items()}
  config = {"family": "multiway", "multiway": dataclasses.asdict(cfg),
            "image_size": cfg.image_size, "max_len": cfg.max_text_len}
  return config, params, report
