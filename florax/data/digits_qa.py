"""Generated questions about the embedded digits: VQA (VQA-v2 style soft
answer scores) and NLVR2-style statements about two digits.

VQA. Each example is a train (or held-out) digit and one question of a
family (`QUESTIONS`): "what digit is this" (answer: the digit's word), "is
it even", "is it odd", "is it a {word}", "is it over {n}" (yes/no). As in
VQA-v2, 10 simulated annotators answer: each gives the correct answer with
probability `p_correct`, else a wrong answer of the same type (another
digit word, or the other of yes/no). An answer's soft score is
min(#annotators who gave it / 3, 1) (VQA-v2's accuracy, without its
average over the 10 leave-one-out subsets of annotators); the model is
trained with BCE against these scores over the answer vocabulary
`ANSWERS` (the union of all answers: ten words, yes, no), and a predicted
answer scores its soft score (VQA accuracy).

NLVR2. Two digits (left, right) and a statement (`STATEMENTS`): "left is
bigger", "both are even", "both are odd", "they are equal", "one is a
{word}"; the label is whether it holds. The label is drawn first (50/50),
then a class pair that makes the statement true or false, then an image of
each class, so the labels are balanced for every statement.

The texts are short on purpose: the tiny BEiT-3 checkpoint's tokenizer is
a 127-piece SentencePiece trained on the digits descriptions
(configs/beit3.py), which spells unseen words letter by letter, and its text
position table has 16 rows. "the left digit is larger than the right one"
is 27 pieces there; "left is bigger" is 12. Every generated text fits 14
pieces + [bos] + [eos] (`max_pieces` checks a tokenizer).

Pipelines as the other digits pipelines (florax.data.digits_images): the
train split sharded per process, shuffled, repeated, every random choice a
function of (seed, element index) through Grain's random_map, so an
iterator's state is a position and a restore continues exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import grain
import numpy as np

from florax.data import digits
from florax.data.tokenizer import TextTokenizer

WORDS = digits.CLASS_WORDS
ANSWERS = tuple(WORDS) + ("yes", "no")
ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}

# family: template ({word}: a digit word, {n}: a numeral 0..8).
QUESTIONS = {
    "what": "what digit is this",
    "even": "is it even",
    "odd": "is it odd",
    "is_a": "is it a {word}",
    "over": "is it over {n}",
}
FAMILIES = tuple(QUESTIONS)

# family: (template, truth(left, right, w) -> bool); w is a digit drawn for
# templates with {word}.
STATEMENTS: dict[str, tuple[str, Callable[[int, int, int], bool]]] = {
    "bigger": ("left is bigger", lambda a, b, w: a > b),
    "both_even": ("both are even", lambda a, b, w: a % 2 == 0 and b % 2 == 0),
    "both_odd": ("both are odd", lambda a, b, w: a % 2 == 1 and b % 2 == 1),
    "equal": ("they are equal", lambda a, b, w: a == b),
    "one_is": ("one is a {word}", lambda a, b, w: a == w or b == w),
}
STATEMENT_FAMILIES = tuple(STATEMENTS)

NUM_ANNOTATORS = 10  # VQA-v2's answers per question


# -- VQA ------------------------------------------------------------------------

def question(class_id: int, family: str, rng: np.random.Generator
             ) -> tuple[str, str]:
  """(question text, correct answer) of `family` about a digit."""
  c = int(class_id)
  if family == "what":
    return QUESTIONS[family], WORDS[c]
  if family == "even":
    return QUESTIONS[family], "yes" if c % 2 == 0 else "no"
  if family == "odd":
    return QUESTIONS[family], "yes" if c % 2 == 1 else "no"
  if family == "is_a":
    # Half the time the true class, so yes and no are balanced.
    w = c if rng.random() < 0.5 else int((c + rng.integers(1, 10)) % 10)
    return QUESTIONS[family].format(word=WORDS[w]), "yes" if w == c else "no"
  if family == "over":
    n = int(rng.integers(0, 9))
    return QUESTIONS[family].format(n=n), "yes" if c > n else "no"
  raise ValueError(f"unknown question family {family!r}; one of {FAMILIES}")


def annotate(correct: str, rng: np.random.Generator, p_correct: float,
             num_annotators: int = NUM_ANNOTATORS) -> list[str]:
  """Simulated annotators' answers: `correct` with probability p_correct,
  else a wrong answer of the same type (another word; yes <-> no)."""
  if correct in ("yes", "no"):
    wrong = ["no" if correct == "yes" else "yes"]
  else:
    wrong = [w for w in WORDS if w != correct]
  out = []
  for _ in range(num_annotators):
    if rng.random() < p_correct:
      out.append(correct)
    else:
      out.append(wrong[int(rng.integers(len(wrong)))])
  return out


def soft_scores(annotations: Sequence[str]) -> np.ndarray:
  """(len(ANSWERS),) float32: min(#annotators who gave the answer / 3, 1)."""
  counts = np.zeros(len(ANSWERS), np.float32)
  for a in annotations:
    counts[ANSWER_INDEX[a]] += 1
  return np.minimum(counts / 3.0, 1.0).astype(np.float32)


def vqa_example(class_id: int, rng: np.random.Generator, *,
                families: Sequence[str] = FAMILIES, p_correct: float = 0.8
                ) -> dict:
  """{'question', 'family', 'answer' (correct), 'annotations', 'scores'}."""
  family = families[int(rng.integers(len(families)))]
  text, answer = question(class_id, family, rng)
  notes = annotate(answer, rng, p_correct)
  return {"question": text, "family": family, "answer": answer,
          "annotations": notes, "scores": soft_scores(notes)}


@dataclasses.dataclass(frozen=True)
class MakeVQA(grain.transforms.RandomMap):
  """{'image', 'label'} -> {'images', 'ids', 'scores'}."""
  tokenizer: TextTokenizer
  max_len: int
  families: tuple = FAMILIES
  p_correct: float = 0.8

  def random_map(self, element, rng: np.random.Generator):
    ex = vqa_example(int(element["label"]), rng, families=self.families,
                     p_correct=self.p_correct)
    return {"images": element["image"],
            "ids": self.tokenizer.encode(ex["question"], self.max_len),
            "scores": ex["scores"]}


# -- NLVR2 ----------------------------------------------------------------------

def statement(family: str, w: int) -> str:
  return STATEMENTS[family][0].format(word=WORDS[w])


def truth(family: str, left: int, right: int, w: int) -> bool:
  return bool(STATEMENTS[family][1](int(left), int(right), int(w)))


def nlvr2_classes(rng: np.random.Generator,
                  families: Sequence[str] = STATEMENT_FAMILIES) -> dict:
  """{'family', 'statement', 'left', 'right' (classes), 'label' (0/1)}: the
  label drawn first (50/50), then a uniform class pair that gives it."""
  family = families[int(rng.integers(len(families)))]
  w = int(rng.integers(10))
  label = bool(rng.random() < 0.5)
  pairs = [(a, b) for a in range(10) for b in range(10)
           if truth(family, a, b, w) == label]
  a, b = pairs[int(rng.integers(len(pairs)))]
  return {"family": family, "statement": statement(family, w), "left": a,
          "right": b, "label": int(label)}


@dataclasses.dataclass(frozen=True)
class ShardImages:
  """The 8x8 images of one process's shard of a split, by class (rebuilt
  from the package when pickled, as DigitsSource)."""
  split: str
  process_index: int = 0
  process_count: int = 1
  train_examples: int = -1

  def __post_init__(self):
    images, labels = digits.load_split(self.split)
    if self.train_examples >= 0:
      images, labels = images[:self.train_examples], labels[
          :self.train_examples]
    images = images[self.process_index::self.process_count]
    labels = labels[self.process_index::self.process_count]
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    missing = [c for c in range(10) if not len(by_class[c])]
    if missing:
      raise ValueError(
          f"process {self.process_index} of {self.process_count} has no "
          f"{self.split} digits of classes {missing} (data.train_examples="
          f"{self.train_examples}): NLVR2 pairs need every class")
    object.__setattr__(self, "_images", images)
    object.__setattr__(self, "_by_class", by_class)

  def __len__(self):
    return len(self._images)

  def draw(self, class_id: int, rng: np.random.Generator) -> np.ndarray:
    idx = self._by_class[class_id]
    return self._images[idx[int(rng.integers(len(idx)))]]

  def __reduce__(self):
    return (ShardImages, (self.split, self.process_index,
                          self.process_count, self.train_examples))


def render(image_u8, image_size: int, random_shift: int,
           rng: np.random.Generator) -> np.ndarray:
  """As digits_images.DigitImage: resized RGB in [-1, 1], randomly shifted."""
  image = digits.to_rgb(image_u8, image_size)
  if random_shift:
    dy, dx = rng.integers(-random_shift, random_shift + 1, 2)
    image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
  return image


@dataclasses.dataclass(frozen=True)
class MakeNLVR2(grain.transforms.RandomMap):
  """(any element: a position) -> {'images_left', 'images_right', 'ids',
  'label'}."""
  images: ShardImages
  tokenizer: TextTokenizer
  max_len: int
  image_size: int
  random_shift: int = 0
  families: tuple = STATEMENT_FAMILIES

  def random_map(self, element, rng: np.random.Generator):
    ex = nlvr2_classes(rng, self.families)
    left = render(self.images.draw(ex["left"], rng), self.image_size,
                  self.random_shift, rng)
    right = render(self.images.draw(ex["right"], rng), self.image_size,
                   self.random_shift, rng)
    return {"images_left": left, "images_right": right,
            "ids": self.tokenizer.encode(ex["statement"], self.max_len),
            "label": np.int32(ex["label"])}


# -- texts and pipelines ----------------------------------------------------------

def question_texts() -> list[str]:
  """Every question the VQA generator can produce."""
  out = [QUESTIONS["what"], QUESTIONS["even"], QUESTIONS["odd"]]
  out += [QUESTIONS["is_a"].format(word=w) for w in WORDS]
  out += [QUESTIONS["over"].format(n=n) for n in range(9)]
  return out


def all_texts() -> list[str]:
  """Every question and statement the generators can produce."""
  return question_texts() + sorted({statement(f, w)
                                    for f in STATEMENT_FAMILIES
                                    for w in range(10)})


def max_pieces(tokenizer: TextTokenizer) -> tuple[int, str]:
  """(pieces, text) of the longest generated text under `tokenizer`."""
  return max((len(tokenizer.pieces(t)), t) for t in all_texts())


def _iter(ds, batch_size: int) -> grain.IterDataset:
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4))


def vqa_dataset(*, tokenizer: TextTokenizer, image_size: int, max_len: int,
                batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, random_shift: int = 0,
                train_examples: int = -1, families: Sequence[str] = FAMILIES,
                p_correct: float = 0.8) -> grain.IterDataset:
  """This process's stream of VQA batches {'images' (B, S, S, 3), 'ids'
  (B, max_len), 'scores' (B, len(ANSWERS))} over the train split."""
  from florax.data import digits_images  # pylint: disable=g-import-not-at-top
  return digits_images.digits_image_dataset(
      image_size=image_size, batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      random_shift=random_shift, train_examples=train_examples,
      transforms=[MakeVQA(tokenizer, max_len, tuple(families), p_correct)])


def nlvr2_dataset(*, tokenizer: TextTokenizer, image_size: int, max_len: int,
                  batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, random_shift: int = 0,
                  train_examples: int = -1,
                  families: Sequence[str] = STATEMENT_FAMILIES
                  ) -> grain.IterDataset:
  """This process's stream of NLVR2 batches {'images_left', 'images_right'
  (B, S, S, 3), 'ids' (B, max_len), 'label' (B,)}: both images from this
  process's shard of the train split."""
  images = ShardImages("train", process_index, process_count, train_examples)
  ds = grain.MapDataset.range(len(images)).shuffle(seed=seed).repeat()
  ds = ds.random_map(MakeNLVR2(images, tokenizer, max_len, image_size,
                               random_shift, tuple(families)), seed=seed + 1)
  return _iter(ds, batch_size)


# -- held-out sets ------------------------------------------------------------------

def vqa_holdout(*, tokenizer: TextTokenizer, image_size: int, max_len: int,
                seed: int = 0, families: Sequence[str] = FAMILIES,
                p_correct: float = 0.8) -> dict:
  """One question of every family about every held-out digit (fixed by
  `seed`): {'images', 'ids', 'scores', 'family' (index into families)}."""
  images, labels = digits.load_split("holdout")
  rng = np.random.default_rng(seed)
  out = {"images": [], "ids": [], "scores": [], "family": []}
  for image, label in zip(images, labels):
    rgb = digits.to_rgb(image, image_size)
    for k, family in enumerate(families):
      ex = vqa_example(int(label), rng, families=(family,),
                       p_correct=p_correct)
      out["images"].append(rgb)
      out["ids"].append(tokenizer.encode(ex["question"], max_len))
      out["scores"].append(ex["scores"])
      out["family"].append(k)
  return {k: np.stack(v) for k, v in out.items()}


def nlvr2_holdout(*, tokenizer: TextTokenizer, image_size: int, max_len: int,
                  examples: int, seed: int = 0,
                  families: Sequence[str] = STATEMENT_FAMILIES) -> dict:
  """`examples` statements over held-out digit pairs (fixed by `seed`):
  {'images_left', 'images_right', 'ids', 'label', 'family'}."""
  shard = ShardImages("holdout")
  rng = np.random.default_rng(seed)
  out = {"images_left": [], "images_right": [], "ids": [], "label": [],
         "family": []}
  for _ in range(examples):
    ex = nlvr2_classes(rng, families)
    out["images_left"].append(digits.to_rgb(shard.draw(ex["left"], rng),
                                            image_size))
    out["images_right"].append(digits.to_rgb(shard.draw(ex["right"], rng),
                                             image_size))
    out["ids"].append(tokenizer.encode(ex["statement"], max_len))
    out["label"].append(ex["label"])
    out["family"].append(list(families).index(ex["family"]))
  return {k: np.stack(v) for k, v in out.items()}
