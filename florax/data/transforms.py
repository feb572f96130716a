"""Picklable per-example transforms: decode + crop + flip + jitter + normalise, text.

Decoding is fused with cropping: the crop box is chosen from the image header
alone, then PIL's JPEG draft mode decodes at the smallest DCT scale (1/2, 1/4,
1/8) that still covers the box at the output resolution, and one `resize(box=)`
crops and resamples. For a 224 crop out of a large photo this skips most of the
IDCT work, which is where decode time goes (the idea of tf's
decode_and_crop_jpeg). Non-JPEG formats and decoded arrays (TFDS) take the
same path without the draft step.

All randomness comes from the `np.random.Generator` Grain passes to a
`RandomMap`, itself a function of (seed, element index): augmentations replay
identically after a restore.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from florax.data import bad_records
from florax.data import prompts
from florax.data.tokenizer import Tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(record_id: str, image: Any) -> Image.Image:
  """A lazily decoded PIL image from encoded bytes or a uint8 array."""
  if image is None or (isinstance(image, (bytes, bytearray)) and not image):
    raise bad_records.BadRecordError(record_id, "no image data")
  if isinstance(image, np.ndarray):
    arr = image
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    return Image.fromarray(np.asarray(arr, np.uint8))
  try:
    return Image.open(io.BytesIO(image))
  except Exception as e:  # PIL.UnidentifiedImageError and friends
    raise bad_records.BadRecordError(record_id,
                                     f"undecodable image ({e})") from None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """A (left, top, right, bottom) box of random area fraction and aspect.

  Area fraction ~ U(scale), log aspect ~ U(log ratio); ten tries to fit, then
  the largest centred box whose aspect is clamped into `ratio`.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop_fraction: float
                    ) -> tuple[int, int, int, int]:
  """Centred square of side crop_fraction * shorter side (resize-then-crop)."""
  side = max(1, int(round(min(width, height) * crop_fraction)))
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def decode_crop_resize(img: Image.Image, box: Sequence[int], size: int
                       ) -> np.ndarray:
  """Decodes only what `box` needs and returns a uint8 (size, size, 3) crop."""
  width, height = img.size
  bw, bh = box[2] - box[0], box[3] - box[1]
  if img.format == "JPEG":
    # draft keeps the decoded size >= the requested one, so the box still
    # has >= size pixels per side after the DCT-domain downscale.
    img.draft("RGB", (math.ceil(width * size / bw), math.ceil(height * size / bh)))
  sx, sy = img.size[0] / width, img.size[1] / height
  if img.mode != "RGB":
    img = img.convert("RGB")
  scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  out = img.resize((size, size), Image.BILINEAR, box=scaled)
  return np.asarray(out, np.uint8)


def color_jitter(x: np.ndarray, rng: np.random.Generator, strength: float
                 ) -> np.ndarray:
  """Brightness, contrast, saturation factors ~ U(1 +- strength) on [0, 1]."""
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
  x = x * b
  gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
  x = (x - gray.mean()) * c + gray.mean()
  gray = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
  x = (x - gray) * s + gray
  return np.clip(x, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Train: RandomResizedCrop + flip (+ jitter); eval: centre crop. Normalised.

  Attributes:
    size: output side in pixels.
    train: random crop/flip/jitter if True, else centre crop.
    scale: RandomResizedCrop area range (EVA uses (0.2, 1)).
    ratio: RandomResizedCrop aspect range.
    flip: random horizontal flip (train).
    color_jitter: brightness/contrast/saturation strength, 0 disables
      (BEiT-3 uses 0.4).
    crop_fraction: eval crop side / shorter image side (0.875 = 224/256).
    mean, std: per-channel normalisation of [0, 1] pixels.
  """
  size: int = 224
  train: bool = True
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  color_jitter: float = 0.0
  crop_fraction: float = 0.875
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  def __call__(self, record_id: str, image: Any,
               rng: np.random.Generator) -> np.ndarray:
    img = open_image(record_id, image)
    try:
      if self.train:
        box = random_resized_crop_box(*img.size, rng, self.scale, self.ratio)
      else:
        box = center_crop_box(*img.size, self.crop_fraction)
      pixels = decode_crop_resize(img, box, self.size)
    except bad_records.BadRecordError:
      raise
    except Exception as e:  # truncated/corrupt data surfaces only on decode
      raise bad_records.BadRecordError(record_id,
                                       f"undecodable image ({e})") from None
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    if self.train and self.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    if self.train and self.color_jitter > 0:
      x = color_jitter(x, rng, self.color_jitter)
    mean = np.asarray(self.mean, np.float32)
    inv_std = 1 / np.asarray(self.std, np.float32)
    return np.ascontiguousarray((x - mean) * inv_std, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class TextTransform:
  """Picks a text, applies a random Florence template to class names, tokenises.

  Attributes:
    tokenizer: SentencePiece `Tokenizer` (picklable).
    max_len: token length incl. bos/eos.
    templates: templates with `{}` for class-name texts (record['prompt']).
    use_templates: apply a template to class-name texts.
    drop_templated: drop class-name samples entirely (Florence stage 2).
  """
  tokenizer: Tokenizer
  max_len: int = 77
  templates: tuple[str, ...] = prompts.FLORENCE_TEMPLATES
  use_templates: bool = True
  drop_templated: bool = False

  def __call__(self, record: dict, rng: np.random.Generator):
    """Returns (ids int32 (max_len,), unicl label int32), or None to drop."""
    if self.drop_templated and record.get("prompt"):
      return None
    texts = record.get("texts") or []
    if not texts:
      raise bad_records.BadRecordError(record["id"], "no text")
    i = int(rng.integers(len(texts))) if len(texts) > 1 else 0
    text = bad_records.check_text(record["id"], texts[i])
    if record.get("prompt") and self.use_templates:
      template = self.templates[int(rng.integers(len(self.templates)))]
      text = prompts.fill(template, text)
    labels = record.get("text_labels") or []
    label = labels[i] if labels else record.get("label", -1)
    return self.tokenizer.encode(text, self.max_len), np.int32(label)


@dataclasses.dataclass(frozen=True)
class ExampleTransform(grain.transforms.RandomMap):
  """Record dict -> training example; bad records become skip markers.

  Attributes:
    image: ImageTransform or None (text-only data).
    text: TextTransform or None (image-only data).
  """
  image: ImageTransform | None = None
  text: TextTransform | None = None

  def random_map(self, element: dict, rng: np.random.Generator):
    record_id = str(element.get("id", "?"))
    try:
      if element.get("error"):
        raise bad_records.BadRecordError(record_id, element["error"])
      out = {}
      if self.text is not None:
        encoded = self.text(element, rng)
        if encoded is None:
          return None  # dropped on purpose (stage 2): not a bad record
        out["text"], out["label"] = encoded
      if self.image is not None:
        out["image"] = self.image(record_id, element.get("image"), rng)
      return out
    except bad_records.BadRecordError as e:
      return bad_records.bad_marker(e.record_id, e.reason)
