"""What BEiT-3's tasks share (florax/tasks/beit3_caption.py,
beit3_retrieval.py, beit3_vqa.py, beit3_mdm.py; FLAVA's task reads its text
tokenizer the same way): the backbone config, the text tokenizer (a
pretrained run's ids must mean what they meant in pre-training), and the
data/model/tokenizer checks, each naming the config key at fault."""

from __future__ import annotations

import os
import shutil

from florax import export
from florax.data import digits
from florax.data import tokenizer as tok_lib
from florax.models import multiway, two_tower
from florax.train import run_record

DATA_SOURCES = ("digits",)

def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def backbone(config) -> multiway.MultiwayConfig:
  return multiway.MultiwayConfig(**dict(config.model.multiway))


def tokenizer_file(config, workdir) -> str:
  """data.text_tokenizer_path, else the init_from workdir's tokenizer.model
  (the pretrained run's: its ids are what the checkpoint learned), else
  this workdir's (trained on the digits descriptions at first use)."""
  if config.data.text_tokenizer_path:
    return config.data.text_tokenizer_path
  src = config.init_from.path
  if src and os.path.isfile(os.path.join(src, "tokenizer.model")):
    return os.path.join(src, "tokenizer.model")
  return os.path.join(workdir, "tokenizer.model")


def load_text_tokenizer(config, workdir) -> tok_lib.TextTokenizer:
  path = tokenizer_file(config, workdir)
  if config.data.text_tokenizer_path or os.path.isfile(path) and (
      path != os.path.join(workdir, "tokenizer.model")):
    return tok_lib.from_file(path,
                             kind=config.data.text_tokenizer_kind or None)
  # The same corpus and size as beit3_mdm trains its tokenizer with.
  return tok_lib.load_or_train_tokenizer(
      path, digits.all_descriptions(), config.data.text_tokenizer_vocab_size)


def mask_id_of(tok) -> int:
  """[MASK]: the tokenizer's own, else one past its vocabulary (beit3_mdm's
  convention)."""
  return int(getattr(tok, "mask_id", tok.vocab_size))


def validate_common(task, needs_mask: bool):
  """data/model/tokenizer checks both uses share (ValueError naming the
  key)."""
  cfg = task.config
  if cfg.data.name not in DATA_SOURCES:
    raise ValueError(f"unknown dataset {cfg.data.name!r}; data.name is one of "
                     f"{DATA_SOURCES}")
  mw = backbone(cfg)
  multiway.validate(mw)
  if cfg.model.dtype not in two_tower.DTYPES:
    raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of "
                     f"{sorted(two_tower.DTYPES)}")
  if cfg.data.image_size != mw.image_size:
    raise ValueError(f"data.image_size {cfg.data.image_size} differs from "
                     f"model.multiway.image_size {mw.image_size}")
  if not is_int(cfg.data.max_len) or not 3 <= cfg.data.max_len <= (
      mw.max_text_len):
    raise ValueError(f"data.max_len must be an integer in [3, model.multiway."
                     f"max_text_len={mw.max_text_len}], got "
                     f"{cfg.data.max_len!r}")
  if cfg.data.get("train_examples", -1) == 0:
    raise ValueError("the digits train split is empty: data.train_examples=0")
  tok = task.text_tokenizer
  top = mask_id_of(tok) if needs_mask else tok.vocab_size - 1
  if top >= mw.vocab_size:
    raise ValueError(
        f"the text tokenizer ({tokenizer_file(cfg, task.workdir)}) has "
        f"{tok.vocab_size} pieces{' and [MASK] id ' + str(top) if needs_mask else ''}"
        f", but model.multiway.vocab_size is {mw.vocab_size}; set it to at "
        f"least {top + 1} (the pretrained run's)")
  if mw.pad_id is not None and mw.pad_id != tok.pad_id:
    raise ValueError(f"the {tok.kind} text tokenizer pads with id "
                     f"{tok.pad_id}, model.multiway.pad_id is {mw.pad_id}")


def record_tokenizer(task):
  """A resume with another tokenizer is refused (ids would change
  meaning). A SentencePiece model read from elsewhere is also copied into
  the workdir, so a run that starts from this one (init_from) finds it:
  unimodal -> joint -> fine-tuning chains keep their ids."""
  path = tokenizer_file(task.config, task.workdir)
  task.text_tokenizer  # trains it into the workdir if needed
  own = os.path.join(task.workdir, "tokenizer.model")
  if os.path.basename(path) == "tokenizer.model" and not os.path.exists(own):
    os.makedirs(task.workdir, exist_ok=True)
    shutil.copyfile(path, own + ".tmp")
    os.replace(own + ".tmp", own)
  run_record.record_or_check(
      task.workdir, "tokenizer.json", {"sha256": export.sha256_file(path)},
      "text tokenizer", "Train with the tokenizer this workdir was trained "
      "with (data.text_tokenizer_path), or use a new --workdir.")
