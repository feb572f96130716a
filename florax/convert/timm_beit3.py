"""timm's BEiT-3 (timm.models.vision_transformer beit3_*) -> florax's
Multiway image classifier (an image-only two-tower whose image tower is
`two_tower.MultiwayImageTower`).

timm ships BEiT-3's image classifiers as a plain `VisionTransformer`
(scale_attn_norm / scale_mlp_norm: the attention and FFN sub-LNs,
global_pool='avg': the mean of the patch tokens, [cls] excluded, then
`fc_norm`; no final norm; LayerNorm eps 1e-5, exact GELU, a full qkv bias),
made from unilm's checkpoints by timm's `_convert_beit3`: torchscale's
vision branch (A) is kept, the language branch (B) and the text embedding
dropped, q/k/v fused into one `attn.qkv`, and the vision position table
stripped of Fairseq's two offset rows. That is BEiT-3's Multiway run on
images only, so it imports onto florax's Multiway with `vision_only=True`
(only the vision branch exists: no text embedding, no language/VL experts,
no MIM mask token), the torchscale layout of florax.convert.torchscale_beit3
(`multiway_attention=True`, `num_vl_layers=0`: the vision copy of each
attention is `attn/{qkv,norm,proj}_v`) and `normalize_output=False`, pooled
by the tower's mean + `fc_norm` exactly as timm's 'avg' pooling. The florax
names are therefore the vision subset of a torchscale BEiT-3 import's
(under `image_encoder/multiway/`): the same BEiT-3 weights get the same
names whichever library they come from. The table (`rules`):

  timm                               florax (image_encoder/multiway/...)
  patch_embed.proj                   vision_embed/patch_embed (conv)
  cls_token                          vision_embed/cls_token
  pos_embed  (1, 1 + g*g, W)         vision_embed/pos_embed (1 + g*g, W)
  blocks.{i}.norm1                   block{i}/norm1_v
  blocks.{i}.attn.qkv                block{i}/attn/qkv_v  (W, 3, heads, hd)
  blocks.{i}.attn.norm               block{i}/attn/norm_v (attention sub-LN)
  blocks.{i}.attn.proj               block{i}/attn/proj_v
  blocks.{i}.norm2                   block{i}/norm2_v
  blocks.{i}.mlp.{fc1,norm,fc2}      block{i}/mlp_v/{fc1,norm,fc2}
  fc_norm                            image_encoder/fc_norm (not multiway/)
  head                               head (the classifier, (W, classes))

As in florax.convert.timm_vit the architecture comes from an explicit table
of timm names (ARCHS): a checkpoint of another shape fails with the list of
tensors that do not fit. A checkpoint still in unilm / torchscale naming
(`beit3.` prefix, `encoder.layers.{i}...{A,B}`) is refused with a pointer
to `--source torchscale` (florax.convert.torchscale_beit3, the whole
Multiway). The class count is read from the head (`.pt` tags have none:
a feature extractor); `allow_missing=('head.*',)` drops it. At another
image size the position grid is interpolated (bicubic, [cls] kept).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common

PREFIX = "image_encoder"
# The Multiway inside two_tower.MultiwayImageTower.
BACKBONE = f"{PREFIX}/multiway"

# timm's pretrained cfg of every beit3_* tag: ImageNet default mean/std,
# crop_pct 1.0 (bicubic).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What every timm BEiT-3 is, in MultiwayConfig fields (module docstring).
# The text fields are torchscale's BEiT-3 values (florax.convert.
# torchscale_beit3), unused by a vision_only model but kept so that the
# config differs from a torchscale import only where the model does.
_TIMM_BEIT3 = dict(vision_only=True, multiway_attention=True,
                   num_vl_layers=0, normalize_output=False, norm_eps=1e-5,
                   sub_ln=True, act="gelu", vocab_size=64010,
                   max_text_len=1022, pad_id=1)


def _beit3(image_size, patch_size, width, depth, num_heads, mlp_ratio=4.0,
           **fields):
  # timm's Block: hidden_features=int(dim * mlp_ratio) (giant: 4.3637 ->
  # int(1408 * 4.3637) = 6144, BEiT-3 giant's FFN).
  return dict(_TIMM_BEIT3, image_size=image_size, patch_size=patch_size,
              width=width, depth=depth, num_heads=num_heads,
              mlp_dim=int(width * mlp_ratio), **fields)


# timm model name -> MultiwayConfig fields (timm 1.0's beit3_* model_args).
# tests/test_convert_timm_beit3.py checks the full-size entries against
# timm's own models (recorded layouts; live on the meta device with timm).
ARCHS = {
    "beit3_base_patch16_224": _beit3(224, 16, 768, 12, 12),
    "beit3_large_patch16_224": _beit3(224, 16, 1024, 24, 16),
    "beit3_giant_patch14_224": _beit3(224, 14, 1408, 40, 16,
                                      mlp_ratio=4.3637),
    "beit3_giant_patch14_336": _beit3(336, 14, 1408, 40, 16,
                                      mlp_ratio=4.3637),
    # The small random timm BEiT-3 of tests/fixtures/make_timm_beit3.py:
    # torchscale_beit3's 'test' shapes (32 px, patch 8, width 64, 2 layers,
    # 4 heads, FFN 128: not 4 x width, so a transposed FFN cannot pass).
    "beit3_test": _beit3(32, 8, 64, 2, 4, mlp_ratio=2.0),
}

# The eval transform of every beit3_* tag (timm pretrained cfg).
EVAL = dict(crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)

# timm keeps no buffers in a ViT's state dict; nothing to ignore.
IGNORE = ()

# unilm / torchscale names: the 'beit3.' wrapper, torchscale's encoder
# layers, the A/B branch copies, the vision embedding module.
_TORCHSCALE_NAME = re.compile(
    r"^(beit3\.|encoder\.layers\.|vision_embed\.|text_embed\.)|\.[AB]\.")


def arch_fields(arch: str) -> dict:
  """The ARCHS entry of a timm model name (a '.tag' suffix such as
  '.in22k_ft_in1k' is ignored)."""
  name = arch.split(".")[0]
  if name not in ARCHS:
    raise ValueError(f"unknown timm BEiT-3 arch {arch!r}; known: "
                     f"{', '.join(sorted(ARCHS))}")
  return dict(ARCHS[name])


def arch_config(arch: str, image_size: int | None = None):
  """(MultiwayConfig, image size) of a timm beit3_* name; `image_size`
  overrides the pretrained resolution (the position grid is
  interpolated)."""
  from florax.models import multiway  # pylint: disable=g-import-not-at-top
  fields = arch_fields(arch)
  if image_size is not None:
    fields["image_size"] = int(image_size)
  cfg = multiway.MultiwayConfig(**fields)
  multiway.validate(cfg)
  return cfg, cfg.image_size


def eval_transform(arch: str) -> dict:
  """timm's eval-time transform of the arch: crop_pct, mean, std."""
  arch_fields(arch)
  return dict(EVAL)


def check_naming(state_dict: Mapping, arch: str = ""):
  """Raises a ValueError pointing at --source torchscale when the state
  dict is still in unilm / torchscale naming (not timm's)."""
  found = sorted(k for k in state_dict if _TORCHSCALE_NAME.search(k))
  if found:
    raise ValueError(
        f"timm {arch or 'BEiT-3'}: the checkpoint is in unilm / torchscale "
        f"BEiT-3 naming ({len(found)} tensors such as {found[0]!r}), not "
        "timm's: import it with --source torchscale (the whole Multiway, "
        "florax.convert.torchscale_beit3), or load it into timm's beit3_* "
        "model (timm converts it on load) and import that model's "
        "state_dict with --source timm")


def rules() -> list[common.Rule]:
  """timm BEiT-3 names -> florax flat names (module docstring)."""
  p = BACKBONE
  blk = r"blocks\.(\d+)\."
  dst = p + r"/block\1/"
  return [
      common.Rule(r"patch_embed\.proj\.weight",
                  f"{p}/vision_embed/patch_embed/kernel", common.CONV2D),
      common.Rule(r"patch_embed\.proj\.bias",
                  f"{p}/vision_embed/patch_embed/bias"),
      common.Rule(r"cls_token", f"{p}/vision_embed/cls_token"),
      # (1, 1 + g*g, W) -> (1 + g*g, W), interpolated at another size.
      common.Rule(r"pos_embed", f"{p}/vision_embed/pos_embed",
                  common.POS_EMBED),
      common.Rule(blk + r"norm1\.weight", dst + "norm1_v/scale"),
      common.Rule(blk + r"norm1\.bias", dst + "norm1_v/bias"),
      # (3W, W) -> (W, 3, heads, head_dim); (3W,) -> (3, heads, head_dim)
      common.Rule(blk + r"attn\.qkv\.weight", dst + "attn/qkv_v/kernel",
                  common.LINEAR),
      common.Rule(blk + r"attn\.qkv\.bias", dst + "attn/qkv_v/bias",
                  common.FLAT),
      common.Rule(blk + r"attn\.norm\.weight", dst + "attn/norm_v/scale"),
      common.Rule(blk + r"attn\.norm\.bias", dst + "attn/norm_v/bias"),
      # (W, W) -> (heads, head_dim, W)
      common.Rule(blk + r"attn\.proj\.weight", dst + "attn/proj_v/kernel",
                  common.linear(2)),
      common.Rule(blk + r"attn\.proj\.bias", dst + "attn/proj_v/bias"),
      common.Rule(blk + r"norm2\.weight", dst + "norm2_v/scale"),
      common.Rule(blk + r"norm2\.bias", dst + "norm2_v/bias"),
      common.Rule(blk + r"mlp\.fc1\.weight", dst + "mlp_v/fc1/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc1\.bias", dst + "mlp_v/fc1/bias"),
      common.Rule(blk + r"mlp\.norm\.weight", dst + "mlp_v/norm/scale"),
      common.Rule(blk + r"mlp\.norm\.bias", dst + "mlp_v/norm/bias"),
      common.Rule(blk + r"mlp\.fc2\.weight", dst + "mlp_v/fc2/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc2\.bias", dst + "mlp_v/fc2/bias"),
      common.Rule(r"fc_norm\.weight", f"{PREFIX}/fc_norm/scale"),
      common.Rule(r"fc_norm\.bias", f"{PREFIX}/fc_norm/bias"),
      # The classifier of the image-only two-tower (as timm_vit's).
      common.Rule(r"head\.weight", "head/kernel", common.LINEAR),
      common.Rule(r"head\.bias", "head/bias"),
  ]


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg) -> tuple:
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  return tuple(common.target_shapes(
      two_tower.MultiwayImageTower(cfg), cfg.image_size,
      prefix=PREFIX).items())


def target_shapes(cfg) -> dict[str, tuple]:
  """{flat name: shape} of the image tower of `cfg` under 'image_encoder/'
  (eval_shape, cached per config: tracing a giant takes seconds)."""
  return dict(_target_shapes(cfg))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       shapes_only: bool = False):
  """A timm BEiT-3 state dict as florax params.

  Args:
    state_dict: {timm name: array} (`common.read_checkpoint`); with
      shapes_only, anything with a .shape.
    arch: a timm model name (ARCHS), e.g. 'beit3_base_patch16_224'.
    image_size: the resolution to build for (default: the arch's); the
      position embedding is interpolated when it differs.
    allow_missing: fnmatch patterns over timm names to drop (e.g. 'head.*')
      and florax names to leave freshly initialised.
    shapes_only: check names and shapes only; the params are then
      {name: shape}.

  Returns:
    (model config dict, {florax flat name: float32 array}, common.Report),
    as florax.convert.timm_vit.convert_state_dict: 'family' ('multiway'),
    'image' (MultiwayConfig fields), 'image_size', 'num_classes' (None
    without a head).
  Raises:
    ValueError for an unknown arch or a checkpoint in torchscale naming;
    common.ConversionError when the state dict does not fit the arch.
  """
  allow_missing = tuple(allow_missing)
  cfg, size = arch_config(arch, image_size)
  check_naming(state_dict, arch)
  shapes = target_shapes(cfg)
  num_classes = None
  head = state_dict.get("head.weight")
  if (head is not None and len(head.shape) == 2
      and not common.matches_any("head.weight", allow_missing)
      and not common.matches_any("head/kernel", allow_missing)):
    # The class count is the fine-tuning dataset's: read from the head.
    num_classes = int(head.shape[0])
    shapes["head/kernel"] = (cfg.width, num_classes)
    shapes["head/bias"] = (num_classes,)
  params, report = common.convert(
      state_dict, rules(), shapes, allow_missing=allow_missing,
      ignore=IGNORE, source=f"timm {arch}", shapes_only=shapes_only)
  if not shapes_only:
    params = {k: np.asarray(v, order="C") for k, v in params.items()}
  config = {"family": "multiway", "image": dataclasses.asdict(cfg),
            "image_size": size, "num_classes": num_classes}
  return config, params, report
