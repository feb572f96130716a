"""timm's SwinTransformer -> florax CoSwin with Swin's patch stem and merging.

timm (>= 0.9) state dicts, as `timm.create_model(...).state_dict()` or the
Hugging Face hub's model.safetensors give them, and the original Microsoft
Swin checkpoints (downsampling at the end of a stage, `head.weight`), which
are renamed the way timm's own checkpoint_filter_fn renames them.

Numerics: florax's window attention is timm's for every grid that the window
divides or that is no larger than the window (all the standard archs at
their resolution). Where a window does not divide a grid, timm pads the
rolled map and lets padded tokens be attended to, while florax masks them
out; outputs then differ slightly, and the report says so.

The converted model is an image-only classifier: the CoSwin tower under
'image_encoder/' and timm's `head.fc` as 'head/kernel' (D, classes),
'head/bias' (classes,) (pass allow_missing=('head.*',) to drop it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

import numpy as np

from florax.convert import common
from florax.models import coswin, windows

PREFIX = "image_encoder"

# timm's model_args for each registered name; `image_size` is the pretrained
# resolution. drop_path_rate is timm's SwinTransformer default (only matters
# for fine-tuning, where a config may override it).
_BASE = dict(stem="patch", merge="patch", stem_stride=4, merge_stride=2,
             mlp_ratio=4.0, drop_path_rate=0.1)
ARCHS = {
    "swin_tiny_patch4_window7_224": dict(
        image_size=224, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(
        image_size=224, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(
        image_size=224, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32)),
    "swin_base_patch4_window12_384": dict(
        image_size=384, window_size=12, embed_dim=128, depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32)),
    "swin_large_patch4_window7_224": dict(
        image_size=224, window_size=7, embed_dim=192, depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48)),
    "swin_large_patch4_window12_384": dict(
        image_size=384, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48)),
    # The small random timm model of tests/fixtures/ref_timm_swin.py: a
    # shifted, masked stage 0 (grid 16, window 8), a stage whose grid equals
    # the window (no shift) and one smaller than it (timm shrinks the table).
    "swin_test": dict(
        image_size=64, window_size=8, embed_dim=8, depths=(2, 2, 2),
        num_heads=(2, 2, 4)),
}

# Non-persistent buffers that original checkpoints nevertheless carry;
# florax recomputes both from the geometry.
IGNORE = (r".*\.relative_position_index", r".*\.attn_mask")


def arch_config(arch: str, image_size: int | None = None,
                window_size: int | None = None):
  """(CoSwinConfig, image size) for a timm model name (a '.tag' suffix such
  as '.ms_in22k_ft_in1k' is ignored)."""
  name = arch.split(".")[0]
  if name not in ARCHS:
    raise ValueError(f"unknown timm Swin arch {arch!r}; known: "
                     f"{', '.join(sorted(ARCHS))}")
  fields = dict(_BASE, **ARCHS[name])
  size = fields.pop("image_size")
  if window_size is not None:
    fields["window_size"] = window_size
  cfg = coswin.CoSwinConfig(**fields)
  size = size if image_size is None else image_size
  coswin.validate(cfg, size)
  return cfg, size


def effective_windows(cfg, image_size: int) -> list[int]:
  """The window each stage really uses (shrunk to grids smaller than it)."""
  return [windows.effective_window((g, g), cfg.window_size, 0)[0][0]
          for g in coswin.stage_grids(image_size, cfg)]


def rules(cfg, image_size: int) -> list[common.Rule]:
  """The mapping table from timm names to florax flat names."""
  p = PREFIX
  blk = r"layers\.(\d+)\.blocks\.(\d+)\."
  dst = p + r"/stage\1_block\2/"
  table = [
      common.Rule(r"patch_embed\.proj\.weight", f"{p}/stem/conv/kernel",
                  common.CONV2D),
      common.Rule(r"patch_embed\.proj\.bias", f"{p}/stem/conv/bias"),
      common.Rule(r"patch_embed\.norm\.weight", f"{p}/stem/norm/scale"),
      common.Rule(r"patch_embed\.norm\.bias", f"{p}/stem/norm/bias"),
      common.Rule(r"layers\.(\d+)\.downsample\.norm\.weight",
                  p + r"/merge\1/norm/scale"),
      common.Rule(r"layers\.(\d+)\.downsample\.norm\.bias",
                  p + r"/merge\1/norm/bias"),
      common.Rule(r"layers\.(\d+)\.downsample\.reduction\.weight",
                  p + r"/merge\1/reduction/kernel", common.LINEAR),
      common.Rule(blk + r"norm1\.weight", dst + "norm1/scale"),
      common.Rule(blk + r"norm1\.bias", dst + "norm1/bias"),
      # (3D, D) -> (D, 3, heads, head_dim): timm splits the fused output as
      # (3, heads, head_dim), the order of florax's kernel axes.
      common.Rule(blk + r"attn\.qkv\.weight", dst + "attn/qkv/kernel",
                  common.LINEAR),
      common.Rule(blk + r"attn\.qkv\.bias", dst + "attn/qkv/bias",
                  common.FLAT),
      common.Rule(blk + r"attn\.proj\.weight", dst + "attn/proj/kernel",
                  common.linear(2)),
      common.Rule(blk + r"attn\.proj\.bias", dst + "attn/proj/bias"),
      common.Rule(blk + r"norm2\.weight", dst + "norm2/scale"),
      common.Rule(blk + r"norm2\.bias", dst + "norm2/bias"),
      common.Rule(blk + r"mlp\.fc1\.weight", dst + "mlp/fc1/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc1\.bias", dst + "mlp/fc1/bias"),
      common.Rule(blk + r"mlp\.fc2\.weight", dst + "mlp/fc2/kernel",
                  common.LINEAR),
      common.Rule(blk + r"mlp\.fc2\.bias", dst + "mlp/fc2/bias"),
      common.Rule(r"norm\.weight", f"{p}/norm/scale"),
      common.Rule(r"norm\.bias", f"{p}/norm/bias"),
      common.Rule(r"head\.fc\.weight", "head/kernel", common.LINEAR),
      common.Rule(r"head\.fc\.bias", "head/bias"),
  ]
  # One table rule per stage: the window a stage really uses decides how a
  # (possibly shrunk) timm table lands in florax's full-window table.
  for s, used in enumerate(effective_windows(cfg, image_size)):
    table.append(common.Rule(
        rf"layers\.{s}\.blocks\.(\d+)\.attn\.relative_position_bias_table",
        p + rf"/stage{s}_block\1/attn/relative_position_bias",
        common.relative_position_table(used)))
  return table


def from_original_swin(state_dict: Mapping[str, np.ndarray]):
  """Microsoft's Swin layout -> timm's: downsampling moves from the end of
  stage i to the start of stage i+1 and `head` becomes `head.fc` (as timm's
  checkpoint_filter_fn). Returns (state dict, renamed?)."""
  if "layers.0.downsample.reduction.weight" not in state_dict:
    return dict(state_dict), False
  out = {}
  for k, v in state_dict.items():
    k = re.sub(r"^layers\.(\d+)\.downsample",
               lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
    k = re.sub(r"^head\.", "head.fc.", k)
    out[k] = v
  return out, True


@functools.lru_cache(maxsize=16)
def _tower_shapes(cfg, image_size):
  """The CoSwin tower's {flat name: shape} (traced once per config)."""
  return common.target_shapes(coswin.CoSwin(cfg), image_size, prefix=PREFIX)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       image_size: int | None = None,
                       allow_missing: Iterable[str] = (), *,
                       window_size: int | None = None,
                       shapes_only: bool = False):
  """A timm Swin state dict as florax params.

  Args:
    state_dict: {timm name: array} (`common.read_checkpoint`).
    arch: a timm model name (ARCHS), e.g. 'swin_base_patch4_window7_224'.
    image_size: the resolution to build for (default: the arch's);
      relative position tables are interpolated when the windows change.
    allow_missing: fnmatch patterns over timm names to drop (e.g. 'head.*')
      and florax names to leave freshly initialised.
    window_size: another window (e.g. 12 for 384 px fine-tuning).
    shapes_only: check names and shapes only (values may be anything with a
      .shape); the returned params are then {name: shape}.

  Returns:
    (model config dict, {florax flat name: float32 array}, common.Report).
    The config dict holds 'family' ('coswin'), 'image' (CoSwinConfig
    fields), 'image_size' and 'num_classes' (None without a head).
  Raises:
    common.ConversionError when the state dict does not fit the arch.
  """
  allow_missing = tuple(allow_missing)
  cfg, size = arch_config(arch, image_size, window_size)
  state_dict, renamed = from_original_swin(state_dict)
  shapes = dict(_tower_shapes(cfg, size))
  num_classes = None
  head = state_dict.get("head.fc.weight")
  dropped = (common.matches_any("head.fc.weight", allow_missing)
             or common.matches_any("head/kernel", allow_missing))
  if head is not None and not dropped:
    num_classes = int(head.shape[0])
    width = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
    shapes["head/kernel"] = (width, num_classes)
    if "head.fc.bias" in state_dict:
      shapes["head/bias"] = (num_classes,)
  params, report = common.convert(
      state_dict, rules(cfg, size), shapes, allow_missing=allow_missing,
      ignore=IGNORE, source=f"timm {arch}", shapes_only=shapes_only)
  if renamed:
    report.notes.append("original Microsoft Swin layout: downsampling "
                        "renamed to timm's (start of the next stage)")
  grids = coswin.stage_grids(size, cfg)
  for s, (g, w) in enumerate(zip(grids, effective_windows(cfg, size))):
    if g % w:
      report.notes.append(
          f"stage {s}: the {w}-token window does not divide the {g}-token "
          "grid; florax masks the padding that timm attends to, so outputs "
          "differ slightly from timm's")
  config = {"family": "coswin", "image": dataclasses.asdict(cfg),
            "image_size": size, "num_classes": num_classes}
  return config, params, report
