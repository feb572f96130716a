"""Export a trained two-tower model for inference outside the training stack.

An export directory holds:

  params.safetensors   inference params only (no optimizer state), flat
                       names such as 'image_encoder/stage0_block0/attn/qkv/
                       kernel', fp32 or cast to bf16;
  config.json          the training config (the model is rebuilt from
                       `model`, inputs sized by `data.image_size/max_len`);
  tokenizer file       the tokenizer the text tower reads (its kind and file
                       name in the manifest: florax's SentencePiece
                       tokenizer.model, an imported CLIP's tokenizer.json,
                       ...; florax.data.tokenizer.from_file reloads it);
  encode_image.jaxexp  `jax.export` serializations of
  encode_text.jaxexp   (flat params, inputs) -> L2-normalised embeddings with
                       a symbolic batch dimension: they run with jax alone,
                       without florax's model code;
  manifest.json        written last: format version, step, dtype, shapes,
                       the eval-time image preprocessing, zero-shot
                       defaults, where imported weights came from (`source`)
                       and the size and sha256 of every other file (a
                       directory without it is incomplete).

An image-only model (an imported timm classifier) has no tokenizer and no
encode_text; `python -m launch.import_weights` writes the same directory,
so `florax.inference.load` and `config.init_from` read imports and exports
alike.

Inputs of the exported functions: images float32 (b, S, S, 3) transformed
as the manifest's `preprocess` spec says (`florax.data.preprocess.apply`:
the run's own eval transform; records: centre crop + mean/std, the digits
demo: whole image resized to [-1, 1]), token ids int32 (b, L) from
`florax.data.tokenizer` (bos, pieces, eos, pad=0). `florax.inference`
applies both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

FORMAT = "florax-export"
# 2: the manifest names the tokenizer's kind and file (version 1 exports
# always held florax's SentencePiece tokenizer.model; still read).
VERSION = 2
MANIFEST = "manifest.json"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
IMAGE_FN_FILE = "encode_image.jaxexp"
TEXT_FN_FILE = "encode_text.jaxexp"
DTYPES = ("float32", "bfloat16")
DEFAULT_PLATFORMS = ("cpu", "cuda")


# -- flat names ---------------------------------------------------------------

def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} from a nested dict of params (Flax's module paths)."""
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      if not node:
        return
      for key in sorted(node):
        if "/" in str(key):
          raise ValueError(f"param name {key!r} contains '/'")
        visit(f"{prefix}/{key}" if prefix else str(key), node[key])
    else:
      flat[prefix] = node

  visit("", params)
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`."""
  nested: dict[str, Any] = {}
  for name, leaf in flat.items():
    *path, last = name.split("/")
    node = nested
    for p in path:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"param name {name!r} nests under a leaf")
    node[last] = leaf
  return nested


# -- encoders -----------------------------------------------------------------

def encoders(model) -> tuple[Callable, Callable]:
  """(encode_image(params, images), encode_text(params, ids)) -> unit-norm
  embeddings; the same computation as the task's evaluators."""
  from florax.losses import contrastive  # pylint: disable=g-import-not-at-top

  def encode_image(params, images):
    return contrastive.l2_normalize(model.apply(
        {"params": params}, images, method=model.encode_image))

  def encode_text(params, ids):
    return contrastive.l2_normalize(model.apply(
        {"params": params}, ids, method=model.encode_text))
  return encode_image, encode_text


def export_flat(fn, flat_abstract: Mapping[str, Any], inputs: Sequence[Any],
                platforms: Sequence[str]) -> tuple[bytes, list[str]]:
  """`jax.export` of fn(nested fp32 params, *inputs) as a function of the
  stored flat params (any float dtype, widened here) and `inputs`
  (ShapeDtypeStructs, symbolic batch allowed). If lowering for every
  platform fails (a kernel that exists for one backend only), the default
  backend alone. Returns (serialized bytes, the platforms used)."""
  flat_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for k, v in flat_abstract.items()}

  def flat_fn(flat, *xs):
    params = unflatten_params({k: v.astype(jnp.float32)
                               for k, v in flat.items()})
    return fn(params, *xs)

  def run(plats):
    exported = jax.export.export(jax.jit(flat_fn), platforms=tuple(plats))(
        flat_abstract, *inputs)
    return bytes(exported.serialize())
  try:
    return run(platforms), list(platforms)
  except Exception:  # pylint: disable=broad-except
    return run((jax.default_backend(),)), [jax.default_backend()]


def serialize_encoders(model, flat_abstract: Mapping[str, Any],
                       image_size: int, max_len: int,
                       platforms: Sequence[str] = DEFAULT_PLATFORMS
                       ) -> tuple[bytes, bytes, list[str]]:
  """`jax.export`s both encoders with a symbolic batch dimension.

  Args:
    model: the TwoTower module.
    flat_abstract: {flat name: ShapeDtypeStruct} of the stored params.
    image_size, max_len: input shapes besides the batch (max_len None: an
      image-only model).
    platforms: lowering platforms (`export_flat`).

  Returns:
    (image bytes, text bytes or None, the platforms both were lowered for).
  """
  encode_image, encode_text = encoders(model)
  batch, = jax.export.symbolic_shape("batch")
  img, used = export_flat(
      encode_image, flat_abstract,
      [jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)],
      platforms)
  txt = None
  if max_len is not None:
    txt, plats = export_flat(
        encode_text, flat_abstract,
        [jax.ShapeDtypeStruct((batch, max_len), jnp.int32)], platforms)
    used = [p for p in used if p in plats]
  return img, txt, used


# -- writing ------------------------------------------------------------------

def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def zeroshot_defaults(config) -> dict:
  """Class names and "{}" templates a user gets when passing none (the
  digits demo's; a task's own come from `task.zeroshot_defaults()`)."""
  from florax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
  if config.data.name == "digits":
    from florax.data import digits  # pylint: disable=g-import-not-at-top
    return {"class_names": list(digits.CLASS_WORDS),
            "templates": [t.replace("{word}", "{}") for t in digits.TEMPLATES
                          if "{word}" in t]}
  return {"class_names": None, "templates": list(zeroshot.IMAGENET_TEMPLATES)}


def prepare_dir(out_dir: str) -> None:
  """Creates `out_dir`, replacing an export (or a half-written one) there;
  anything else is refused rather than deleted."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if not os.path.exists(os.path.join(out_dir, MANIFEST)) and not all(
        f.endswith((".safetensors", ".json", ".model", ".jaxexp", ".tmp"))
        for f in os.listdir(out_dir)):
      raise FileExistsError(
          f"{out_dir} exists and is not a florax export; choose another --out")
    shutil.rmtree(out_dir)
  os.makedirs(out_dir)


def save_params(out_dir: str, params: Mapping[str, Any], dtype: str,
                step: int) -> dict[str, np.ndarray]:
  """Writes PARAMS_FILE; returns the flat host arrays it holds."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
  np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.float32
  # C order: safetensors writes an array's raw memory, so a transposed
  # (Fortran-ordered) view would come back transposed.
  flat = {k: np.array(jax.device_get(v), dtype=np_dtype, order="C")
          for k, v in flatten_params(params).items()}
  save_file(flat, os.path.join(out_dir, PARAMS_FILE),
            metadata={"format": FORMAT, "dtype": dtype, "step": str(step)})
  return flat


def save_config(out_dir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def save_tokenizer(out_dir: str, tokenizer) -> tuple[list[str], dict | None]:
  """Writes the tokenizer's file; returns ([its name] or [], the manifest's
  tokenizer entry or None)."""
  if tokenizer is None:
    return [], None
  tok_file, blob = tokenizer.serialize()
  with open(os.path.join(out_dir, tok_file), "wb") as f:
    f.write(blob)
  return [tok_file], {"kind": tokenizer.kind, "file": tok_file,
                      "vocab_size": int(tokenizer.vocab_size)}


def finish(out_dir: str, names: Sequence[str], manifest: dict) -> dict:
  """Adds every file's size and sha256 to `manifest` and writes it last,
  atomically: a directory without it is incomplete."""
  manifest["files"] = {
      name: {"bytes": os.path.getsize(os.path.join(out_dir, name)),
             "sha256": sha256_file(os.path.join(out_dir, name))}
      for name in names}
  tmp = os.path.join(out_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, MANIFEST))  # last: marks completion
  return manifest


def write_export(out_dir: str, config: ml_collections.ConfigDict,
                 params: Mapping[str, Any], tokenizer, *,
                 step: int, dtype: str = "float32",
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 preprocess: dict | None = None,
                 zeroshot: dict | None = None,
                 source: dict | None = None) -> dict:
  """Writes an export directory (see module docstring).

  Args:
    out_dir: target directory; created, or replaced if it holds an export.
    config: the training config (or an import's, configs/imported.py).
    params: nested params (fp32, any device).
    tokenizer: a florax.data.tokenizer tokenizer of any kind, the bytes of
      florax's own SentencePiece model, or None for an image-only model.
    step: the checkpoint step, recorded in the manifest.
    dtype: 'float32' or 'bfloat16' storage dtype.
    platforms: `jax.export` lowering platforms.
    preprocess: the eval-time image transform (florax.data.preprocess spec)
      that inference must apply; default: the digits' whole-image resize.
    zeroshot: default class names and templates; default from the config.
    source: where imported weights came from (recorded as is).

  Returns:
    The manifest.
  """
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  if isinstance(tokenizer, (bytes, bytearray)):
    tokenizer = tok_lib.Tokenizer(tokenizer)
  text = two_tower.has_text(config.model)
  if text and tokenizer is None:
    raise ValueError("a model with a text tower needs its tokenizer in the "
                     "export")
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
  prepare_dir(out_dir)
  flat = save_params(out_dir, params, dtype, step)
  save_config(out_dir, config)
  tok_names, tok_info = save_tokenizer(out_dir, tokenizer)
  names = [PARAMS_FILE, CONFIG_FILE, IMAGE_FN_FILE] + tok_names
  if tokenizer is not None:
    names.append(TEXT_FN_FILE)

  model = two_tower.from_config(config.model)
  img, txt, used = serialize_encoders(
      model, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in
              flat.items()}, config.data.image_size,
      config.data.max_len if text else None, platforms)
  for name, blob in ((IMAGE_FN_FILE, img), (TEXT_FN_FILE, txt)):
    if blob is not None:
      with open(os.path.join(out_dir, name), "wb") as f:
        f.write(blob)

  return finish(out_dir, names, {
      "format": FORMAT, "version": VERSION, "step": int(step),
      "param_dtype": dtype, "num_params": int(sum(v.size for v in flat.values())),
      "image_size": int(config.data.image_size),
      "max_len": int(config.data.max_len) if text else None,
      "embed_dim": int(config.model.embed_dim),
      "num_classes": int(config.model.get("num_classes", 0)),
      "tokenizer": tok_info,
      "source": source,
      "export_platforms": used,
      "image_input": "float32 (batch, S, S, 3) after `preprocess`",
      "preprocess": preprocess or preprocess_lib.resize_spec(
          config.data.image_size),
      "zeroshot": zeroshot or zeroshot_defaults(config),
  })


def export_workdir(config: ml_collections.ConfigDict, workdir: str,
                   out_dir: str, step: int | None = None,
                   dtype: str = "float32",
                   platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   ema: bool = False) -> dict:
  """Exports one checkpoint of a training workdir.

  Args:
    config: the config the workdir was trained with.
    workdir: the training workdir.
    out_dir: the export directory.
    step: checkpoint step (None: latest).
    dtype: 'float32' or 'bfloat16'.
    platforms: `jax.export` lowering platforms.
    ema: export the EMA of the weights held in the checkpoint's optimizer
      state (a run with optimizer.ema_decay > 0) instead of the params.

  Returns:
    The manifest.
  """
  from florax import tasks  # pylint: disable=g-import-not-at-top
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:  # fail before any restore
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
  task = tasks.build(config, workdir)
  functions = task.serving()
  if functions is not None:  # a task that serves more than two encoders
    from florax import serving  # pylint: disable=g-import-not-at-top
    params, step = _restore(task, workdir, step, ema)
    return serving.write(out_dir, config, params, task.serving_tokenizer(),
                         functions, step=step, dtype=dtype,
                         platforms=platforms,
                         preprocess=task.preprocess_spec())
  tokenizer = None
  if two_tower.has_text(config.model):  # an image-only model has none
    tok_path = task.tokenizer_path()
    if not os.path.exists(tok_path):
      raise FileNotFoundError(
          f"no tokenizer at {tok_path}: the export needs the tokenizer the "
          "model was trained with")
    tokenizer = task.tokenizer
  params, step = _restore(task, workdir, step, ema)
  defaults = getattr(task, "zeroshot_defaults", None)
  return write_export(out_dir, config, params, tokenizer, step=step,
                      dtype=dtype,
                      platforms=platforms, preprocess=task.preprocess_spec(),
                      zeroshot=defaults() if defaults else None)


def _restore(task, workdir: str, step: int | None, ema: bool):
  """(params, step) of a checkpoint, or of its weights' EMA."""
  from florax import restore  # pylint: disable=g-import-not-at-top
  abstract = restore.abstract_params(task)
  if ema:
    from florax.train import ema as ema_lib  # pylint: disable=g-import-not-at-top
    return ema_lib.restore_ema_params(workdir, abstract, step)
  return restore.restore_params(workdir, abstract, step)
