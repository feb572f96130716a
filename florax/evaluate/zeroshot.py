"""Zero-shot classification: prompt-ensembled class embeddings and top-k.

A class is represented by the average of its normalised text embeddings over
a set of prompt templates ("a bad photo of a {}.", ...), re-normalised
(CLIP §3.1.4). Images are classified by the highest dot product with those
class embeddings.

Tie rule (shared with `florax.evaluate.retrieval`): pessimistic. The rank of
the true class is the number of OTHER classes whose score is >= its score, and
a prediction is correct at k iff that rank is < k. A model whose scores are
all equal (a collapsed tower) therefore scores 0, never 100%: ties can only
lower the metric, so no bug that produces ties can inflate it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# CLIP's 80 ImageNet prompt templates (CLIP paper, prompt-engineering
# notebook), in their published order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

_EPS = 1e-12


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norm <= _EPS):
    raise ValueError(
        "text encoder returned an all-zero embedding; it cannot be normalised")
  return x / norm


def class_embeddings(encode_text: Callable[[list[str]], object],
                     class_names: Sequence[str],
                     templates: Sequence[str] = IMAGENET_TEMPLATES,
                     batch_size: int = 256) -> np.ndarray:
  """Prompt-ensembled, L2-normalised class embeddings.

  For each class every template is filled with the class name and embedded;
  each embedding is L2-normalised, the class's embeddings are averaged and the
  average is normalised again.

  Args:
    encode_text: maps a list of strings to an (n, d) array (numpy or jax).
      Called with at most `batch_size` strings at a time, in class-major
      order, so an encoder that pads to fixed buckets compiles few times.
    class_names: one name per class; class i is row i of the result.
    templates: format strings, each with exactly one "{}".
    batch_size: most strings passed to one `encode_text` call.

  Returns:
    float32 numpy array (num_classes, d) with unit-norm rows.
  """
  class_names = list(class_names)
  templates = list(templates)
  if not class_names:
    raise ValueError("class_names is empty")
  if not templates:
    raise ValueError("templates is empty")
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  prompts = [t.format(name) for name in class_names for t in templates]
  chunks = []
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start:start + batch_size]
    emb = np.asarray(encode_text(batch), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(batch):
      raise ValueError(
          f"encode_text must return shape ({len(batch)}, d) for {len(batch)} "
          f"texts, got {emb.shape}")
    chunks.append(emb)
  emb = _l2_normalize(np.concatenate(chunks, axis=0).astype(np.float64))
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return _l2_normalize(emb).astype(np.float32)


def load_class_names(path: str) -> list[str]:
  """Reads class names from a text file, one per line (blank lines skipped).

  Args:
    path: file whose i-th non-blank line (stripped) is class i's name.

  Returns:
    The list of names.
  """
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f]
  names = [n for n in names if n]
  if not names:
    raise ValueError(f"class names file {path!r} has no names")
  return names


def class_names_from_info(info, label_key: str = "label",
                          underscores_to_spaces: bool = True) -> list[str]:
  """Class names from a TFDS `DatasetInfo` (or anything shaped like one).

  Args:
    info: object with `info.features[label_key].names`.
    label_key: the ClassLabel feature holding the labels.
    underscores_to_spaces: TFDS names are identifiers ("apple_pie"); prompts
      read better as words ("apple pie").

  Returns:
    The list of names, in label order.
  """
  features = info.features
  try:
    feature = features[label_key]
  except KeyError:
    keys = list(features.keys()) if hasattr(features, "keys") else "?"
    raise ValueError(
        f"dataset has no feature {label_key!r}; features are {keys}") from None
  names = getattr(feature, "names", None)
  if not names:
    raise ValueError(
        f"feature {label_key!r} is not a ClassLabel with names "
        f"(got {type(feature).__name__})")
  names = [str(n) for n in names]
  if underscores_to_spaces:
    names = [n.replace("_", " ") for n in names]
  return names


def class_names_from_tfds(name: str, label_key: str = "label",
                          underscores_to_spaces: bool = True,
                          **builder_kwargs) -> list[str]:
  """Class names from TFDS metadata: `tfds.builder(name).info`.

  Args:
    name: TFDS dataset name, e.g. "cifar10".
    label_key: the ClassLabel feature holding the labels.
    underscores_to_spaces: see `class_names_from_info`.
    **builder_kwargs: passed to `tfds.builder` (e.g. data_dir).

  Returns:
    The list of names, in label order.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder(name, **builder_kwargs).info
  return class_names_from_info(info, label_key, underscores_to_spaces)


@jax.jit
def _true_class_ranks(image_emb, class_emb, labels):
  # Pessimistic rank: other classes scoring >= the true class.
  scores = jnp.matmul(image_emb, class_emb.T,
                      precision=jax.lax.Precision.HIGHEST)
  true = jnp.take_along_axis(scores, labels[:, None], axis=1)
  other = jnp.arange(scores.shape[1])[None, :] != labels[:, None]
  return jnp.sum((scores >= true) & other, axis=1)


class TopKAccuracy:
  """Streaming zero-shot top-k accuracy against fixed class embeddings.

  Usage:
    acc = TopKAccuracy(class_emb, ks=(1, 5))
    for images_emb, labels in batches:
      acc.update(images_emb, labels)
    acc.result()  # {"top1": ..., "top5": ...}

  Only per-batch hit counts are kept on the host, so memory does not grow
  with the dataset. Tie rule: pessimistic (see module docstring).
  """

  def __init__(self, class_emb, ks: Sequence[int] = (1, 5)):
    """Args: class_emb (num_classes, d); ks: the k of each top-k reported."""
    class_emb = jnp.asarray(class_emb)
    if class_emb.ndim != 2:
      raise ValueError(f"class_emb must be (classes, d), got {class_emb.shape}")
    self.num_classes = class_emb.shape[0]
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 or k > self.num_classes for k in ks):
      raise ValueError(
          f"every k must be in [1, {self.num_classes}] (the number of "
          f"classes); got ks={ks}")
    self.class_emb = class_emb
    self.ks = ks
    self.reset()

  def reset(self):
    self.count = 0
    self.hits = {k: 0 for k in self.ks}

  def update(self, image_emb, labels, mask=None):
    """Adds a batch.

    Args:
      image_emb: (batch, d) image embeddings (need not be normalised: ranking
        per image is invariant to its scale).
      labels: (batch,) int true class ids.
      mask: optional (batch,) bool; False rows (padding) are ignored.
    """
    image_emb = jnp.asarray(image_emb)
    labels = np.asarray(labels)
    if image_emb.ndim != 2 or image_emb.shape[1] != self.class_emb.shape[1]:
      raise ValueError(
          f"image_emb must be (batch, {self.class_emb.shape[1]}), got "
          f"{image_emb.shape}")
    if labels.shape != (image_emb.shape[0],):
      raise ValueError(
          f"labels must be ({image_emb.shape[0]},), got {labels.shape}")
    keep = (np.ones(labels.shape, bool) if mask is None
            else np.asarray(mask, bool))
    if keep.shape != labels.shape:
      raise ValueError(f"mask must be {labels.shape}, got {keep.shape}")
    if keep.any() and np.any((labels[keep] < 0) |
                             (labels[keep] >= self.num_classes)):
      raise ValueError(
          f"labels must lie in [0, {self.num_classes}); got min "
          f"{labels[keep].min()}, max {labels[keep].max()}")
    safe_labels = np.where(keep, labels, 0).astype(np.int32)
    ranks = np.asarray(_true_class_ranks(image_emb, self.class_emb,
                                         jnp.asarray(safe_labels)))[keep]
    self.count += int(keep.sum())
    for k in self.ks:
      self.hits[k] += int(np.sum(ranks < k))

  def result(self) -> dict[str, float]:
    """Returns {"top{k}": fraction of images whose true class is in top k}."""
    if self.count == 0:
      raise ValueError("TopKAccuracy.result() called before any update")
    return {f"top{k}": self.hits[k] / self.count for k in self.ks}


def topk_accuracy(image_emb, class_emb, labels,
                  ks: Sequence[int] = (1, 5)) -> Mapping[str, float]:
  """One-shot top-k accuracy; same rule as `TopKAccuracy`."""
  acc = TopKAccuracy(class_emb, ks)
  acc.update(image_emb, labels)
  return acc.result()
