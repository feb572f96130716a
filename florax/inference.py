"""Inference on an export directory: embeddings, zero-shot, similarity.

  model = florax.inference.load("export_dir")
  model.encode_image(images)            # PIL images or uint8 arrays
  model.encode_text(["a handwritten 7.", ...])
  model.zero_shot(images, ["zero", "one", ...])   # probs + predictions
  model.similarity(images, texts)        # (n_images, n_texts) cosines

Batches are padded up to a power of two (capped at `max_batch`; longer
inputs are cut into `max_batch` chunks), so a notebook calling with 1, 3, 7
or 8 images compiles at most once per bucket instead of once per call. It
runs on one device: the first GPU when there is one, else the CPU.

Two backends: 'native' rebuilds the model from config.json with florax's
model code and jits it; 'exported' runs the serialized `jax.export`
artifacts and needs jax, safetensors and sentencepiece only (this module
does not import the model code unless the native backend is used).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# florax.export imports the model code only inside its functions, so the
# exported backend can share its format constants without loading models.
from florax.export import CONFIG_FILE as _CONFIG  # noqa: E402
from florax.export import FORMAT as _FORMAT  # noqa: E402
from florax.export import IMAGE_FN_FILE as _IMAGE_FN  # noqa: E402
from florax.export import MANIFEST as _MANIFEST  # noqa: E402
from florax.export import PARAMS_FILE as _PARAMS  # noqa: E402
from florax.export import TEXT_FN_FILE as _TEXT_FN  # noqa: E402
from florax.export import VERSION as _VERSION  # noqa: E402
from florax.export import sha256_file as _sha256  # noqa: E402
_REQUIRED = (_PARAMS, _CONFIG, _IMAGE_FN)
BACKENDS = ("native", "exported")


class ExportError(ValueError):
  """The export directory is missing, incomplete, corrupt or inconsistent."""


@dataclasses.dataclass
class ZeroShotResult:
  """Zero-shot predictions.

  Attributes:
    class_names: the candidate classes, column order of `probs`.
    probs: (n_images, n_classes) softmax over temperature-scaled cosines.
    class_ids: (n_images,) argmax class index.
    predictions: the predicted class name of every image.
  """
  class_names: list[str]
  probs: np.ndarray
  class_ids: np.ndarray
  predictions: list[str]


# -- checking the directory ---------------------------------------------------

def read_manifest(export_dir: str, verify_checksums: bool = False) -> dict:
  """Reads and checks an export directory's manifest against its files.

  Args:
    export_dir: the directory written by `python -m launch.export`.
    verify_checksums: also hash the params and serialized functions (the
      config and tokenizer are always hashed: they are small).

  Returns:
    The manifest.
  """
  redo = "re-run `python -m launch.export --workdir W --out DIR`"
  if not os.path.isdir(export_dir):
    raise ExportError(f"no export directory at {export_dir!r}; {redo}")
  path = os.path.join(export_dir, _MANIFEST)
  if not os.path.exists(path):
    raise ExportError(
        f"{export_dir} is not a complete florax export: {_MANIFEST} is "
        f"missing (the export was interrupted, or this is not an export "
        f"directory); {redo}")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{path} is unreadable or truncated ({e}); {redo}"
                      ) from None
  if manifest.get("format") != _FORMAT:
    raise ExportError(f"{path} is not a florax export manifest")
  if manifest.get("version") == 1:
    # Version 1 always held florax's SentencePiece model as tokenizer.model.
    manifest["version"] = _VERSION
    manifest.update(tokenizer={
        "kind": "sentencepiece", "file": "tokenizer.model",
        "vocab_size": manifest.pop("tokenizer_vocab_size")}, source=None,
                    num_classes=0)
  if manifest.get("version") != _VERSION:
    raise ExportError(
        f"{export_dir} has export format version {manifest.get('version')}; "
        f"this florax reads versions 1 and {_VERSION}")
  tok = manifest.get("tokenizer")
  if "functions" in manifest:  # a served export (florax.serving)
    required = (_PARAMS, _CONFIG) + tuple(
        f["file"] for f in manifest["functions"].values())
    required += (tok["file"],) if tok else ()
  else:
    required = _REQUIRED + ((tok["file"], _TEXT_FN) if tok else ())
  for name in required:
    file = os.path.join(export_dir, name)
    expected = manifest["files"].get(name)
    if expected is None:
      raise ExportError(f"{path} lists no {name}; {redo}")
    if not os.path.exists(file):
      raise ExportError(f"{export_dir} is incomplete: {name} is missing; "
                        f"{redo}")
    if tok and name == tok["file"]:  # checked by _load_tokenizer
      continue
    size = os.path.getsize(file)
    if size != expected["bytes"]:
      raise ExportError(
          f"{file} is truncated or altered: {size} bytes, the manifest says "
          f"{expected['bytes']}; {redo}")
    if (verify_checksums or name == _CONFIG) and (
        _sha256(file) != expected["sha256"]):
      raise ExportError(f"{file} does not match its sha256 in the manifest; "
                        f"{redo}")
  return manifest


def _load_tokenizer(export_dir: str, manifest: dict, text_vocab: int):
  from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  info = manifest["tokenizer"]
  path = os.path.join(export_dir, info["file"])
  try:
    tok = tok_lib.from_file(path, kind=info["kind"])
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"{path} is not a readable {info['kind']} tokenizer: "
                      f"{e}") from None
  if tok.vocab_size > text_vocab:
    raise ExportError(
        f"{path} has {tok.vocab_size} pieces but the model's text tower has "
        f"vocab_size {text_vocab}: this tokenizer does not belong to the "
        "exported config")
  if tok.vocab_size != info["vocab_size"]:
    raise ExportError(
        f"{path} has {tok.vocab_size} pieces; the model was trained with a "
        f"tokenizer of {info['vocab_size']}: it does not match the exported "
        "config")
  if _sha256(path) != manifest["files"][info["file"]]["sha256"]:
    raise ExportError(
        f"{path} is not the tokenizer this model was exported with (its "
        f"sha256 differs from the manifest); put back the exported "
        f"{info['file']} or re-export")
  return tok


def _load_flat_params(export_dir: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(export_dir, _PARAMS)
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"{path} is not a readable safetensors file: {e}"
                      ) from None


# -- images -------------------------------------------------------------------

def _as_image_list(images) -> list:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(images, Image.Image):
    return [images]
  if isinstance(images, np.ndarray) or hasattr(images, "__array__") and (
      not isinstance(images, (list, tuple))):
    arr = np.asarray(images)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
      return [arr]
    if arr.ndim in (3, 4):
      return list(arr)
    raise ValueError(
        f"image array must be (H, W), (H, W, C), (N, H, W) or (N, H, W, C); "
        f"got shape {arr.shape}")
  return list(images)


def preprocess(images, size: int) -> np.ndarray:
  """PIL images or uint8 arrays -> float32 (n, size, size, 3) in [-1, 1].

  Grey images stay grey through the bilinear resize and are repeated over
  RGB, as the digits pipeline does; colour images are resized as RGB.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for i, im in enumerate(_as_image_list(images)):
    if not isinstance(im, Image.Image):
      arr = np.asarray(im)
      if arr.dtype != np.uint8:
        raise ValueError(
            f"image {i}: pass uint8 pixel arrays (0-255) or PIL images; got "
            f"dtype {arr.dtype}")
      if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
      if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in
                                    (3, 4)):
        raise ValueError(f"image {i}: expected (H, W) or (H, W, 3|4), got "
                         f"shape {arr.shape}")
      im = Image.fromarray(arr)
    if im.mode not in ("L", "RGB"):
      im = im.convert("RGB")
    x = np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)
    x = x / 127.5 - 1.0
    if x.ndim == 2:
      x = np.repeat(x[:, :, None], 3, axis=2)
    out.append(x)
  if not out:
    raise ValueError("no images given")
  return np.stack(out)


def preprocess_images(manifest: dict, images) -> np.ndarray:
  """PIL images or uint8 arrays -> float32 (n, S, S, 3) by the manifest's
  `preprocess` spec (the run's own eval transform)."""
  spec = manifest.get("preprocess") or {}
  if spec.get("transform", "resize") == "resize":
    return preprocess(images, int(manifest["image_size"]))
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  items = images if isinstance(images, (list, tuple)) else _as_image_list(
      images)
  if not items:
    raise ValueError("no images given")
  return np.stack([preprocess_lib.apply(im, spec, f"image {i}")
                   for i, im in enumerate(items)])


def bucket_size(n: int, max_batch: int) -> int:
  """The padded batch for n inputs: the next power of two, capped."""
  return min(1 << max(0, (n - 1).bit_length()), max_batch)


def run_in_buckets(fn, params, xs: Sequence[np.ndarray], max_batch: int,
                   device) -> np.ndarray:
  """fn(params, *chunks) over inputs of equal length, `max_batch` rows at
  a time, each chunk zero-padded to its bucket (one compile per bucket)."""
  outs = []
  for start in range(0, xs[0].shape[0], max_batch):
    chunks = [x[start:start + max_batch] for x in xs]
    n = chunks[0].shape[0]
    pad = bucket_size(n, max_batch) - n
    if pad:
      chunks = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)])
                for c in chunks]
    out = fn(params, *[jax.device_put(c, device) for c in chunks])
    outs.append(np.asarray(out)[:n])
  return np.concatenate(outs)


# -- the model ----------------------------------------------------------------

class Model:
  """An exported two-tower model on one device. Build it with `load`."""

  def __init__(self, export_dir: str, manifest: dict, config: dict,
               tokenizer, image_fn, text_fn, params, logit_scale: float,
               device, max_batch: int, backend: str):
    self.export_dir = export_dir
    self.manifest = manifest
    self.config = config
    self.tokenizer = tokenizer
    self.image_size = int(manifest["image_size"])
    self.max_len = manifest["max_len"]
    self.step = int(manifest["step"])
    self.logit_scale = logit_scale
    self.device = device
    self.max_batch = max_batch
    self.backend = backend
    self._params = params
    #: (tower, padded batch) -> times traced; tracing precedes every compile.
    self.traces: collections.Counter = collections.Counter()
    self._image_fn = self._jit("image", image_fn)
    self._text_fn = None if text_fn is None else self._jit("text", text_fn)
    self._classify_fn = None

  def _jit(self, tower, fn):
    def counted(params, x):
      self.traces[(tower, x.shape[0])] += 1  # runs at trace time only
      return fn(params, x)
    return jax.jit(counted)

  def _run(self, fn, x: np.ndarray) -> np.ndarray:
    return run_in_buckets(fn, self._params, [x], self.max_batch, self.device)

  def preprocess(self, images) -> np.ndarray:
    """The run's own eval transform (recorded in the manifest): what the
    training-time evaluators saw, so results match them."""
    return preprocess_images(self.manifest, images)

  def encode_image(self, images) -> np.ndarray:
    """Unit-norm embeddings (n, d) of PIL images or uint8 arrays."""
    return self._run(self._image_fn, self.preprocess(images))

  def classify(self, images) -> np.ndarray:
    """Class logits (n, classes) of an imported classifier (a timm model
    with its head); native backend."""
    return self.classify_pixels(self.preprocess(images))

  def classify_pixels(self, pixels) -> np.ndarray:
    """Like `classify` for already preprocessed float32 (n, S, S, 3)."""
    if self._classify_fn is None:
      raise ValueError(
          f"{self.export_dir} has no classifier head"
          if not self.manifest.get("num_classes") else
          "classify needs backend='native' (the exported functions are the "
          "embedding towers)")
    return self._run(self._classify_fn, self._pixels(pixels))

  def encode_pixels(self, pixels) -> np.ndarray:
    """Like `encode_image` for already preprocessed float32 (n, S, S, 3)."""
    return self._run(self._image_fn, self._pixels(pixels))

  def _pixels(self, pixels) -> np.ndarray:
    pixels = np.asarray(pixels, np.float32)
    shape = (self.image_size, self.image_size, 3)
    if pixels.ndim != 4 or pixels.shape[1:] != shape:
      raise ValueError(f"pixels must be (n, {shape[0]}, {shape[1]}, 3), got "
                       f"{pixels.shape}")
    return pixels

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"{self.export_dir} holds an image-only model: it has "
                       "no text tower or tokenizer")
    if isinstance(texts, str):
      raise ValueError("encode_text takes a list of strings, not one string")
    texts = list(texts)
    if not texts:
      raise ValueError("no texts given")
    return self.tokenizer.encode_batch(texts, self.max_len)

  def encode_text(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm embeddings (n, d) of a list of strings."""
    return self._run(self._text_fn, self.tokenize(texts))

  def similarity(self, images, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarities (n_images, n_texts)."""
    return self.encode_image(images) @ self.encode_text(texts).T

  def zero_shot(self, images, class_names: Sequence[str] | None = None,
                templates: Sequence[str] | None = None) -> ZeroShotResult:
    """Classifies images among class names by prompt-ensembled text.

    Args:
      images: PIL images or uint8 arrays.
      class_names: candidate classes; default: the export's own (those of
        the run's zero-shot evaluation: its split's class names; digits for
        the demo).
      templates: "{}" prompt templates; default: the export's (those that
        evaluation ensembled; CLIP's 80 ImageNet templates if it has none).

    Returns:
      A ZeroShotResult.
    """
    from florax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
    defaults = self.manifest.get("zeroshot", {})
    if class_names is None:
      class_names = defaults.get("class_names")
      if not class_names:
        raise ValueError("this export has no default class names; pass "
                         "class_names")
    templates = list(templates or defaults.get("templates")
                     or zeroshot.IMAGENET_TEMPLATES)
    class_emb = zeroshot.class_embeddings(self.encode_text, class_names,
                                          templates, self.max_batch)
    logits = self.logit_scale * (self.encode_image(images) @ class_emb.T)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argmax(probs, axis=1)
    names = list(class_names)
    return ZeroShotResult(names, probs, ids, [names[i] for i in ids])


def _logit_scale(flat: dict, max_scale: float = 100.0) -> float | None:
  # TwoTower.logit_scale: exp(log τ) clamped at 100.
  if "logit_scale" not in flat:  # an image-only model
    return None
  return float(np.exp(min(float(np.asarray(flat["logit_scale"], np.float32)),
                          np.log(max_scale))))


def load(export_dir: str, *, backend: str = "native", device=None,
         max_batch: int = 64, verify_checksums: bool = False):
  """Loads an export directory for inference.

  Args:
    export_dir: written by `python -m launch.export`.
    backend: 'native' (florax model code, jit) or 'exported' (the
      serialized jax.export functions; no model code imported).
    device: a jax device; default the first one (a GPU if present).
    max_batch: largest padded batch; a power of two.
    verify_checksums: hash every file against the manifest.

  Returns:
    A Model (a two-tower export), or a florax.serving.ServedModel (an
    export of a task's own functions: `run(name, **inputs)`).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
  if max_batch < 1 or max_batch & (max_batch - 1):
    raise ValueError(f"max_batch must be a power of two, got {max_batch}")
  manifest = read_manifest(export_dir, verify_checksums)
  with open(os.path.join(export_dir, _CONFIG), encoding="utf-8") as f:
    config = json.load(f)
  served = "functions" in manifest
  tokenizer = None
  if manifest.get("tokenizer"):
    # A served task's text vocabulary is its own business: the manifest's
    # count and the file's sha256 pin the tokenizer.
    tokenizer = _load_tokenizer(
        export_dir, manifest, int(
            manifest["tokenizer"]["vocab_size"] if served
            else config["model"]["text"]["vocab_size"]))
  flat = _load_flat_params(export_dir)
  device = device or jax.devices()[0]
  if served:
    from florax import serving  # pylint: disable=g-import-not-at-top
    return serving.load(export_dir, manifest, config, tokenizer, flat,
                        backend, device, max_batch)
  scale = _logit_scale(flat)

  if backend == "exported":
    fns = [None, None]
    for i, name in enumerate((_IMAGE_FN, _TEXT_FN)[:1 + bool(tokenizer)]):
      with open(os.path.join(export_dir, name), "rb") as f:
        try:
          exported = jax.export.deserialize(bytearray(f.read()))
        except Exception as e:  # pylint: disable=broad-except
          raise ExportError(f"cannot deserialize {name}: {e}") from None
      fns[i] = lambda p, x, e=exported: e.call(p, x)
    params = jax.device_put(flat, device)
    return Model(export_dir, manifest, config, tokenizer, fns[0], fns[1],
                 params, scale, device, max_batch, backend)

  import ml_collections  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  from florax.models import two_tower  # pylint: disable=g-import-not-at-top
  model = two_tower.from_config(ml_collections.ConfigDict(config["model"]))
  image_fn, text_fn = export.encoders(model)
  s, length = manifest["image_size"], manifest["max_len"]
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jnp.zeros((1, s, s, 3)),
                         None if length is None else jnp.zeros((1, length),
                                                               jnp.int32))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  expected = export.flatten_params(nn.unbox(boxed)["params"])
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ExportError(
        f"{_PARAMS} does not match config.json's model: {len(missing)} "
        f"params missing (e.g. {missing[:2]}), {len(extra)} unexpected "
        f"(e.g. {extra[:2]})")
  for k, v in expected.items():
    if tuple(flat[k].shape) != tuple(v.shape):
      raise ExportError(f"{_PARAMS}: {k} has shape {flat[k].shape}, the "
                        f"config's model needs {v.shape}")
  # bf16 storage is widened on load: the towers compute in config dtype.
  params = export.unflatten_params(
      {k: np.asarray(v).astype(np.float32) for k, v in flat.items()})
  params = jax.device_put(params, device)
  loaded = Model(export_dir, manifest, config, tokenizer, image_fn,
                 text_fn if tokenizer else None, params, scale, device,
                 max_batch, backend)
  if manifest.get("num_classes"):
    loaded._classify_fn = loaded._jit(  # pylint: disable=protected-access
        "classify", lambda p, x: model.apply({"params": p}, x,
                                             method=model.classify))
  return loaded
