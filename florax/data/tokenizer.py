"""SentencePiece tokenizer: training from texts, caching, batch encoding.

Ids 0..3 are reserved: pad=0, unk=1, bos=2, eos=3. Every encoded text is
`[bos] pieces... [eos] pad...`; when a text is too long its pieces are cut and
the eos still closes the sequence, so towers that pool at the eos token
always find it.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A picklable SentencePiece wrapper (Grain workers are spawned)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(),
        self._sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(
          "tokenizer model has special ids (pad, unk, bos, eos) = "
          f"{(self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())}"
          f"; florax expects {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """Returns int32 (max_len,) ids: bos, pieces, eos, then padding."""
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}")
    pieces = self._sp.encode(text)[: max_len - 2]
    ids = np.full((max_len,), PAD_ID, np.int32)
    ids[0] = BOS_ID
    ids[1:1 + len(pieces)] = pieces
    ids[1 + len(pieces)] = EOS_ID
    return ids

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    return np.stack([self.encode(t, max_len) for t in texts]) if texts else (
        np.zeros((0, max_len), np.int32))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    model_type: str = "bpe") -> Tokenizer:
  """Trains a SentencePiece model in memory.

  `hard_vocab_limit=False` lets a small corpus end below `vocab_size` instead
  of failing; BPE keeps whole words of a small corpus as single pieces where
  unigram collapses to characters (see ENV-NOTES).
  """
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("cannot train a tokenizer on an empty corpus")
  for t in texts:
    try:
      t.encode("utf-8")
    except UnicodeEncodeError:
      # SentencePiece fails on a lone surrogate with an opaque pybind error
      raise ValueError(
          f"tokenizer corpus text {t!r} is not valid UTF-8; build the corpus "
          "with florax.data.corpus.training_texts, which skips such texts"
      ) from None
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model,
      vocab_size=vocab_size, model_type=model_type,
      hard_vocab_limit=False, character_coverage=1.0,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      minloglevel=2)
  return Tokenizer(model.getvalue())


def load_tokenizer(path: str) -> Tokenizer:
  with open(path, "rb") as f:
    return Tokenizer(f.read())


def load_or_train_tokenizer(path: str, texts: Iterable[str], vocab_size: int,
                            model_type: str = "bpe") -> Tokenizer:
  """Loads the cached model at `path`, or trains one and caches it there."""
  if os.path.exists(path):
    return load_tokenizer(path)
  tok = train_tokenizer(texts, vocab_size, model_type)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(tok.model_proto)
  os.replace(tmp, path)  # atomic: a killed run never leaves half a model
  return tok
