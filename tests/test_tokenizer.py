import pickle

import numpy as np
import pytest

from florax.data import digits
from florax.data import tokenizer as tok_lib


def test_round_trip_every_description(tmp_path):
  texts = digits.all_descriptions()
  path = str(tmp_path / "tok.model")
  tok = tok_lib.load_or_train_tokenizer(path, texts, 96)
  for t in texts:
    ids = tok.encode(t, 32)
    assert ids[0] == tok_lib.BOS_ID
    assert tok_lib.EOS_ID in ids, "the eos token must survive"
    assert tok.decode(ids) == t
  # Cached: a second call loads the same model instead of training.
  again = tok_lib.load_or_train_tokenizer(path, ["something else"], 50)
  assert again.model_proto == tok.model_proto
  # Picklable, as Grain workers need.
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(texts[3], 24),
                                tok.encode(texts[3], 24))


def test_truncation_keeps_eos_last():
  tok = tok_lib.train_tokenizer(digits.all_descriptions(), 96)
  ids = tok.encode("a black and white picture of a handwritten seven.", 6)
  assert ids.shape == (6,)
  assert ids[-1] == tok_lib.EOS_ID and ids[0] == tok_lib.BOS_ID
  assert tok_lib.PAD_ID not in ids


def test_digits_descriptions_fit_the_tiny_context():
  """With the tiny preset's vocabulary every template over every class fits
  in 16 tokens, so no class name is cut off (ENV-NOTES: a cut stalls
  training at chance)."""
  from configs import florence
  cfg = florence.get_config("tiny")
  tok = tok_lib.train_tokenizer(digits.all_descriptions(),
                                cfg.data.tokenizer_vocab_size)
  assert cfg.data.max_len == 16
  for t in digits.all_descriptions():
    ids = tok.encode(t, 16)
    assert tok.decode(ids) == t, t


# -- BERT WordPiece (kind 'wordpiece': FLAVA's text tokenizer) -----------------

# A tiny BERT vocab.txt: the id of a token is its line number.
_WP_VOCAB = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a",
             "the", "cat", "##s", "'", "s", "play", "##ing", ",", "!", ".",
             "ca", "##fe", "on", "mat", "sat", "un", "##able", "京")
_WP_TEXT = "The CAT's playing, Café [MASK] zebra!"
# Lower-cased, accents stripped, split at punctuation, '##' continuations,
# the literal [MASK] kept whole, an unknown word -> [UNK]:
#   the cat ' s play ##ing , ca ##fe [MASK] [UNK] !
_WP_PIECES = [7, 8, 10, 11, 12, 13, 14, 17, 18, 5, 2, 15]


def _wp_vocab(tmp_path, tokens=_WP_VOCAB):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return str(path)


def test_wordpiece_hand_computed_ids(tmp_path):
  path = _wp_vocab(tmp_path)
  tok = tok_lib.from_file(path)  # vocab.txt: kind 'wordpiece' by name
  assert tok.kind == "wordpiece" and tok.vocab_size == len(_WP_VOCAB)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
      0, 2, 3, 4, 5)
  # Never masked nor drawn as a random replacement ([unused0] is a piece).
  assert tok.special_ids == (0, 2, 3, 4, 5)
  assert tok.pieces(_WP_TEXT) == _WP_PIECES
  # [CLS] pieces [SEP] [PAD]...; a long text is cut and [SEP] still closes.
  np.testing.assert_array_equal(tok.encode(_WP_TEXT, 16),
                                [3] + _WP_PIECES + [4, 0, 0])
  np.testing.assert_array_equal(tok.encode(_WP_TEXT, 8),
                                [3] + _WP_PIECES[:6] + [4])
  np.testing.assert_array_equal(
      tok.encode_batch(["cats sat on the mat.", "unable \t 北京"], 10),
      [[3, 8, 9, 21, 19, 7, 20, 16, 4, 0],
       [3, 22, 23, 2, 24, 4, 0, 0, 0, 0]])  # CJK: one char a word
  assert tok.decode(tok.encode("Cats sat on the mat.", 12)) == (
      "cats sat on the mat.")
  assert tok.decode([3] + _WP_PIECES + [4, 0]) == (
      "the cat ' s playing, cafe [MASK] [UNK]!")


def test_wordpiece_serialize_reload_and_pickle(tmp_path):
  tok = tok_lib.from_file(_wp_vocab(tmp_path), kind="wordpiece")
  name, blob = tok.serialize()
  assert name == "wordpiece.json"
  saved = tok.save(str(tmp_path / "export"))
  # As a Hugging Face tokenizer.json it is a WordPiece, not CLIP's BPE.
  hf_json = tmp_path / "hf" / "tokenizer.json"
  hf_json.parent.mkdir()
  hf_json.write_bytes(blob)
  for again in (tok_lib.from_file(saved), tok_lib.from_file(str(hf_json)),
                tok_lib.from_file(str(hf_json.parent), kind="wordpiece"),
                pickle.loads(pickle.dumps(tok))):
    assert again.kind == "wordpiece" and again.mask_id == 5
    assert again.pieces(_WP_TEXT) == _WP_PIECES


def test_wordpiece_refuses_what_is_not_bert(tmp_path):
  with pytest.raises(ValueError, match=r"is not a BERT vocab.txt: it has no "
                     r"\[MASK\]"):
    tok_lib.from_file(_wp_vocab(tmp_path, _WP_VOCAB[:5] + _WP_VOCAB[6:]))
  bpe = tmp_path / "bpe.json"
  bpe.write_text('{"model": {"type": "BPE", "vocab": {}}}')
  with pytest.raises(ValueError, match="is not a WordPiece"):
    tok_lib.from_file(str(bpe), kind="wordpiece")
  with pytest.raises(ValueError, match="occurs twice"):
    tok_lib.from_file(_wp_vocab(tmp_path, _WP_VOCAB + ("cat",)))


def test_wordpiece_matches_transformers_bert(tmp_path):
  """Id for id transformers' BertTokenizer (uncased) on the same vocab.txt,
  where transformers is installed."""
  transformers = pytest.importorskip("transformers")
  path = _wp_vocab(tmp_path)
  ref = transformers.BertTokenizer(path, do_lower_case=True)
  tok = tok_lib.from_file(path)
  texts = [_WP_TEXT, "cats sat on the mat.", "  unable\tto\n play ",
           "北京 a", "[mask] [CLS]x", "a" * 120, "Ça\u0301 fe\u00a0!", ""]
  for text in texts:
    assert tok.pieces(text) == ref(text, add_special_tokens=False)[
        "input_ids"], text
    np.testing.assert_array_equal(
        tok.encode(text, 8), ref(text, max_length=8, truncation=True,
                                 padding="max_length")["input_ids"])
