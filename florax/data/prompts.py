"""Florence-style prompt templates that turn short labels into descriptions.

Florence enriches one-word descriptions with templates ("A photo of the
[WORD]", ...), one random template per sample (Florence §2.2, following
UniCL). `{}` stands for the class text.
"""

from __future__ import annotations

FLORENCE_TEMPLATES = (
    "a photo of the {}.",
    "a cropped photo of {}.",
    "a photo of a {}.",
    "a blurry photo of the {}.",
    "a low resolution photo of the {}.",
    "a close-up photo of the {}.",
    "a black and white photo of the {}.",
    "an image of {}.",
)


def fill(template: str, text: str) -> str:
  return template.format(text)


def descriptions(class_text: str, templates=FLORENCE_TEMPLATES) -> list[str]:
  return [fill(t, class_text) for t in templates]
