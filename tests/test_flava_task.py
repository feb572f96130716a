"""FLAVA pre-training (florax.tasks.flava, florax.data.flava_digits,
configs/flava.py): every loss term against a numpy transcription on a fixed
batch, ITM negatives as configured, per-kind steps touching only the params
their losses reach, round-robin kind frequencies over 10k steps, an
interrupted run resuming the same kind sequence and losses, the data's
pairs and masks, and config refusals before compiling.

The visual tokenizer is test_beit3_mdm's stand-in (the FrozenVQTokenizer
interface); a trained VQ-KD feeds the digits demo (README)."""

from __future__ import annotations

import collections
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import helpers
from configs import flava as cfg_lib
from florax import tasks
from florax.data import flava_digits, mixtures
from florax.tasks import base, beit3_caption, flava
from florax.train import precision
from florax.train import trainer as trainer_lib
from test_beit3_mdm import fake_vq  # noqa: F401  (fixture)


def tiny_config(**overrides):
  c = cfg_lib.get_config("tiny")
  with c.unlocked():
    c.tokenizer.path = "fake"
    for k in flava_digits.KINDS:
      c.data.batch_sizes[k] = 8
    c.train.batch_size = 8
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 3
    c.optimizer.warmup_steps = 1
    # one layer per encoder: compiling three kinds dominates the module
    for tower in ("image", "text", "multimodal"):
      c.model.flava[tower].depth = 1
    helpers.apply_overrides(c, overrides)
  return c


@pytest.fixture
def built(fake_vq, tmp_path):  # noqa: F811
  task = tasks.build(tiny_config(), str(tmp_path))
  params = nn.unbox(task.init(jax.random.key(0)))
  frozen = task.visual_tokenizer.load(None)
  batches = {k: next(iter(flava_digits.kind_dataset(
      k, tokenizer=task.text_tokenizer, settings=task.mask_settings(),
      image_size=32, max_len=16, batch_size=8, seed=1))) for k in
             flava_digits.KINDS}
  return task, params, frozen, batches


# -- pure pieces ---------------------------------------------------------------

def _np_ce(logits, targets, mask):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = [-logp[idx][targets[idx]] for idx in zip(*np.nonzero(mask))]
  return float(np.mean(nll)) if nll else 0.0


@pytest.mark.parametrize("match", ["instance", "class"])
def test_itm_negatives_are_in_batch_and_as_configured(match):
  labels = jnp.asarray([0, 1, 2, 0, 1, 2, 3, 3, 4, 5])
  for seed in range(20):
    idx, matched = flava.itm_pairs(jax.random.key(seed), labels, 0.5, match)
    idx, matched = np.asarray(idx), np.asarray(matched)
    moved = idx != np.arange(10)
    assert moved.sum() == 5  # round(0.5 * 10) pairs take another's text
    assert ((0 <= idx) & (idx < 10)).all()
    for i in range(10):
      want = (i == idx[i]) if match == "instance" else (
          labels[idx[i]] == labels[i])
      assert matched[i] == want


def test_itm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 2)).astype(np.float32) * 3
  matched = rng.random(7) < 0.5
  loss, acc = flava.itm_loss(jnp.asarray(logits), jnp.asarray(matched))
  y = matched.astype(int)
  want = _np_ce(logits, y, np.ones(7, bool))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(acc) == pytest.approx(np.mean(np.argmax(logits, -1) == y))


# -- the step's terms ------------------------------------------------------------

def _apply(task, params, *args, method):
  return task.model.apply({"params": params}, *args, method=method)


def test_unimodal_terms_equal_numpy(built):
  task, params, frozen, b = built
  for kind in ("image", "text"):
    batch = b[kind]
    loss, m = task.loss(params, batch, jax.random.key(1),
                        base.StepContext(0, frozen, kind))
    if kind == "image":
      logits = _apply(task, params, batch["images"], batch["image_mask"],
                      method=flava.FlavaPretraining.mim)
      codes = np.asarray(task.visual_codes(frozen, batch["images"]))
      want = _np_ce(np.asarray(logits), codes, batch["image_mask"])
    else:
      ids = batch["ids"]
      logits = _apply(task, params, ids, ids != 0,
                      method=flava.FlavaPretraining.mlm)
      want = _np_ce(np.asarray(logits), batch["targets"], batch["mlm_mask"])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert set(m) == {f"{kind == 'image' and 'mim' or 'mlm'}_{x}"
                      for x in ("loss", "accuracy", "masked")}


def test_pair_terms_equal_numpy(built):
  task, params, frozen, b = built
  batch = b["pair"]
  rng = jax.random.key(5)
  loss, m = task.loss(params, batch, rng, base.StepContext(0, frozen, "pair"))
  # The ITM draw the step makes (its rng split as the task splits it).
  _, k_itm = jax.random.split(rng)
  labels = batch["label"]
  idx, matched = map(np.asarray, flava.itm_pairs(
      k_itm, jnp.asarray(labels), 0.5, "class"))
  clean = batch["targets"]
  img, txt, scale = _apply(task, params, batch["images"], clean, clean != 0,
                           method=flava.FlavaPretraining.embeddings)
  logits = float(scale) * np.asarray(img) @ np.asarray(txt).T
  pos = (labels[:, None] == labels[None, :]).astype(np.float64)

  def sup(lg, p):  # UniCL: mean over rows of -sum_pos log softmax / #pos
    z = lg - lg.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(-(p * logp).sum(1) / p.sum(1)))
  contrastive = sup(logits, pos) + sup(logits.T, pos.T)
  ids = batch["ids"][idx]
  itm, mmm_i, mmm_t = _apply(task, params, batch["images"],
                             batch["image_mask"], ids, ids != 0,
                             method=flava.FlavaPretraining.multimodal)
  itm_ce = _np_ce(np.asarray(itm), matched.astype(int), np.ones(8, bool))
  codes = np.asarray(task.visual_codes(frozen, batch["images"]))
  mi = _np_ce(np.asarray(mmm_i), codes,
              batch["image_mask"] & matched[:, None])
  mt = _np_ce(np.asarray(mmm_t), clean[idx],
              batch["mlm_mask"][idx] & matched[:, None])
  np.testing.assert_allclose(float(m["contrastive_loss"]), contrastive,
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["itm_loss"]), itm_ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["mmm_image_loss"]), mi, rtol=1e-5)
  np.testing.assert_allclose(float(m["mmm_text_loss"]), mt, rtol=1e-5)
  np.testing.assert_allclose(float(loss), contrastive + itm_ce + mi + mt,
                             rtol=1e-5)
  # MMM counts only the matched pairs' masked positions.
  assert float(m["mmm_image_masked"]) == (
      batch["image_mask"] & matched[:, None]).sum()


def _flat(tree):
  return {"/".join(k): v for k, v in
          traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_each_kind_touches_only_what_its_losses_reach(built):
  task, params, frozen, b = built
  reached = {}
  for kind in ("image", "text"):
    grads = jax.grad(lambda p, kind=kind: task.loss(
        p, b[kind], jax.random.key(2), base.StepContext(0, frozen, kind))[0])(
            params)
    reached[kind] = {k for k, v in _flat(grads).items()
                     if np.abs(np.asarray(v)).max() > 0}
  def under(names, prefix):
    return {n for n in names if n.startswith(prefix)}
  # A text-only step leaves the image encoder's grads exactly zero, and an
  # image-only step the text encoder's; neither reaches the multimodal
  # encoder or the pair heads.
  assert not under(reached["text"], "flava/image_encoder")
  assert not under(reached["image"], "flava/text_encoder")
  for kind in ("image", "text"):
    assert not under(reached[kind], "flava/multimodal_encoder")
    assert not under(reached[kind], "itm_head")
  assert under(reached["image"], "mim_head") and not under(
      reached["image"], "mlm_head")
  assert under(reached["text"], "mlm_head")
  # (A pair step reaches both encoders, the multimodal one and its heads:
  # test_pair_terms_equal_numpy checks each of its terms.)


# -- data and round-robin --------------------------------------------------------

def test_pairs_hold_a_description_of_their_digit(built):
  task, _, _, b = built
  pair = b["pair"]
  tok = task.text_tokenizer
  for label, targets in zip(pair["label"], pair["targets"]):
    text = tok.decode(targets)
    assert beit3_caption.names_digit(text, int(label)), (text, label)
  assert pair["image_mask"].any(1).all() and pair["mlm_mask"].any(1).all()


def test_round_robin_frequencies_follow_the_mixture():
  weights = dict(cfg_lib.get_config("tiny").train.mixture)
  idx = mixtures.round_robin_choices(weights, 0, np.arange(10_000))
  counts = collections.Counter(idx.tolist())
  total = sum(weights.values())
  for i, k in enumerate(weights):
    assert abs(counts[i] / 10_000 - weights[k] / total) < 0.02, k


def _rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(l) for l in f if "train/loss" in l]


def test_interrupted_run_resumes_the_same_kinds_and_losses(fake_vq,  # noqa: F811
                                                           tmp_path):
  # Two kinds (one compiled step each; the unimodal ones compile fastest)
  # are enough to see the sequence.
  cfg = tiny_config(**{"train.mixture.pair": 0.0})
  straight = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "a")))
  straight.train()
  want = _rows(tmp_path / "a")
  assert [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
  # The same run interrupted after step 3: its workdir as it was then (the
  # step-3 checkpoint, the first three log rows), resumed by a new trainer.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  with open(tmp_path / "b" / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in want[:3])
  trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "b"))).train()
  got = _rows(tmp_path / "b")
  assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
  kinds = straight.kind_sequence(0, 6)
  assert len(set(kinds)) > 1  # the test would not see a mix otherwise
  for r_want, r_got, kind in zip(want[3:], got[3:], kinds[3:]):
    assert f"train/{kind}/loss" in r_got
    np.testing.assert_allclose(r_got["train/loss"], r_want["train/loss"],
                               rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"flava.positives": "pairs"}, "flava.positives"),
    ({"flava.itm_negative_rate": 1.0}, "itm_negative_rate"),
    ({"flava.loss_weights.itm": -1.0}, "loss_weights.itm"),
    ({"data.batch_sizes.text": 1}, "batch_sizes.text"),
    ({"data.max_len": 40}, "max_len"),
    ({"model.flava.text.vocab_size": 100}, "vocab_size"),
    ({"train.mixture.video": 1.0}, "unknown batch kinds"),
])
def test_bad_config_is_refused_before_compiling(fake_vq, tmp_path,  # noqa: F811
                                                overrides, match):
  with pytest.raises(ValueError, match=match):
    task = tasks.build(tiny_config(**overrides), str(tmp_path))
    trainer_lib.Trainer(task)


def test_presets_build():
  for name in ("tiny", "tiny_unimodal", "full"):
    c = cfg_lib.get_config(name)
    assert c.task == "flava"
  assert dict(cfg_lib.get_config("tiny_unimodal").train.mixture)["pair"] == 0
  # The paper's recipe (§4): batch 8192, AdamW lr 1e-3, weight decay 0.1,
  # 10k warmup, FSDP, fp16 (dynamic loss scaling) except LayerNorm.
  full = cfg_lib.get_config("full")
  assert set(full.data.batch_sizes.values()) == {8192}
  assert (full.optimizer.learning_rate, full.optimizer.weight_decay,
          full.optimizer.warmup_steps) == (1e-3, 0.1, 10_000)
  assert full.sharding.zero_stage == 3 and full.model.dtype == "float16"
  assert precision.loss_scaling_enabled(full)


def test_export_serves_the_evaluators_embeddings_and_itm(built, tmp_path):
  """A FLAVA export (florax.serving) embeds and matches as the evaluator:
  the contrastive unit embeddings (zero-shot retrieval) and ITM logits."""
  from florax import inference, serving  # pylint: disable=g-import-not-at-top
  task, params, _, _ = built
  serving.write(str(tmp_path / "export"), task.config, params,
                task.serving_tokenizer(), task.serving(), step=1,
                platforms=("cpu",))
  model = inference.load(str(tmp_path / "export"), backend="exported",
                         max_batch=8)
  images, _, own, other = task.holdout()
  images, own, other = images[:5], own[:5], other[:5]
  np.testing.assert_allclose(model.encode_image(images),
                             task.encode_images(params, images), atol=2e-5)
  np.testing.assert_allclose(model.call("encode_text", text=own),
                             task.encode_texts(params, own), atol=2e-5)
  np.testing.assert_allclose(model.call("match", images=images, text=other),
                             task.itm_logits(params, images, other),
                             atol=2e-5)
