"""FLAVA's downstream heads (florax.tasks.flava_classify): a head on
h_CLS,I / h_CLS,T / h_CLS,M through the shared fine-tuning task.

References: the logits are checked against FLAVA's own forward pass
(florax.models.flava.Flava.__call__, the path with Hugging Face parity)
and a numpy head; the entailment data against a parse of the decoded text
(which digits it names); the analytic FLOPs against the lowered step's
op-by-op matmul count; the served export against the evaluator's logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import flava_finetune
from florax import inference, serving, tasks
from florax.models import flops
from florax.models import flava as flava_lib
from florax.tasks import base
from florax.tasks import beit3_caption
from florax.tasks import flava_classify
from test_flops_beit3 import _abstract, _mesh_rules

N = 5  # held-out rows per check


def _task(preset, workdir, **overrides):
  c = flava_finetune.get_config(preset)
  with c.unlocked():
    c.train.batch_size = 4
    c.eval_batch_size = 8
    for k, v in overrides.items():
      node = c
      *path, leaf = k.split(".")
      for p in path:
        node = node[p]
      node[leaf] = v
  return tasks.build(c, str(workdir))


def _random_params(init, seed):
  """Params of `init`'s shapes drawn in numpy (compiling an init costs more
  than the checks; both sides of every check read the same params)."""
  shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(
      s.dtype), shapes)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  task = _task("tiny_pair", tmp_path_factory.mktemp("fc_pair"))
  task.validate()
  return task, _random_params(task.init, 0)


def test_entailment_pairs_name_their_digit(pair):
  task = pair[0]
  tok, d = task.text_tokenizer, task.config.data
  rng = np.random.default_rng(0)
  for entail in (False, True):
    t = flava_classify.Describe(tok, d.max_len, entailment=entail)
    labels, others = [], []
    for i in range(3000):
      digit = i % 10
      out = t.random_map({"image": 0, "label": np.int32(digit)}, rng)
      named = beit3_caption.digits_named(tok.decode(out["ids"]))
      assert len(named) == 1
      if not entail:
        assert named == {digit} and out["label"] == digit
        continue
      labels.append(int(out["label"]))
      assert (named == {digit}) == (out["label"] == 1)
      if out["label"] == 0:
        others.append((min(named) - digit) % 10)
    if entail:
      assert abs(np.mean(labels) - 0.5) < 0.03
      counts = np.bincount(others, minlength=10)
      assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].mean()


@pytest.mark.parametrize("input_", ["image", "text", "pair"])
def test_heads_read_the_cls_state_of_their_encoder(input_, pair, tmp_path):
  task, params = pair if input_ == "pair" else (
      _task(f"tiny_{input_}", tmp_path), None)
  if params is None:
    params = _random_params(task.init, 1)
  # Only the encoders the input reaches exist (nothing idle to decay; the
  # scalar logit scale is a setup param, out of weight decay).
  made = set(params["flava"]) - {"logit_scale"}
  want = {"image": {"image_encoder"}, "text": {"text_encoder"},
          "pair": {"image_encoder", "text_encoder", "image_to_mm_projection",
                   "text_to_mm_projection", "multimodal_encoder"}}[input_]
  assert made == want, made
  inputs, labels = task.holdout()
  inputs = {k: v[:N] for k, v in inputs.items()}
  logits = np.asarray(task.logits_map()(params, inputs))
  assert logits.shape == (N, task.config.model.num_classes)
  # Reference: FLAVA's full forward on the same params, its [CLS] states.
  flava = flava_lib.Flava(task.flava_config)
  full = _random_params(lambda r: flava.init(r, *flava_lib.init_inputs(
      task.flava_config, 1, task.config.data.max_len)), 2)["params"]
  full = dict(full, **params["flava"])
  ids = inputs.get("ids")
  out, _ = flava.apply(
      {"params": full}, inputs.get("image"), ids,
      None if ids is None else ids != task.text_tokenizer.pad_id)
  key = {"image": "image_tokens", "text": "text_tokens",
         "pair": "multimodal_tokens"}[input_]
  cls = np.asarray(out[key][:, 0], np.float64)
  head = params["head"]
  want_logits = cls @ np.asarray(head["kernel"], np.float64) + np.asarray(
      head["bias"], np.float64)
  np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=1e-5)
  assert labels.shape[0] == len(task.holdout()[0][next(iter(inputs))])


@pytest.mark.parametrize("preset", ["tiny_pair", "tiny_text",
                                    "tiny_image,probe"])
def test_flops_equal_the_programs_matmuls(preset, tmp_path):
  task = _task(preset, tmp_path)
  cfg = task.config
  task = flava_classify.FlavaClassifyTask(cfg, str(tmp_path),
                                          *_mesh_rules(cfg))
  batch = task.batch_spec(4)
  params = _abstract(nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))

  def step(p, b):
    return task.value_and_grad(p, b, jax.random.key(1),
                               base.StepContext(step=0, frozen=None))
  lowered = jax.jit(step).lower(params, _abstract(batch))
  counted = flops.hlo_matmul_flops(lowered)
  assert 4 * task.flops_per_example() == pytest.approx(counted, rel=1e-9)


def test_served_entailment_equals_the_evaluator(pair, tmp_path):
  task, params = pair
  manifest = serving.write(str(tmp_path / "export"), task.config, params,
                           task.serving_tokenizer(), task.serving(), step=1,
                           platforms=("cpu",))
  assert manifest["functions"]["entail"]["labels"] == ["contradiction",
                                                        "entailment"]
  model = inference.load(str(tmp_path / "export"), backend="exported",
                         max_batch=8)
  inputs, _ = task.holdout()
  rows = np.r_[0:3, len(inputs["ids"]) // 2:len(inputs["ids"]) // 2 + 3]
  want = np.asarray(task.logits_map()(
      params, {k: v[rows] for k, v in inputs.items()}))
  got = model.call("entail", images=inputs["image"][rows],
                   text=inputs["ids"][rows])
  np.testing.assert_allclose(got, want, atol=2e-5)
  labels = model.run("entail", images=inputs["image"][rows],
                     text=inputs["ids"][rows])
  assert labels == [("contradiction", "entailment")[i]
                    for i in np.argmax(want, -1)]


@pytest.mark.parametrize("override,message", [
    ({"finetune.input": "audio"}, "finetune.input"),
    ({"finetune.mixup_alpha": 0.8}, "Mixup/CutMix mix images"),
    ({"model.num_classes": 1}, "model.num_classes"),
    ({"data.max_len": 999}, "data.max_len"),
    ({"data.negative_rate": 1.0}, "data.negative_rate"),
    ({"model.head_hidden": -1}, "model.head_hidden"),
    ({"finetune.train_backbone": False}, "optimizer.freeze"),
])
def test_bad_config_is_named(override, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    _task("tiny_pair", tmp_path, **override).validate()
