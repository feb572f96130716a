"""Evaluation splits from config: images (preprocessed), labels, class names
and captions, for the embedded digits or the user's own data.

An evaluator's `data` config:
  source       'digits' (the embedded held-out split) | 'records' (a
               `launch.make_dataset` directory) | 'tfds'
  path         records: the dataset directory
  split        records/tfds split, e.g. 'validation' (make_dataset
               --holdout_fraction writes it) or 'train'
  names_file   one class name per line, overriding the dataset's names
  tfds_name    tfds: dataset name (its label names become class names)
  max_examples cap (0: all); the first examples in the split's order
Every process loads the same split in the same order (evaluation feeds it
over the mesh, see mesh_map.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from florax.data import bad_records
from florax.data import digits
from florax.data import pipeline
from florax.data import preprocess


@dataclasses.dataclass
class EvalSet:
  """One evaluation split.

  Attributes:
    images: float32 (n, S, S, 3), preprocessed as inference will.
    labels: int32 (n,) class ids, or None.
    class_names: name of every class id, or None.
    texts: captions; `text_image[j]` is the image caption j describes.
    class_prompts: per class, its own full prompts (datasets that come with
      templates of their own, like digits), or None.
    skipped: records that could not be decoded.
  """
  images: np.ndarray
  labels: np.ndarray | None
  class_names: list[str] | None
  texts: list[str]
  text_image: np.ndarray
  class_prompts: list[list[str]] | None = None
  skipped: int = 0


def _digits(split: str, size: int, max_examples: int) -> EvalSet:
  if split in ("holdout", "validation", ""):
    images, labels = pipeline.holdout_arrays(size)
  else:
    raw, labels = digits.load_split(split)
    images = np.stack([digits.to_rgb(x, size) for x in raw])
  if max_examples:
    images, labels = images[:max_examples], labels[:max_examples]
  # Image i is described once, by template i mod T of its class.
  texts = [digits.describe(int(c), digits.TEMPLATES[i % len(digits.TEMPLATES)])
           for i, c in enumerate(labels)]
  return EvalSet(images, labels, list(digits.CLASS_WORDS), texts,
                 np.arange(len(labels)),
                 [[digits.describe(c, t) for t in digits.TEMPLATES]
                  for c in range(len(digits.CLASS_WORDS))])


def _from_records(examples, class_names, spec, max_examples) -> EvalSet:
  images, labels, texts, text_image, skipped = [], [], [], [], 0
  for record in examples:
    if max_examples and len(images) >= max_examples:
      break
    try:
      x = preprocess.apply(record["image"], spec, record.get("id", "?"))
    except (bad_records.BadRecordError, ValueError, OSError):
      skipped += 1
      continue
    for t in record.get("texts") or []:
      if isinstance(t, str) and t.strip() and not record.get("prompt"):
        texts.append(t)
        text_image.append(len(images))
    images.append(x)
    labels.append(record.get("label", -1))
  if not images:
    raise ValueError("the evaluation split has no decodable images")
  labels = np.asarray(labels, np.int32)
  return EvalSet(np.stack(images), labels if (labels >= 0).all() else None,
                 class_names, texts, np.asarray(text_image, np.int64),
                 skipped=skipped)


def load(data_cfg, spec: dict) -> EvalSet:
  """The split named by `data_cfg`, preprocessed with `spec` (see
  florax.data.preprocess)."""
  source = data_cfg.get("source", "digits")
  max_examples = int(data_cfg.get("max_examples", 0) or 0)
  split = data_cfg.get("split", "")
  if source == "digits":
    out = _digits(split or "holdout", spec["size"], max_examples)
  elif source == "records":
    from florax.data import records  # pylint: disable=g-import-not-at-top
    path = data_cfg.get("path", "")
    if not path:
      raise ValueError("an evaluator with data.source='records' needs "
                       "data.path (a make_dataset directory)")
    split = split or "validation"
    if split not in records.split_names(path):
      raise ValueError(
          f"{path} has no split {split!r} (it has {records.split_names(path)});"
          " write one with python -m launch.make_dataset --holdout_fraction")
    meta = records.read_metadata(path)
    source_ = records.RecordSource(path, split)
    out = _from_records((source_[i] for i in range(len(source_))),
                        meta.get("class_names"), spec, max_examples)
  elif source == "tfds":
    from florax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    src = TfdsSource(data_cfg.tfds_name, split or "validation",
                     data_cfg.get("data_dir") or None)
    out = _from_records((src[i] for i in range(len(src))),
                        getattr(src, "class_names", None), spec, max_examples)
  else:
    raise ValueError(f"evaluator data.source={source!r}: use 'digits', "
                     "'records' or 'tfds'")
  names_file = data_cfg.get("names_file", "")
  if names_file:
    from florax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
    out.class_names = zeroshot.load_class_names(names_file)
    out.class_prompts = None
  return out
