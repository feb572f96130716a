"""FLAVA on the shared encoder library (florax.models.flava), imported from
Hugging Face transformers (florax.convert.hf_flava), and FLAVA's DALL-E
codebook (florax.models.flava_codebook).

Parity against transformers' own outputs for a small random FlavaModel and
FlavaImageCodebook (committed in tests/fixtures/hf_flava_tiny.npz and
hf_flava_codebook_tiny.npz by make_hf_flava.py; regenerated and compared
live when torch + transformers import): image, text and multimodal tokens,
the three poolers, the per-token projections (get_*_features), the
normalised contrastive embeddings and logits, the image [MASK] path, the
codebook logits and ids; fp32, atol 1e-4. Without torch: the full-size
layouts recorded from transformers (names, shapes, param counts: the
'full' preset is param-exact), config import, and clear errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import common
from florax.convert import hf_flava
from florax.export import unflatten_params
from florax.models import flava, flava_codebook
from tests.fixtures import make_hf_flava as ref

ATOL = 1e-4
# transformers' FlavaModel(FlavaConfig()) (facebook/flava-full's
# architecture) and FlavaImageCodebook(FlavaImageCodebookConfig()),
# counted on the meta device (make_hf_flava.full_size_layouts).
HF_FLAVA_FULL_PARAMS = 241_356_289
HF_CODEBOOK_FULL_PARAMS = 53_786_240


@pytest.fixture(scope="module")
def fixture():
  return ref.load(ref.FIXTURE)


@pytest.fixture(scope="module")
def codebook_fixture():
  return ref.load(ref.CODEBOOK_FIXTURE)


@pytest.fixture(scope="module")
def run_florax():
  """Converts a state dict and computes every fixture output with florax:
  {name: array}. One compile per config."""
  cache = {}

  def run(state, x, arch=ref.ARCH):
    config, params, _ = hf_flava.convert_state_dict(state, arch)
    cfg = flava.from_dict(config["flava"])
    if cfg not in cache:
      cache[cfg] = ref.florax_outputs_fn(cfg)
    got = cache[cfg](unflatten_params(params), *ref.run_inputs(x))
    return {k: np.asarray(got[k]) for k in ref.OUTPUTS}

  return run


def _diffs(got, outs):
  return {k: float(np.abs(got[k] - outs[k]).max()) for k in ref.OUTPUTS}


@pytest.fixture(scope="module")
def committed_diffs(fixture, run_florax):
  state, x, outs, _ = fixture
  return _diffs(run_florax(state, x), outs)


@pytest.mark.parametrize("name", ref.OUTPUTS)
def test_parity_with_committed_hf_outputs(fixture, committed_diffs, name):
  _, _, outs, _ = fixture
  assert committed_diffs[name] <= ATOL, committed_diffs
  # Outputs of a useful size: an absolute tolerance of 1e-4 means something.
  assert np.abs(outs[name]).max() > 0.3


def test_fixture_exercises_what_could_go_wrong(fixture):
  """Different widths per tower (a misrouted projection cannot fit),
  non-trivial LayerNorms, a padded text row, a second segment, masked
  patches that change the image output, and multimodal tokens laid out as
  [CLS_M, image (1 + N), text (L)]."""
  state, x, outs, _ = fixture
  assert state["image_to_mm_projection.weight"].shape == (48, 32)
  assert state["text_to_mm_projection.weight"].shape == (48, 40)
  assert state["image_projection.weight"].shape == (24, 32)
  ln = state["multimodal_model.encoder.layer.0.layernorm_after.weight"]
  assert np.abs(ln - 1).max() > 0.1
  assert x["valid"].min(axis=1).tolist() == [1, 0]
  assert x["token_types"].max(axis=1).tolist() == [1, 0]
  assert np.abs(outs["image_tokens"] - outs["image_tokens_masked"]
                ).max() > 0.1
  assert outs["multimodal_tokens"].shape == (2, 1 + 17 + 7, 48)
  np.testing.assert_allclose(np.linalg.norm(outs["image_embedding"], axis=1),
                             1, atol=1e-5)


def test_padding_is_masked(fixture, run_florax):
  """Changing the ids under the padding leaves every valid output as is."""
  state, x, outs, _ = fixture
  x2 = dict(x, ids=x["ids"].copy())
  x2["ids"][1, 4:] = 7
  got = run_florax(state, x2)
  np.testing.assert_allclose(got["text_tokens"][1, :4],
                             outs["text_tokens"][1, :4], atol=ATOL)
  np.testing.assert_allclose(got["multimodal_tokens"][1, :1 + 17 + 4],
                             outs["multimodal_tokens"][1, :1 + 17 + 4],
                             atol=ATOL)
  np.testing.assert_allclose(got["text_embedding"], outs["text_embedding"],
                             atol=ATOL)


def test_parity_live_against_transformers(tmp_path, run_florax):
  """Regenerates the fixtures with the installed transformers, compares
  florax again, and checks the committed outputs are what this
  transformers produces."""
  if ref.import_transformers() is None:
    pytest.skip("torch/transformers not installed (optional extras)")
  path = ref.make(str(tmp_path / "flava.npz"), full_size=False)
  state, x, outs, _ = ref.load(path)
  diffs = _diffs(run_florax(state, x), outs)
  assert max(diffs.values()) <= ATOL, diffs
  _, _, committed, _ = ref.load(ref.FIXTURE)
  for name in ref.OUTPUTS:
    np.testing.assert_allclose(outs[name], committed[name], atol=1e-5)
  path = ref.make_codebook(str(tmp_path / "codebook.npz"), full_size=False)
  state, x, outs, _ = ref.load(path)
  got = _run_codebook(state, x)
  np.testing.assert_allclose(got, outs["logits"], atol=ATOL)
  _, _, committed, _ = ref.load(ref.CODEBOOK_FIXTURE)
  np.testing.assert_allclose(outs["logits"], committed["logits"], atol=1e-5)


# -- full size ------------------------------------------------------------------

def _count(shapes):
  return sum(int(np.prod(s)) for s in shapes.values())


def test_full_preset_is_param_exact(fixture):
  """florax's 'full' preset has exactly HF FlavaModel's params (recorded,
  and re-counted on the meta device when transformers imports)."""
  layout = fixture[3]["full_size"]["flava_model"]
  assert layout["param_count"] == HF_FLAVA_FULL_PARAMS
  assert flava.param_count(flava.config_for("full")) == HF_FLAVA_FULL_PARAMS
  transformers = ref.import_transformers()
  if transformers is not None:
    import torch  # pylint: disable=g-import-not-at-top
    with torch.device("meta"):
      model = transformers.FlavaModel(transformers.FlavaConfig())
    assert sum(p.numel() for p in model.parameters()) == HF_FLAVA_FULL_PARAMS


def test_full_size_names_and_shapes(fixture):
  """HF's full-size FlavaModel layout (names and shapes recorded from
  transformers) converts onto the 'full' preset with nothing left over,
  nothing missing and every shape fitting; its config.json gives the same
  config."""
  layout = fixture[3]["full_size"]["flava_model"]
  assert hf_flava.config_from_hf(layout["hf_config"]) == flava.FlavaConfig()
  state = {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
           for k, s in layout["keys"].items()}
  assert max(int(k.split(".")[3]) for k in state
             if k.startswith("image_model.encoder.layer.")) == 11
  config, shapes, report = hf_flava.convert_state_dict(
      state, "facebook/flava-full", shapes_only=True)
  assert not report.dropped and not report.resized and not report.ignored
  assert set(shapes) == set(hf_flava.target_shapes(flava.FlavaConfig()))
  assert _count(shapes) == HF_FLAVA_FULL_PARAMS
  assert config["image_size"] == 224 and config["max_len"] == 512
  # A FlavaForPreTraining checkpoint: 'flava.' prefix, heads dropped.
  wrapped = {f"flava.{k}": v for k, v in state.items()}
  wrapped["mlm_head.decoder.weight"] = jax.ShapeDtypeStruct((30522, 768),
                                                            jnp.float32)
  with pytest.raises(common.ConversionError) as e:
    hf_flava.convert_state_dict(wrapped, "full", shapes_only=True)
  assert e.value.unmapped == ["mlm_head.decoder.weight"]
  _, shapes, report = hf_flava.convert_state_dict(
      wrapped, "full", allow_missing=hf_flava.PRETRAINING_EXTRAS,
      shapes_only=True)
  assert report.dropped == ["mlm_head.decoder.weight"]
  assert _count(shapes) == HF_FLAVA_FULL_PARAMS


def test_codebook_full_size(codebook_fixture):
  layout = codebook_fixture[3]["full_size"]
  assert layout["param_count"] == HF_CODEBOOK_FULL_PARAMS
  state = {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
           for k, s in layout["keys"].items()}
  config, shapes, _ = hf_flava.convert_codebook_state_dict(
      state, "facebook/flava-image-codebook", shapes_only=True)
  assert _count(shapes) == HF_CODEBOOK_FULL_PARAMS
  assert config["codebook"] == dataclasses.asdict(
      flava_codebook.CodebookConfig())
  # Inside a FlavaForPreTraining state dict: only image_codebook.* is read.
  wrapped = {f"image_codebook.{k}": v for k, v in state.items()}
  wrapped["flava.logit_scale"] = jax.ShapeDtypeStruct((), jnp.float32)
  _, shapes, _ = hf_flava.convert_codebook_state_dict(wrapped,
                                                      shapes_only=True)
  assert _count(shapes) == HF_CODEBOOK_FULL_PARAMS


# -- the codebook -------------------------------------------------------------

def _run_codebook(state, x):
  config, params, _ = hf_flava.convert_codebook_state_dict(state, "test")
  model = flava_codebook.ImageCodebook(
      flava_codebook.CodebookConfig(**config["codebook"]))
  return np.asarray(jax.jit(model.apply)({"params": unflatten_params(params)},
                                         jnp.asarray(x["images"])))


def test_codebook_parity_with_committed_hf_outputs(codebook_fixture):
  state, x, outs, meta = codebook_fixture
  assert hf_flava.codebook_config_from_hf(
      meta["hf_config"], image_size=16) == hf_flava.codebook_arch_config(
          "test")
  got = _run_codebook(state, x)
  assert got.shape == outs["logits"].shape == (2, 2, 2, 32)
  assert np.abs(got - outs["logits"]).max() <= ATOL
  assert np.abs(outs["logits"]).max() > 0.3
  np.testing.assert_array_equal(got.argmax(-1), outs["ids"])


# -- config, presets, errors ----------------------------------------------------

def test_config_from_hf_matches_the_test_arch(fixture):
  meta = fixture[3]
  assert hf_flava.config_from_hf(meta["hf_config"]) == (
      hf_flava.arch_config(ref.ARCH))
  cfg = flava.config_for("tiny")
  assert flava.from_dict(dataclasses.asdict(cfg)) == cfg
  with pytest.raises(ValueError, match="unknown FLAVA preset"):
    flava.config_for("huge")


def test_tiny_preset_params_carry_logical_axes():
  """Every param is boxed with logical axis names (sharding is one table in
  the config); unimodal calls leave the multimodal output out."""
  cfg = flava.config_for("tiny")
  flava.validate(cfg)
  model = flava.Flava(cfg)
  images, text = flava.init_inputs(cfg, batch=2, length=5)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, text)
  leaves = jax.tree.leaves(variables["params"],
                           is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)
  assert all(len(v.names) == v.value.ndim for v in leaves)
  out, _ = jax.eval_shape(
      lambda v, t: model.apply(v, text=t), variables, text)
  assert "multimodal_tokens" not in out and "image_tokens" not in out
  assert out["text_embedding"].shape == (2, 64)


def test_errors_name_the_tensors(fixture):
  state, _, _, _ = fixture
  with pytest.raises(ValueError, match="unknown Hugging Face FLAVA arch"):
    hf_flava.convert_state_dict(state, "flava-huge")
  cut = {k: v for k, v in state.items()
         if k != "text_model.encoder.layer.1.output.dense.weight"}
  with pytest.raises(common.ConversionError) as e:
    hf_flava.convert_state_dict(cut, ref.ARCH)
  assert e.value.missing == ["text_encoder/encoder/block1/mlp/fc2/kernel"]
  # Without one of query/key/value the other two are listed, and the fused
  # kernel is missing.
  cut = {k: v for k, v in state.items()
         if k != "multimodal_model.encoder.layer.0.attention.attention.key"
                 ".weight"}
  with pytest.raises(common.ConversionError) as e:
    hf_flava.convert_state_dict(cut, ref.ARCH)
  assert set(e.value.unmapped) == {
      "multimodal_model.encoder.layer.0.attention.attention.query.weight",
      "multimodal_model.encoder.layer.0.attention.attention.value.weight"}
  assert e.value.missing == [
      "multimodal_encoder/encoder/block0/attn/qkv/kernel"]
  # A tensor of another shape is named with the shape expected.
  name = "image_model.encoder.layer.0.intermediate.dense.weight"
  wrong = dict(state, **{name: state[name][:50]})
  with pytest.raises(common.ConversionError) as e:
    hf_flava.convert_state_dict(wrong, ref.ARCH)
  assert e.value.mismatched == [("image_encoder/encoder/block0/mlp/fc1/kernel",
                                 name, (50, 32), (56, 32), "linear")]
  # Older checkpoints saved the text buffers: ignored.
  buffers = dict(state, **{
      "text_model.embeddings.position_ids": np.arange(16)[None]})
  _, _, report = hf_flava.convert_state_dict(buffers, ref.ARCH)
  assert report.ignored == ["text_model.embeddings.position_ids"]


def test_image_size_override_interpolates_positions(fixture):
  state, _, _, _ = fixture
  config, params, report = hf_flava.convert_state_dict(state, ref.ARCH,
                                                       image_size=48)
  assert config["image_size"] == 48
  assert report.resized == [("image_encoder/pos_embed", (1, 17, 32),
                             (37, 32))]
  np.testing.assert_array_equal(
      params["image_encoder/pos_embed"][0],
      state["image_model.embeddings.position_embeddings"][0, 0])
