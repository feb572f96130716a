"""Text tokenizers: florax's own SentencePiece, and imported ones.

Every tokenizer shares one small interface (`TextTokenizer`) so export,
inference and the tasks never care which kind they hold: `kind`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode`, `encode_batch`,
`decode`, and `serialize()` -> (file name, bytes), the one file that travels
in an export/import directory; `from_file` reloads any kind from that file.

Kinds and their files:
  "sentencepiece"          tokenizer.model          florax's own (below)
  "clip_bpe"               tokenizer.json           CLIP's byte-level BPE
  "sentencepiece_fairseq"  sentencepiece.bpe.model  XLM-R / BEiT-3 ids
  "wordpiece"              wordpiece.json           BERT's WordPiece (FLAVA;
                                                    read from a vocab.txt or
                                                    a tokenizer.json)

An imported CLIP is useless with the wrong text ids, so the imported kinds
reproduce their reference implementations id for id (open_clip.tokenize,
transformers' XLMRobertaTokenizer and BertTokenizer);
tests/test_tokenizer_import.py and tests/test_tokenizer.py check it.

florax's own SentencePiece reserves ids 0..3: pad=0, unk=1, bos=2, eos=3.
Every encoded text is `[bos] pieces... [eos] pad...`; when a text is too long
its pieces are cut and the eos still closes the sequence, so towers that pool
at the eos token always find it. The imported kinds frame the same way with
their own special ids.
"""

from __future__ import annotations

import abc
import gzip
import html
import io
import json
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _frame(pieces: Sequence[int], max_len: int, bos: int, eos: int,
           pad: int) -> np.ndarray:
  """`[bos] pieces[:max_len-2] [eos] pad...` as int32 (max_len,).

  This is also exactly what open_clip does (it cuts `[sot] + pieces + [eot]`
  to max_len and then overwrites the last id with eot) and what
  transformers does with truncation=True, padding="max_length".
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}")
  pieces = list(pieces)[: max_len - 2]
  ids = np.full((max_len,), pad, np.int32)
  ids[0] = bos
  ids[1:1 + len(pieces)] = pieces
  ids[1 + len(pieces)] = eos
  return ids


class TextTokenizer(abc.ABC):
  """The interface every tokenizer kind shares.

  Subclasses must pickle (Grain workers are spawned, so the tokenizer travels
  to them pickled): they pickle their one serialized file and rebuild.
  """

  kind: str = ""
  # The file name `serialize` uses; `from_file` dispatches on it.
  file_name: str = ""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """One more than the largest id `encode` can return."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int: ...

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids that are not text (sorted): pad, bos, eos and, where the kind has
    them, [UNK] and [MASK]. Masked modeling never chooses them and never
    draws them as a random replacement (florax.data.masking)."""
    ids = {self.pad_id, self.bos_id, self.eos_id}
    for name in ("unk_id", "mask_id"):
      if getattr(self, name, None) is not None:
        ids.add(int(getattr(self, name)))
    return tuple(sorted(ids))

  @abc.abstractmethod
  def pieces(self, text: str) -> list[int]:
    """The ids of `text` without the bos/eos framing or truncation."""

  def pieces_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.pieces(t) for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str: ...

  @abc.abstractmethod
  def serialize(self) -> tuple[str, bytes]:
    """(file name, bytes): the one file that reloads this tokenizer."""

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """int32 (max_len,): bos, pieces, eos, then padding; long texts are cut
    so that eos still closes the sequence."""
    return _frame(self.pieces(text), max_len, self.bos_id, self.eos_id,
                  self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 (len(texts), max_len)."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of texts, got one str; "
                      "use encode for a single text")
    if len(texts) == 0:  # pylint: disable=g-explicit-length-test
      return np.zeros((0, max_len), np.int32)
    return np.stack([_frame(p, max_len, self.bos_id, self.eos_id, self.pad_id)
                     for p in self.pieces_batch(list(texts))])

  def save(self, directory: str) -> str:
    """Writes `serialize()` into `directory`; returns the file's path."""
    name, blob = self.serialize()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
    return path


class Tokenizer(TextTokenizer):
  """florax's own SentencePiece model (pad=0, unk=1, bos=2, eos=3)."""

  kind = "sentencepiece"
  file_name = "tokenizer.model"

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(),
        self._sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(
          "tokenizer model has special ids (pad, unk, bos, eos) = "
          f"{(self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())}"
          f"; florax expects {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (an XLM-R / "
          "BEiT-3 model is loaded with kind='sentencepiece_fairseq')")

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

  pad_id = property(lambda self: PAD_ID)
  unk_id = property(lambda self: UNK_ID)
  bos_id = property(lambda self: BOS_ID)
  eos_id = property(lambda self: EOS_ID)

  def pieces(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

  def serialize(self) -> tuple[str, bytes]:
    return self.file_name, self._proto


# -- CLIP ---------------------------------------------------------------------

# CLIP's pre-tokenizer regex (OpenAI CLIP / open_clip SimpleTokenizer), run by
# the tokenizers library's Oniguruma engine. open_clip compiles it with
# re.IGNORECASE and puts its two special tokens first; the case-insensitive
# flag matters even on lower-cased text (`'ſ` matches `'s` under case folding).
_CLIP_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                 r"""[^\s\p{L}\p{N}]+""")
_CLIP_EOW = "</w>"
# open_clip names its special tokens <start_of_text>/<end_of_text>; Hugging
# Face's CLIP vocabulary names the same ids <|startoftext|>/<|endoftext|>.
_CLIP_SPECIALS = (("<start_of_text>", "<end_of_text>"),
                  ("<|startoftext|>", "<|endoftext|>"))
# open_clip's SimpleTokenizer reads merges[1:49152-256-2+1] of its file: line
# 0 is a header; the vocabulary is 256 bytes, 256 bytes+</w>, the merges, sot,
# eot = 49408 ids for OpenAI's file.
_CLIP_MAX_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table.

  Printable latin-1 bytes map to themselves, the other 68 bytes to U+0100...
  in byte order. It fixes the order of CLIP's first 512 ids; the tokenizers
  library's ByteLevel pre-tokenizer uses the same table.
  """
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  table = {b: chr(b) for b in keep}
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + len(table) - len(keep))
  return table  # insertion order: the printable bytes first, as CLIP's ids


try:  # ftfy is optional: open_clip cleans with it when present.
  import ftfy as _ftfy  # pylint: disable=g-import-not-at-top
except ImportError:
  _ftfy = None


def clip_clean(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, html unescape (twice), whitespace
  collapsed, stripped, lower-cased.

  Without ftfy only its Unicode NFC step is applied; ftfy also repairs
  mojibake, uncurls quotes, narrows full-width characters and splits
  ligatures, so for such texts the ids differ from open_clip's unless ftfy
  is installed (`pip install ftfy`).
  """
  if not isinstance(text, str):
    raise TypeError(f"a text must be a str, got {type(text).__name__}")
  if _ftfy is not None:
    text = _ftfy.fix_text(text)
  else:
    text = unicodedata.normalize("NFC", text)
  text = html.unescape(html.unescape(text)).strip()
  cleaned = " ".join(text.split()).strip().lower()
  try:
    cleaned.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(
        f"text {text!r} is not valid UTF-8 (a lone surrogate); ftfy repairs "
        "it as open_clip does: pip install ftfy") from None
  return cleaned


class ClipTokenizer(TextTokenizer):
  """CLIP's byte-level BPE, id for id equal to `open_clip.tokenize`.

  The BPE itself runs in the Hugging Face `tokenizers` library; the text
  cleaning (`clip_clean`) runs here because ftfy has no tokenizers
  equivalent. Ids: pad=0 (open_clip pads with 0, which is also the id of
  '!': padding is whatever follows eot), bos=<start_of_text>,
  eos=<end_of_text> (49406 and 49407 for OpenAI's vocabulary).

  Build with `from_open_clip_vocab` (open_clip's bpe_simple_vocab_16e6.txt.gz
  format), `from_hf` (a Hugging Face tokenizer.json, or a directory with it or
  with vocab.json + merges.txt) or `from_file` (what `serialize` wrote).

  A text containing a special token's literal name gets that special id only
  where CLIP's regex scan reaches the name (after a letter, digit or space,
  not inside a punctuation run), as in open_clip. The names are open_clip's
  whatever the source: a Hugging Face vocabulary's <|startoftext|> and
  <|endoftext|> are renamed, so "<|endoftext|>" in a text is spelt out as
  open_clip does.
  """

  kind = "clip_bpe"
  file_name = "tokenizer.json"

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               sot_token: str = "<start_of_text>",
               eot_token: str = "<end_of_text>"):
    from tokenizers import (  # pylint: disable=g-import-not-at-top
        AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models,
        normalizers, pre_tokenizers, processors)
    for name in (sot_token, eot_token):
      if name not in vocab:
        raise ValueError(f"CLIP vocabulary has no special token {name!r}")
    merges = [tuple(m) for m in merges]
    for i, m in enumerate(merges):
      if len(m) != 2 or "".join(m) not in vocab:
        raise ValueError(f"CLIP merge {i} {m!r} is not a pair whose join is "
                         "in the vocabulary")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
      raise ValueError("CLIP vocabulary ids must be 0..n-1 without gaps")
    self._sot, self._eot = sot_token, eot_token
    self._specials = {sot_token: vocab[sot_token], eot_token: vocab[eot_token]}
    # ignore_merges=False: CLIP always merges (a word that is itself in the
    # vocabulary may still split). No unk token: every byte+</w> is in the
    # vocabulary, so nothing is unknown.
    hf = HFTokenizer(models.BPE(
        vocab=dict(vocab), merges=merges, end_of_word_suffix=_CLIP_EOW,
        continuing_subword_prefix="", fuse_unk=False, byte_fallback=False,
        ignore_merges=False))
    pattern = "(?i)" + "|".join(
        [_regex_escape(sot_token), _regex_escape(eot_token), _CLIP_PATTERN])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True + "removed": keep the regex's matches, drop the rest
        # (whitespace), i.e. re.findall.
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(sot_token, special=True),
                           AddedToken(eot_token, special=True)])
    hf.post_processor = processors.TemplateProcessing(
        single=f"{sot_token} $A {eot_token}",
        special_tokens=[(sot_token, vocab[sot_token]),
                        (eot_token, vocab[eot_token])])
    # The serialized file also works standalone in `tokenizers` (Hugging
    # Face's own CLIP normalizer: NFC, whitespace, lower-case); florax itself
    # cleans in Python (clip_clean) and so drops the normalizer below.
    hf.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    self._json = hf.to_str()
    hf.normalizer = None
    self._hf = hf
    self._vocab_size = len(vocab)

  # -- constructors -----------------------------------------------------------

  @classmethod
  def from_open_clip_vocab(cls, path: str) -> "ClipTokenizer":
    """From open_clip's merges file (bpe_simple_vocab_16e6.txt.gz, or a plain
    .txt of the same format: a header line, then one merge "a b" a line).

    Builds the vocabulary exactly as open_clip's SimpleTokenizer does,
    including its quirk that a blank line inside the read range (a file
    ending in a newline, when it has fewer than 48894 merges) takes an id.
    """
    with open(path, "rb") as f:
      blob = f.read()
    if blob[:2] == b"\x1f\x8b":
      blob = gzip.decompress(blob)
    try:
      lines = blob.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not a UTF-8 CLIP merges file: {e}"
                       ) from None
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + _CLIP_EOW for c in byte_chars]
    merges = []
    for lineno, line in enumerate(lines[1:_CLIP_MAX_MERGES + 1], start=2):
      parts = tuple(line.split())
      if not parts:
        # open_clip appends '' to its vocabulary here: an id no text reaches.
        vocab.append(f"<florax:blank_line_{lineno}>")
        continue
      if len(parts) != 2:
        raise ValueError(f"{path} line {lineno}: a CLIP merge is two symbols "
                         f"separated by a space, got {line!r}")
      merges.append(parts)
      vocab.append("".join(parts))
    sot, eot = _CLIP_SPECIALS[0]
    vocab += [sot, eot]
    index = {}
    for i, tok in enumerate(vocab):
      if tok in index:
        raise ValueError(f"{path}: token {tok!r} occurs twice in the CLIP "
                         f"vocabulary (ids {index[tok]} and {i})")
      index[tok] = i
    return cls(index, merges, sot, eot)

  @classmethod
  def from_hf(cls, path: str) -> "ClipTokenizer":
    """From a Hugging Face CLIP tokenizer: a tokenizer.json file, or a
    directory holding tokenizer.json or vocab.json + merges.txt."""
    if os.path.isdir(path):
      tj = os.path.join(path, "tokenizer.json")
      if os.path.exists(tj):
        return cls.from_json(_read_text(tj), source=tj)
      vj, mt = os.path.join(path, "vocab.json"), os.path.join(path,
                                                              "merges.txt")
      if os.path.exists(vj) and os.path.exists(mt):
        return cls.from_vocab_merges(vj, mt)
      raise ValueError(f"{path} has neither tokenizer.json nor vocab.json + "
                       "merges.txt")
    return cls.from_json(_read_text(path), source=path)

  @classmethod
  def from_vocab_merges(cls, vocab_json: str,
                        merges_txt: str) -> "ClipTokenizer":
    """From Hugging Face's vocab.json + merges.txt ("#version" header)."""
    with open(vocab_json, encoding="utf-8") as f:
      vocab = json.load(f)
    merges = []
    for lineno, line in enumerate(_read_text(merges_txt).split("\n"), 1):
      if (lineno == 1 and line.startswith("#version")) or not line.strip():
        continue
      parts = tuple(line.split())
      if len(parts) != 2:
        raise ValueError(f"{merges_txt} line {lineno}: expected a merge "
                         f"'a b', got {line!r}")
      merges.append(parts)
    return cls(_open_clip_names(vocab, vocab_json), merges)

  @classmethod
  def from_json(cls, text: str, source: str = "tokenizer.json"
                ) -> "ClipTokenizer":
    """From a tokenizers JSON string (ours or Hugging Face's CLIP)."""
    try:
      model = json.loads(text)["model"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{source} is not a tokenizers JSON file: {e}"
                       ) from None
    if (model.get("type") != "BPE"
        or model.get("end_of_word_suffix") != _CLIP_EOW):
      raise ValueError(
          f"{source} is not a CLIP tokenizer: its model is "
          f"{model.get('type')!r} with end_of_word_suffix "
          f"{model.get('end_of_word_suffix')!r}; CLIP's is a BPE with "
          f"{_CLIP_EOW!r}")
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model["merges"]]
    return cls(_open_clip_names(vocab, source), merges)

  # -- the interface ----------------------------------------------------------

  def __getstate__(self):
    return {"json": self._json}

  def __setstate__(self, state):
    other = ClipTokenizer.from_json(state["json"])
    self.__dict__.update(other.__dict__)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  pad_id = property(lambda self: 0)
  bos_id = property(lambda self: self._specials[self._sot])
  eos_id = property(lambda self: self._specials[self._eot])

  def pieces(self, text: str) -> list[int]:
    return self.pieces_batch([text])[0]

  def pieces_batch(self, texts: Sequence[str]) -> list[list[int]]:
    cleaned = [clip_clean(t) for t in texts]
    out: list[list[int] | None] = [None] * len(cleaned)
    plain = []
    for i, text in enumerate(cleaned):
      if self._sot in text or self._eot in text:
        out[i] = self._pieces_with_specials(text)
      else:
        plain.append(i)
    # The common case in one call (the library runs it in parallel). The
    # special tokens are registered as added tokens for standalone users of
    # the JSON, which would match their names anywhere; texts holding one go
    # the slow way above instead.
    try:
      encs = self._hf.encode_batch([cleaned[i] for i in plain],
                                   add_special_tokens=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"CLIP tokenizer cannot encode these texts: {e}"
                       ) from None
    for i, enc in zip(plain, encs):
      out[i] = enc.ids
    return out

  def _pieces_with_specials(self, text: str) -> list[int]:
    """open_clip's scan: its regex lists the special names first, so a name
    the scan reaches becomes one special id; anywhere else (inside a
    punctuation run) it is spelt out like any other text."""
    ids = []
    for chunk, _ in self._hf.pre_tokenizer.pre_tokenize_str(text):
      if chunk in self._specials:
        ids.append(self._specials[chunk])
      else:
        ids.extend(t.id for t in self._hf.model.tokenize(chunk))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """The cleaned, lower-cased text, with a space after every word end
    (CLIP's </w>), so punctuation comes back space-separated: "a cat!" ->
    "a cat !". Stops at eot; a leading sot is dropped."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == self.bos_id:
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    bad = [i for i in ids if not 0 <= i < self._vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the CLIP vocabulary of "
                       f"{self._vocab_size}")
    text = self._hf.decode(ids, skip_special_tokens=False)
    return " ".join(text.replace(_CLIP_EOW, " ").split())

  def serialize(self) -> tuple[str, bytes]:
    return self.file_name, self._json.encode("utf-8")


def _regex_escape(s: str) -> str:
  return "".join("\\" + c if c in r"\^$.|?*+()[]{}" else c for c in s)


def _open_clip_names(vocab: dict, source: str) -> dict[str, int]:
  """The vocabulary with open_clip's special names (see ClipTokenizer)."""
  (sot, eot), (hf_sot, hf_eot) = _CLIP_SPECIALS
  if sot in vocab and eot in vocab:
    return dict(vocab)
  if hf_sot in vocab and hf_eot in vocab and sot not in vocab and (
      eot not in vocab):
    renamed = {hf_sot: sot, hf_eot: eot}
    return {renamed.get(k, k): v for k, v in vocab.items()}
  raise ValueError(f"{source} has no CLIP start/end tokens (looked for "
                   f"{_CLIP_SPECIALS})")


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


# -- XLM-R / BEiT-3 SentencePiece ----------------------------------------------

# Longest first is not needed: no special name is a prefix of another.
_SPECIAL_SPLIT = re.compile("(<s>|</s>|<pad>|<unk>|<mask>)")


class FairseqSentencePiece(TextTokenizer):
  """A SentencePiece model used with fairseq's dictionary, as XLM-R and
  BEiT-3 do (transformers' XLMRobertaTokenizer): <s>=0, <pad>=1, </s>=2,
  <unk>=3, every other piece id shifted by 1, <mask> = pieces + 1.

  The model must have SentencePiece's default layout (unk=0, bos=1, eos=2):
  the fairseq dictionary was built over it, which is what the shift assumes.
  `encode` = [0] + ids[:max_len-2] + [2] padded with 1.

  Like transformers (and so BEiT-3), a literal "<s>", "</s>", "<pad>",
  "<unk>" or "<mask>" inside a text becomes that special id, and the text
  between them is encoded piece by piece (each piece gets SentencePiece's
  leading "▁" of its own). Web captions do hold "<s>": HTML strikethrough.
  """

  kind = "sentencepiece_fairseq"
  # XLM-R's own file name for its SentencePiece model: from_file knows it.
  file_name = "sentencepiece.bpe.model"
  OFFSET = 1
  BOS, PAD, EOS, UNK = 0, 1, 2, 3

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"not a SentencePiece model: {e}") from None
    layout = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if layout != (0, 1, 2):
      raise ValueError(
          f"SentencePiece model has (unk, bos, eos) ids {layout}; the fairseq "
          "/ XLM-R mapping needs SentencePiece's default (0, 1, 2)")

  @classmethod
  def from_path(cls, path: str) -> "FairseqSentencePiece":
    with open(path, "rb") as f:
      return cls(f.read())

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() + self.OFFSET + 1  # + <mask>

  @property
  def mask_id(self) -> int:
    return self._sp.get_piece_size() + self.OFFSET

  pad_id = property(lambda self: FairseqSentencePiece.PAD)
  unk_id = property(lambda self: FairseqSentencePiece.UNK)
  bos_id = property(lambda self: FairseqSentencePiece.BOS)
  eos_id = property(lambda self: FairseqSentencePiece.EOS)

  def _special_ids(self) -> dict[str, int]:
    return {"<s>": self.BOS, "<pad>": self.PAD, "</s>": self.EOS,
            "<unk>": self.UNK, "<mask>": self.mask_id}

  def pieces(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"a text must be a str, got {type(text).__name__}")
    specials = self._special_ids()
    ids = []
    for part in _SPECIAL_SPLIT.split(text):
      if part in specials:
        ids.append(specials[part])
      elif part:
        # SentencePiece's unk (0) is fairseq's <unk> (3); the rest shift by 1.
        ids += [p + self.OFFSET if p else self.UNK
                for p in self._sp.encode(part)]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if self.EOS in ids:
      ids = ids[:ids.index(self.EOS)]
    sp_ids = []
    for i in ids:
      if i in (self.BOS, self.PAD) or i == self.mask_id:
        continue
      if not 0 <= i < self.mask_id:
        raise ValueError(f"id {i} is outside the vocabulary of "
                         f"{self.vocab_size}")
      sp_ids.append(0 if i == self.UNK else i - self.OFFSET)
    return self._sp.decode(sp_ids)

  def serialize(self) -> tuple[str, bytes]:
    return self.file_name, self._proto


# -- BERT WordPiece (FLAVA's text tokenizer) ----------------------------------

# BERT's special tokens; bert-base-uncased (FLAVA's vocabulary) has them at
# [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103 of 30522 ids.
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# transformers' BertTokenizer default: a longer word is one [UNK].
_BERT_MAX_WORD_CHARS = 100


class WordPieceTokenizer(TextTokenizer):
  """BERT's WordPiece (bert-base-uncased: FLAVA's text tokenizer), run by
  the Hugging Face `tokenizers` library as transformers' BertTokenizerFast
  runs it: BertNormalizer (control characters dropped, whitespace made
  spaces, CJK characters spaced, lower-cased and accents stripped when
  uncased), BertPreTokenizer (split at whitespace and punctuation),
  WordPiece ('##' continuations; a word with no split, or longer than 100
  characters, is one [UNK]). A special token's literal name in a text
  ("[MASK]") is its id.

  Ids are the vocabulary's: bos=[CLS], eos=[SEP], pad=[PAD], `mask_id` =
  [MASK], `unk_id` = [UNK]; `encode` = [CLS] pieces [SEP] [PAD]...

  Build with `from_vocab` (BERT's vocab.txt: one token a line, the id is
  the line number), `from_json` (a tokenizers JSON with a WordPiece model:
  Hugging Face's tokenizer.json, or what `serialize` wrote) or `from_path`
  (either file, or a directory holding tokenizer.json or vocab.txt).
  `serialize` writes the tokenizers JSON (wordpiece.json): it keeps the
  normalizer's settings, which a vocab.txt does not.
  """

  kind = "wordpiece"
  file_name = "wordpiece.json"

  def __init__(self, json_text: str, source: str = "tokenizer.json"):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    try:
      model = json.loads(json_text)["model"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{source} is not a tokenizers JSON file: {e}"
                       ) from None
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
      raise ValueError(
          f"{source} is not a WordPiece (BERT) tokenizer: its model is "
          f"{model.get('type') if isinstance(model, dict) else model!r}")
    vocab = model.get("vocab") or {}
    missing = [t for t in _BERT_SPECIALS if t not in vocab]
    if missing:
      raise ValueError(f"{source}: the WordPiece vocabulary has no "
                       f"{', '.join(missing)} (BERT's special tokens "
                       f"{', '.join(_BERT_SPECIALS)} are needed)")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
      raise ValueError(f"{source}: WordPiece vocabulary ids must be 0..n-1 "
                       "without gaps or repeats")
    try:
      hf = HFTokenizer.from_str(json_text)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{source} does not load in tokenizers: {e}") from None
    # florax frames and pads itself (`_frame`); a tokenizer.json may carry
    # its own truncation/padding settings.
    hf.no_truncation()
    hf.no_padding()
    self._hf = hf
    self._json = hf.to_str()
    self._ids = {t: int(vocab[t]) for t in _BERT_SPECIALS}
    self._vocab_size = len(vocab)

  # -- constructors -----------------------------------------------------------

  @classmethod
  def from_vocab(cls, path: str, lowercase: bool = True
                 ) -> "WordPieceTokenizer":
    """From BERT's vocab.txt (one token a line; id = line number, from 0).
    `lowercase`: an uncased vocabulary (FLAVA's), which also strips
    accents, as transformers' BertTokenizer(do_lower_case=True)."""
    from tokenizers import (  # pylint: disable=g-import-not-at-top
        AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers,
        pre_tokenizers, processors)
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
      lines.pop()  # the file's final newline
    vocab = {}
    for i, line in enumerate(lines):
      token = line.rstrip("\r")
      if not token:
        raise ValueError(f"{path} line {i + 1} is empty: a BERT vocab.txt "
                         "holds one token a line")
      if token in vocab:
        raise ValueError(f"{path}: token {token!r} occurs twice (lines "
                         f"{vocab[token] + 1} and {i + 1})")
      vocab[token] = i
    missing = [t for t in _BERT_SPECIALS if t not in vocab]
    if missing:
      raise ValueError(f"{path} is not a BERT vocab.txt: it has no "
                       f"{', '.join(missing)}")
    hf = HFTokenizer(models.WordPiece(
        vocab=vocab, unk_token="[UNK]",
        max_input_chars_per_word=_BERT_MAX_WORD_CHARS))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None,
        lowercase=lowercase)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in _BERT_SPECIALS])
    # For standalone users of the serialized file (florax frames itself).
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]),
                        ("[SEP]", vocab["[SEP]"])])
    return cls(hf.to_str(), source=path)

  @classmethod
  def from_json(cls, text: str, source: str = "tokenizer.json"
                ) -> "WordPieceTokenizer":
    return cls(text, source=source)

  @classmethod
  def from_path(cls, path: str) -> "WordPieceTokenizer":
    """A vocab.txt (any *.txt), a tokenizers JSON, or a directory holding
    tokenizer.json (preferred) or vocab.txt (a Hugging Face model
    folder)."""
    if os.path.isdir(path):
      for name in ("tokenizer.json", cls.file_name, "vocab.txt"):
        if os.path.exists(os.path.join(path, name)):
          return cls.from_path(os.path.join(path, name))
      raise ValueError(f"{path} has neither tokenizer.json nor vocab.txt")
    if path.endswith(".txt"):
      return cls.from_vocab(path)
    return cls.from_json(_read_text(path), source=path)

  # -- the interface ----------------------------------------------------------

  def __getstate__(self):
    return {"json": self._json}

  def __setstate__(self, state):
    self.__init__(state["json"])

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  pad_id = property(lambda self: self._ids["[PAD]"])
  bos_id = property(lambda self: self._ids["[CLS]"])
  eos_id = property(lambda self: self._ids["[SEP]"])
  mask_id = property(lambda self: self._ids["[MASK]"])
  unk_id = property(lambda self: self._ids["[UNK]"])

  def pieces(self, text: str) -> list[int]:
    return self.pieces_batch([text])[0]

  def pieces_batch(self, texts: Sequence[str]) -> list[list[int]]:
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"a text must be a str, got {type(t).__name__}")
    try:
      encs = self._hf.encode_batch(list(texts), add_special_tokens=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"WordPiece tokenizer cannot encode these texts: {e}"
                       ) from None
    return [list(enc.ids) for enc in encs]

  def decode(self, ids: Iterable[int]) -> str:
    """The (lower-cased) text: a leading [CLS] dropped, stops at [SEP],
    padding dropped, '##' pieces joined; [UNK] and [MASK] stay visible."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == self.bos_id:
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    ids = [i for i in ids if i != self.pad_id]
    bad = [i for i in ids if not 0 <= i < self._vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the WordPiece vocabulary "
                       f"of {self._vocab_size}")
    return self._hf.decode(ids, skip_special_tokens=False)

  def serialize(self) -> tuple[str, bytes]:
    return self.file_name, self._json.encode("utf-8")


def _json_model_type(path: str) -> str | None:
  """The `model.type` of a tokenizers JSON file (None if it is not one)."""
  try:
    model = json.loads(_read_text(path)).get("model")
  except (OSError, ValueError, AttributeError):
    return None
  return model.get("type") if isinstance(model, dict) else None


# -- loading any kind ---------------------------------------------------------

KINDS = {cls.kind: cls for cls in (Tokenizer, ClipTokenizer,
                                   FairseqSentencePiece, WordPieceTokenizer)}
_BY_FILE_NAME = {cls.file_name: cls.kind for cls in KINDS.values()}
_BY_FILE_NAME["vocab.txt"] = WordPieceTokenizer.kind  # BERT's vocabulary


def from_file(path: str, kind: str | None = None) -> TextTokenizer:
  """Reloads any tokenizer kind from its one file.

  With `kind` None the file name decides: tokenizer.model (florax's
  SentencePiece), tokenizer.json (CLIP BPE), sentencepiece.bpe.model (fairseq
  SentencePiece, XLM-R's name for it), wordpiece.json and vocab.txt (BERT
  WordPiece); else any *.json or *.gz (open_clip's
  bpe_simple_vocab_16e6.txt.gz) is "clip_bpe" -- except a JSON file whose
  tokenizers model is a WordPiece (a BERT tokenizer.json): "wordpiece".
  Other names (BEiT-3's beit3.spm: SentencePiece models of both kinds look
  alike) need `kind`; for "clip_bpe" a .txt/.gz file is read as open_clip's
  merges format; "wordpiece" also takes a Hugging Face model directory.
  """
  if kind is None:
    name = os.path.basename(path)
    kind = _BY_FILE_NAME.get(name)
    if kind is None and name.endswith((".json", ".gz")):
      kind = ClipTokenizer.kind
    if (kind == ClipTokenizer.kind and name.endswith(".json")
        and _json_model_type(path) == "WordPiece"):
      kind = WordPieceTokenizer.kind
    if kind is None:
      raise ValueError(
          f"cannot tell the tokenizer kind of {path!r} from its file name "
          f"(known: {sorted(_BY_FILE_NAME)}); pass kind= one of "
          f"{sorted(KINDS)}")
  if kind not in KINDS:
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: "
                     f"{sorted(KINDS)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  if kind == "sentencepiece":
    return load_tokenizer(path)
  if kind == "sentencepiece_fairseq":
    return FairseqSentencePiece.from_path(path)
  if kind == WordPieceTokenizer.kind:
    return WordPieceTokenizer.from_path(path)
  if path.endswith((".gz", ".txt")):
    return ClipTokenizer.from_open_clip_vocab(path)
  return ClipTokenizer.from_hf(path)


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
