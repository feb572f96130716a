"""Video clips from florax records: temporal sampling, one crop per clip.

A clip record (florax/data/records.py) holds `frames`, its encoded frames
in time order; launch/make_dataset.py writes them from folders of frames
(florax/data/converters.py). A clip becomes the model's (frames, S, S, 3)
input here, at training time, so one conversion serves every frame count
and stride:

* time (florax/data/temporal.py): training reads `frames` frames at a
  random fitting stride of `train_strides` from a random start; evaluation
  reads `eval_stride`, centred, or `views` evenly spaced views.
* space: ONE box for every frame of a clip (so motion stays motion): in
  training a RandomResizedCrop box (`crop_scale`, `crop_ratio` of
  data.records) and an optional flip (`flip`, off for the moving digits,
  whose labels are directions); in evaluation the centre crop
  (`crop_fraction`). Only the sampled frames are decoded.
* pixels: [0, 1] then (x - mean) / std with data.records' mean / std (0.5
  gives the [-1, 1] pixels of the embedded digits and the UniCL quickstart).
* text (retrieval, with a tokenizer): one of the record's texts at random
  (training; templates on class-name texts as for images) or its first
  (evaluation), tokenised, with its UniCL label (the converter's
  dataset-wide table): every clip described by the same text is a positive.

A record without frames, or with a frame that does not decode or differs
in size from the first, is a bad record: skipped and counted like a bad
image (florax/data/bad_records.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from florax.data import bad_records
from florax.data import record_pipeline
from florax.data import records
from florax.data import temporal
from florax.data import transforms


@dataclasses.dataclass(frozen=True)
class ClipTransform(grain.transforms.RandomMap):
  """A clip record -> {'video', 'label'[, 'ids', 'caption_label']}.

  'video' is (frames, S, S, 3) float32 in training and (views, frames, S,
  S, 3) in evaluation.
  """
  frames: int
  size: int
  train_strides: tuple[int, ...] = (1, 2)
  eval_stride: int = 2
  train: bool = True
  views: int = 1
  scale: tuple[float, float] = (0.25, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  crop_fraction: float = 1.0
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  text: transforms.TextTransform | None = None
  keys: tuple[str, ...] | None = None  # keep only these outputs

  def _pixels(self, record_id: str, frames: Sequence[bytes],
              index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    needed = sorted({int(i) for i in index.ravel()})
    images = {i: transforms.open_image(record_id, frames[i]) for i in needed}
    size = images[needed[0]].size
    for i in needed:
      if images[i].size != size:
        raise bad_records.BadRecordError(
            record_id, f"frame {i} is {images[i].size[0]}x"
            f"{images[i].size[1]}, frame {needed[0]} {size[0]}x{size[1]}")
    if self.train:
      box = transforms.random_resized_crop_box(*size, rng, self.scale,
                                               self.ratio)
    else:
      box = transforms.center_crop_box(*size, self.crop_fraction)
    crops = {}
    for i in needed:
      try:
        crops[i] = transforms.decode_crop_resize(images[i], box, self.size)
      except Exception as e:  # truncated data surfaces only on decode
        raise bad_records.BadRecordError(
            record_id, f"undecodable frame {i} ({e})") from None
    x = np.stack([crops[int(i)] for i in index.ravel()]).reshape(
        index.shape + (self.size, self.size, 3)).astype(np.float32) / 255
    if self.train and self.flip and rng.random() < 0.5:
      x = x[..., ::-1, :]
    mean = np.asarray(self.mean, np.float32)
    return np.ascontiguousarray((x - mean) / np.asarray(self.std, np.float32),
                                np.float32)

  def random_map(self, element: dict, rng: np.random.Generator):
    record_id = str(element.get("id", "?"))
    try:
      frames = element.get("frames") or []
      if not frames:
        raise bad_records.BadRecordError(
            record_id, "no frames: not a clip record (convert folders of "
            "frames with launch/make_dataset.py)")
      if self.train:
        index = temporal.train_indices(len(frames), self.frames,
                                       self.train_strides, rng)
      else:
        index = temporal.eval_indices(len(frames), self.frames,
                                      self.eval_stride, self.views)
      out = {"video": self._pixels(record_id, frames, index, rng),
             "label": np.int32(element.get("label", -1))}
      if self.text is not None:
        if self.train:
          out["ids"], out["caption_label"] = self.text(element, rng)
        else:  # the clip's first text, untemplated: a fixed query
          first = dict(element, texts=(element.get("texts") or [])[:1],
                       text_labels=(element.get("text_labels") or [])[:1],
                       prompt=False)
          out["ids"], out["caption_label"] = self.text(first, rng)
      if self.keys is not None:
        out = {k: out[k] for k in self.keys}
      return out
    except bad_records.BadRecordError as e:
      return bad_records.bad_marker(e.record_id, e.reason)


def clip_transform(rc, *, frames: int, train_strides: Sequence[int],
                   eval_stride: int, train: bool, views: int = 1,
                   tokenizer=None, max_len: int = 0) -> ClipTransform:
  """The ClipTransform of a `data.records` config (record_pipeline's
  fields: image_size, crop_scale, crop_ratio, flip, crop_fraction, mean,
  std, use_templates)."""
  text = None
  if tokenizer is not None:
    text = transforms.TextTransform(tokenizer, max_len,
                                    use_templates=rc.use_templates)
  return ClipTransform(
      frames=frames, size=rc.image_size,
      train_strides=tuple(int(s) for s in train_strides),
      eval_stride=eval_stride, train=train, views=views,
      scale=tuple(rc.crop_scale), ratio=tuple(rc.crop_ratio), flip=rc.flip,
      crop_fraction=rc.crop_fraction, mean=tuple(rc.mean), std=tuple(rc.std),
      text=text)


def train_iterator(rc, transform: ClipTransform, *, process_index: int,
                   process_count: int):
  """This process's stream of clip batches (shuffle, repeat, bad records
  skipped and counted, exact resume: record_pipeline.make_train_iterator)."""
  return record_pipeline.make_train_iterator(
      rc, process_index=process_index, process_count=process_count,
      chain=[transform])


def holdout(dataset_dir: str, split: str, transform: ClipTransform
            ) -> tuple[dict[str, Any], int]:
  """Every clip of `split` under the eval sampling, and the bad-record count.

  Returns ({'video' (N, views, frames, S, S, 3), 'label' (N,), and with a
  text transform 'ids' (N, L), 'caption_label' (N,), 'caption' [N str]},
  skipped).
  """
  if transform.train:
    raise ValueError("holdout clips need an eval ClipTransform (train=False)")
  source = records.RecordSource(dataset_dir, split)
  rng = np.random.default_rng(0)  # unused by the eval sampling
  rows, captions, skipped = [], [], 0
  for i in range(len(source)):
    element = source[i]
    out = transform.random_map(element, rng)
    if bad_records.is_bad(out):
      skipped += 1
      continue
    rows.append(out)
    captions.append((element.get("texts") or [""])[0])
  if not rows:
    raise ValueError(f"{dataset_dir} split {split!r}: no usable clip record "
                     f"({skipped} bad)")
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  if transform.text is not None:
    batch["caption"] = captions
  return batch, skipped
