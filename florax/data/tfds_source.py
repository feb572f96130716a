"""A TFDS dataset prepared in array_record format, as florax record dicts.

`tfds.data_source` gives random access without TensorFlow; a feature mapping
(image key, text key, label key) from the config turns its examples into the
record dicts the transforms expect. Without a text key the class names are the
texts (Florence templates apply, `prompt=True`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from florax.data.unicl_labels import LabelTable


def _as_text(value: Any) -> Any:
  """bytes stay bytes (a bad encoding is reported per record downstream)."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  return value


class TfdsSource:
  """Grain random-access source over `tfds.data_source(name, split)`.

  Args:
    name: TFDS name, e.g. "oxford_flowers102" or "coco_captions/2017".
    split: split spec, e.g. "train" or "train[:90%]".
    data_dir: TFDS data dir (None: TFDS default).
    image_key: feature holding the image (decoded array or encoded bytes).
    text_key: feature holding a caption or a list of captions; "" or None to
      use class names of `label_key` as texts.
    label_key: ClassLabel feature ("" or None for none).
    id_key: feature used as record id (default: the example index).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", text_key: str | None = None,
               label_key: str | None = "label", id_key: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._ds = tfds.data_source(
        name, split=split, data_dir=data_dir or None,
        builder_kwargs={"file_format": "array_record"})
    self.name, self.split = name, split
    self.image_key, self.text_key = image_key, text_key or None
    self.label_key, self.id_key = label_key or None, id_key or None
    features = self._ds.dataset_info.features
    for key in (image_key, self.text_key, self.label_key, self.id_key):
      if key is not None and key not in features:
        raise KeyError(f"TFDS {name}: no feature {key!r}; features are "
                       f"{sorted(features.keys())}")
    self.class_names = None
    if self.label_key is not None and hasattr(features[self.label_key],
                                              "names"):
      self.class_names = [n.replace("_", " ")
                          for n in features[self.label_key].names]
    if self.text_key is None:
      if self.class_names is None:
        raise ValueError(f"TFDS {name}: without text_key the label feature "
                         "must be a ClassLabel with names")
      self.label_table = LabelTable.build(self.class_names)
    else:
      # Free text: one pass over the split. Convert large caption datasets
      # with launch.make_dataset instead, where this happens once.
      self.label_table = LabelTable.build(
          t for i in range(len(self._ds)) for t in self._texts(self._ds[i])
          if isinstance(t, str) and t.strip())

  def _texts(self, example) -> list:
    value = _as_text(example[self.text_key])
    return value if isinstance(value, list) else [value]

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._ds[index]
    label = int(ex[self.label_key]) if self.label_key else -1
    if self.text_key is None:
      texts, prompt = [self.class_names[label]], True
    else:
      texts, prompt = [_as_text(t) for t in self._texts(ex)], False
    text_labels = []
    try:
      text_labels = [self.label_table.label(t) for t in texts]
    except (KeyError, TypeError):
      pass  # bad text: reported by the text transform
    rid = (str(_as_text(ex[self.id_key])) if self.id_key
           else f"{self.name}/{self.split}/{index}")
    return {"id": rid, "image": ex[self.image_key], "texts": texts,
            "text_labels": text_labels, "label": label, "prompt": prompt}
