"""Trains a SentencePiece model on the texts of a florax dataset directory.

The corpus is what training feeds the text tower: captions, and class names
expanded through the prompt templates (see florax/data/corpus.py), of the
train split (held-out texts stay out).

  python -m launch.train_tokenizer --dataset=/data/cc --vocab_size=64000 \
      --out=/data/cc/spm64k.model
"""

from __future__ import annotations

import itertools

from absl import app
from absl import flags

from florax.data import records
from florax.data.tokenizer import train_tokenizer

_DATASET = flags.DEFINE_string("dataset", "", "florax dataset directory.")
_OUT = flags.DEFINE_string("out", "", "Path of the .model file to write.")
_VOCAB = flags.DEFINE_integer("vocab_size", 64_000, "Pieces (BEiT-3: 64k).")
_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"],
                          "SentencePiece model type.")
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split to read.")
_MAX_TEXTS = flags.DEFINE_integer("max_texts", 5_000_000,
                                  "Train on at most this many texts.")


def main(argv):
  del argv
  if not _DATASET.value or not _OUT.value:
    raise app.UsageError("--dataset and --out are required")
  texts = list(itertools.islice(
      records.iter_texts(_DATASET.value, _SPLIT.value), _MAX_TEXTS.value))
  tok = train_tokenizer(texts, _VOCAB.value, _TYPE.value)
  with open(_OUT.value, "wb") as f:
    f.write(tok.model_proto)
  print(f"trained {tok.vocab_size} pieces on {len(texts)} texts -> "
        f"{_OUT.value}")


if __name__ == "__main__":
  app.run(main)
