"""BEiT-3 masked data modeling (florax.tasks.beit3_mdm, configs/beit3.py,
florax.data.beit3_digits): the loss against a numpy transcription, zero
gradient at visible positions, the masking statistics of §2.2 over 10k
samples, the step's composition and its exact resume, modality routing seen
by the trainer's gradients, config refusals, and a few trainer steps.

The visual tokenizer is a stand-in with the FrozenVQTokenizer interface (a
random patch projection quantised to a random codebook); the trainer's MDM
steps with a real trained VQ-KD tokenizer run in tests/test_vqkd.py, which
trains one.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import ndimage

import helpers
from configs import beit3
from florax import tasks
from florax.data import beit3_digits
from florax.data import digits
from florax.data import tokenizer as tok_lib
from florax.models import layers
from florax.tasks import beit3_mdm
from florax.tasks import vq_tokenizer


# -- a stand-in visual tokenizer ------------------------------------------------

class _FakeVQNet(nn.Module):
  patch: int
  codes: int

  @nn.compact
  def __call__(self, images):
    b, s = images.shape[0], images.shape[1]
    g = s // self.patch
    x = images.reshape(b, g, self.patch, g, self.patch, 3).transpose(
        0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    z = layers.dense(8, ("embed", "mlp"), name="proj")(x)
    book = self.param("codebook", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "mlp")), (self.codes, 8))
    d = jnp.sum((z[..., None, :] - book) ** 2, -1)
    return jnp.argmin(d, -1).astype(jnp.int32)


class FakeVQTokenizer:
  """FrozenVQTokenizer's interface: codes of each patch of an image."""

  def __init__(self, path, step=-1, dtype=jnp.float32, *, grid=4,
               num_codes=16, image_size=32):
    self.path, self.num_codes, self.image_size, self.grid = (
        path, num_codes, image_size, grid)
    self.net = _FakeVQNet(image_size // grid, num_codes)

  def spec(self):
    s = self.image_size
    return jax.eval_shape(lambda: self.net.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"])

  def load(self, shardings):
    s = self.image_size
    params = nn.unbox(self.net.init(jax.random.key(3),
                                    jnp.zeros((1, s, s, 3)))["params"])
    return jax.device_put(params, shardings)

  def source(self):
    return f"fake {self.path}"

  def set_input_stats(self, mean, std):
    pass

  def codes(self, params, images):
    return self.net.apply({"params": params}, images)


@pytest.fixture
def fake_vq(monkeypatch):
  made = {}

  def load(path, step, dtype):
    made["tok"] = FakeVQTokenizer(path, step, dtype,
                                  **made.get("kwargs", {}))
    return made["tok"]
  monkeypatch.setattr(vq_tokenizer, "load_visual_tokenizer", load)
  return made


def tiny_config(**overrides):
  cfg = beit3.get_config("tiny")
  with cfg.unlocked():
    cfg.tokenizer.path = "fake"
    cfg.data.composition.image = 8
    cfg.data.composition.text = 16
    cfg.data.composition.pair = 8
    cfg.train.steps = 2
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 2
    cfg.optimizer.warmup_steps = 1
    # two layers (the top one with the VL expert): compiling dominates
    cfg.model.multiway.depth = 2
    cfg.model.multiway.width = 32
    cfg.model.multiway.mlp_dim = 64
    helpers.apply_overrides(cfg, overrides)
  return cfg


# -- the loss -------------------------------------------------------------------

def _np_part(logits, targets, mask):
  """Mean CE over masked positions and accuracy there, in numpy."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll, hit = [], []
  for idx in zip(*np.nonzero(mask)):
    nll.append(-logp[idx][targets[idx]])
    hit.append(np.argmax(logits[idx]) == targets[idx])
  return np.mean(nll), np.mean(hit), len(nll)


def _fixed_parts(rng):
  def part(shape, k, p):
    return (rng.normal(size=shape + (k,)).astype(np.float32) * 3,
            rng.integers(0, k, size=shape).astype(np.int32),
            rng.random(shape) < p)
  return {"mlm": part((4, 7), 11, 0.15), "mim": part((3, 16), 5, 0.4),
          "mvlm_text": part((2, 7), 11, 0.5),
          "mvlm_image": part((2, 16), 5, 0.4)}


def test_losses_match_numpy():
  parts = _fixed_parts(np.random.default_rng(0))
  weights = {"mlm": 1.0, "mim": 0.5, "mvlm_text": 2.0, "mvlm_image": 0.25}
  loss, metrics = jax.jit(lambda p: beit3_mdm.mdm_losses(p, weights))(parts)
  want = 0.0
  for name, (logits, targets, mask) in parts.items():
    ce, acc, n = _np_part(logits, targets, mask)
    want += weights[name] * ce
    np.testing.assert_allclose(metrics[f"{name}_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics[f"{name}_accuracy"], acc, rtol=1e-6)
    assert int(metrics[f"{name}_masked"]) == n
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_visible_positions_get_exactly_zero_gradient():
  parts = _fixed_parts(np.random.default_rng(1))
  weights = dict.fromkeys(parts, 1.0)
  # a visible position with an extreme logit still gets no gradient
  parts["mlm"][0][~parts["mlm"][2]] *= 1e4
  logits = {k: jnp.asarray(v[0]) for k, v in parts.items()}

  def f(logits):
    return beit3_mdm.mdm_losses(
        {k: (logits[k], jnp.asarray(parts[k][1]), jnp.asarray(parts[k][2]))
         for k in parts}, weights)[0]
  grads = jax.jit(jax.grad(f))(logits)
  for k, (_, _, mask) in parts.items():
    g = np.asarray(grads[k])
    assert np.all(g[~mask] == 0.0), k
    assert np.all(np.abs(g[mask]).sum(-1) > 0), k
    # d CE / d logits = (softmax - onehot) / count: rows sum to zero
    np.testing.assert_allclose(g[mask].sum(-1), 0.0, atol=1e-6)


# -- masking statistics (BEiT-3 §2.2) -----------------------------------------

@pytest.fixture(scope="module")
def text_tokenizer():
  return tok_lib.train_tokenizer(digits.all_descriptions(), 127)


def _settings(tok, grid=4, min_block=2, **kw):
  return beit3_digits.MaskSettings(grid=grid, vocab_size=tok.vocab_size,
                                   mask_id=tok.vocab_size,
                                   min_block=min_block, **kw)


def _text_counts(samples, mask_id):
  chosen = maskable = masked = randomised = kept = 0
  for s in samples:
    ids, out, m = s["targets"], s["ids"], s["mlm_mask"]
    special = ids < 4
    assert not (m & special).any() and (out[special] == ids[special]).all()
    assert ((out != ids) <= m).all()  # only chosen tokens change
    maskable += int((~special).sum())
    chosen += int(m.sum())
    masked += int((out[m] == mask_id).sum())
    randomised += int((m & (out != ids) & (out != mask_id)).sum())
    kept += int((m & (out == ids)).sum())
  return chosen / maskable, masked / chosen, randomised / chosen, kept / chosen


def test_mlm_and_mvlm_text_masking_over_10k_samples(text_tokenizer):
  tok = text_tokenizer
  settings = _settings(tok)
  rng = np.random.default_rng(0)
  texts = digits.all_descriptions()
  mlm = beit3_digits.MaskText(tok, 16, settings)
  samples = [mlm.random_map(texts[i % len(texts)], rng)
             for i in range(10_000)]
  rate, to_mask, to_random, to_keep = _text_counts(samples, tok.vocab_size)
  assert abs(rate - 0.15) < 0.01, rate
  # a random replacement equal to the original counts as kept (p 0.1/123)
  assert abs(to_mask - 0.8) < 0.01, to_mask
  assert abs(to_random - 0.1) < 0.01, to_random
  assert abs(to_keep - 0.1) < 0.01, to_keep

  pair = beit3_digits.MaskPair(tok, 16, settings)
  image = np.zeros((32, 32, 3), np.float32)
  pairs = [pair.random_map({"image": image, "label": i % 10}, rng)
           for i in range(10_000)]
  text_side = [p for p in pairs if p["mlm_mask"].any()]
  # separate masking: exactly one modality of each pair, each half the time
  for p in pairs:
    assert p["mlm_mask"].any() != p["image_mask"].any()
  assert abs(len(text_side) / len(pairs) - 0.5) < 0.01
  rate, to_mask, to_random, to_keep = _text_counts(text_side, tok.vocab_size)
  assert abs(rate - 0.5) < 0.01, rate
  assert abs(to_mask - 0.8) < 0.01 and abs(to_random - 0.1) < 0.01
  assert abs(to_keep - 0.1) < 0.01
  joint = beit3_digits.MaskPair(tok, 16, dataclasses.replace(
      settings, mvlm_mode="joint"))
  for i in range(50):
    p = joint.random_map({"image": image, "label": i % 10}, rng)
    assert p["mlm_mask"].any() and p["image_mask"].any()


@pytest.mark.parametrize("grid,samples", [(4, 10_000), (14, 10_000)])
def test_mim_block_masks_over_10k_samples(text_tokenizer, grid, samples):
  # BEiT's smallest block (16 of 196 patches); 2 on the tiny 4x4 grid
  settings = _settings(text_tokenizer, grid=grid,
                       min_block=2 if grid == 4 else 16)
  t = beit3_digits.MaskImage(settings)
  rng = np.random.default_rng(0)
  n = grid * grid
  counts, comps = [], []
  for _ in range(samples):
    m = t.random_map({"image": None, "label": 0}, rng)["image_mask"]
    counts.append(int(m.sum()))
    if len(comps) < 200:
      comps.append(ndimage.label(m.reshape(grid, grid))[1])
  counts = np.asarray(counts)
  # every mask within one patch of 40%; 40% +- 1% on average
  assert np.all(np.abs(counts - 0.4 * n) < 1), np.unique(counts)
  assert abs(counts.mean() / n - 0.4) < 0.01, counts.mean() / n
  assert np.mean(comps) <= (2.5 if grid == 4 else 6)  # blocks, not scatter


# -- the step's batch -------------------------------------------------------------

def test_batch_has_the_composition_and_resumes_exactly(text_tokenizer):
  settings = _settings(text_tokenizer)
  comp = {"image": 4, "text": 8, "pair": 6}  # rows = gcd = 2

  def make(process_index=0, process_count=1):
    return beit3_digits.mdm_iterator(
        tokenizer=text_tokenizer, settings=settings, composition=comp,
        image_size=32, max_len=16, seed=3, process_index=process_index,
        process_count=process_count)
  it = make()
  first = next(it)
  assert set(first) == {"image", "text", "pair"}
  assert first["image"]["images"].shape == (2, 2, 32, 32, 3)
  assert first["image"]["image_mask"].shape == (2, 2, 16)
  assert first["text"]["ids"].shape == (2, 4, 16)
  assert first["pair"]["ids"].shape == (2, 3, 16)
  assert first["pair"]["images"].shape == (2, 3, 32, 32, 3)
  flat = {p: beit3_digits.ungroup_rows(first[p]) for p in first}
  assert {p: len(flat[p]["image_mask" if p != "text" else "ids"])
          for p in flat} == comp
  assert set(flat["image"]["image_mask"].sum(-1)) <= {6, 7}
  text = flat["text"]
  maskable = (text["targets"] >= 4).sum(-1)
  assert (np.abs(text["mlm_mask"].sum(-1) - 0.15 * maskable) < 1).all()
  # the two image streams are shuffled differently
  assert not np.array_equal(flat["image"]["images"][:2],
                            flat["pair"]["images"][:2])
  next(it)
  state = it.get_state()
  want = next(it)
  it.set_state(state)
  got = next(it)
  fresh = make()
  fresh.set_state(state)
  again = next(fresh)
  for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(got),
                     jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  # two processes: each half of every part (rows split), disjoint images
  halves = [next(make(i, 2)) for i in range(2)]
  for h in halves:
    assert h["image"]["images"].shape == (1, 2, 32, 32, 3)
    assert h["text"]["ids"].shape == (1, 4, 16)
  with pytest.raises(ValueError, match="common divisor 2"):
    make(0, 4)


# -- routing, config, trainer -----------------------------------------------------

def _expert_of(name: str) -> str | None:
  """'v' / 'l' / 'vl' for a modality-specific param, None for shared ones."""
  parts = name.split("/")
  if parts[0] == "mim_head":
    return "v"
  if parts[0] == "mlm_head":
    return "l"
  if parts[0] != "multiway":
    return None
  if parts[1] == "vision_embed":
    return "v"
  if parts[1] == "text_embed":
    return "l"
  if parts[1].startswith("norm_"):
    return parts[1][5:]
  if parts[1].startswith("block") and parts[2] != "attn":
    return parts[2].rsplit("_", 1)[1]
  return None


def test_single_modality_steps_leave_the_other_experts_exactly_zero(
    fake_vq, tmp_path):
  task = tasks.build(tiny_config(), str(tmp_path))
  model, rng = task.model, np.random.default_rng(0)
  # Random values in the params' shapes (no init compile: only the two
  # gradients are compiled); LayerNorm scales stay near 1.
  params = jax.tree.map(
      lambda a: (rng.normal(size=a.shape) * 0.1 + 1.0 * (a.ndim == 1)
                 ).astype(np.float32),
      nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))
  b, length, n = 4, 16, 16
  ids = rng.integers(4, 127, size=(b, length)).astype(np.int32)
  ids[:, -3:] = 0  # padding
  images = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
  image_mask = rng.random((b, n)) < 0.4
  text_targets = rng.integers(4, 127, size=(b, length))
  codes = rng.integers(0, 16, size=(b, n))

  def mlm(p):  # a text-only call
    text = model.apply({"params": p}, text=ids)["text_logits"]
    return beit3_mdm.masked_cross_entropy(text, text_targets, ids > 0)[0]

  def mim(p):  # an image-only call
    image = model.apply({"params": p}, images=images,
                        image_mask=image_mask)["image_logits"]
    return beit3_mdm.masked_cross_entropy(image, codes, image_mask)[0]
  text_grads = jax.jit(jax.grad(mlm))(params)
  image_grads = jax.jit(jax.grad(mim))(params)
  for grads, silent in ((text_grads, ("v", "vl")), (image_grads, ("l", "vl"))):
    flat = traverse_util.flatten_dict(grads, sep="/")
    for name, g in flat.items():
      g = np.asarray(g)
      if _expert_of(name) in silent:
        assert np.all(g == 0), name
    # the modality's own experts and the shared attention do learn
    active = "l" if silent[0] == "v" else "v"
    assert all(np.any(np.asarray(g) != 0) for k, g in flat.items()
               if _expert_of(k) == active and "mask_token" not in k
               and "pos_embed" not in k), active
    assert any(np.any(np.asarray(g) != 0) for k, g in flat.items()
               if "/attn/" in k)


@pytest.mark.parametrize("overrides,kwargs,match", [
    ({}, {"grid": 2}, "code grid"),
    ({"data.composition.image": 4, "data.composition.text": 4,
      "data.composition.pair": 4}, {}, "data.composition"),
    ({"train.batch_size": 100}, {}, "train.batch_size"),
    ({"mdm.mlm_rate": 1.5}, {}, "mdm.mlm_rate"),
    ({"mdm.mim_ratio": 0.0}, {}, "mdm.mim_ratio"),
    ({"mdm.mvlm_text_rate": 1.0}, {}, "mdm.mvlm_text_rate"),
    ({"mdm.mvlm_mode": "both"}, {}, "mdm.mvlm_mode"),
    ({"mdm.loss_weights.mim": -1.0}, {}, "mdm.loss_weights.mim"),
    ({"model.multiway.vocab_size": 100}, {}, "vocab_size"),
    ({"data.image_size": 48}, {}, "data.image_size"),
    ({"data.max_len": 32}, {}, "data.max_len"),
])
def test_bad_config_is_refused_before_compiling(fake_vq, tmp_path, overrides,
                                                kwargs, match):
  fake_vq["kwargs"] = kwargs
  with pytest.raises(ValueError, match=match):
    tasks.build(tiny_config(**overrides), str(tmp_path))


def test_no_visual_tokenizer_is_named(tmp_path):
  with pytest.raises(ValueError, match="tokenizer.path"):
    tasks.build(tiny_config(**{"tokenizer.path": ""}), str(tmp_path))
