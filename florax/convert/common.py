"""Shared machinery for importing weights trained elsewhere (timm, open_clip).

Every source module (timm_swin, timm_vit, open_clip, ...) describes its
checkpoint as an explicit table of `Rule`s: a regex over the source's
parameter names, the florax flat name it becomes (`re` group references such
as \\1 fill in block numbers) and a named `Layout` saying how the tensor is
rearranged (torch Linear weights are transposed, conv kernels go OIHW ->
HWIO, a fused qkv weight is split into (D, 3, heads, head_dim), ...).
`convert` applies a table to a state dict and is strict on purpose: a
silently half-loaded model is the worst outcome of an import, so one
`ConversionError` lists every source name no rule maps, every florax param
with no source and every shape that does not fit, at once.

Shapes that follow the image resolution or window size (relative position
bias tables, absolute image position embeddings) are interpolated to the
target with `florax.train.init_from.resize_to`, the same code that carries
florax's own checkpoints to a new resolution, and reported; at the source's
own size nothing is interpolated and the values are copied exactly.

Reading needs no torch for .safetensors; .pt/.pth/.bin pickles need the
optional torch extra.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
  """A state dict that does not fit the florax model; the message lists
  every problem. The lists are also attributes, for programs and tests."""

  def __init__(self, message, *, unmapped=(), missing=(), mismatched=(),
               unexpected=(), duplicates=()):
    super().__init__(message)
    self.unmapped = list(unmapped)        # source names no rule matched
    self.missing = list(missing)          # florax names with no source
    # (florax name, source name, source shape, expected source shape, layout)
    self.mismatched = list(mismatched)
    self.unexpected = list(unexpected)    # (source, florax name not in model)
    self.duplicates = list(duplicates)    # (florax name, [sources])


class CheckpointReadError(ValueError):
  """A checkpoint file that cannot be read (truncated, corrupt, a format we
  do not know, or a torch pickle without torch installed)."""


class Shape:
  """A stand-in with only a .shape, for shapes_only conversions."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def fuse_qkv(state_dict: Mapping, query: re.Pattern, parts: Sequence[str],
             fused: str, shapes_only: bool = False) -> dict:
  """Separate q/k/v projections fused into one tensor of 3W rows (q, k, v:
  florax's qkv kernel order). `query` matches a q tensor's name; `parts`
  (three) and `fused` are `re.Match.expand` templates of the q, k, v names
  and of the fused one. A layer missing one of the three, or whose three
  differ in shape, keeps its names, so the conversion error lists them."""
  out = dict(state_dict)
  for name in sorted(out):
    m = query.fullmatch(name)
    if not m:
      continue
    names = [m.expand(t) for t in parts]
    if not all(n in out for n in names):
      continue
    tensors = [out[n] for n in names]
    if len({tuple(t.shape) for t in tensors}) != 1:
      continue
    for n in names:
      del out[n]
    shape = (3 * tensors[0].shape[0],) + tuple(tensors[0].shape[1:])
    out[m.expand(fused)] = (Shape(shape) if shapes_only else np.concatenate(
        [np.asarray(t) for t in tensors], axis=0))
  return out


# -- reading ------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Training scripts wrap the state dict: {'state_dict': ...} (timm train.py,
# Lightning), {'model': ...} (DeiT, Swin, MAE), {'module': ...} (DeepSpeed).
_WRAPPER_KEYS = ("state_dict", "model", "module")
# DistributedDataParallel / torch.compile prefix every name.
_NAME_PREFIXES = ("module.", "_orig_mod.")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "BOOL": np.bool_,
}


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file or a torch pickle.

  Floating tensors come back as float32 (bf16/fp16 checkpoints included);
  integer buffers keep their dtype. Common wrappers ('state_dict', 'model',
  'module' sub-dicts; 'module.' / '_orig_mod.' name prefixes) are removed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  lower = path.lower()
  if lower.endswith(".safetensors"):
    state = _read_safetensors(path)
  elif lower.endswith(TORCH_SUFFIXES):
    state = _read_torch(path)
  else:
    raise CheckpointReadError(
        f"checkpoint {path!r}: unknown file type; expected .safetensors or a "
        f"torch pickle ({', '.join(TORCH_SUFFIXES)})")
  state = unwrap_state_dict(state)
  if not state:
    raise CheckpointReadError(f"checkpoint {path!r} holds no tensors")
  return state


def _read_safetensors(path):
  import safetensors  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  # `deserialize` hands back raw bytes for every dtype, bf16 included (which
  # safetensors.numpy cannot represent), so one path serves all checkpoints.
  try:
    with open(path, "rb") as f:
      items = safetensors.deserialize(f.read())
  except Exception as e:  # SafetensorError, a bad header, a short file
    raise CheckpointReadError(
        f"could not read {path!r} as safetensors ({type(e).__name__}: {e}); "
        "the file is probably truncated or corrupt: download it again") from e
  out = {}
  for name, info in items:
    dtype = info["dtype"]
    if dtype == "BF16":
      np_dtype = ml_dtypes.bfloat16
    elif dtype in _SAFETENSORS_DTYPES:
      np_dtype = _SAFETENSORS_DTYPES[dtype]
    else:
      raise CheckpointReadError(
          f"{path!r}: tensor {name!r} has dtype {dtype}, which the importer "
          "does not read")
    arr = np.frombuffer(bytes(info["data"]), np_dtype).reshape(info["shape"])
    out[name] = _as_numpy(arr)
  return out


def _as_numpy(arr):
  """Floating types -> float32 (a private copy); others as they are."""
  arr = np.asarray(arr)
  if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
    return np.array(arr, np.float32)
  return np.array(arr)


def _read_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointReadError(
        f"{path!r} is a torch pickle and reading it needs torch, which is not "
        "installed: install the optional extra (pip install -e .[torch]) or "
        "convert the file to .safetensors first (safetensors.torch.save_file "
        "on a machine with torch)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # zipfile/pickle/EOF/Runtime errors alike
    raise CheckpointReadError(
        f"could not read {path!r} with torch.load(weights_only=True) "
        f"({type(e).__name__}: {e}); the file may be truncated or corrupt, or "
        "pickle objects other than tensors") from e

  def to_numpy(value):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.is_floating_point():
        return value.to(torch.float32).numpy().copy()
      return value.numpy().copy()
    if isinstance(value, Mapping):
      return {k: to_numpy(v) for k, v in value.items()}
    return value

  obj = to_numpy(obj)
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(
        f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return obj


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Removes training-script wrappers around a state dict; drops non-tensor
  entries (epoch counters, args) that sit next to it."""
  while True:
    wrapped = [k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)]
    if not wrapped:
      break
    state = state[wrapped[0]]
  out = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  for prefix in _NAME_PREFIXES:
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


# -- layouts ------------------------------------------------------------------

class _Mismatch(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one source tensor becomes one florax param.

  name: shown in reports and errors.
  source_shape: the source shape a florax target shape needs.
  forward: (source value, target shape) -> florax value, for that shape.
  resize: None, or (source value, target shape, florax name) -> the value
    interpolated to the target shape, or None when it cannot be (only layouts
    of resolution-dependent params have one).
  """
  name: str
  source_shape: Callable[[tuple], tuple]
  forward: Callable[[np.ndarray, tuple], np.ndarray]
  resize: Callable[[np.ndarray, tuple, str], np.ndarray | None] | None = None

  def apply(self, value, target_shape, target_name):
    """(florax value, resized?); raises _Mismatch when it does not fit."""
    target_shape = tuple(target_shape)
    if tuple(value.shape) == tuple(self.source_shape(target_shape)):
      out = self.forward(value, target_shape)
      assert out.shape == target_shape, (self.name, out.shape, target_shape)
      return out, False
    if self.resize is not None:
      out = self.resize(value, target_shape, target_name)
      if out is not None and tuple(out.shape) == target_shape:
        return out, True
    raise _Mismatch()


def _prod(shape):
  return int(math.prod(shape))


COPY = Layout("copy", lambda t: t, lambda v, t: v)
# A 1-D source reshaped, e.g. a fused qkv bias (3D,) -> (3, heads, head_dim).
FLAT = Layout("flat", lambda t: (_prod(t),), lambda v, t: v.reshape(t))
# torch Conv2d (out, in, kh, kw) -> flax (kh, kw, in, out).
CONV2D = Layout("conv2d", lambda t: (t[3], t[2], t[0], t[1]),
                lambda v, t: v.transpose(2, 3, 1, 0))


def linear(in_ndim: int = 1) -> Layout:
  """torch Linear weight (out, in) -> florax kernel of shape in_dims +
  out_dims, the first `in_ndim` target axes being the contracted input:
  linear(1) gives (D, F) and a fused qkv (D, 3, heads, head_dim); linear(2)
  gives an attention output projection (heads, head_dim, D)."""
  def source_shape(t):
    return (_prod(t[in_ndim:]), _prod(t[:in_ndim]))
  return Layout(f"linear({in_ndim})" if in_ndim != 1 else "linear",
                source_shape, lambda v, t: v.T.reshape(t))


LINEAR = linear(1)


def _resize_via_init_from(value, target_shape, target_name):
  from florax.train import init_from  # pylint: disable=g-import-not-at-top
  return init_from.resize_to(target_name, value, target_shape)


def relative_position_table(used_window: int | None = None) -> Layout:
  """A Swin relative position bias table ((2w-1)^2, heads).

  florax keeps a table for the configured window w and indexes only its
  centre (2e-1)^2 block when the stage grid e is smaller than w; timm
  instead builds the table for e itself. `used_window` is e for this stage
  (None = the table's own window): a source table for e is embedded at the
  centre exactly (the rest is never read and stays zero); a source for
  another window is interpolated to e first (bicubic, as timm's
  resize_rel_pos_bias_table does when a model changes resolution).
  """
  def embed(v, t):
    side, t_side = math.isqrt(v.shape[0]), math.isqrt(t[0])
    if side == t_side:
      return v
    grid = np.zeros((t_side, t_side, t[1]), np.float32)
    off = (t_side - side) // 2
    grid[off:off + side, off:off + side] = v.reshape(side, side, -1)
    return grid.reshape(t)

  def used_shape(t):
    if used_window is None:
      return t
    return ((2 * used_window - 1) ** 2, t[1])

  def resize(v, t, name):
    u = used_shape(t)
    if v.ndim != 2 or v.shape[1] != t[1]:
      return None
    out = _resize_via_init_from(v, u, name)
    return None if out is None else embed(np.asarray(out, np.float32), t)

  return Layout(
      "relative_position_table" + (f"(window {used_window})"
                                   if used_window else ""),
      used_shape, lambda v, t: embed(v, t).astype(np.float32), resize)


RELATIVE_POSITION_TABLE = relative_position_table()


def _pos_embed_forward(v, t):
  return v.reshape(t)


def _pos_embed_resize(v, t, name):
  if v.ndim == len(t) + 1 and v.shape[0] == 1:
    v = v[0]
  return _resize_via_init_from(v, t, name)


# A learned absolute position embedding -> florax's (N, D): POS_EMBED for a
# source stored as (1, N, D) (timm), POS_EMBED_2D for (N, D) (open_clip). A
# grid of another size (leading class tokens kept) is interpolated bicubically
# by init_from.resize_to, which decides from the florax name whether the
# param is an image position embedding (a text tower's is never resized).
POS_EMBED = Layout("pos_embed", lambda t: (1,) + tuple(t), _pos_embed_forward,
                   _pos_embed_resize)
POS_EMBED_2D = Layout("pos_embed", lambda t: tuple(t), _pos_embed_forward,
                      _pos_embed_resize)


# -- rules and conversion -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """`source` (a regex that must match the whole source name) -> `target`
  (a template for `re.Match.expand`, e.g. r'encoder/block\\1/norm1/scale'),
  rearranged by `layout`."""
  source: str
  target: str
  layout: Layout = COPY

  def match(self, name):
    return re.fullmatch(self.source, name)


@dataclasses.dataclass
class Report:
  """What a conversion did. Lists of names (or tuples) for programs; a
  `summary()` paragraph for people."""
  source: str = ""
  mapped: list = dataclasses.field(default_factory=list)   # (src, dst, layout)
  resized: list = dataclasses.field(default_factory=list)  # (dst, from, to)
  ignored: list = dataclasses.field(default_factory=list)  # buffers
  dropped: list = dataclasses.field(default_factory=list)  # allow_missing src
  fresh: list = dataclasses.field(default_factory=list)    # allow_missing dst
  notes: list = dataclasses.field(default_factory=list)

  def as_dict(self):
    return dataclasses.asdict(self)

  def summary(self) -> str:
    def few(items):
      items = [i if isinstance(i, str) else " ".join(map(str, i))
               for i in items]
      return ", ".join(items[:4]) + (f" ... ({len(items)})"
                                     if len(items) > 4 else "")
    lines = [f"florax: imported {len(self.mapped)} tensors"
             + (f" from {self.source}" if self.source else "")]
    if self.resized:
      lines.append(f"  interpolated to the new resolution/window: "
                   f"{few([f'{n} {a} -> {b}' for n, a, b in self.resized])}")
    if self.ignored:
      lines.append(f"  ignored buffers (recomputed by florax): "
                   f"{few(self.ignored)}")
    if self.dropped:
      lines.append(f"  dropped (allow_missing): {few(self.dropped)}")
    if self.fresh:
      lines.append(f"  left freshly initialised (allow_missing): "
                   f"{few(self.fresh)}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
  """Whether `name` matches one of the fnmatch `patterns` (allow_missing)."""
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


_matches_any = matches_any  # the name timm_vit uses


def convert(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule],
            target_shapes: Mapping[str, Sequence[int]],
            allow_missing: Iterable[str] = (), ignore: Iterable[str] = (),
            source: str = "", shapes_only: bool = False
            ) -> tuple[dict[str, np.ndarray], Report]:
  """Maps a source state dict onto florax flat names.

  Args:
    state_dict: {source name: array}.
    rules: the source's table; the first rule whose regex matches wins.
    target_shapes: {florax flat name: shape} of the model to fill
      (`target_shapes()`); every one must get a value.
    allow_missing: fnmatch patterns. A source name matching one is dropped
      when no rule maps it (or its target is not in the model), e.g. 'head.*'
      for a classifier to be retrained; a florax name matching one may stay
      without a source (reported as 'fresh': the caller keeps its init).
    ignore: regexes (full match) of source buffers that are not parameters
      (relative_position_index, attn_mask, ...), declared by the source
      module; they are skipped and reported as ignored.
    source: a description for the report.
    shapes_only: check names and shapes without touching the data (the
      values only need a .shape, e.g. jax.ShapeDtypeStruct: a full-size
      checkpoint's layout is checked without allocating it); the result
      then maps florax names to their shapes.

  Returns:
    ({florax name: float32 array}, Report).
  Raises:
    ConversionError listing every unmapped source name, every florax param
    without a source and every shape mismatch.
  """
  allow_missing = tuple(allow_missing)
  ignore = tuple(re.compile(p) for p in ignore)
  report = Report(source=source)
  out: dict[str, np.ndarray] = {}
  origin: dict[str, list[str]] = {}
  unmapped, unexpected, mismatched = [], [], []
  for name in sorted(state_dict):
    if any(p.fullmatch(name) for p in ignore):
      report.ignored.append(name)
      continue
    target = layout = None
    for rule in rules:
      m = rule.match(name)
      if m:
        target, layout = m.expand(rule.target), rule.layout
        break
    if target is None or target not in target_shapes:
      if matches_any(name, allow_missing) or (
          target is not None and matches_any(target, allow_missing)):
        report.dropped.append(name)
      elif target is None:
        unmapped.append(name)
      else:
        unexpected.append((name, target))
      continue
    origin.setdefault(target, []).append(name)
    value = state_dict[name]
    shape = tuple(int(d) for d in target_shapes[target])
    try:
      if not shapes_only:
        converted, resized = layout.apply(
            np.asarray(value).astype(np.float32, copy=False), shape, target)
        out[target] = np.array(converted, np.float32, order="C")
      elif tuple(value.shape) == tuple(layout.source_shape(shape)):
        resized, out[target] = False, shape
      elif layout.resize is None:
        raise _Mismatch()
      else:  # resizable params are small: try it on zeros
        _, resized = layout.apply(np.zeros(value.shape, np.float32), shape,
                                  target)
        out[target] = shape
    except _Mismatch:
      mismatched.append((target, name, tuple(value.shape),
                         tuple(layout.source_shape(shape)), layout.name))
      continue
    report.mapped.append((name, target, layout.name))
    if resized:
      report.resized.append((target, tuple(value.shape), shape))
  duplicates = [(t, srcs) for t, srcs in origin.items() if len(srcs) > 1]
  missing = []
  for target in sorted(target_shapes):
    if target in origin:
      continue
    if matches_any(target, allow_missing):
      report.fresh.append(target)
    else:
      missing.append(target)
  if unmapped or unexpected or mismatched or missing or duplicates:
    raise ConversionError(
        _error_message(source, unmapped, unexpected, mismatched, missing,
                       duplicates),
        unmapped=unmapped, missing=missing, mismatched=mismatched,
        unexpected=unexpected, duplicates=duplicates)
  return out, report


def _error_message(source, unmapped, unexpected, mismatched, missing,
                   duplicates):
  lines = [f"the checkpoint{' (' + source + ')' if source else ''} does not "
           "fit the florax model (wrong architecture or a damaged file?):"]
  if unmapped:
    lines.append(f"{len(unmapped)} source tensors that no rule maps:")
    lines += [f"  {n}" for n in unmapped]
  if unexpected:
    lines.append(f"{len(unexpected)} source tensors whose florax param does "
                 "not exist in this architecture:")
    lines += [f"  {n} -> {t}" for n, t in unexpected]
  if mismatched:
    lines.append(f"{len(mismatched)} shape mismatches (florax name: source "
                 "name, source shape, expected source shape):")
    lines += [f"  {t}: {n} has shape {s}, expected {e} (layout {lay})"
              for t, n, s, e, lay in mismatched]
  if missing:
    lines.append(f"{len(missing)} florax params with no source tensor:")
    lines += [f"  {n}" for n in missing]
  if duplicates:
    lines.append(f"{len(duplicates)} florax params claimed by several source "
                 "tensors:")
    lines += [f"  {t}: {', '.join(s)}" for t, s in duplicates]
  lines.append("pass allow_missing patterns (fnmatch) for tensors you mean "
               "to drop or params you mean to train from scratch")
  return "\n".join(lines)


# -- florax side --------------------------------------------------------------

def target_shapes(model, image_size: int | None = None, *, inputs=None,
                  prefix: str = "") -> dict[str, tuple]:
  """{flat florax name: shape} of `model`'s params, from `jax.eval_shape`
  (nothing is allocated or compiled).

  Args:
    model: a Flax module called as model(*inputs).
    image_size: shorthand for inputs = (one (1, S, S, 3) float32 image,).
    inputs: example inputs (arrays or jax.ShapeDtypeStruct) otherwise.
    prefix: prepended to every name ('image_encoder' for a tower that sits
      inside a TwoTower).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  if inputs is None:
    if image_size is None:
      raise ValueError("target_shapes needs image_size or inputs")
    inputs = (jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                   jnp.float32),)
  variables = jax.eval_shape(lambda r, *x: model.init(r, *x),
                             jax.random.key(0), *inputs)
  params = nn.meta.unbox(variables["params"])
  flat = export.flatten_params(params)
  prefix = prefix.strip("/")
  return {(f"{prefix}/{k}" if prefix else k): tuple(v.shape)
          for k, v in flat.items()}
