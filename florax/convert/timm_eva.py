"""timm's EVA / EVA-02 (timm.models.eva.Eva) -> florax ViT (image-only).

EVA is a BEiT-style ViT: a class token, a learned position embedding that
covers it, q and v biases with no k bias (timm's `q_bias`/`v_bias`; the zero
`k_bias` is a non-persistent buffer, absent from state dicts), optional
layer scales `gamma_1`/`gamma_2`, and by default 'avg' pooling of the patch
tokens followed by `fc_norm` (no final norm). EVA-02 adds:

  * 2-D RoPE on the grid tokens (timm's RotaryEmbeddingCat, 'cat' type,
    interleaved pairs, row then column, theta 10000): florax's `rope`. timm
    scales the rope positions onto `ref_feat_shape` (the MIM pretraining
    grid, 16x16 for every EVA-02): row i of an h-row grid sits at
    i * 16 / h. florax's `rope_ref_grid` is that reference, recorded for
    every rope arch, so the 336/448 px fine-tunes, EVA02-CLIP-B/16's 14x14
    grid and any `image_size` override match timm (at grid = reference the
    positions are the plain indices, as before).
  * SwiGLU: either packed (timm GluMlp, `mlp.fc1` of 2F rows, the first F
    the gate: silu(first half) * second half) or split (`mlp.fc1_g` gate,
    `mlp.fc1_x` up); both become florax's mlp/gate + mlp/fc1.
  * `scale_mlp`: a LayerNorm on the MLP hidden before fc2 (`mlp.norm`),
    without the attention-side one unless `scale_attn_inner` (`attn.norm`):
    florax's sub_ln="mlp" / "attn" / True.
  * `qkv_fused=False` (eva02_base/large): separate q/k/v projections, fused
    here into one qkv kernel (q_proj.bias -> q_bias, v_proj.bias -> v_bias;
    k_proj has none).

As in florax.convert.timm_vit, the architecture comes from an explicit
table of timm names (ARCHS), so a checkpoint of another shape fails with
the list of tensors that do not fit. The EVA-CLIP vision trunks
(`*_clip_*`: class-token pooling, final norm, the head is the CLIP
projection) are entries too; florax.convert.open_clip reuses this table and
`rules` for open_clip's EVA-CLIP models. UNSUPPORTED names the timm EVAs
that need a block florax does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common

PREFIX = "image_encoder"

# timm's EVA default pretrained cfg: OpenAI CLIP mean/std, crop_pct 0.9.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# timm Eva defaults in florax's names: class token, qv bias, global_pool
# 'avg' -> mean of the patch tokens then fc_norm, LayerNorm eps 1e-6.
_BASE = dict(class_token=True, pre_norm=False, patch_bias=True, pool="mean",
             fc_norm=True, qkv_bias="qv", layer_scale=None, act="gelu",
             norm_eps=1e-6, sub_ln=False, rope=False)
# EVA-02: rope + SwiGLU (timm's mlp_ratio 4 * 2/3 -> int(width * 8/3)),
# rope positions on timm's ref_feat_shape = the 224 px / patch-14 MIM grid.
_EVA02 = dict(rope=True, act="swiglu", rope_ref_grid=(16, 16))
# timm global_pool='token' (the *_clip_* trunks, open_clip's EVA-CLIP):
# the final norm on every token, the class token pooled, no fc_norm.
TOKEN_POOL = dict(pool="cls", fc_norm=False)


def _eva(image_size, patch_size, width, depth, num_heads, mlp_dim,
         crop_pct=0.9, **fields):
  return dict(_BASE, image_size=image_size, patch_size=patch_size,
              width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
              **fields, eval=dict(crop_pct=crop_pct, mean=CLIP_MEAN,
                                  std=CLIP_STD))


# timm model name -> florax ViTConfig fields (+ the eval transform of its
# default tag). Checked against timm's own models (meta device) by
# tests/test_convert_timm_eva.py when timm is installed.
ARCHS = {
    "eva_giant_patch14_224": _eva(224, 14, 1408, 40, 16, 6144),
    "eva02_tiny_patch14_224": _eva(224, 14, 192, 12, 3, 512, **_EVA02),
    "eva02_small_patch14_224": _eva(224, 14, 384, 12, 6, 1024, **_EVA02),
    "eva02_base_patch14_224": _eva(224, 14, 768, 12, 12, 2048, sub_ln="mlp",
                                   **_EVA02),
    "eva02_large_patch14_224": _eva(224, 14, 1024, 24, 16, 2730,
                                    sub_ln="mlp", **_EVA02),
    # Fine-tuned at 336 / 448 px on the 16x16 rope reference (grids 24 and
    # 32). The default tags of the 448 px models resize with timm's
    # crop_mode 'squash' (both sides to 448); florax's eval transform
    # resizes the shorter side and centre-crops: the same for square images.
    "eva02_tiny_patch14_336": _eva(336, 14, 192, 12, 3, 512, crop_pct=1.0,
                                   **_EVA02),
    "eva02_small_patch14_336": _eva(336, 14, 384, 12, 6, 1024, crop_pct=1.0,
                                    **_EVA02),
    "eva02_base_patch14_448": _eva(448, 14, 768, 12, 12, 2048, sub_ln="mlp",
                                   crop_pct=1.0, **_EVA02),
    "eva02_large_patch14_448": _eva(448, 14, 1024, 24, 16, 2730,
                                    sub_ln="mlp", crop_pct=1.0, **_EVA02),
    # EVA-CLIP vision trunks (the head is the CLIP projection, with a bias):
    # sub-LN in attention and MLP (scale_attn_inner + scale_mlp). B/16's
    # grid is 14x14 on the 16x16 rope reference.
    "eva_giant_patch14_clip_224": _eva(224, 14, 1408, 40, 16, 6144,
                                       **TOKEN_POOL),
    "eva02_base_patch16_clip_224": _eva(224, 16, 768, 12, 12, 2048,
                                        sub_ln=True, **TOKEN_POOL, **_EVA02),
    "eva02_large_patch14_clip_224": _eva(224, 14, 1024, 24, 16, 2730,
                                         sub_ln=True, **TOKEN_POOL, **_EVA02),
    "eva02_large_patch14_clip_336": _eva(336, 14, 1024, 24, 16, 2730,
                                         sub_ln=True, crop_pct=1.0,
                                         **TOKEN_POOL, **_EVA02),
    # The small random timm models of tests/fixtures/ref_timm_eva.py:
    # 'eva_test' is EVA-01 (qv bias, GELU, layer scale, avg + fc_norm);
    # 'eva02_test' is EVA-02 (rope, split SwiGLU with the MLP sub-LN only).
    "eva_test": _eva(32, 8, 64, 2, 2, 96, layer_scale=0.1),
    "eva02_test": _eva(32, 8, 64, 2, 2, 96, sub_ln="mlp",
                       **dict(_EVA02, rope_ref_grid=(4, 4))),
    # Compared live only: eva02_tiny's packed SwiGLU and eva02_base's
    # separate q/k/v projections (the `canonical` rewrites).
    "eva02_test_packed": _eva(32, 8, 64, 2, 2, 96,
                              **dict(_EVA02, rope_ref_grid=(4, 4))),
    # The trunk of open_clip 'EVA02-test' (tests/fixtures/ref_eva_clip.py,
    # which registers it with timm): EVA-CLIP B/16's layout at 32 px, a
    # 4x4 grid on a 5x5 rope reference (B/16: 14x14 on 16x16).
    "eva02_clip_test": _eva(32, 8, 32, 2, 2, 85, sub_ln=True, **TOKEN_POOL,
                            **dict(_EVA02, rope_ref_grid=(5, 5))),
    # tests/fixtures/ref_timm_eva_rope.py: EVA-02 at 48 px (a 6x6 grid) on
    # a 4x4 rope reference, as a 448 px fine-tune on the 224 px grid.
    "eva02_test_ref": _eva(48, 8, 32, 2, 2, 85, sub_ln="mlp",
                           **dict(_EVA02, rope_ref_grid=(4, 4))),
}

# timm EVAs whose blocks florax's encoder cannot express: name -> the
# missing feature (raised as a ValueError naming it).
UNSUPPORTED = {
    "eva02_enormous_patch14_clip_224": (
        "residual post-norm blocks (timm use_post_norm=True, "
        "EvaBlockPostNorm: x + norm(attn(x)) instead of x + attn(norm(x))); "
        "florax's encoder is pre-LN only"),
}

IGNORE = ()


def unsupported_error(arch: str, what: str = "", supported=None
                      ) -> ValueError:
  """The error for an UNSUPPORTED timm EVA (`what`: how the caller names
  it, e.g. the open_clip model it is the trunk of; `supported`: the names
  to suggest instead, default this table's)."""
  name = arch.split(".")[0]
  if supported is None:
    supported = [a for a in ARCHS if "_test" not in a]
  return ValueError(
      f"{what or 'timm ' + name} cannot be imported: it needs "
      f"{UNSUPPORTED[name]}. Supported: {', '.join(sorted(supported))}")


def arch_fields(arch: str) -> dict:
  """The ARCHS entry of a timm model name ('.tag' suffixes ignored)."""
  name = arch.split(".")[0]
  if name in UNSUPPORTED:
    raise unsupported_error(name)
  if name not in ARCHS:
    raise ValueError(f"unknown timm EVA arch {arch!r}; known: "
                     f"{', '.join(sorted(ARCHS))}")
  return dict(ARCHS[name])


def arch_config(arch: str, image_size: int | None = None, **overrides):
  """(ViTConfig, image size) of a timm EVA name; `image_size` overrides the
  pretrained resolution (the position embedding is interpolated; a rope
  arch keeps its rope_ref_grid, as timm keeps ref_feat_shape when a model
  is created at another img_size); `overrides` replace ViTConfig fields
  (open_clip's global_pool='token' on eva_giant_patch14_224)."""
  from florax.models import vit  # pylint: disable=g-import-not-at-top
  fields = arch_fields(arch)
  fields.pop("eval")
  fields.update(overrides)
  if image_size is not None:
    fields["image_size"] = int(image_size)
  cfg = vit.ViTConfig(**fields)
  vit.validate(cfg)
  return cfg, cfg.image_size


def eval_transform(arch: str) -> dict:
  """timm's eval-time transform of the arch: crop_pct, mean, std."""
  return dict(arch_fields(arch)["eval"])


def _cat(parts, shapes_only):
  if shapes_only:
    return common.Shape((sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:]))
  return np.concatenate([np.asarray(p) for p in parts], axis=0)


def _split(value, shapes_only):
  if shapes_only:
    half = (value.shape[0] // 2,) + tuple(value.shape[1:])
    return common.Shape(half), common.Shape(half)
  value = np.asarray(value)
  return np.split(value, 2, axis=0) if value.shape[0] % 2 == 0 else (
      value, value)  # odd: left as is, the shape check names it


def canonical(state_dict: Mapping, swiglu: bool,
              shapes_only: bool = False) -> dict:
  """timm's EVA layout variants rewritten to one: separate q/k/v
  projections fused into attn.qkv (+ q_bias/v_bias), and for a SwiGLU arch
  a packed GluMlp fc1 split into fc1_g (first half: the gate) and fc1_x."""
  out = dict(state_dict)
  blocks = sorted({k.split(".")[1] for k in out
                   if k.startswith("blocks.") and ".attn.q_proj.weight" in k})
  for i in blocks:
    a = f"blocks.{i}.attn."
    names = [a + n + "_proj.weight" for n in "qkv"]
    if all(n in out for n in names):
      out[a + "qkv.weight"] = _cat([out.pop(n) for n in names], shapes_only)
      for n in "qv":
        if a + f"{n}_proj.bias" in out:
          out[a + f"{n}_bias"] = out.pop(a + f"{n}_proj.bias")
  for k in [k for k in out if swiglu and k.startswith("blocks.")
            and k.endswith((".mlp.fc1.weight", ".mlp.fc1.bias"))]:
    base, kind = k.rsplit(".", 1)
    gate, up = _split(out.pop(k), shapes_only)
    out[f"{base}_g.{kind}"], out[f"{base}_x.{kind}"] = gate, up
  return out


def rules(cfg, head: str = "head") -> list[common.Rule]:
  """The mapping table from (canonical) timm EVA names to florax names;
  `head`: the florax module timm's `head` Linear becomes (open_clip's
  EVA-CLIP: 'image_proj')."""
  p = PREFIX
  blk = r"blocks\.(\d+)\."
  dst = p + r"/encoder/block\1/"
  if cfg.act == "swiglu":
    mlp = [common.Rule(blk + r"mlp\.fc1_g\.weight", dst + "mlp/gate/kernel",
                       common.LINEAR),
           common.Rule(blk + r"mlp\.fc1_g\.bias", dst + "mlp/gate/bias"),
           common.Rule(blk + r"mlp\.fc1_x\.weight", dst + "mlp/fc1/kernel",
                       common.LINEAR),
           common.Rule(blk + r"mlp\.fc1_x\.bias", dst + "mlp/fc1/bias")]
  else:
    mlp = [common.Rule(blk + r"mlp\.fc1\.weight", dst + "mlp/fc1/kernel",
                       common.LINEAR),
           common.Rule(blk + r"mlp\.fc1\.bias", dst + "mlp/fc1/bias")]
  return mlp + [
      common.Rule(r"patch_embed\.proj\.weight", f"{p}/patch_embed/kernel",
                  common.CONV2D),
      common.Rule(r"patch_embed\.proj\.bias", f"{p}/patch_embed/bias"),
      common.Rule(r"cls_token", f"{p}/cls_token"),
      common.Rule(r"pos_embed", f"{p}/pos_embed", common.POS_EMBED),
      common.Rule(blk + r"norm1\.weight", dst + "norm1/scale"),
      common.Rule(blk + r"norm1\.bias", dst + "norm1/bias"),
      # (3D, D) -> (D, 3, heads, head_dim), timm's (3, heads, hd) order.
      common.Rule(blk + r"attn\.qkv\.weight", dst + "attn/qkv/kernel",
                  common.LINEAR),
      # (D,) -> (heads, head_dim)
      common.Rule(blk + r"attn\.q_bias", dst + "attn/q_bias", common.FLAT),
      common.Rule(blk + r"attn\.v_bias", dst + "attn/v_bias", common.FLAT),
      common.Rule(blk + r"attn\.norm\.weight", dst + "attn/norm/scale"),
      common.Rule(blk + r"attn\.norm\.bias", dst + "attn/norm/bias"),
      common.Rule(blk + r"attn\.proj\.weight", dst + "attn/proj/kernel",
                  common.linear(2)),
      common.Rule(blk + r"attn\.proj\.bias", dst + "attn/proj/bias"),
      common.Rule(blk + r"gamma_1", dst + "ls1"),
      common.Rule(blk + r"norm2\.weight", dst + "norm2/scale"),
      common.Rule(blk + r"norm2\.bias", dst + "norm2/bias"),
      common.Rule(blk + r"mlp\.norm\.weight", dst + "mlp/norm/scale"),
      common.Rule(blk + r"mlp\.norm\.bias", dst + "mlp/norm/bias"),
      common.Rule(blk + r"mlp\.fc2\.weight", dst + "mlp/fc2/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc2\.bias", dst + "mlp/fc2/bias"),
      common.Rule(blk + r"gamma_2", dst + "ls2"),
      common.Rule(r"norm\.weight", f"{p}/norm/scale"),
      common.Rule(r"norm\.bias", f"{p}/norm/bias"),
      common.Rule(r"fc_norm\.weight", f"{p}/fc_norm/scale"),
      common.Rule(r"fc_norm\.bias", f"{p}/fc_norm/bias"),
      common.Rule(r"head\.weight", f"{head}/kernel", common.LINEAR),
      common.Rule(r"head\.bias", f"{head}/bias"),
  ]


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       shapes_only: bool = False):
  """A timm EVA / EVA-02 state dict as florax params.

  Args and returns as florax.convert.timm_vit.convert_state_dict (family
  'vit'; the config's 'image' holds the ViTConfig fields).
  Raises:
    ValueError for an unknown or UNSUPPORTED arch;
    common.ConversionError when the state dict does not fit the arch.
  """
  from florax.models import vit  # pylint: disable=g-import-not-at-top
  allow_missing = tuple(allow_missing)
  cfg, size = arch_config(arch, image_size)
  state_dict = canonical(state_dict, cfg.act == "swiglu", shapes_only)
  shapes = common.target_shapes(vit.ViT(cfg), size, prefix=PREFIX)
  num_classes = None
  head = state_dict.get("head.weight")
  if (head is not None and len(head.shape) == 2
      and not common.matches_any("head.weight", allow_missing)
      and not common.matches_any("head/kernel", allow_missing)):
    num_classes = int(head.shape[0])
    shapes["head/kernel"] = (cfg.width, num_classes)
    shapes["head/bias"] = (num_classes,)
  params, report = common.convert(
      state_dict, rules(cfg), shapes, allow_missing=allow_missing,
      ignore=IGNORE, source=f"timm {arch}", shapes_only=shapes_only)
  if not shapes_only:
    params = {k: np.asarray(v, order="C") for k, v in params.items()}
  config = {"family": "vit", "image": dataclasses.asdict(cfg),
            "image_size": size, "num_classes": num_classes}
  return config, params, report
