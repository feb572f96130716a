"""BEiT-3's masked data modeling batches on your own data.

The same three parts, masking recipes, fixed composition and (rows, n //
rows) layout as `florax.data.beit3_digits` (read it first), fed by the
record pipeline's sources instead of the embedded digits:

  image  the images of `data.records` (records directory, captions file or
         TFDS: florax.data.record_pipeline.make_source), augmented as that
         pipeline does (`train_augment`, crops, flip, colour jitter,
         mean/std), 40% of the patches block-masked (MIM);
  text   a text-only corpus: `data.text_corpus` (a UTF-8 file, one text
         per line; BEiT-3's 160 GB of text is that), else the captions of
         the same records (class-name records through the Florence
         templates, as UniCL reads them), BERT-masked (MLM);
  pair   (image, one of its texts) from the records, masked for MVLM.

Each part is its own Grain pipeline over its own shuffle of the source
(seeded per part), sharded per process and skipping bad records as the
record pipeline does (`data/skipped` is logged; too many stop the run with
the first reasons); the FixedComposition of the three restores exactly
from the checkpointed positions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import grain
import ml_collections
import numpy as np

from florax.data import bad_records
from florax.data import beit3_digits
from florax.data import mixtures
from florax.data import record_pipeline
from florax.data import transforms
from florax.data.tokenizer import TextTokenizer

PARTS = beit3_digits.PARTS


@dataclasses.dataclass(frozen=True)
class _Masked(grain.transforms.RandomMap):
  """Applies a part's masking to a transformed record; skip markers of bad
  records pass through to the skipping stage."""
  part: str
  settings: beit3_digits.MaskSettings

  def random_map(self, element, rng: np.random.Generator):
    if bad_records.is_bad(element):
      return element
    s = self.settings
    if self.part == "image":
      return {"images": element["image"], "image_mask": s.block_mask(rng)}
    if self.part == "text":
      return beit3_digits.text_fields(element["text"], rng, s, s.mlm_rate)
    return beit3_digits.mask_pair(element["text"], element["image"], rng, s)


@dataclasses.dataclass(frozen=True)
class _CorpusLine(grain.transforms.RandomMap):
  """A line of the text corpus -> {'text': ids}, or a skip marker for an
  unusable line (empty, not text)."""
  tokenizer: TextTokenizer
  max_len: int

  def random_map(self, element, rng: np.random.Generator):
    index, line = element
    try:
      text = bad_records.check_text(f"line {index + 1}", line)
    except bad_records.BadRecordError as e:
      return bad_records.bad_marker(e.record_id, e.reason)
    return {"text": self.tokenizer.encode(text, self.max_len)}


# Record-pipeline fields the parts decide themselves (which of image and
# text a part reads, its masking) or that this pipeline does not run
# (worker processes): refused in data.records rather than ignored.
PART_OWNED_FIELDS = ("image", "text", "image_mask", "text_mask",
                     "tokenizer_path", "tokenizer_kind", "max_text_len",
                     "drop_templated", "num_workers", "worker_buffer_size",
                     "shuffle", "num_epochs")


def records_config() -> ml_collections.ConfigDict:
  """`data.records` of a BEiT-3 config: the record pipeline's user fields
  less PART_OWNED_FIELDS, with BEiT-3's augmentation (§2.3: random resized
  crop, flip, colour jitter 0.4) and unilm's [-1, 1] normalisation."""
  fields = {k: v for k, v in record_pipeline.user_data_config().items()
            if k not in PART_OWNED_FIELDS}
  cfg = ml_collections.ConfigDict(fields)
  cfg.color_jitter = 0.4
  cfg.mean = cfg.std = (0.5, 0.5, 0.5)
  return cfg


def validate(data) -> None:
  """Checks a task's `data` for the records path (data.name records /
  captions / tfds): data.records' fields, its path, the text tokenizer
  (only the digits demo trains its own) and data.text_corpus. ValueError
  naming the key."""
  records = data.get("records")
  if records is None:
    raise ValueError(f"data.name={data.name!r} reads data.records (the "
                     "record pipeline's fields: path, split, augmentation, "
                     "...)")
  known = set(records_config())
  unknown = sorted(set(records) - known)
  if unknown:
    raise ValueError(f"data.records has unknown fields {unknown}; known: "
                     f"{sorted(known)}")
  if data.name in ("records", "captions") and not records.path:
    raise ValueError(f"data.name={data.name!r} needs data.records.path")
  if not data.text_tokenizer_path:
    raise ValueError(
        f"data.name={data.name!r}: set data.text_tokenizer_path (the "
        "pretrained model's: BEiT-3's beit3.spm with data.text_tokenizer_kind"
        "=sentencepiece_fairseq, FLAVA's BERT vocab.txt with kind wordpiece; "
        "or a florax SentencePiece from `python -m launch.train_tokenizer`); "
        "only the digits demo trains its own")
  corpus = data.get("text_corpus", "")
  if corpus and not os.path.isfile(corpus):
    raise ValueError(f"data.text_corpus {corpus!r} does not exist (a UTF-8 "
                     "file, one text per line; empty: the records' texts)")


def with_source(data) -> ml_collections.ConfigDict:
  """`data.records` with the task-owned field `source` (= data.name)."""
  rc = ml_collections.ConfigDict(data.records.to_dict())
  rc.source = data.name
  return rc


def preprocess_spec(data) -> dict:
  """The eval-time transform of records-trained images (what an export
  records and a frozen tokenizer un-does): resize + centre crop at
  crop_fraction, the records' mean/std."""
  from florax.data import preprocess  # pylint: disable=g-import-not-at-top
  r = data.records
  return preprocess.resize_center_crop_spec(
      data.image_size, round(data.image_size / r.crop_fraction), r.mean, r.std)


def _group(batch: dict, rows: int | None) -> dict:
  """beit3_digits.group_rows, leaving the per-example skip flags flat for
  the accounting iterator (it counts examples by their length); rows None:
  the batch as is (FLAVA's one-kind steps)."""
  if rows is None:
    return batch
  flags = {k: batch[k] for k in batch if k == bad_records.SKIPPED_KEY}
  return {**beit3_digits.group_rows(
      {k: v for k, v in batch.items() if k not in flags}, rows), **flags}


def read_corpus(path: str) -> list[str]:
  """The lines of a UTF-8 text file (a blank line is a bad record,
  skipped and counted like any other)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.text_corpus {path!r} does not exist")
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line.rstrip("\n") for line in f]
  if not lines:
    raise ValueError(f"data.text_corpus {path!r} is empty")
  return lines


def _record_cfg(records: ml_collections.ConfigDict, image_size: int,
                max_len: int) -> ml_collections.ConfigDict:
  cfg = record_pipeline.default_data_config()
  cfg.update(records.to_dict())
  cfg.image_size, cfg.max_text_len = image_size, max_len
  return cfg


def part_dataset(part: str, *, records: ml_collections.ConfigDict,
                 text_corpus: str, tokenizer: TextTokenizer,
                 settings: beit3_digits.MaskSettings, image_size: int,
                 max_len: int, batch_size: int, rows: int | None, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 source=None):
  """This process's stream of one part (module docstring), as a
  SkipAccountingIterator of (rows, batch_size // rows, ...) batches
  ((batch_size, ...) with rows None: FLAVA's kinds)."""
  cfg = _record_cfg(records, image_size, max_len)
  part_seed = seed + 1000 * (1 + PARTS.index(part))
  if part == "text" and text_corpus:
    ds = grain.MapDataset.source(
        list(enumerate(read_corpus(text_corpus))))
    chain = [_CorpusLine(tokenizer, max_len)]
  else:
    ds = grain.MapDataset.source(
        source if source is not None else record_pipeline.make_source(cfg))
    image = None
    if part != "text":
      image = transforms.ImageTransform(
          size=image_size, train=cfg.train_augment,
          scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
          flip=cfg.flip, color_jitter=cfg.color_jitter,
          crop_fraction=cfg.crop_fraction, mean=tuple(cfg.mean),
          std=tuple(cfg.std))
    text = None
    if part != "image":
      text = transforms.TextTransform(tokenizer, max_len,
                                      use_templates=cfg.use_templates)
    chain = [transforms.ExampleTransform(image=image, text=text)]
  ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(
        f"the {part} part: process {process_index} of {process_count} "
        f"holds {len(ds)} examples, fewer than its {batch_size} a step")
  ds = ds.shuffle(seed=part_seed).repeat()
  for i, t in enumerate(chain + [_Masked(part, settings)]):
    ds = ds.random_map(t, seed=int(np.random.SeedSequence(
        [part_seed, process_index, i]).generate_state(1)[0]))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
  it = bad_records.SkipBadRecordsIterDataset(
      it, cfg.max_skip_fraction, cfg.min_seen_for_skip_limit)
  it = it.batch(batch_size, drop_remainder=True)
  it = it.map(lambda b: _group(b, rows))
  layout = {"process_index": process_index, "process_count": process_count,
            "num_workers": 0, "local_batch": batch_size}
  return bad_records.SkipAccountingIterator(
      iter(it), cfg.max_skip_fraction, cfg.min_seen_for_skip_limit, layout)


def mdm_iterator(*, records: ml_collections.ConfigDict, text_corpus: str,
                 tokenizer: TextTokenizer,
                 settings: beit3_digits.MaskSettings, composition: dict,
                 image_size: int, max_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 parts: Sequence[str] = PARTS, source=None
                 ) -> mixtures.FixedComposition:
  """This process's BEiT-3 stream over `records` (beit3_digits.mdm_iterator's
  layout and composition rules). `source` overrides the records' source
  (tests)."""
  rows = beit3_digits.rows_per_step(composition)
  if rows % process_count:
    raise ValueError(
        f"data.composition {dict(composition)}: the common divisor {rows} of "
        f"its sizes is not divisible by the {process_count} processes")
  local_rows = rows // process_count
  return mixtures.FixedComposition({
      p: part_dataset(
          p, records=records, text_corpus=text_corpus, tokenizer=tokenizer,
          settings=settings, image_size=image_size, max_len=max_len,
          batch_size=int(composition[p]) // process_count, rows=local_rows,
          seed=seed, process_index=process_index,
          process_count=process_count, source=source)
      for p in parts})
