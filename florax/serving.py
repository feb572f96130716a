"""Exports that serve a task's own functions: VQA answers, captions, ...

The two-tower export (florax/export.py) serves `encode_image` and
`encode_text`. A task whose uses are other functions of its params (BEiT-3's
fusion encoder answering questions, its caption decoder, a dual encoder)
declares them with `Task.serving()`: {name: Function}, each a pure
`fn(params, *inputs) -> (batch, ...) array` with per-example input specs
and the meaning of its output. `write` stores them like the two-tower
export does (params.safetensors, config.json, the tokenizer, one
`<name>.jaxexp` per function with a symbolic batch dimension, the manifest
written last) and lists them in the manifest's `functions`:

  "functions": {"answer": {"file": "answer.jaxexp",
                           "inputs": [{"name": "images", "kind": "image",
                                       "shape": [32, 32, 3],
                                       "dtype": "float32"},
                                      {"name": "text", "kind": "text",
                                       "shape": [24], "dtype": "int32"}],
                           "output": "labels", "labels": ["0", ...]}}

Input kinds: 'image' (float32 pixels after the manifest's `preprocess`;
PIL images or uint8 arrays are transformed by `ServedModel`), 'text' (int32
token ids; strings are tokenized with the export's tokenizer), 'array'
(given as is). Output kinds: 'labels' (logits over `labels`: `run` returns
the argmax label), 'tokens' (token ids: `run` returns decoded strings),
'embedding' (unit vectors), 'logits' (raw).

`florax.inference.load` returns a `ServedModel` for such a directory:

  model = florax.inference.load("export")
  model.functions                      # {'answer': ..., ...}
  model.run("answer", images=[im], text=["what digit is shown?"])  # ['7']
  model.run("caption", images=[im])    # ['a handwritten seven.']
  model.call("answer", images=pixels, text=ids)  # the raw output array

backend='exported' runs the `jax.export` artifacts (jax, safetensors and the
tokenizer library only); backend='native' rebuilds the task from
config.json (florax's code) and jits the same functions.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from florax import export

INPUT_KINDS = ("image", "text", "array")
OUTPUT_KINDS = ("labels", "tokens", "embedding", "logits")
DTYPES = ("float32", "int32")


@dataclasses.dataclass(frozen=True)
class Input:
  """One batched input: its name (the keyword of `ServedModel.run`), kind,
  per-example shape and dtype."""
  name: str
  kind: str
  shape: tuple
  dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in INPUT_KINDS:
      raise ValueError(f"input {self.name!r}: kind {self.kind!r} is not one "
                       f"of {INPUT_KINDS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"input {self.name!r}: dtype {self.dtype!r} is not one "
                       f"of {DTYPES}")

  def as_dict(self) -> dict:
    return {"name": self.name, "kind": self.kind,
            "shape": [int(d) for d in self.shape], "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class Function:
  """fn(params, *inputs) -> one batch-major array (module docstring)."""
  fn: Callable
  inputs: tuple
  output: str
  labels: tuple = ()

  def __post_init__(self):
    if self.output not in OUTPUT_KINDS:
      raise ValueError(f"output {self.output!r} is not one of {OUTPUT_KINDS}")
    if (self.output == "labels") != bool(self.labels):
      raise ValueError("a 'labels' output names its labels (and only it)")

  def entry(self, file: str) -> dict:
    out = {"file": file, "inputs": [i.as_dict() for i in self.inputs],
           "output": self.output}
    if self.labels:
      out["labels"] = list(self.labels)
    return out


def _file(name: str) -> str:
  if not name.isidentifier():
    raise ValueError(f"served function name {name!r} is not an identifier")
  return f"{name}.jaxexp"


def serialize(function: Function, flat_abstract: Mapping[str, Any],
              platforms: Sequence[str]) -> tuple[bytes, list[str]]:
  """`jax.export` of the function with a symbolic batch dimension
  (export.export_flat)."""
  batch, = jax.export.symbolic_shape("batch")
  inputs = [jax.ShapeDtypeStruct((batch,) + tuple(i.shape),
                                 jnp.dtype(i.dtype))
            for i in function.inputs]
  return export.export_flat(function.fn, flat_abstract, inputs, platforms)


def write(out_dir: str, config, params: Mapping[str, Any], tokenizer,
          functions: Mapping[str, Function], *, step: int,
          dtype: str = "float32",
          platforms: Sequence[str] = export.DEFAULT_PLATFORMS,
          preprocess: dict | None = None) -> dict:
  """Writes a served export (module docstring); returns the manifest."""
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  if not functions:
    raise ValueError("a served export needs at least one function")
  reads_text = any(i.kind == "text" for f in functions.values()
                   for i in f.inputs)
  decodes = any(f.output == "tokens" for f in functions.values())
  if (reads_text or decodes) and tokenizer is None:
    raise ValueError("these functions read or write text: the export needs "
                     "the task's tokenizer")
  if dtype not in export.DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {export.DTYPES}")
  files = {name: _file(name) for name in functions}
  export.prepare_dir(out_dir)
  flat = export.save_params(out_dir, params, dtype, step)
  export.save_config(out_dir, config)
  tok_names, tok_info = export.save_tokenizer(out_dir, tokenizer)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in flat.items()}
  used = None
  for name, function in functions.items():
    blob, plats = serialize(function, abstract, platforms)
    used = plats if used is None else [p for p in used if p in plats]
    with open(os.path.join(out_dir, files[name]), "wb") as f:
      f.write(blob)
  size = int(config.data.image_size)
  return export.finish(
      out_dir, [export.PARAMS_FILE, export.CONFIG_FILE] + tok_names
      + list(files.values()), {
          "format": export.FORMAT, "version": export.VERSION,
          "step": int(step), "task": str(config.task),
          "param_dtype": dtype,
          "num_params": int(sum(v.size for v in flat.values())),
          "image_size": size,
          "max_len": int(config.data.max_len) if reads_text else None,
          "tokenizer": tok_info,
          "export_platforms": used,
          "image_input": "float32 (batch, S, S, 3) after `preprocess`",
          "preprocess": preprocess or preprocess_lib.resize_spec(size),
          "functions": {name: functions[name].entry(files[name])
                        for name in functions},
      })


# -- serving ------------------------------------------------------------------

class ServedModel:
  """A served export on one device (module docstring). Build it with
  `florax.inference.load`."""

  def __init__(self, export_dir: str, manifest: dict, config: dict,
               tokenizer, fns: Mapping[str, Callable], params, device,
               max_batch: int, backend: str):
    self.export_dir = export_dir
    self.manifest = manifest
    self.config = config
    self.tokenizer = tokenizer
    self.functions = dict(manifest["functions"])
    self.image_size = int(manifest["image_size"])
    self.max_len = manifest.get("max_len")
    self.step = int(manifest["step"])
    self.device = device
    self.max_batch = max_batch
    self.backend = backend
    self._params = params
    #: (function, padded batch) -> times traced (one compile per bucket).
    self.traces: collections.Counter = collections.Counter()
    self._fns = {name: self._jit(name, fn) for name, fn in fns.items()}

  def _jit(self, name, fn):
    def counted(params, *xs):
      self.traces[(name, xs[0].shape[0])] += 1  # at trace time only
      return fn(params, *xs)
    return jax.jit(counted)

  def _spec(self, name: str) -> dict:
    if name not in self.functions:
      raise ValueError(f"{self.export_dir} serves {sorted(self.functions)}, "
                       f"not {name!r}")
    return self.functions[name]

  def _prepare(self, spec: dict, value) -> np.ndarray:
    from florax import inference  # pylint: disable=g-import-not-at-top
    shape, name = tuple(spec["shape"]), spec["name"]
    if spec["kind"] == "image" and not _is_pixels(value, shape):
      value = inference.preprocess_images(self.manifest, value)
    elif spec["kind"] == "text" and not isinstance(value, np.ndarray):
      if isinstance(value, str):
        raise ValueError(f"{name}: a list of strings, not one string")
      texts = list(value)
      if not texts:
        raise ValueError(f"{name}: no texts given")
      value = self.tokenizer.encode_batch(texts, shape[0])
    value = np.asarray(value, spec["dtype"])
    if value.ndim != 1 + len(shape) or value.shape[1:] != shape:
      raise ValueError(f"{name} must be (n, {', '.join(map(str, shape))}), "
                       f"got {value.shape}")
    return value

  def call(self, name: str, **inputs) -> np.ndarray:
    """The function's raw output for a batch of inputs, given by their
    names (images as PIL / uint8 / preprocessed float32 pixels, text as
    strings or ids)."""
    spec = self._spec(name)
    names = [i["name"] for i in spec["inputs"]]
    if sorted(inputs) != sorted(names):
      raise ValueError(f"{name} takes inputs {names}, got {sorted(inputs)}")
    xs = [self._prepare(i, inputs[i["name"]]) for i in spec["inputs"]]
    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
      raise ValueError(f"{name}: inputs of different lengths "
                       f"{[x.shape[0] for x in xs]}")
    from florax import inference  # pylint: disable=g-import-not-at-top
    return inference.run_in_buckets(self._fns[name], self._params, xs,
                                    self.max_batch, self.device)

  def run(self, name: str, **inputs):
    """`call`, its output decoded: 'labels' -> the argmax label of each
    example, 'tokens' -> decoded strings, else the array."""
    out = self.call(name, **inputs)
    spec = self._spec(name)
    if spec["output"] == "labels":
      return [spec["labels"][i] for i in np.argmax(out, -1)]
    if spec["output"] == "tokens":
      return [self.tokenizer.decode(row) for row in out]
    return out

  # The two-tower Model's embedding API, for a served dual encoder.
  def encode_image(self, images) -> np.ndarray:
    return self.call("encode_image", images=images)

  def encode_text(self, texts: Sequence[str]) -> np.ndarray:
    return self.call("encode_text", text=texts)

  def similarity(self, images, texts: Sequence[str]) -> np.ndarray:
    return self.encode_image(images) @ self.encode_text(texts).T


def _is_pixels(value, shape) -> bool:
  return (isinstance(value, np.ndarray) and value.dtype == np.float32
          and value.shape[1:] == shape)


def native_functions(config: dict, export_dir: str, tokenizer_file: str | None
                     ) -> dict[str, Function]:
  """The task's `serving()` rebuilt from config.json on one device, reading
  the export's tokenizer (not the training run's paths)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from florax import tasks  # pylint: disable=g-import-not-at-top
  from florax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config)
  if tokenizer_file and "text_tokenizer_path" in cfg.data:
    cfg.data.text_tokenizer_path = os.path.join(export_dir, tokenizer_file)
  if "init_from" in cfg:
    cfg.init_from.path = ""
  mesh = mesh_lib.make_mesh({n: 1 for n in cfg.mesh.axes},
                            jax.devices()[:1])
  functions = tasks.build(cfg, export_dir, mesh=mesh).serving()
  if not functions:
    raise export_error(f"task {cfg.task!r} serves no functions natively")
  return functions


def export_error(message: str):
  from florax import inference  # pylint: disable=g-import-not-at-top
  return inference.ExportError(message)


def load(export_dir: str, manifest: dict, config: dict, tokenizer, flat,
         backend: str, device, max_batch: int) -> ServedModel:
  """A ServedModel of a served export (florax.inference.load's branch)."""
  entries = manifest["functions"]
  if backend == "exported":
    fns = {}
    for name, entry in entries.items():
      with open(os.path.join(export_dir, entry["file"]), "rb") as f:
        try:
          exported = jax.export.deserialize(bytearray(f.read()))
        except Exception as e:  # pylint: disable=broad-except
          raise export_error(f"cannot deserialize {entry['file']}: {e}"
                             ) from None
      fns[name] = lambda p, *xs, e=exported: e.call(p, *xs)
    params = jax.device_put(flat, device)
  else:
    tok_file = (manifest.get("tokenizer") or {}).get("file")
    functions = native_functions(config, export_dir, tok_file)
    missing = sorted(set(entries) - set(functions))
    if missing:
      raise export_error(f"the task's code no longer serves {missing}")
    fns = {name: functions[name].fn for name in entries}
    # bf16 storage is widened on load: the model computes in config dtype.
    params = jax.device_put(export.unflatten_params(
        {k: np.asarray(v).astype(np.float32) for k, v in flat.items()}),
                            device)
  return ServedModel(export_dir, manifest, config, tokenizer, fns, params,
                     device, max_batch, backend)

