"""Import weights trained elsewhere (timm, open_clip, torchscale, Hugging
Face FLAVA) as a florax export or import directory.

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

--source hf (FLAVA, florax.convert.hf_flava; --arch full, also spelt
flava-full or facebook/flava-full, or the path of any FLAVA model's HF
config.json or of its directory, e.g. a hub snapshot) imports a Hugging Face FlavaModel or
FlavaForPreTraining state dict (model.safetensors or pytorch_model.bin)
onto florax.models.flava the same way (write_import_dir):
params.safetensors (flat Flava names), a config.json
whose `model` is {'arch': 'flava', 'flava': FlavaConfig fields
(flava.from_dict reads them)}, data.image_size / max_len, the text
tokenizer when --tokenizer names FLAVA's BERT uncased vocab.txt or
tokenizer.json (kind 'wordpiece': [PAD] 0, [CLS] 101, [SEP] 102, [MASK]
103), init_from.path = the directory, and the manifest (preprocess: HF's
224 px resize with OpenAI CLIP's mean/std). FlavaForPreTraining's
pre-training heads (mim/mlm/itm/mmm_*_head) and image codebook are not
FlavaModel params: they are dropped without --allow_missing and listed in
the report and the manifest's source.dropped (the FLAVA task brings its own
heads; it loads the import with init_from.prefixes [["", "flava"]]).
--codebook_out DIR imports that codebook as well, as a second directory
({'arch': 'flava_codebook', ...}; florax.models.flava_codebook).

  python -m launch.import_weights --source hf --arch full \
      --checkpoint flava-full/model.safetensors --out imports/flava_full \
      --tokenizer flava-full/vocab.txt --codebook_out imports/flava_codebook
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
                            "vit_base_patch16_224 or ViT-B-16 (--source hf: "
                            "also a FLAVA config.json or its directory)")
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
                                 "(beit3.spm, optional); hf: FLAVA's BERT "
                                 "uncased vocab.txt or tokenizer.json (or "
                                 "their directory; optional)")
_CODEBOOK_OUT = flags.DEFINE_string(
    "codebook_out", None, "hf: also import a FlavaForPreTraining "
    "checkpoint's image codebook (image_codebook.*) into this directory")
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
  if _CODEBOOK_OUT.value and source != "hf":
    raise ValueError("--codebook_out is for --source hf (a FLAVA "
                     "FlavaForPreTraining checkpoint's image codebook)")
  if source == "hf":
    import_hf_flava(arch, _CHECKPOINT.value, _OUT.value, _IMAGE_SIZE.value,
                    _ALLOW_MISSING.value, _TOKENIZER.value, _DTYPE.value,
                    codebook_out=_CODEBOOK_OUT.value)
    return
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
  _refuse_fresh(report)
  directory = os.path.abspath(out)
  tok_file = tokenizer.serialize()[0] if tokenizer is not None else ""
  config = imported_config.config(
      imported.model, imported.image_size, imported.max_len,
      imported.preprocess, directory=directory, tokenizer_file=tok_file)
  source = source_record(imported.source, imported.arch, checkpoint,
                         imported.image_size, allow_missing, report)
  manifest = export.write_export(
      out, config, export.unflatten_params(imported.params), tokenizer,
      step=0, dtype=dtype, platforms=platforms,
      preprocess=imported.preprocess, zeroshot=None, source=source)
  print(report.summary(), flush=True)
  print(f"florax: imported {imported.source} {imported.arch} "
        f"({manifest['num_params'] / 1e6:.2f}M params, {dtype}, "
        f"{imported.image_size}px) to {out}", flush=True)
  return manifest


# -- models that are no two-tower: their own import directory -----------------

# export.prepare_dir replaces a directory that holds an export (or only files
# an export writes: a half-written one); it refuses anything else.
_EXPORT_SUFFIXES = (".safetensors", ".json", ".model", ".jaxexp", ".tmp")


def check_out(out: str, flag: str = "--out"):
  """--out checks that cost nothing, made before a checkpoint is read: not a
  file, and not a directory export.prepare_dir would refuse to replace."""
  if not out:
    raise ValueError(f"{flag} is empty")
  if os.path.isfile(out):
    raise NotADirectoryError(f"{flag} {out} is a file")
  if os.path.isdir(out) and os.listdir(out):
    names = os.listdir(out)
    if "manifest.json" not in names and not all(
        n.endswith(_EXPORT_SUFFIXES) for n in names):
      raise FileExistsError(f"{flag} {out} exists and is not a florax export "
                            f"(only an export is replaced); choose another "
                            f"{flag}")


def source_record(source: str, arch: str, checkpoint: str, image_size: int,
                  allow_missing, report, checkpoint_sha256: str | None = None
                  ) -> dict:
  """The manifest's `source`: where imported weights came from and what the
  conversion did to them."""
  from florax import export  # pylint: disable=g-import-not-at-top
  return {
      "source": source, "arch": arch,
      "checkpoint": os.path.abspath(checkpoint),
      "checkpoint_sha256": (checkpoint_sha256
                            or export.sha256_file(checkpoint)),
      "image_size": int(image_size),
      "allow_missing": list(_patterns(allow_missing)),
      "tensors": len(report.mapped),
      "interpolated": [list(map(str, r)) for r in report.resized],
      "dropped": list(report.dropped), "fresh": list(report.fresh),
  }


def _refuse_fresh(report):
  if report.fresh:
    raise ValueError(
        "--allow_missing leaves florax params without weights ("
        + ", ".join(report.fresh[:_EXAMPLES]) + "); an import directory "
        "holds complete weights: drop those patterns, or start a run from "
        "this checkpoint with init_from, which keeps fresh params")


def write_import_dir(out: str, model: dict, params: dict, report, tokenizer,
                     *, source: dict, image_size: int, max_len: int | None,
                     vocab_size: int | None, preprocess: dict,
                     dtype: str = "float32") -> dict:
  """The import directory of a model that is no two-tower (torchscale's
  Multiway, Hugging Face's FLAVA and its image codebook): the export's
  files and conventions (florax/export.py) without the jax.export'ed
  encoders, which florax.inference serves for two-towers only:

    params.safetensors  flat florax names, `dtype` (export.save_params)
    config.json         `model` as given ({'arch': A, A: its config's
                        fields, 'dtype'}), data.image_size, and for a model
                        with text data.max_len / tokenizer_vocab_size /
                        tokenizer_path / tokenizer_kind; init_from.path =
                        this directory (absolute), so a run whose model has
                        the same names starts from these weights
    the tokenizer file  if `tokenizer` (export.save_tokenizer)
    manifest.json       written last (export.finish): format, dtype, sizes
                        and sha256 of every file, `source`, `preprocess`

  An export (or a half-written one) at `out` is replaced; anything else is
  refused before anything is written. Returns the manifest."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  if dtype not in export.DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not one of {export.DTYPES}")
  _refuse_fresh(report)
  export.prepare_dir(out)
  directory = os.path.abspath(out)
  flat = export.save_params(out, export.unflatten_params(params), dtype, 0)
  tok_names, tok_info = export.save_tokenizer(out, tokenizer)
  data = {"image_size": int(image_size)}
  if max_len is not None:
    data.update(
        max_len=int(max_len), tokenizer_vocab_size=int(vocab_size),
        tokenizer_path=(f"{directory}/{tok_names[0]}" if tok_names else ""),
        tokenizer_kind=tokenizer.kind if tokenizer is not None else "")
  export.save_config(out, ml_collections.ConfigDict({
      "preset": "imported", "task": "", "model": model, "data": data,
      "init_from": {"path": directory, "step": -1, "prefixes": []},
  }))
  return export.finish(out, [export.PARAMS_FILE, export.CONFIG_FILE]
                       + tok_names, {
      "format": export.FORMAT, "version": export.VERSION, "step": 0,
      "model": model["arch"], "param_dtype": dtype,
      "num_params": int(sum(v.size for v in flat.values())),
      "image_size": int(image_size),
      "max_len": None if max_len is None else int(max_len),
      "tokenizer": tok_info, "source": source, "export_platforms": [],
      "image_input": "float32 (batch, S, S, 3) after `preprocess`",
      "preprocess": preprocess})


def _done(what: str, manifest: dict, report, out: str):
  print(report.summary(), flush=True)
  print(f"florax: imported {what} ({manifest['num_params'] / 1e6:.2f}M "
        f"params, {manifest['param_dtype']}, {manifest['image_size']}px) to "
        f"{out}", flush=True)


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
  check_out(out)
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
  _refuse_fresh(report)
  return write_multiway(config, params, report, tokenizer, out, checkpoint,
                        arch, allow_missing, dtype)


def write_multiway(config: dict, params: dict, report, tokenizer, out: str,
                   checkpoint: str, arch: str, allow_missing=(),
                   dtype: str = "float32") -> dict:
  """The import directory of a Multiway model (write_import_dir), with
  unilm's BEiT-3 eval transform: the whole image resized to the input size,
  normalised to [-1, 1] (mean = std = 0.5)."""
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  size = int(config["image_size"])
  manifest = write_import_dir(
      out, {"arch": "multiway", "multiway": dict(config["multiway"]),
            "dtype": "float32"}, params, report, tokenizer,
      source=source_record("torchscale", arch, checkpoint, size,
                           allow_missing, report),
      image_size=size, max_len=int(config["max_len"]),
      vocab_size=int(config["multiway"]["vocab_size"]),
      preprocess=preprocess_lib.resize_spec(size), dtype=dtype)
  _done(f"torchscale {arch}", manifest, report, out)
  return manifest


# -- Hugging Face FLAVA onto florax.models.flava -----------------------------

def load_wordpiece(path: str | None, vocab_size: int, arch: str):
  """FLAVA's text tokenizer (BERT uncased WordPiece) from --tokenizer, or
  None; its vocabulary must be the text embedding's, id for id."""
  if not path:
    return None
  from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"--tokenizer {path} does not exist")
  try:
    tokenizer = tok_lib.from_file(path, kind="wordpiece")
  except (OSError, ValueError) as e:
    raise ValueError(
        f"--tokenizer {path} is not a BERT WordPiece tokenizer (FLAVA's: "
        "facebook/flava-full's vocab.txt or tokenizer.json, or its "
        f"directory): {e}") from None
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(
        f"--tokenizer {path} has {tokenizer.vocab_size} ids but FLAVA "
        f"{arch}'s text embedding has {vocab_size} rows: pass the tokenizer "
        "the checkpoint was trained with (facebook/flava-full: BERT uncased, "
        "30522 ids)")
  return tokenizer


def codebook_preprocess(size: int) -> dict:
  """FLAVA's codebook input as a florax.data.preprocess spec: the whole
  image resized to `size`, pixels in [0, 1] mapped to (1 - 2 eps) x + eps,
  i.e. mean = -eps / (1 - 2 eps), std = 1 / (1 - 2 eps). HF resizes with
  Lanczos, florax's 'resize' bilinearly: pixels differ slightly."""
  from florax.convert import hf_flava  # pylint: disable=g-import-not-at-top
  from florax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  eps = hf_flava.CODEBOOK_PIXEL_EPS
  return dict(preprocess_lib.resize_spec(size),
              mean=[-eps / (1 - 2 * eps)] * 3, std=[1 / (1 - 2 * eps)] * 3)


def import_hf_flava(arch: str, checkpoint: str, out: str,
                    image_size: int | None = None, allow_missing=(),
                    tokenizer_path: str | None = None,
                    dtype: str = "float32",
                    codebook_out: str | None = None) -> dict:
  """Converts a Hugging Face FlavaModel / FlavaForPreTraining checkpoint
  (florax.convert.hf_flava) and writes its import directory
  (write_import_dir; module docstring); returns the manifest.

  FlavaForPreTraining's heads and codebook are not FlavaModel params: they
  are dropped without --allow_missing (florax.convert.convert, a note in
  the report; the manifest's source.dropped lists them). With
  `codebook_out` the checkpoint's image codebook ('image_codebook.*') is
  imported too, as a second directory (florax.models.flava_codebook, at
  the codebook arch's input size: 112 px for 'full').

  Every check that costs nothing (arch, --out, --codebook_out,
  --image_size, --dtype, the tokenizer and its vocabulary size) runs before
  the checkpoint is read; a checkpoint that does not fit writes nothing."""
  from florax import convert  # pylint: disable=g-import-not-at-top
  from florax import export  # pylint: disable=g-import-not-at-top
  from florax.convert import common  # pylint: disable=g-import-not-at-top
  from florax.convert import hf_flava  # pylint: disable=g-import-not-at-top
  fields = hf_flava.arch_fields(arch)  # a ValueError naming the known archs
  check_out(out)
  if codebook_out:
    check_out(codebook_out, "--codebook_out")
    if os.path.abspath(codebook_out) == os.path.abspath(out):
      raise ValueError("--codebook_out must be another directory than --out")
  if image_size is not None and image_size <= 0:
    raise ValueError(f"--image_size must be positive, got {image_size}")
  if dtype not in export.DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not one of {export.DTYPES}")
  tokenizer = load_wordpiece(tokenizer_path, fields["text"]["vocab_size"],
                             arch)

  state = common.read_checkpoint(checkpoint)
  try:
    imported = convert.convert("hf", state, arch, image_size,
                               _patterns(allow_missing))
  except common.ConversionError as e:
    raise ValueError(conversion_message(e, checkpoint, "hf", arch)) from None
  _refuse_fresh(imported.report)
  has_codebook = any(k.startswith(hf_flava.CODEBOOK_PREFIX) for k in state)
  codebook = None
  if codebook_out:
    if not has_codebook:
      raise ValueError(
          f"--codebook_out: {checkpoint} holds no image codebook (no "
          f"{hf_flava.CODEBOOK_PREFIX}* tensors: a FlavaModel checkpoint, "
          "not FlavaForPreTraining's); drop --codebook_out")
    cb_arch = arch if arch in hf_flava.CODEBOOK_ARCHS else "full"
    try:
      codebook = hf_flava.convert_codebook_state_dict(state, cb_arch)
    except common.ConversionError as e:
      raise ValueError(conversion_message(
          e, checkpoint, "hf", f"{arch} (its image codebook, as "
          f"FlavaImageCodebook {cb_arch})")) from None
  elif has_codebook:
    imported.report.notes.append(
        "the checkpoint holds FLAVA's image codebook: --codebook_out DIR "
        "imports it as well")
  if tokenizer is None:
    imported.report.notes.append(
        "no --tokenizer: the directory holds no text tokenizer (pass "
        "facebook/flava-full's vocab.txt or tokenizer.json to include it)")
  del state

  sha = export.sha256_file(checkpoint)
  flava_fields = imported.model["flava"]
  manifest = write_import_dir(
      out, imported.model, imported.params, imported.report, tokenizer,
      source=source_record("hf", arch, checkpoint, imported.image_size,
                           allow_missing, imported.report, sha),
      image_size=imported.image_size, max_len=imported.max_len,
      vocab_size=flava_fields["text"]["vocab_size"],
      preprocess=imported.preprocess, dtype=dtype)
  _done(f"hf FLAVA {arch}", manifest, imported.report, out)
  if codebook is not None:
    cb_config, cb_params, cb_report = codebook
    size = int(cb_config["image_size"])
    source = dict(source_record("hf", arch, checkpoint, size, (), cb_report,
                                sha), component="image_codebook")
    cb_manifest = write_import_dir(
        codebook_out, {"arch": "flava_codebook",
                       "flava_codebook": cb_config["codebook"],
                       "dtype": "float32"},
        cb_params, cb_report, None, source=source, image_size=size,
        max_len=None, vocab_size=None, preprocess=codebook_preprocess(size),
        dtype=dtype)
    _done(f"hf FLAVA {arch}'s image codebook", cb_manifest, cb_report,
          codebook_out)
  return manifest


if __name__ == "__main__":
  flags.mark_flags_as_required(["source", "arch", "checkpoint", "out"])
  cli.run(main)
