"""Video CoSwin: Florence's video adapter (Florence §2.6) on top of CoSwin.

The image encoder carried to video with minimal changes (following Video
Swin, Liu et al. 2021b):

* tokenisation: CoSwin's 2-D conv stem becomes a 3-D conv, each
  (temporal kernel x spatial kernel^2) tube one token, + LayerNorm;
* patch merging: CoSwin's overlapping conv merging becomes a 3-D conv
  (spatially exactly CoSwin's: same kernel, stride and zero padding);
* attention: 3-D (shifted) local windows (t, h, w); the shifted blocks shift
  by half the window on every axis (Video Swin), a window larger than the
  grid on some axis shrinks to it and is then not shifted on that axis;
  grids a window does not divide are padded at the end of each axis and the
  padded tokens are masked out as keys (as `windows` does in 2-D);
* a 3-D relative position bias table ((2t-1)(2h-1)(2w-1), heads) per block;
* "dynamic window size": every stage has its own (t, h, w) window
  (`window_sizes`) and its own table extent (`table_windows`), so early
  stages can use small windows and later ones large windows;
* final LayerNorm and mean pooling over (t, h, w).

`inflate` turns a 2-D CoSwin checkpoint into this model's parameters by the
paper's rule: every 2-D conv kernel (kh, kw, cin, cout) is duplicated along
time and divided by the temporal kernel size; the 2-D relative position bias
is duplicated along the temporal offset axis (after a bicubic resize with
`coswin.resize_relative_position_bias` when a stage's spatial table differs
from the checkpoint's window); everything else (LayerNorms, qkv, proj, MLP,
conv biases) is inherited unchanged. Parameter names are CoSwin's, so the map
is name for name.

What that rule buys, and the padding choice that keeps it exact: on a static
video (one frame repeated), the inflated model computes exactly the 2-D
CoSwin features of that frame at every (t, h, w) position, when each stage's
spatial window and table equal the 2-D ones. A conv whose temporal taps all
see the same frame sums w/kt over kt copies = w; attention over a window
holding n copies of each key gives the same softmax; the bias does not
depend on the temporal offset. The one place this can break is the temporal
padding of a conv: zero padding hands the border taps zeros instead of the
frame, so an overlapping temporal kernel (kernel > stride) with zero padding
is NOT exact on the first/last token slices. Hence:

* tokenisation uses a tubelet: temporal kernel = stride (default 2), no
  temporal padding — exact, each tube one token, as the paper says;
* merging uses an overlapping temporal kernel (default 3, stride 1) for the
  "spatial and temporal interactions among tokens" the paper motivates it
  with, and pads time by replicating the border slices
  (`temporal_padding="edge"`), which is exact on a static video.
  `temporal_padding="zero"` is the plain zero-padded 3-D conv (not exact at
  the temporal borders); a temporal kernel = stride needs no padding at all.

Temporal padding of a conv with kernel k and stride s totals max(k - s, 0)
slices, split (floor, ceil) between the front and the back, so a length T
divisible by s comes out T / s. Spatially every conv pads (k - 1) // 2 zeros
on each side, exactly as CoSwin.

`stem="patch"` (Swin's patchify stem) becomes a (tubelet, p, p) patchify
conv; `merge="patch"` (Swin's 2x2 PatchMerging) is applied frame by frame
(spatial merging only, as in Video Swin), with its parameters inherited.

Not implemented: `scan=True` (refused by `validate`). `remat` works as in
CoSwin.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import traverse_util

from florax.models import coswin, layers, windows
from florax.models.coswin import CoSwinConfig
from kernels.window_attention import window_attention

TEMPORAL_PADDINGS = ("edge", "zero")


@dataclasses.dataclass(frozen=True)
class VideoCoSwinConfig(CoSwinConfig):
  """CoSwinConfig plus the video fields.

  The CoSwin fields keep their meaning (spatial kernels/strides, widths,
  depths, heads); `window_size` is only the default spatial window when
  `window_sizes` is None.
  """
  # Tokenisation: a tubelet of `stem_temporal_kernel` frames per token,
  # stepping `stem_temporal_stride` frames.
  stem_temporal_kernel: int = 2
  stem_temporal_stride: int = 2
  # Conv patch merging along time (spatially: merge_kernel / merge_stride).
  merge_temporal_kernel: int = 3
  merge_temporal_stride: int = 1
  # How the convs pad time when kernel > stride: "edge" replicates the
  # border slices (exact on static videos), "zero" is a plain 3-D conv.
  temporal_padding: str = "edge"
  # Per-stage attention windows (t, h, w); None: (8, window_size,
  # window_size) in every stage (Video Swin's default), clamped to the grid.
  window_sizes: Optional[Sequence[Sequence[int]]] = None
  # Per-stage bias-table extents (t, h, w), >= the effective windows; None:
  # the stage's window.
  table_windows: Optional[Sequence[Sequence[int]]] = None


def from_coswin(cfg: CoSwinConfig, **video_fields) -> VideoCoSwinConfig:
  """The video config of a 2-D CoSwin config, with the given video fields."""
  base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CoSwinConfig)}
  base.update(video_fields)
  return VideoCoSwinConfig(**base)


def stage_windows(cfg: VideoCoSwinConfig) -> tuple[tuple[int, int, int], ...]:
  if cfg.window_sizes is None:
    return tuple((8, cfg.window_size, cfg.window_size)
                 for _ in cfg.depths)
  return tuple(tuple(int(v) for v in w) for w in cfg.window_sizes)


def stage_tables(cfg: VideoCoSwinConfig) -> tuple[tuple[int, int, int], ...]:
  if cfg.table_windows is None:
    return stage_windows(cfg)
  return tuple(tuple(int(v) for v in w) for w in cfg.table_windows)


def _temporal_pad(kernel: int, stride: int) -> tuple[int, int]:
  total = max(kernel - stride, 0)
  return total // 2, total - total // 2


def _check_windows(cfg, field, value):
  if value is None:
    return
  if len(value) != len(cfg.depths):
    raise ValueError(f"VideoCoSwin {field} has {len(value)} entries for "
                     f"{len(cfg.depths)} stages; give one (t, h, w) per stage")
  for s, w in enumerate(value):
    if (len(w) != 3 or not all(isinstance(v, (int, np.integer)) for v in w)
        or min(w) < 1):
      raise ValueError(f"VideoCoSwin {field}[{s}]={tuple(w)!r} must be three "
                       f"positive ints (t, h, w)")


def stage_grids(cfg: VideoCoSwinConfig, frames: int,
                image_size: int) -> list[tuple[int, int, int]]:
  """(T', H', W') token grid of every stage, checking the stride schedule."""
  spatial = coswin.stage_grids(image_size, cfg)
  total = cfg.stem_temporal_stride * cfg.merge_temporal_stride ** (
      len(cfg.depths) - 1)
  if frames < 1 or frames % total:
    raise ValueError(
        f"frames={frames} does not fit the Video CoSwin temporal stride "
        f"schedule: it must be a positive multiple of {total} "
        f"(stem_temporal_stride {cfg.stem_temporal_stride} x "
        f"merge_temporal_stride {cfg.merge_temporal_stride}^"
        f"{len(cfg.depths) - 1})")
  t = frames // cfg.stem_temporal_stride
  grids = []
  for g in spatial:
    grids.append((t, g, g))
    t //= cfg.merge_temporal_stride
  return grids


def validate(cfg: VideoCoSwinConfig, frames: int, image_size: int):
  """Checks a config against an input size before anything is compiled;
  raises ValueError naming the offending field. Returns the stage grids."""
  if not isinstance(cfg, VideoCoSwinConfig):
    raise ValueError(f"VideoCoSwin wants a VideoCoSwinConfig, got "
                     f"{type(cfg).__name__} (see video_coswin.from_coswin)")
  if cfg.scan:
    raise ValueError("VideoCoSwin does not implement scan=True (nn.scan over "
                     "block pairs); use scan=False")
  for field in ("stem_temporal_kernel", "stem_temporal_stride",
                "merge_temporal_kernel", "merge_temporal_stride"):
    v = getattr(cfg, field)
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"VideoCoSwin {field} must be a positive int, got {v!r}")
  if cfg.temporal_padding not in TEMPORAL_PADDINGS:
    raise ValueError(f"VideoCoSwin temporal_padding={cfg.temporal_padding!r} "
                     f"is not one of {TEMPORAL_PADDINGS}")
  if cfg.merge == "patch" and (cfg.merge_temporal_kernel != 1
                               or cfg.merge_temporal_stride != 1):
    raise ValueError(
        "VideoCoSwin merge='patch' merges each frame's 2x2 neighbourhoods "
        "(spatial only), so merge_temporal_kernel and merge_temporal_stride "
        f"must be 1; got {cfg.merge_temporal_kernel}, "
        f"{cfg.merge_temporal_stride}")
  _check_windows(cfg, "window_sizes", cfg.window_sizes)
  _check_windows(cfg, "table_windows", cfg.table_windows)
  # CoSwin's own checks (depths/heads, embeddings, spatial strides, remat).
  coswin.validate(cfg, image_size)
  grids = stage_grids(cfg, frames, image_size)
  for s, (grid, win, tab) in enumerate(zip(grids, stage_windows(cfg),
                                           stage_tables(cfg))):
    eff, _ = effective_window_3d(grid, win, (0, 0, 0))
    for axis, e, t in zip("thw", eff, tab):
      if e > t:
        raise ValueError(
            f"VideoCoSwin stage {s}: the effective window {eff} (window_sizes "
            f"{win} clamped to the grid {grid}) exceeds table_windows[{s}]="
            f"{tab} on axis {axis}; the bias table must cover the window")
  return grids


# ---------------------------------------------------------------------------
# 3-D window geometry (the 2-D versions live in florax.models.windows).


def effective_window_3d(grid, window, shift):
  """Per-axis window and shift: a window larger than the grid on an axis
  shrinks to it and is not shifted there (Swin / Video Swin's rule)."""
  wins, shifts = [], []
  for g, w, s in zip(grid, window, shift):
    if g <= w:
      wins.append(g)
      shifts.append(0)
    else:
      wins.append(w)
      shifts.append(s)
  return tuple(wins), tuple(shifts)


def partition_3d(x, win):
  """(B, T, H, W, C), axes multiples of win -> (B*nW, wt*wh*ww, C)."""
  return rearrange(x, "b (nt wt) (nh wh) (nw ww) c -> (b nt nh nw) (wt wh ww) c",
                   wt=win[0], wh=win[1], ww=win[2])


def merge_3d(x, win, grid):
  """Inverse of `partition_3d` for a padded grid (T, H, W)."""
  return rearrange(x, "(b nt nh nw) (wt wh ww) c -> b (nt wt) (nh wh) (nw ww) c",
                   nt=grid[0] // win[0], nh=grid[1] // win[1],
                   nw=grid[2] // win[2], wt=win[0], wh=win[1], ww=win[2])


def attention_mask_3d(grid, win, shift):
  """Additive mask (nW, N, N) for a (padded, shifted) (T, H, W) grid, or None.

  As `windows.attention_mask` on three axes: key j is visible from query i
  iff both lie in the same region of the rolled grid and j is a real token.
  """
  padded = windows.padded_grid(grid, win)
  if tuple(padded) == tuple(grid) and not any(shift):
    return None
  region = np.zeros(padded, np.int32)
  labels = []
  for p, w, s in zip(padded, win, shift):
    lab = np.zeros(p, np.int32)
    if s:
      lab[p - w:p - s] = 1
      lab[p - s:] = 2
    labels.append(lab)
  region = (labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3
            + labels[2][None, None, :])
  valid = np.zeros(padded, bool)
  valid[:grid[0], :grid[1], :grid[2]] = True
  valid = np.roll(valid, tuple(-s for s in shift), axis=(0, 1, 2))
  region_w = partition_3d(region[None, ..., None], win)[..., 0]   # (nW, N)
  valid_w = partition_3d(valid[None, ..., None], win)[..., 0]     # (nW, N)
  same = region_w[:, :, None] == region_w[:, None, :]
  visible = same & valid_w[:, None, :]
  return np.where(visible, 0.0, windows.MASK_VALUE).astype(np.float32)


def relative_position_index_3d(win, table):
  """(N, N) indices into a ((2t-1)(2h-1)(2w-1), heads) table of extent
  `table` (t, h, w), row-major by (dt, dh, dw); a window smaller than the
  table uses its centre."""
  coords = np.stack(np.meshgrid(*(np.arange(w) for w in win),
                                indexing="ij")).reshape(3, -1)     # (3, N)
  rel = (coords[:, :, None] - coords[:, None, :]
         + (np.asarray(table) - 1)[:, None, None])
  return ((rel[0] * (2 * table[1] - 1) + rel[1]) * (2 * table[2] - 1)
          + rel[2]).astype(np.int32)


def table_length(table) -> int:
  return math.prod(2 * t - 1 for t in table)


# ---------------------------------------------------------------------------
# Modules.


class VideoConvEmbed(nn.Module):
  """3-D conv token embedding + LN: CoSwin's ConvEmbed with a temporal
  kernel/stride (see the module docstring for the temporal padding)."""
  features: int
  kernel: int
  stride: int
  temporal_kernel: int
  temporal_stride: int
  temporal_padding: str = "edge"
  dtype: Any = jnp.float32
  patchify: bool = False

  @nn.compact
  def __call__(self, x):                                  # (B, T, H, W, C)
    pad = 0 if self.patchify else (self.kernel - 1) // 2
    tpad = _temporal_pad(self.temporal_kernel, self.temporal_stride)
    if self.temporal_padding == "edge" and any(tpad):
      x = jnp.pad(x, ((0, 0), tpad, (0, 0), (0, 0), (0, 0)), mode="edge")
      tpad = (0, 0)
    x = nn.Conv(
        self.features, (self.temporal_kernel, self.kernel, self.kernel),
        strides=(self.temporal_stride, self.stride, self.stride),
        padding=(tpad, (pad, pad), (pad, pad)), dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            layers.default_kernel_init, (None, None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("embed",)),
        name="conv")(x)
    return layers.layer_norm(name="norm")(x).astype(self.dtype)


class VideoWindowAttention(nn.Module):
  """Multi-head self-attention within (shifted) 3-D windows of a
  (B, T, H, W, C) map; parameters named as CoSwin's WindowAttention."""
  num_heads: int
  window_size: tuple[int, int, int]
  table_window: tuple[int, int, int]
  shift: tuple[int, int, int]
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, h, w, c = x.shape
    heads = self.num_heads
    head_dim = c // heads
    win, shift = effective_window_3d((t, h, w), self.window_size, self.shift)
    tp, hp, wp = windows.padded_grid((t, h, w), win)
    qkv = layers.dense((3, heads, head_dim), ("embed", None, "heads", "kv"),
                       dtype=self.dtype, name="qkv")(x)   # (B,T,H,W,3,h,d)
    qkv = jnp.pad(qkv, ((0, 0), (0, tp - t), (0, hp - h), (0, wp - w),
                        (0, 0), (0, 0), (0, 0)))
    if any(shift):
      qkv = jnp.roll(qkv, tuple(-s for s in shift), axis=(1, 2, 3))
    qkv = qkv.reshape(b, tp, hp, wp, -1)
    n = win[0] * win[1] * win[2]
    qkv = partition_3d(qkv, win).reshape(-1, n, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    table = self.param(
        "relative_position_bias",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                     ("relpos", "heads")),
        (table_length(self.table_window), heads), jnp.float32)
    index = relative_position_index_3d(win, self.table_window)
    bias = jnp.transpose(table[index], (2, 0, 1))          # (heads, N, N)
    mask = attention_mask_3d((t, h, w), win, shift)
    out = window_attention(q, k, v, bias,
                           None if mask is None else jnp.asarray(mask),
                           implementation=self.attention_impl)
    out = merge_3d(out.reshape(out.shape[0], n, -1), win, (tp, hp, wp))
    out = out.reshape(b, tp, hp, wp, heads, head_dim)
    if any(shift):
      out = jnp.roll(out, shift, axis=(1, 2, 3))
    out = out[:, :t, :h, :w]
    return layers.dense(c, ("heads", "kv", "embed"), dtype=self.dtype,
                        name="proj", axis=(-2, -1))(out)


class VideoSwinBlock(nn.Module):
  num_heads: int
  window_size: tuple[int, int, int]
  table_window: tuple[int, int, int]
  shift: tuple[int, int, int]
  mlp_ratio: float
  drop_path: float
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.with_logical_constraint(
        x, ("batch", None, "height", "width", "embed"))
    y = layers.layer_norm(name="norm1")(x).astype(self.dtype)
    y = VideoWindowAttention(self.num_heads, self.window_size,
                             self.table_window, self.shift,
                             self.attention_impl, self.dtype, name="attn")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = layers.layer_norm(name="norm2")(x).astype(self.dtype)
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
                   name="mlp")(y, deterministic)
    return x + layers.DropPath(self.drop_path)(y, deterministic)


class VideoCoSwin(nn.Module):
  """Video CoSwin on (B, T, H, W, 3) clips (H = W). Returns (pooled feature
  (B, C_last), aux: per-stage feature maps "stage_features" and the normed
  final map "tokens" (B, T', H', W', C_last)), as CoSwin does."""
  config: VideoCoSwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, videos, deterministic: bool = True):
    cfg = self.config
    if videos.ndim != 5:
      raise ValueError(f"VideoCoSwin wants (B, T, H, W, C) videos, got shape "
                       f"{videos.shape}")
    _, frames, height, width, _ = videos.shape
    validate(cfg, frames, height)
    if width != height:
      validate(cfg, frames, width)
    wins, tabs = stage_windows(cfg), stage_tables(cfg)
    rates = layers.drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
    block_cls = layers.maybe_remat(VideoSwinBlock, cfg.remat,
                                   static_argnums=(2,))
    patch_stem = cfg.stem == "patch"
    x = VideoConvEmbed(cfg.embed_dim,
                       cfg.stem_stride if patch_stem else cfg.stem_kernel,
                       cfg.stem_stride, cfg.stem_temporal_kernel,
                       cfg.stem_temporal_stride, cfg.temporal_padding,
                       self.dtype, patchify=patch_stem,
                       name="stem")(videos.astype(self.dtype))
    features = []
    i_block = 0
    for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      if s > 0 and cfg.merge == "patch":
        b, t, h, w, c = x.shape
        x = coswin.PatchMerging(cfg.embed_dim * 2 ** s, self.dtype,
                                name=f"merge{s}")(x.reshape(b * t, h, w, c))
        x = x.reshape(b, t, *x.shape[1:])
      elif s > 0:
        x = VideoConvEmbed(cfg.embed_dim * 2 ** s, cfg.merge_kernel,
                           cfg.merge_stride, cfg.merge_temporal_kernel,
                           cfg.merge_temporal_stride, cfg.temporal_padding,
                           self.dtype, name=f"merge{s}")(x)
      half = tuple(v // 2 for v in wins[s])
      for d in range(depth):
        x = block_cls(heads, wins[s], tabs[s],
                      (0, 0, 0) if d % 2 == 0 else half, cfg.mlp_ratio,
                      rates[i_block], cfg.attention_impl, self.dtype,
                      name=f"stage{s}_block{d}")(x, deterministic)
        i_block += 1
      features.append(x)
    x = layers.layer_norm(name="norm")(x)
    pooled = jnp.mean(x, axis=(1, 2, 3))
    return pooled, {"stage_features": features, "tokens": x}


# ---------------------------------------------------------------------------
# 2-D -> 3-D weights.

# CoSwin fields that fix the parameter shapes and meaning: a 2-D checkpoint
# inflates only into a video config that agrees on all of them.
_SHARED_FIELDS = ("embed_dim", "depths", "num_heads", "mlp_ratio",
                  "stem_kernel", "stem_stride", "merge_kernel", "merge_stride",
                  "stem", "merge")


def _path(p):
  return "/".join(p)


def inflate(params_2d, coswin_cfg: CoSwinConfig,
            video_cfg: VideoCoSwinConfig):
  """A 2-D CoSwin checkpoint's params -> VideoCoSwin params (Florence §2.6).

  Args:
    params_2d: CoSwin's "params" collection (boxed or not; a dict holding
      only "params" is unwrapped and the result wrapped the same way).
    coswin_cfg: the config the checkpoint was trained with (scan=False).
    video_cfg: the video config; its CoSwin fields must agree.
  Returns:
    params for `VideoCoSwin(video_cfg)` (plain arrays, float32).
  Raises:
    ValueError naming every parameter that is missing, left over, or whose
    shape does not fit, or the config field that disagrees.
  """
  for f in _SHARED_FIELDS:
    a, b = getattr(coswin_cfg, f), getattr(video_cfg, f)
    if isinstance(a, (list, tuple)):
      a, b = tuple(a), tuple(b)
    if a != b:
      raise ValueError(f"inflate: the 2-D checkpoint's CoSwin {f}={a!r} "
                       f"differs from the video config's {f}={b!r}")
  if coswin_cfg.scan:
    raise ValueError("inflate: a scan=True CoSwin checkpoint keeps its blocks "
                     "under stage{s}_pairs with a stacked layers axis; "
                     "restore it into a scan=False CoSwin first")
  params = nn.meta.unbox(params_2d)
  wrapped = isinstance(params, dict) and set(params) == {"params"}
  if wrapped:
    params = params["params"]
  flat2 = {_path(k): v for k, v in
           traverse_util.flatten_dict(dict(params)).items()}

  # The video model's parameter shapes (abstract: nothing is computed).
  frames = video_cfg.stem_temporal_stride * video_cfg.merge_temporal_stride ** (
      len(video_cfg.depths) - 1)
  size = video_cfg.stem_stride * video_cfg.merge_stride ** (
      len(video_cfg.depths) - 1)
  validate(video_cfg, frames, size)
  abstract = jax.eval_shape(
      VideoCoSwin(video_cfg).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32))
  flat3 = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
  tables = stage_tables(video_cfg)

  out, errors, used = {}, [], set()
  for key, leaf3 in flat3.items():
    name = _path(key)
    shape3 = tuple(leaf3.shape)
    if name not in flat2:
      errors.append(f"{name}: missing from the 2-D checkpoint (want the 2-D "
                    f"counterpart of {shape3})")
      continue
    used.add(name)
    w = jnp.asarray(flat2[name], jnp.float32)
    if key[-2:] == ("conv", "kernel"):
      kt = shape3[0]
      if w.shape != shape3[1:]:
        errors.append(f"{name}: 2-D conv kernel {tuple(w.shape)} does not fit "
                      f"the 3-D kernel {shape3} (want {shape3[1:]})")
        continue
      out[key] = jnp.broadcast_to(w[None], shape3) / kt
    elif key[-1] == "relative_position_bias":
      stage = int(key[0].split("_")[0][len("stage"):])
      tt, th, tw = tables[stage]
      side = int(round(w.shape[0] ** 0.5)) if w.ndim == 2 else 0
      if (w.ndim != 2 or side * side != w.shape[0] or side % 2 == 0
          or w.shape[1] != shape3[1]):
        errors.append(f"{name}: {tuple(w.shape)} is not a 2-D bias table "
                      f"((2w-1)^2, {shape3[1]} heads)")
        continue
      if th != tw:
        errors.append(f"{name}: a square 2-D table inflates only into a "
                      f"square spatial table; table_windows[{stage}]="
                      f"{tables[stage]}")
        continue
      if side != 2 * th - 1:
        w = coswin.resize_relative_position_bias(w, th)
      grid = w.reshape(1, 2 * th - 1, 2 * tw - 1, -1)
      out[key] = jnp.broadcast_to(
          grid, (2 * tt - 1,) + grid.shape[1:]).reshape(shape3)
    else:
      if tuple(w.shape) != shape3:
        errors.append(f"{name}: shape {tuple(w.shape)} in the 2-D checkpoint, "
                      f"the video model wants {shape3}")
        continue
      out[key] = w
  for name in sorted(set(flat2) - used):
    errors.append(f"{name}: in the 2-D checkpoint but not a VideoCoSwin "
                  f"parameter")
  if errors:
    shown = "\n  ".join(errors[:12])
    more = f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else ""
    raise ValueError(f"inflate: the 2-D checkpoint does not fit the video "
                     f"model ({len(errors)} problems):\n  {shown}{more}")
  result = traverse_util.unflatten_dict(out)
  return {"params": result} if wrapped else result
