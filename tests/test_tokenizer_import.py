"""Imported tokenizers give the reference libraries' ids, id for id.

The committed fixtures (made by tests/fixtures/ref_clip_tokenizer.py) hold
open_clip's and transformers' answers for 300 varied strings, so the default
suite needs neither library. When they are importable the live tests also
check OpenAI's real CLIP vocabulary (it ships inside the open_clip package)
and recompute the fixtures.
"""

import gzip
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from florax.data import digits
from florax.data import tokenizer as tok_lib
from tests.fixtures import ref_clip_tokenizer as ref
from tests.fixtures import torch_env

CONTEXTS = (77, 16)


def _load(directory):
  with open(os.path.join(directory, "cases.json"), encoding="utf-8") as f:
    cases = json.load(f)
  with np.load(os.path.join(directory, "ids.npz")) as z:
    ids = {k: z[k] for k in z.files}
  return cases, ids


def _has_ftfy():
  try:
    import ftfy  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _mismatches(got, want, texts, rows):
  return [(texts[i], got[i].tolist(), want[i].tolist()) for i in rows
          if not np.array_equal(got[i], want[i])]


# -- CLIP ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_cases():
  cases, ids = _load(ref.CLIP_DIR)
  # Without ftfy florax applies only its NFC step (ClipTokenizer docs); the
  # fixture marks the texts whose cleaning then differs.
  rows = [i for i, f in enumerate(cases["ftfy_changes"])
          if _has_ftfy() or not f]
  return cases, ids, rows


@pytest.fixture(scope="module")
def clip_tok():
  return tok_lib.ClipTokenizer.from_open_clip_vocab(
      os.path.join(ref.CLIP_DIR, "merges.txt"))


def test_clip_matches_open_clip_fixture(clip_tok, clip_cases):
  cases, ids, rows = clip_cases
  assert len(cases["texts"]) == 300 and len(rows) >= 290
  assert clip_tok.kind == "clip_bpe"
  assert clip_tok.vocab_size == cases["vocab_size"]
  assert (clip_tok.pad_id, clip_tok.bos_id, clip_tok.eos_id) == (
      0, cases["sot"], cases["eot"])
  for n in CONTEXTS:
    got = clip_tok.encode_batch(cases["texts"], n)
    assert got.shape == (300, n) and got.dtype == np.int32
    assert _mismatches(got, ids[f"ids_{n}"], cases["texts"], rows) == []
  # The fixture does exercise truncation (eot forced last) at both lengths.
  assert (ids["ids_16"][:, -1] == cases["eot"]).sum() > 50
  assert (ids["ids_77"][:, -1] == cases["eot"]).sum() >= 5
  one = clip_tok.encode(cases["texts"][0], 16)
  np.testing.assert_array_equal(one, ids["ids_16"][0])


def test_clip_other_sources_give_the_same_ids(clip_tok, clip_cases, tmp_path):
  """open_clip's gzip file, Hugging Face's vocab.json + merges.txt (with its
  <|startoftext|> names), and from_file all build the same tokenizer."""
  cases, ids, rows = clip_cases
  with open(os.path.join(ref.CLIP_DIR, "merges.txt"), "rb") as f:
    merges = f.read()
  gz = tmp_path / "bpe_simple_vocab.txt.gz"
  gz.write_bytes(gzip.compress(merges))
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(ref.CLIP_DIR, name), hf_dir / name)
  for tok in (tok_lib.from_file(str(gz)),
              tok_lib.ClipTokenizer.from_hf(str(hf_dir))):
    got = tok.encode_batch(cases["texts"], 77)
    assert _mismatches(got, ids["ids_77"], cases["texts"], rows) == []


def test_clip_serialize_and_pickle_round_trip(clip_tok, clip_cases, tmp_path):
  cases, ids, _ = clip_cases
  name, blob = clip_tok.serialize()
  assert name == "tokenizer.json"
  path = clip_tok.save(str(tmp_path))
  assert os.path.basename(path) == "tokenizer.json"
  want = clip_tok.encode_batch(cases["texts"], 77)
  other_name = tmp_path / "my_clip.json"  # any *.json is the CLIP kind
  shutil.copy(path, other_name)
  for tok in (tok_lib.from_file(path), tok_lib.from_file(str(other_name)),
              pickle.loads(pickle.dumps(clip_tok))):
    assert tok.kind == "clip_bpe" and tok.eos_id == cases["eot"]
    np.testing.assert_array_equal(tok.encode_batch(cases["texts"], 77), want)
  # The file stands alone in the tokenizers library (no florax), framing
  # included, for plain lower-case text: open_clip's ids.
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  alone = Tokenizer.from_str(blob.decode("utf-8"))
  i = cases["texts"].index("a photo of a lamp in the style of a painting")
  row = ids["ids_77"][i].tolist()
  assert alone.encode(cases["texts"][i]).ids == row[:row.index(
      cases["eot"]) + 1]


def test_clip_decode_matches_open_clip(clip_tok, clip_cases):
  cases, _, rows = clip_cases
  checked = 0
  for i in rows:
    text = cases["texts"][i]
    if "_of_text>" in text:
      continue  # decode stops at the first eot, open_clip's does not
    n = len(clip_tok.pieces(text)) + 2  # no truncation
    got = clip_tok.decode(clip_tok.encode(text, n))
    assert got == " ".join(cases["open_clip_decode"][i].split()), text
    checked += 1
  assert checked > 250
  # Words and single spaces only: decode gives back the cleaned text.
  plain = "  A Dog RUNS\tacross  the field  "
  assert clip_tok.decode(clip_tok.encode(plain, 77)) == (
      "a dog runs across the field")


def test_clip_bad_files(tmp_path):
  bad = tmp_path / "merges.txt"
  bad.write_text("#version\na b c\n", encoding="utf-8")
  with pytest.raises(ValueError, match="line 2"):
    tok_lib.ClipTokenizer.from_open_clip_vocab(str(bad))
  other = tmp_path / "tokenizer.json"
  # (a WordPiece tokenizer.json is the 'wordpiece' kind's: test_tokenizer.py)
  other.write_text(json.dumps({"model": {"type": "Unigram"}}))
  with pytest.raises(ValueError, match="not a CLIP tokenizer"):
    tok_lib.from_file(str(other))
  with pytest.raises(ValueError, match="max_len"):
    tok_lib.ClipTokenizer.from_open_clip_vocab(
        os.path.join(ref.CLIP_DIR, "merges.txt")).encode("a", 1)


# -- XLM-R / BEiT-3 SentencePiece ---------------------------------------------

@pytest.fixture(scope="module")
def xlmr():
  cases, ids = _load(ref.XLMR_DIR)
  tok = tok_lib.from_file(
      os.path.join(ref.XLMR_DIR, "sentencepiece.bpe.model"))
  return tok, cases, ids


def test_fairseq_matches_transformers_fixture(xlmr):
  tok, cases, ids = xlmr
  assert tok.kind == "sentencepiece_fairseq"
  assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == cases["vocab_size"]
  assert tok.mask_id == cases["mask_id"]
  texts = cases["texts"]
  # One text where transformers 5's tokenizers-run normalizer drops a second
  # combining accent that SentencePiece keeps; its expected ids are
  # SentencePiece's (what XLM-R/BEiT-3 were trained with), see the maker.
  assert len(cases["sentencepiece_not_transformers"]) <= 2
  for n in CONTEXTS:
    got = tok.encode_batch(texts, n)
    assert _mismatches(got, ids[f"ids_{n}"], texts, range(len(texts))) == []
  assert (ids["ids_16"][:, -1] == 2).sum() > 50  # truncation is exercised


def test_fairseq_round_trips(xlmr, tmp_path):
  tok, cases, _ = xlmr
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = cases["texts"]
  want = tok.encode_batch(texts, 77)
  name, _ = tok.serialize()
  assert name == "sentencepiece.bpe.model"
  renamed = tmp_path / "beit3.spm"  # BEiT-3's name: needs the kind
  renamed.write_bytes(tok.serialize()[1])
  with pytest.raises(ValueError, match="kind"):
    tok_lib.from_file(str(renamed))
  for other in (tok_lib.from_file(tok.save(str(tmp_path / "x"))),
                tok_lib.from_file(str(renamed), kind="sentencepiece_fairseq"),
                pickle.loads(pickle.dumps(tok))):
    np.testing.assert_array_equal(other.encode_batch(texts, 77), want)
  # decode inverts encode as SentencePiece itself does
  sp = spm.SentencePieceProcessor(
      model_file=os.path.join(ref.XLMR_DIR, "sentencepiece.bpe.model"))
  for text in texts:
    if "<" not in text:
      n = len(tok.pieces(text)) + 2
      assert tok.decode(tok.encode(text, n)) == sp.decode(sp.encode(text))
  # florax's own model has another special layout: refused, not misread
  own = tok_lib.train_tokenizer(digits.all_descriptions(), 96)
  with pytest.raises(ValueError, match="unk, bos, eos"):
    tok_lib.FairseqSentencePiece(own.model_proto)
  with pytest.raises(ValueError, match="sentencepiece_fairseq"):
    tok_lib.Tokenizer(tok.serialize()[1])


def test_florax_sentencepiece_shares_the_interface(tmp_path):
  own = tok_lib.train_tokenizer(digits.all_descriptions(), 96)
  assert own.kind == "sentencepiece"
  assert (own.pad_id, own.bos_id, own.eos_id) == (
      tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID)
  path = own.save(str(tmp_path))
  assert os.path.basename(path) == "tokenizer.model"
  back = tok_lib.from_file(path)
  assert isinstance(back, tok_lib.Tokenizer)
  texts = digits.all_descriptions()
  np.testing.assert_array_equal(back.encode_batch(texts, 16),
                                own.encode_batch(texts, 16))
  with pytest.raises(ValueError, match="unknown tokenizer kind"):
    tok_lib.from_file(path, kind="unigram")
  with pytest.raises(FileNotFoundError):
    tok_lib.from_file(str(tmp_path / "tokenizer.json"))


# -- live: the reference libraries themselves ---------------------------------

def test_live_open_clip_real_vocabulary_and_fixture(tmp_path):
  torch_env.require_open_clip()
  import open_clip  # pylint: disable=g-import-not-at-top
  oct_mod = open_clip.tokenizer
  texts = ref.test_strings()
  real = tok_lib.ClipTokenizer.from_open_clip_vocab(oct_mod.default_bpe())
  assert (real.vocab_size, real.bos_id, real.eos_id) == (49408, 49406, 49407)
  for n in (77, 16):
    want = open_clip.tokenize(texts, context_length=n).numpy()
    got = real.encode_batch(texts, n)
    assert _mismatches(got, want, texts, range(len(texts))) == []
  # The committed fixture is what the maker writes today, byte for byte.
  summary = ref.make(str(tmp_path / "clip"))
  assert summary["texts"] == 300
  for name in ("merges.txt", "vocab.json", "cases.json"):
    with open(os.path.join(ref.CLIP_DIR, name), "rb") as f1, open(
        tmp_path / "clip" / name, "rb") as f2:
      assert f1.read() == f2.read(), name
  _, ids = _load(str(tmp_path / "clip"))
  _, committed = _load(ref.CLIP_DIR)
  for k in committed:
    np.testing.assert_array_equal(ids[k], committed[k])
  # open_clip's quirk: a merges file ending in a newline gives its blank
  # last line an id, moving sot/eot up by one; florax follows.
  with open(os.path.join(ref.CLIP_DIR, "merges.txt"), "rb") as f:
    blob = f.read() + b"\n"
  gz = str(tmp_path / "newline.txt.gz")
  with open(gz, "wb") as f:
    f.write(gzip.compress(blob))
  simple = oct_mod.SimpleTokenizer(bpe_path=gz)
  tok = tok_lib.ClipTokenizer.from_open_clip_vocab(gz)
  assert tok.eos_id == simple.eot_token_id
  np.testing.assert_array_equal(tok.encode_batch(texts[:50], 16),
                                simple(texts[:50], context_length=16).numpy())


def test_live_transformers(tmp_path):
  pytest.importorskip("transformers")
  from transformers import CLIPTokenizer, XLMRobertaTokenizer  # pylint: disable=g-import-not-at-top
  # XLM-R: the live library against florax, on every fixture text.
  cases, _ = _load(ref.XLMR_DIR)
  texts = cases["texts"]
  hf = XLMRobertaTokenizer.from_pretrained(ref.XLMR_DIR)
  tok = tok_lib.from_file(os.path.join(ref.XLMR_DIR,
                                       "sentencepiece.bpe.model"))
  assert tok.vocab_size == len(hf) and tok.mask_id == hf.mask_token_id
  want = np.asarray(hf(texts, max_length=77, truncation=True,
                       padding="max_length")["input_ids"])
  got = tok.encode_batch(texts, 77)
  differ = {i for i in range(len(texts)) if not np.array_equal(got[i],
                                                               want[i])}
  assert differ == {int(i) for i in cases["sentencepiece_not_transformers"]}
  # CLIP: a tokenizer.json that transformers itself writes loads into florax
  # with open_clip's ids (transformers' own CLIP tokenizer differs from
  # open_clip on html entities, ftfy repairs and case folding).
  clip_cases, clip_ids = _load(ref.CLIP_DIR)
  hf_clip = CLIPTokenizer(vocab=os.path.join(ref.CLIP_DIR, "vocab.json"),
                          merges=os.path.join(ref.CLIP_DIR, "merges.txt"))
  hf_clip.save_pretrained(str(tmp_path / "hf"))
  clip = tok_lib.ClipTokenizer.from_hf(str(tmp_path / "hf" /
                                           "tokenizer.json"))
  np.testing.assert_array_equal(
      clip.encode_batch(clip_cases["texts"], 77), clip_ids["ids_77"])
