"""Every preset's parameter count, from `jax.eval_shape` (nothing allocated),
against an independent closed-form count of the architecture, and the
Florence sizes against the paper (CoSwin-H 637M, text 256M, 893M total)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import florence
from florax.models import two_tower
from florax.models import coswin, text


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def coswin_formula(cfg: coswin.CoSwinConfig) -> int:
  """Conv embeddings + Swin blocks + final norm, written out by hand."""
  c = cfg.embed_dim
  n = cfg.stem_kernel ** 2 * 3 * c + c + 2 * c                 # stem conv + LN
  for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
    dim = cfg.embed_dim * 2 ** s
    if s:
      prev = dim // 2
      n += cfg.merge_kernel ** 2 * prev * dim + dim + 2 * dim  # merge conv + LN
    hidden = int(dim * cfg.mlp_ratio)
    block = (2 * dim                                           # norm1
             + dim * 3 * dim + 3 * dim                         # qkv
             + (2 * cfg.window_size - 1) ** 2 * heads          # bias table
             + dim * dim + dim                                 # proj
             + 2 * dim                                         # norm2
             + dim * hidden + hidden + hidden * dim + dim)     # mlp
    n += depth * block
  last = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
  return n + 2 * last


def text_formula(cfg: text.TextConfig) -> int:
  w = cfg.width
  hidden = int(w * cfg.mlp_ratio)
  block = (2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w
           + w * hidden + hidden + hidden * w + w)
  return cfg.vocab_size * w + cfg.max_len * w + cfg.depth * block + 2 * w


@pytest.mark.parametrize("preset", sorted(florence._PRESETS))
def test_preset_counts_match_closed_form(preset):
  cfg = florence.get_config(preset)
  image_cfg = two_tower.image_config(cfg.model)
  text_cfg = text.TextConfig(**dict(cfg.model.text))
  model = two_tower.from_config(cfg.model)
  s, length = cfg.data.image_size, cfg.data.max_len
  variables = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, length), jnp.int32)),
      jax.random.key(0))
  params = variables["params"]
  last = cfg.model.image.embed_dim * 2 ** (len(cfg.model.image.depths) - 1)
  e = cfg.model.embed_dim
  assert _count(params["image_encoder"]) == coswin_formula(image_cfg)
  assert _count(params["text_encoder"]) == text_formula(text_cfg)
  assert _count(params) == (coswin_formula(image_cfg) + text_formula(text_cfg)
                            + last * e + text_cfg.width * e + 1)


def test_florence_h_matches_the_paper():
  cfg = florence.get_config("h")
  image_cfg = two_tower.image_config(cfg.model)
  text_cfg = text.TextConfig(**dict(cfg.model.text))
  last = image_cfg.embed_dim * 2 ** (len(image_cfg.depths) - 1)
  # Each tower counted with its projection into the shared space.
  image_tower = coswin_formula(image_cfg) + last * cfg.model.embed_dim
  text_tower = text_formula(text_cfg) + text_cfg.width * cfg.model.embed_dim
  assert abs(image_tower / 637e6 - 1) <= 0.02, image_tower
  assert abs(text_tower / 256e6 - 1) <= 0.03, text_tower
  assert abs((image_tower + text_tower) / 893e6 - 1) <= 0.02
  assert text_cfg.depth == 12
