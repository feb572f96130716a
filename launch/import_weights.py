"""Import weights trained elsewhere (timm, open_clip) as a florax export.

  python -m launch.import_weights --source open_clip --arch ViT-B-16 \
      --checkpoint open_clip_model.safetensors --out imports/clip_b16
  python -m launch.import_weights --source timm --arch vit_base_patch16_224 \
      --checkpoint model.safetensors --out imports/vit_b16 --image_size 384
  python -m launch.import_weights --source torchscale --arch base \
      --checkpoint beit3_base_patch16_224.pth --out imports/beit3_base \
      --tokenizer beit3.spm

  --image_size N        build for another resolution (the image position
                        embedding is interpolated; same size: exact copy)
  --allow_missing GLOB  (repeatable, or comma-separated) source tensors to
                        drop, e.g. 'head.*' (a timm classifier then imports
                        as a feature extractor)
  --tokenizer PATH      open_clip: the CLIP BPE the text tower reads
                        (open_clip's bpe_simple_vocab_16e6.txt.gz, a merges
                        .txt, or a Hugging Face tokenizer.json / directory);
                        default: the vocabulary bundled with an installed
                        open_clip

The output is an export directory (florax/export.py): params, config.json
(configs/imported.py: usable as init_from.path and as a UniCL config),
the tokenizer, the eval preprocessing and the source in the manifest. Load
it with `florax.inference.load(OUT)`.

--source torchscale (BEiT-3, florax.convert.torchscale_beit3; --arch base,
large, giant or a unilm name such as beit3_large_patch16_384) imports onto
florax's Multiway model, which is no two-tower: its directory holds the
export's params.safetensors (flat Multiway names), a config.json whose
`model` is {'arch': 'multiway', 'multiway': MultiwayConfig fields}, the
tokenizer when --tokenizer names BEiT-3's SentencePiece model (fairseq ids,
pad 1) and a manifest with the same `source` record and file hashes, but
no jax.export'ed encoders (florax.inference serves two-towers only): it is
a starting point for init_from.path. A checkpoint that does not fit the
arch (truncated, another architecture, a wrong --arch) stops before anything
is written, with one line naming the tensors at fault.
"""

from __future__ import annotations

import importlib.util
import os

from absl import app, flags, logging

from launch import cli

_SOURCE = flags.DEFINE_enum(
    "source", None, ["timm", "open_clip", "hf", "torchscale"],
    "where the checkpoint comes from")
_ARCH = flags.DEFINE_string("arch", None, "the source's model name, e.g. "
                            "vit_base_patch16_224 or ViT-B-16")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, ".safetensors or torch pickle (.pt/.pth/.bin)")
_OUT = flags.DEFINE_string("out", None, "the import (export) directory")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "build for this "
                                   "resolution (default: the arch's)")
_ALLOW_MISSING = flags.DEFINE_multi_string(
    "allow_missing", [], "fnmatch patterns of source tensors to drop, e.g. "
    "'head.*' (repeatable, or comma-separated)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "open_clip: the CLIP BPE "
                                 "vocabulary (default: open_clip's bundled "
                                 "one, if open_clip is installed); "
                                 "torchscale: BEiT-3's SentencePiece model "
                                 "(beit3.spm, optional)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "storage dtype of the imported params")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "jax.export lowering platforms")

OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# How many names of each kind of problem the one-line error shows.
_EXAMPLES = 3


def bundled_open_clip_vocab() -> str | None:
  """open_clip's bundled BPE vocabulary, found without importing open_clip
  (which would import torch and torchvision)."""
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, OPEN_CLIP_VOCAB)
    if os.path.exists(path):
      return path
  return None


def load_tokenizer(source: str, path: str | None):
  """The text tower's tokenizer (None for an image-only source)."""
  from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if source != "open_clip":
    if path:
      raise ValueError(f"--tokenizer: a {source} model is image-only (no text "
                       "tower); drop --tokenizer")
    return None
  if not path:
    path = bundled_open_clip_vocab()
    if path is None:
      raise ValueError(
          "--source open_clip needs --tokenizer: open_clip is not installed, "
          f"so its bundled vocabulary ({OPEN_CLIP_VOCAB}) is not available; "
          "pass --tokenizer PATH (that file, a CLIP merges .txt, or a Hugging "
          "Face CLIP tokenizer.json or directory)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--tokenizer {path} does not exist")
  try:
    return tok_lib.from_file(path, kind="clip_bpe")
  except (OSError, ValueError) as e:
    raise ValueError(f"--tokenizer {path} is not a CLIP BPE tokenizer: {e}"
                     ) from None


def _patterns(values) -> tuple[str, ...]:
  return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def conversion_message(e, checkpoint: str, source: str, arch: str) -> str:
  """A ConversionError as one line: counts and a few names of each kind."""
  def few(items, fmt):
    shown = "; ".join(fmt(i) for i in items[:_EXAMPLES])
    more = f"; ... {len(items) - _EXAMPLES} more" if len(
        items) > _EXAMPLES else ""
    return shown + more
  parts = []
  if e.mismatched:
    parts.append(f"{len(e.mismatched)} shape mismatches ("
                 + few(e.mismatched, lambda m: f"{m[1]} has shape "
                       f"{tuple(m[2])}, {m[0]} needs {tuple(m[3])}") + ")")
  if e.unmapped:
    parts.append(f"{len(e.unmapped)} checkpoint tensors that {source} "
                 f"{arch} has no place for (" + few(e.unmapped, str) + ")")
  if e.unexpected:
    parts.append(f"{len(e.unexpected)} tensors this arch does not have ("
                 + few(e.unexpected, lambda u: u[0]) + ")")
  if e.missing:
    parts.append(f"{len(e.missing)} florax params missing from the checkpoint"
                 " (" + few(e.missing, str) + ")")
  if e.duplicates:
    parts.append(f"{len(e.duplicates)} params claimed twice ("
                 + few(e.duplicates, lambda d: d[0]) + ")")
  return (f"{checkpoint} does not fit {source} arch {arch} (a truncated "
          "checkpoint, another architecture or a wrong --arch?): "
          + "; ".join(parts)
          + " (--allow_missing GLOB drops tensors you mean to leave out)")


def _check_tokenizer(tokenizer, vocab: int, arch: str, exact: bool):
  if tokenizer.vocab_size > vocab or (exact and tokenizer.vocab_size != vocab):
    which = _TOKENIZER.value or f"open_clip's bundled {OPEN_CLIP_VOCAB}"
    raise ValueError(
        f"the tokenizer ({which}) has {tokenizer.vocab_size} ids but {arch}'s "
        f"text tower has a vocabulary of {vocab}: pass the --tokenizer the "
        "checkpoint was trained with")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from florax import convert  # pylint: disable=g-import-not-at-top
  source, arch = _SOURCE.value, _ARCH.value
  if source == "torchscale":
    import_torchscale(arch, _CHECKPOINT.value, _OUT.value, _IMAGE_SIZE.value,
                      _ALLOW_MISSING.value, _TOKENIZER.value, _DTYPE.value)
    return
  # Cheap checks first: a wrong flag costs nothing to report.
  module = convert.module_for(source, arch)
  if arch.split(".")[0] not in module.ARCHS:
    raise ValueError(f"--arch {arch!r} is not a known {source} arch; known: "
                     f"{', '.join(convert.known_archs(source))}")
  if os.path.isfile(_OUT.value):
    raise NotADirectoryError(f"--out {_OUT.value} is a file")
  if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value <= 0:
    raise ValueError(f"--image_size must be positive, got {_IMAGE_SIZE.value}")
  tokenizer = load_tokenizer(source, _TOKENIZER.value)
  if tokenizer is not None:  # more ids than the arch has: fail at once
    _check_tokenizer(tokenizer, module.arch_entry(arch)["text"]["vocab_size"],
                     arch, exact=False)

  from florax.convert import common  # pylint: disable=g-import-not-at-top
  state = common.read_checkpoint(_CHECKPOINT.value)
  try:
    imported = convert.convert(
        source, state, arch, _IMAGE_SIZE.value, _patterns(_ALLOW_MISSING.value),
        eos_id=None if tokenizer is None else tokenizer.eos_id)
  except common.ConversionError as e:
    raise ValueError(conversion_message(e, _CHECKPOINT.value, source, arch)
                     ) from None
  del state
  if tokenizer is not None:
    # The ids must mean what the embedding rows were trained on: a smaller
    # vocabulary would run, and embed every text wrongly.
    _check_tokenizer(tokenizer, imported.model["text"]["vocab_size"], arch,
                     exact=True)
  write(imported, tokenizer, _OUT.value, _CHECKPOINT.value,
        _ALLOW_MISSING.value, _DTYPE.value, tuple(_PLATFORMS.value))


def write(imported, tokenizer, out: str, checkpoint: str, allow_missing,
          dtype: str = "float32", platforms=("cpu", "cuda")) -> dict:
  """Writes `imported` as an export directory; returns the manifest."""
  from configs import imported as imported_config  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  report = imported.report
  if report.fresh:
    raise ValueError(
        "--allow_missing leaves florax params without weights ("
        + ", ".join(report.fresh[:_EXAMPLES]) + "); an import directory "
        "holds complete weights: drop those patterns, or start a run from "
        "this checkpoint with init_from, which keeps fresh params")
  directory = os.path.abspath(out)
  tok_file = tokenizer.serialize()[0] if tokenizer is not None else ""
  config = imported_config.config(
      imported.model, imported.image_size, imported.max_len,
      imported.preprocess, directory=directory, tokenizer_file=tok_file)
  source = {
      "source": imported.source, "arch": imported.arch,
      "checkpoint": os.path.abspath(checkpoint),
      "checkpoint_sha256": export.sha256_file(checkpoint),
      "image_size": imported.image_size,
      "allow_missing": list(_patterns(allow_missing)),
      "tensors": len(report.mapped),
      "interpolated": [list(map(str, r)) for r in report.resized],
      "dropped": list(report.dropped), "fresh": list(report.fresh),
  }
  manifest = export.write_export(
      out, config, export.unflatten_params(imported.params), tokenizer,
      step=0, dtype=dtype, platforms=platforms,
      preprocess=imported.preprocess, zeroshot=None, source=source)
  print(report.summary(), flush=True)
  print(f"florax: imported {imported.source} {imported.arch} "
        f"({manifest['num_params'] / 1e6:.2f}M params, {dtype}, "
        f"{imported.image_size}px) to {out}", flush=True)
  return manifest


# -- torchscale BEiT-3 onto the Multiway model ---------------------------------

def import_torchscale(arch: str, checkpoint: str, out: str,
                      image_size: int | None = None, allow_missing=(),
                      tokenizer_path: str | None = None,
                      dtype: str = "float32") -> dict:
  """Converts a torchscale / unilm BEiT3 checkpoint and writes its import
  directory (module docstring); returns the manifest. Every check that
  costs nothing (arch, --out, --image_size, tokenizer) runs before the
  checkpoint is read; a checkpoint that does not fit writes nothing."""
  from florax.convert import common  # pylint: disable=g-import-not-at-top
  from florax.convert import torchscale_beit3 as ts  # pylint: disable=g-import-not-at-top
  if not ts.is_known_arch(arch):
    ts.arch_fields(arch)  # raises the ValueError naming the known archs
  if os.path.isfile(out):
    raise NotADirectoryError(f"--out {out} is a file")
  if image_size is not None and image_size <= 0:
    raise ValueError(f"--image_size must be positive, got {image_size}")
  tokenizer = None
  if tokenizer_path:
    from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    if not os.path.exists(tokenizer_path):
      raise FileNotFoundError(f"--tokenizer {tokenizer_path} does not exist")
    try:
      tokenizer = tok_lib.from_file(tokenizer_path,
                                    kind="sentencepiece_fairseq")
    except (OSError, ValueError) as e:
      raise ValueError(f"--tokenizer {tokenizer_path} is not BEiT-3's "
                       f"SentencePiece model: {e}") from None
  state = common.read_checkpoint(checkpoint)
  try:
    config, params, report = ts.convert_state_dict(
        state, arch, image_size, _patterns(allow_missing))
  except common.ConversionError as e:
    raise ValueError(conversion_message(e, checkpoint, "torchscale", arch)
                     ) from None
  del state
  fields = config["multiway"]
  if tokenizer is not None and (tokenizer.vocab_size > fields["vocab_size"]
                                or tokenizer.pad_id != fields["pad_id"]):
    raise ValueError(
        f"--tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids and pad "
        f"id {tokenizer.pad_id}; the checkpoint's text embedding has "
        f"{fields['vocab_size']} rows and BEiT-3 pads with "
        f"{fields['pad_id']}: pass the tokenizer it was trained with")
  if report.fresh:
    raise ValueError(
        "--allow_missing leaves florax params without weights ("
        + ", ".join(report.fresh[:_EXAMPLES]) + "); an import directory "
        "holds complete weights: drop those patterns, or start a run from "
        "this checkpoint with init_from, which keeps fresh params")
  return write_multiway(config, params, report, tokenizer, out, checkpoint,
                        arch, allow_missing, dtype)


def write_multiway(config: dict, params: dict, report, tokenizer, out: str,
                   checkpoint: str, arch: str, allow_missing=(),
                   dtype: str = "float32") -> dict:
  """The import directory of a Multiway model: the export's params file
  and manifest conventions (export.PARAMS_FILE, flat names, dtype, file
  hashes, the manifest written last) without the two-tower encoders."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  if dtype not in export.DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not one of {export.DTYPES}")
  if os.path.exists(out) and os.listdir(out):
    if not os.path.exists(os.path.join(out, export.MANIFEST)):
      raise FileExistsError(
          f"{out} exists and is not a florax export; choose another --out")
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  directory = os.path.abspath(out)
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  flat = {k: np.array(v, dtype=np_dtype, order="C")
          for k, v in params.items()}
  save_file(flat, os.path.join(out, export.PARAMS_FILE),
            metadata={"format": export.FORMAT, "dtype": dtype, "step": "0"})
  size, max_len = int(config["image_size"]), int(config["max_len"])
  # unilm's BEiT-3 eval transform: the whole image resized to the input
  # size, normalised to [-1, 1] (mean = std = 0.5).
  preprocess = preprocess_lib.resize_spec(size)
  names = [export.PARAMS_FILE, export.CONFIG_FILE]
  tok_info = None
  tok_file = ""
  if tokenizer is not None:
    tok_file, blob = tokenizer.serialize()
    with open(os.path.join(out, tok_file), "wb") as f:
      f.write(blob)
    names.append(tok_file)
    tok_info = {"kind": tokenizer.kind, "file": tok_file,
                "vocab_size": int(tokenizer.vocab_size)}
  cfg = ml_collections.ConfigDict({
      "preset": "imported", "task": "",
      "model": {"arch": "multiway", "multiway": dict(config["multiway"]),
                "dtype": "float32"},
      "data": {"image_size": size, "max_len": max_len,
               "tokenizer_vocab_size": int(config["multiway"]["vocab_size"]),
               "tokenizer_path": (f"{directory}/{tok_file}" if tok_file
                                  else "")},
      "init_from": {"path": directory, "step": -1, "prefixes": []},
  })
  with open(os.path.join(out, export.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(cfg.to_json_best_effort(indent=1, sort_keys=True))
  source = {
      "source": "torchscale", "arch": arch,
      "checkpoint": os.path.abspath(checkpoint),
      "checkpoint_sha256": export.sha256_file(checkpoint),
      "image_size": size, "allow_missing": list(_patterns(allow_missing)),
      "tensors": len(report.mapped),
      "interpolated": [list(map(str, r)) for r in report.resized],
      "dropped": list(report.dropped), "fresh": list(report.fresh),
  }
  files = {n: {"bytes": os.path.getsize(os.path.join(out, n)),
               "sha256": export.sha256_file(os.path.join(out, n))}
           for n in names}
  manifest = {
      "format": export.FORMAT, "version": export.VERSION, "step": 0,
      "model": "multiway", "param_dtype": dtype,
      "num_params": int(sum(v.size for v in flat.values())),
      "image_size": size, "max_len": max_len, "tokenizer": tok_info,
      "source": source, "export_platforms": [],
      "image_input": "float32 (batch, S, S, 3) after `preprocess`",
      "preprocess": preprocess, "files": files,
  }
  tmp = os.path.join(out, export.MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out, export.MANIFEST))  # last: complete
  print(report.summary(), flush=True)
  print(f"florax: imported torchscale {arch} "
        f"({manifest['num_params'] / 1e6:.2f}M params, {dtype}, {size}px) "
        f"to {out}", flush=True)
  return manifest


if __name__ == "__main__":
  flags.mark_flags_as_required(["source", "arch", "checkpoint", "out"])
  cli.run(main)
