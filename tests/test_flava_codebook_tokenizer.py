"""FLAVA's DALL-E codebook (florax.models.flava_codebook) as the FLAVA
task's frozen visual tokenizer (florax.tasks.vq_tokenizer.
FrozenImageCodebook, picked by load_visual_tokenizer from a codebook import
directory).

The directory is made by the real import path (launch.import_weights.
import_hf_flava --codebook_out) from the committed random codebook of
tests/fixtures/hf_flava_codebook_tiny.npz (HF arch 'test': 16 px input, a
2x2 grid of 32 visual words), saved inside a FlavaForPreTraining
checkpoint as test_import_flava_cli does. The tiny FLAVA then runs with a
2x2 patch grid: 16 px images at patch 8 (no resize) or 32 px at patch 16
(resized to the codebook's 16 px).

References, none through florax's pixel path: the fixture's own recorded
transformers codebook logits for its input pixels; and, with torch +
transformers, a live FlavaImageCodebook with the same weights fed pixels
resized by PIL (Lanczos, as HF's processor) and mapped as HF's
map_pixels. Codes are argmaxes: a position where the two disagree must be
a tie of the reference logits (within 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

import helpers
from configs import flava as cfg_lib
from florax import tasks
from florax.data import flava_digits
from florax.tasks import base, flava, vq_tokenizer
from tests.fixtures import make_hf_flava as ref

CONSUMER_MEAN = CONSUMER_STD = 0.5  # the digits' [-1, 1] (resize_spec)
TIE = 1e-4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(FLAVA import dir, codebook import dir) written by import_hf_flava."""
  from launch import import_weights  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("hf_flava_codebook")
  state = ref.load(ref.FIXTURE)[0]
  codebook = ref.load(ref.CODEBOOK_FIXTURE)[0]
  pre = {f"flava.{k}": v for k, v in state.items()}
  pre.update({f"image_codebook.{k}": v for k, v in codebook.items()})
  save_file(pre, str(d / "pretraining.safetensors"))
  out, cb = d / "flava", d / "codebook"
  import_weights.import_hf_flava("test", str(d / "pretraining.safetensors"),
                                 str(out), codebook_out=str(cb))
  return str(out), str(cb)


def flava_config(path, size=16, patch=8, **overrides):
  c = cfg_lib.get_config("tiny")
  with c.unlocked():
    c.tokenizer.path = path
    c.data.image_size = size
    c.data.random_shift = 0
    c.model.flava.image.image_size = size
    c.model.flava.image.patch_size = patch
    c.flava.min_block = 1
    for k in flava_digits.KINDS:
      c.data.batch_sizes[k] = 4
    c.train.batch_size = 4
    for tower in ("image", "text", "multimodal"):
      c.model.flava[tower].depth = 1
    helpers.apply_overrides(c, overrides)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("flava_work"))  # its text tokenizer


@pytest.fixture(scope="module")
def task16(dirs, workdir):
  return tasks.build(flava_config(dirs[1]), workdir)


def _consumer(pixels):
  """[0, 1] pixels as the FLAVA task's data normalises them."""
  return ((pixels - CONSUMER_MEAN) / CONSUMER_STD).astype(np.float32)


def _assert_codes(got, want, logits):
  """got == want, except where the reference logits (B, g, g, V) tie."""
  b = got.shape[0]
  flat = logits.reshape(b, -1, logits.shape[-1])
  assert got.shape == want.shape and got.dtype == np.int32
  for i, j in zip(*np.nonzero(got != want)):
    gap = flat[i, j, want[i, j]] - flat[i, j, got[i, j]]
    assert gap <= TIE, (i, j, got[i, j], want[i, j], gap)


def test_task_codes_equal_the_recorded_hf_codebook(task16, dirs):
  """The task's codes of the fixture's images (its codebook pixels mapped
  back through 0.1 + 0.8 x and the digits' normalisation) are the
  argmaxes of transformers' recorded logits, row-major."""
  tok = task16.visual_tokenizer
  assert isinstance(tok, vq_tokenizer.FrozenImageCodebook)
  assert (tok.num_codes, tok.grid, tok.image_size) == (32, 2, 16)
  assert tok.source().startswith(f"flava_codebook import {dirs[1]}, 16 px "
                                 "(from hf test checkpoint ")
  assert sorted(nn.unbox(task16.frozen_spec())) == [
      "group1", "group2", "group3", "group4", "input", "output"]
  _, x, outs, _ = ref.load(ref.CODEBOOK_FIXTURE)
  pixels = (x["images"] - 0.1) / 0.8  # HF's codebook input -> [0, 1]
  frozen = task16.load_frozen(None)
  got = np.asarray(jax.jit(task16.visual_codes)(frozen,
                                                jnp.asarray(_consumer(pixels))))
  want = outs["ids"].reshape(2, 4)
  assert got.shape == (2, 4)
  np.testing.assert_array_equal(want, np.argmax(outs["logits"], -1).reshape(
      2, 4))
  _assert_codes(got, want, outs["logits"])


def _pil_lanczos(pixels, size):
  """(B, S, S, 3) float pixels resized by PIL's LANCZOS, channel by channel
  (HF FlavaImageProcessor's codebook resample, on float images)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.stack([np.asarray(Image.fromarray(
      np.ascontiguousarray(img[..., c]), mode="F").resize(
          (size, size), Image.LANCZOS)) for c in range(3)], -1)
                   for img in pixels]).astype(np.float32)


def test_lanczos_resize_is_pils():
  """The codebook's resize (jax.image.resize 'lanczos3') is PIL's LANCZOS
  on float pixels, as vq_tokenizer's comment says."""
  rng = np.random.default_rng(3)
  pixels = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  got = np.asarray(jax.image.resize(jnp.asarray(pixels), (2, 16, 16, 3),
                                    "lanczos3"))
  np.testing.assert_allclose(got, _pil_lanczos(pixels, 16), atol=1e-6)


def _hf_codebook():
  torch = pytest.importorskip("torch")
  transformers = ref.import_transformers()
  if transformers is None:
    pytest.skip("transformers' FLAVA is not importable")
  model = transformers.FlavaImageCodebook(
      transformers.FlavaImageCodebookConfig(**ref.CODEBOOK_KWARGS))
  state = ref.load(ref.CODEBOOK_FIXTURE)[0]
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  model.eval()

  def run(codebook_pixels):
    """(ids (B, g*g), logits (B, g, g, V)) of HF-prepared pixels."""
    t = torch.from_numpy(codebook_pixels).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
      logits = model(t).permute(0, 2, 3, 1).numpy()
      ids = model.get_codebook_indices(t).numpy()
    return ids.reshape(ids.shape[0], -1).astype(np.int32), logits
  return run


def test_task_codes_equal_live_hf_codebook(task16, dirs, workdir):
  """transformers' FlavaImageCodebook (same weights) on HF's codebook
  pixels: at the codebook's size (16 px), and from 32 px images through
  PIL's Lanczos (a FLAVA at patch 16: the same 2x2 grid)."""
  hf = _hf_codebook()
  eps = 0.1  # HF's LOGIT_LAPLACE_EPS
  rng = np.random.default_rng(7)
  pixels = rng.uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
  frozen = task16.load_frozen(None)
  got = np.asarray(jax.jit(task16.visual_codes)(
      frozen, jnp.asarray(_consumer(pixels))))
  want, logits = hf((1 - 2 * eps) * pixels + eps)
  _assert_codes(got, want, logits)

  task32 = tasks.build(flava_config(dirs[1], size=32, patch=16), workdir)
  assert task32.visual_tokenizer.grid == task32.flava_config.image.grid == 2
  # Smooth images (a 4x4 grid of colours, upsampled) keep Lanczos' overshoot
  # small; what overshoots is clipped, as PIL's 8-bit output is.
  coarse = rng.uniform(0, 1, (6, 4, 4, 3)).astype(np.float32)
  big = np.asarray(jax.image.resize(jnp.asarray(coarse), (6, 32, 32, 3),
                                    "linear"))
  codes32, frozen32 = jax.jit(task32.visual_codes), task32.load_frozen(None)
  got = np.asarray(codes32(frozen32, jnp.asarray(_consumer(big))))
  small = np.clip(_pil_lanczos(big, 16), 0, 1)
  want, logits = hf((1 - 2 * eps) * small + eps)
  _assert_codes(got, want, logits)
  # Random black and white pixels: Lanczos overshoots [0, 1], which both
  # sides clip.
  noise = rng.integers(0, 2, (6, 32, 32, 3)).astype(np.float32)
  got = np.asarray(codes32(frozen32, jnp.asarray(_consumer(noise))))
  small = np.clip(_pil_lanczos(noise, 16), 0, 1)
  assert (small != _pil_lanczos(noise, 16)).any()
  want, logits = hf((1 - 2 * eps) * small + eps)
  _assert_codes(got, want, logits)


def test_other_directories_are_refused_naming_both_kinds(dirs, tmp_path,
                                                         workdir):
  both = (r"neither a `vqkd` training workdir .* nor a FLAVA image codebook "
          r"import directory .*--codebook_out DIR\)")
  flava_dir = dirs[0]  # the model's import, not its codebook's
  with pytest.raises(ValueError, match=both + r": its config.json is of task "
                     r"'', model.arch 'flava'"):
    vq_tokenizer.load_visual_tokenizer(flava_dir, -1, jnp.float32)
  with pytest.raises(ValueError, match=both + ": it has no readable "
                     "config.json"):
    vq_tokenizer.load_visual_tokenizer(str(tmp_path), -1, jnp.float32)
  with pytest.raises(ValueError, match=both + ": it is not a directory"):
    vq_tokenizer.load_visual_tokenizer(str(tmp_path / "nowhere"), -1,
                                       jnp.float32)
  # Through the task, before anything compiles.
  with pytest.raises(ValueError, match=both):
    tasks.build(flava_config(flava_dir), workdir)
  with pytest.raises(ValueError, match="vqkd.*codebook_out"):
    tasks.build(flava_config(""), workdir)
  # An import has no checkpoints to pick.
  with pytest.raises(ValueError, match="holds one set of weights"):
    vq_tokenizer.load_visual_tokenizer(dirs[1], 3, jnp.float32)


def test_grid_mismatch_is_refused(dirs, workdir):
  """The tiny FLAVA's 4x4 grid (32 px, patch 8) against the codebook's
  2x2: FlavaTask.validate refuses it."""
  with pytest.raises(ValueError, match="gives a 2x2 code grid but the image "
                     "encoder has 4x4 patches"):
    tasks.build(flava_config(dirs[1], size=32, patch=8), workdir)
  tok = vq_tokenizer.load_visual_tokenizer(dirs[1], -1, jnp.float32)
  with pytest.raises(ValueError, match=r"model.image is 4x4 .* 2x2 grid of "
                     r"codes \(16 px input"):
    tok.check_grid(4, "model.image")
  tok.check_grid(2)


def test_image_kind_loss_with_the_codebook(task16):
  """FLAVA's MIM on a digits batch, its targets the codebook's codes."""
  # The params the image kind reaches (the image encoder and the MIM head),
  # drawn in numpy: compiling the initialisers costs more than the step.
  n = task16.flava_config.image.grid ** 2
  shapes = nn.unbox(jax.eval_shape(lambda: task16.model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)),
      jnp.zeros((1, n), bool), method=flava.FlavaPretraining.mim)["params"]))
  assert sorted(shapes) == ["flava", "mim_head"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32)
                       if path[-1].key == "scale" else
                       0.05 * rng.standard_normal(s.shape).astype(
                           np.float32)), shapes)
  frozen = task16.load_frozen(None)
  batch = next(iter(flava_digits.kind_dataset(
      "image", tokenizer=task16.text_tokenizer,
      settings=task16.mask_settings(), image_size=16,
      max_len=task16.config.data.max_len,
      batch_size=4, seed=1)))
  ctx = base.StepContext(0, frozen, "image")
  loss, m = jax.jit(lambda p, b: task16.loss(p, b, jax.random.key(1), ctx))(
      params, batch)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(m["mim_loss"]) == pytest.approx(float(loss))
  assert float(m["mim_masked"]) > 0
  codes = np.asarray(task16.visual_codes(frozen, jnp.asarray(
      batch["images"])))
  assert codes.shape == (4, 4) and ((0 <= codes) & (codes < 32)).all()


def test_image_step_flops_count_the_codebook(dirs, workdir):
  """With the DALL-E codebook as the frozen tokenizer, the analytic image
  step (FLAVA's trained part + the codebook's forward + the Lanczos resize
  32 -> 16 px) equals the lowered step's op-by-op matmul/conv count."""
  from florax.models import flops  # pylint: disable=g-import-not-at-top
  from test_flops_flava import _lower  # pylint: disable=g-import-not-at-top
  task = tasks.build(flava_config(dirs[1], size=32, patch=16), workdir)
  analytic = task.step_flops("image", 4)
  assert analytic == pytest.approx(
      flops.hlo_matmul_flops(_lower(task, "image")), rel=1e-9)
