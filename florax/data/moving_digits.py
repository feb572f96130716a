"""Moving digits: generated video clips of the embedded digits (Video CoSwin's
CPU demo data, florax/tasks/video.py).

A clip is one sklearn digit (florax/data/digits.py), resized to
`digit_size` px, on a black `image_size` px canvas, moving in a straight
line in one of `DIRECTIONS` (the class label) at `speed` px per frame over
`render_frames` frames. Its caption names both what and how ("a three
moving left"), so text->video retrieval needs the digit and the motion.

Temporal sampling: a clip is `render_frames` long; the model reads `frames`
of them, frame times start + stride * (0..frames-1):
  * training: stride drawn from `train_strides` (those whose span fits),
    start uniform over every position where the span fits (speed
    augmentation and temporal jitter);
  * evaluation: `eval_stride`, centred: start = (render_frames - span) // 2
    with span = (frames - 1) * eval_stride + 1 (the "centre clip" of video
    evaluation).
Only the sampled frames are drawn (frame t puts the digit at
start_position + round(speed * t) along the motion axis), which is the same
as rendering the whole clip and picking frames.

Train clips are made from the digits train split, the held-out clips from
the holdout split (the digits the UniCL quickstart never trained on):
`holdout_clips` is a fixed set (`HOLDOUT_SEED`, clips_per_digit per holdout
digit, directions balanced by a seeded permutation, the eval temporal
sampling and the canonical caption `EVAL_TEMPLATE`).

The training stream is `digits_images.train_shard` (this process's share
of the train split) -> shuffle (reshuffled every epoch) -> repeat ->
`MakeClip` (a grain RandomMap: every random choice - direction, speed,
position, stride, start, caption template - is a function of (seed,
element index), so the iterator's state is a position and a restored
iterator continues exactly) -> batch. Examples:
  video          (frames, S, S, 3) float32 in [-1, 1]
  label          int32, the direction (index into DIRECTIONS)
  digit          int32, the digit class 0-9
  caption_label  int32, UniCL's key of the canonical caption (digit,
                 direction): every caption of the same pair is a positive
  ids            (max_len,) int32 caption tokens (only with a tokenizer)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from florax.data import digits
from florax.data import digits_images
from florax.data import temporal

DIRECTIONS = ("left", "right", "up", "down")
# (dy, dx) of one step in image coordinates (rows grow downwards).
STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}

# "{word}"/"{digit}" name the digit, "{direction}" the motion.
TEMPLATES = (
    "a {word} moving {direction}",
    "the digit {word} moving {direction}",
    "a handwritten {digit} moving {direction}",
)
EVAL_TEMPLATE = TEMPLATES[0]

HOLDOUT_SEED = 2024  # fixed forever: the held-out clips never change


def caption(digit: int, direction: int, template: str = EVAL_TEMPLATE) -> str:
  return template.format(word=digits.CLASS_WORDS[digit], digit=str(digit),
                         direction=DIRECTIONS[direction])


def caption_label(digit: int, direction: int) -> int:
  """UniCL's key of the (digit, direction) pair: its canonical caption's."""
  return digits.unicl_label(caption(digit, direction))


def all_captions() -> list[str]:
  """Every caption of every (digit, direction): a tokenizer's corpus."""
  return [caption(d, k, t) for t in TEMPLATES for d in range(10)
          for k in range(len(DIRECTIONS))]


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """How clips look and are sampled (the config's data.* fields)."""
  image_size: int = 32
  frames: int = 8
  render_frames: int = 16
  digit_size: int = 14
  min_speed: float = 0.75
  max_speed: float = 1.0
  train_strides: tuple = (1, 2)
  eval_stride: int = 2

  @classmethod
  def from_config(cls, data_cfg) -> "ClipSpec":
    fields = {f.name: data_cfg[f.name] for f in dataclasses.fields(cls)
              if f.name in data_cfg}
    if "train_strides" in fields:
      fields["train_strides"] = tuple(fields["train_strides"])
    return cls(**fields)

  def span(self, stride: int) -> int:
    return (self.frames - 1) * stride + 1

  def max_travel(self) -> int:
    return int(np.floor(self.max_speed * (self.render_frames - 1) + 0.5))

  def validate(self):
    """ValueError naming the data.* field at fault."""
    def pos_int(name):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {v!r}")
    for name in ("image_size", "frames", "render_frames", "digit_size",
                 "eval_stride"):
      pos_int(name)
    if not 0 < self.min_speed <= self.max_speed:
      raise ValueError(f"data.min_speed/max_speed must satisfy 0 < min <= "
                       f"max, got {self.min_speed}, {self.max_speed}")
    if not self.train_strides or any(
        not isinstance(s, (int, np.integer)) or s < 1
        for s in self.train_strides):
      raise ValueError(f"data.train_strides must be positive integers, got "
                       f"{self.train_strides!r}")
    if self.span(self.eval_stride) > self.render_frames:
      raise ValueError(
          f"data.eval_stride={self.eval_stride}: {self.frames} frames span "
          f"{self.span(self.eval_stride)} > data.render_frames="
          f"{self.render_frames}")
    if self.span(min(self.train_strides)) > self.render_frames:
      raise ValueError(
          f"data.train_strides={tuple(self.train_strides)}: no stride fits "
          f"{self.frames} frames into data.render_frames="
          f"{self.render_frames}")
    room = self.image_size - self.digit_size - self.max_travel()
    if room < 0:
      raise ValueError(
          f"a digit of data.digit_size={self.digit_size} moving up to "
          f"{self.max_travel()} px (data.max_speed={self.max_speed} x "
          f"(render_frames - 1)) leaves the data.image_size="
          f"{self.image_size} canvas; shrink one of them")


def draw_motion(spec: ClipSpec, direction: int, rng: np.random.Generator):
  """(start (y, x), speed) keeping the whole trajectory on the canvas."""
  speed = float(rng.uniform(spec.min_speed, spec.max_speed))
  travel = int(np.floor(speed * (spec.render_frames - 1) + 0.5))
  free = spec.image_size - spec.digit_size
  dy, dx = STEPS[DIRECTIONS[direction]]
  start = []
  for step in (dy, dx):
    if step > 0:
      start.append(int(rng.integers(0, free - travel + 1)))
    elif step < 0:
      start.append(int(rng.integers(travel, free + 1)))
    else:
      start.append(int(rng.integers(0, free + 1)))
  return tuple(start), speed


def frame_times(spec: ClipSpec, rng: np.random.Generator | None,
                views: int = 1) -> np.ndarray:
  """The rendered frames the model reads (florax/data/temporal.py): random
  stride and start with an rng (training, (frames,)), the eval_stride
  sampling without ((frames,) centred, or (views, frames) spread)."""
  if rng is None:
    times = temporal.eval_indices(spec.render_frames, spec.frames,
                                  spec.eval_stride, views)
    return times[0] if views == 1 else times
  return temporal.train_indices(spec.render_frames, spec.frames,
                                spec.train_strides, rng)


def positions(spec: ClipSpec, direction: int, start, speed: float,
              times: np.ndarray) -> np.ndarray:
  """(frames, 2) top-left (y, x) of the digit at each frame time."""
  dy, dx = STEPS[DIRECTIONS[direction]]
  # Rounded half up (not numpy's half-to-even), so a step of >= 1 px per
  # sampled frame always moves the digit.
  moved = np.floor(speed * np.asarray(times, np.float64) + 0.5).astype(
      np.int64)
  return np.stack([start[0] + dy * moved, start[1] + dx * moved], axis=1)


def render(image_u8: np.ndarray, spec: ClipSpec, direction: int, start,
           speed: float, times: np.ndarray) -> np.ndarray:
  """(len(times), S, S, 3) float32 in [-1, 1]: the digit at each time."""
  glyph = digits.to_rgb(image_u8, spec.digit_size)
  d, s = spec.digit_size, spec.image_size
  video = np.full((len(times), s, s, 3), -1.0, np.float32)
  for i, (y, x) in enumerate(positions(spec, direction, start, speed, times)):
    video[i, y:y + d, x:x + d] = glyph
  return video


@dataclasses.dataclass(frozen=True)
class MakeClip(grain.transforms.RandomMap):
  """A digit example -> a random clip of it (see the module docstring)."""
  spec: ClipSpec
  tokenizer: object = None
  max_len: int = 0

  def random_map(self, element, rng: np.random.Generator):
    digit = int(element["class_id"])
    direction = int(rng.integers(len(DIRECTIONS)))
    start, speed = draw_motion(self.spec, direction, rng)
    times = frame_times(self.spec, rng)
    out = {
        "video": render(element["image_u8"], self.spec, direction, start,
                        speed, times),
        "label": np.int32(direction),
        "digit": np.int32(digit),
        "caption_label": np.int32(caption_label(digit, direction)),
    }
    if self.tokenizer is not None:
      template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
      out["ids"] = self.tokenizer.encode(caption(digit, direction, template),
                                         self.max_len)
    return out


def moving_digits_dataset(spec: ClipSpec, *, batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1,
                          tokenizer=None, max_len: int = 0,
                          train_examples: int = -1,
                          keys: Sequence[str] | None = None
                          ) -> grain.IterDataset:
  """This process's stream of `batch_size`-clip training batches.

  Args:
    tokenizer: adds 'ids' (captions of a random template, `max_len` ids).
    keys: the batch's keys (default: all of MakeClip's).
  """
  spec.validate()
  ds = digits_images.train_shard(process_index, process_count, train_examples,
                                 batch_size)
  ds = ds.shuffle(seed=seed).repeat()
  ds = ds.random_map(MakeClip(spec, tokenizer, max_len), seed=seed + 1)
  if keys is not None:
    keys = tuple(keys)
    ds = ds.map(lambda e: {k: e[k] for k in keys})
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))


def holdout_clips(spec: ClipSpec, clips_per_digit: int = 1,
                  tokenizer=None, max_len: int = 0, views: int = 1) -> dict:
  """The fixed held-out clips (holdout-split digits, eval sampling).

  Returns {'video' (N, frames, S, S, 3), or (N, views, frames, S, S, 3)
  with views > 1 (temporal views of each clip, florax/data/temporal.py),
  'label', 'digit',
  'caption_label' (N,) int32, 'caption' [N str] (EVAL_TEMPLATE), and
  'ids' (N, max_len) with a tokenizer}, N = clips_per_digit x holdout digits.
  """
  spec.validate()
  if clips_per_digit < 1:
    raise ValueError(f"clips_per_digit must be >= 1, got {clips_per_digit}")
  images, targets = digits.load_split("holdout")
  n = len(images) * clips_per_digit
  rng = np.random.default_rng(HOLDOUT_SEED)
  directions = rng.permutation(np.arange(n) % len(DIRECTIONS))
  times = frame_times(spec, None, views)
  videos, digit_ids, captions = [], [], []
  for i in range(n):
    image, digit = images[i % len(images)], int(targets[i % len(images)])
    start, speed = draw_motion(spec, int(directions[i]),
                               np.random.default_rng([HOLDOUT_SEED, i]))
    if views == 1:
      videos.append(render(image, spec, int(directions[i]), start, speed,
                           times))
    else:
      videos.append(np.stack([render(image, spec, int(directions[i]), start,
                                     speed, t) for t in times]))
    digit_ids.append(digit)
    captions.append(caption(digit, int(directions[i])))
  out = {
      "video": np.stack(videos),
      "label": directions.astype(np.int32),
      "digit": np.asarray(digit_ids, np.int32),
      "caption_label": np.asarray(
          [caption_label(d, k) for d, k in zip(digit_ids, directions)],
          np.int32),
      "caption": captions,
  }
  if tokenizer is not None:
    out["ids"] = tokenizer.encode_batch(captions, max_len)
  return out


def write_clip_folders(out_dir: str, spec: ClipSpec, *, split: str = "train",
                       clips_per_digit: int = 1, seed: int = 0,
                       max_clips: int | None = None) -> str:
  """Moving-digit clips as folders of PNG frames: the on-disk layout of real
  clips, for launch/make_dataset.py.

  Writes `out_dir/<direction>/<split>_<i>/<t:03d>.png` (all render_frames
  frames of clip i; class folders = directions) and `out_dir/captions.csv`
  (path = the clip folder, caption = its eval caption, label = the
  direction): `--class_folders=out_dir` gives a classification set,
  `--captions=out_dir/captions.csv` a retrieval set. Digits from `split`
  of the sklearn digits (clips_per_digit each, at most max_clips in all);
  returns the captions file.
  """
  import csv  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  spec.validate()
  images, targets = digits.load_split(split)
  rng = np.random.default_rng([seed, len(split)])
  times = np.arange(spec.render_frames)
  rows = []
  count = len(images) * clips_per_digit
  for i in range(count if max_clips is None else min(count, max_clips)):
    digit = int(targets[i % len(images)])
    direction = int(rng.integers(len(DIRECTIONS)))
    start, speed = draw_motion(spec, direction, rng)
    video = render(images[i % len(images)], spec, direction, start, speed,
                   times)
    rel = os.path.join(DIRECTIONS[direction], f"{split}_{i:05d}")
    os.makedirs(os.path.join(out_dir, rel), exist_ok=True)
    for t, frame in enumerate(video):
      Image.fromarray(np.round((frame + 1) * 127.5).astype(np.uint8)).save(
          os.path.join(out_dir, rel, f"{t:03d}.png"))
    rows.append({"path": rel, "caption": caption(digit, direction),
                 "label": DIRECTIONS[direction]})
  path = os.path.join(out_dir, "captions.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, ("path", "caption", "label"))
    writer.writeheader()
    writer.writerows(rows)
  return path
