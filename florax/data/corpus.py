"""The texts a tokenizer should be trained on: what training actually feeds.

Class-name texts (`prompt` records: class folders, TFDS labels) are never
seen bare in training: TextTransform wraps them in a random Florence template
("a photo of the {}."). So the corpus holds every template expansion of each
class name. Each distinct class name is expanded once, not once per image: the
descriptions are identical for every image of a class, and repeating them
would only inflate the corpus (ImageNet: 10M copies of 8000 texts, and a
`--max_texts` cut would then drop whole classes). Captions are kept one per
occurrence, as they are sampled. Unusable texts (empty, non-UTF-8) are
skipped, as the pipeline skips their records; SentencePiece would otherwise
fail with an opaque error on a lone surrogate.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from florax.data import bad_records
from florax.data import prompts


def tokenizer_texts(examples: Iterable[tuple[str, Sequence, bool]],
                    templates: Sequence[str] = prompts.FLORENCE_TEMPLATES
                    ) -> Iterator[str]:
  """Clean, template-expanded texts of (record id, texts, prompt) examples."""
  expanded = set()
  for record_id, texts, prompt in examples:
    for text in texts:
      try:
        text = bad_records.check_text(record_id, text)
      except bad_records.BadRecordError:
        continue  # its record is skipped in training too
      if not prompt or not templates:
        yield text
      elif text not in expanded:
        expanded.add(text)
        yield from prompts.descriptions(text, templates)


def training_texts(source: str, path: str, image_root: str | None = None
                   ) -> list[str]:
  """The tokenizer corpus of a `records` dataset dir or a `captions` file.

  Args:
    source: "records" (a converted dataset: its train split) or "captions"
      (a CSV/JSONL captions file read directly).
    path: the dataset directory or captions file.
    image_root: captions only: folder the image paths are relative to.

  Returns:
    The texts, bad ones skipped, class names template-expanded.
  """
  # imported here: records imports this module
  from florax.data import converters  # pylint: disable=g-import-not-at-top
  from florax.data import records  # pylint: disable=g-import-not-at-top
  if source == "records":
    # held-out texts stay out of the tokenizer, like out of training
    return list(records.iter_texts(path, split="train"))
  if source == "captions":
    items, _ = converters.caption_items(path, image_root)
    return list(tokenizer_texts((i.id, i.texts, i.prompt) for i in items))
  raise ValueError(f"no tokenizer corpus for data source {source!r}; "
                   "expected 'records' or 'captions'")
