"""A frozen visual tokenizer as the frozen network of another task.

BEiT v2 / BEiT-3 / FLAVA masked image modeling predicts, at every masked
patch, the code a frozen visual tokenizer gives that patch. Two kinds are
read (`load_visual_tokenizer` tells them apart by their config.json):

  * `FrozenVQTokenizer`: a `vqkd` training workdir (florax.tasks.vqkd;
    config.json's task 'vqkd'), BEiT v2's VQ-KD. Only the encoder, its task
    layer and the codebook are read: the decoder (which only served to
    train the tokenizer) is not loaded.
  * `FrozenImageCodebook`: a FLAVA image codebook import directory
    (config.json's model.arch 'flava_codebook'), the DALL-E dVAE encoder
    FLAVA's paper takes its MIM / MMM targets from
    (florax.models.flava_codebook), written by
    `python -m launch.import_weights --source hf ... --codebook_out DIR`.

Both give a consumer task what it needs to hold the tokenizer as frozen
variables (florax.tasks.base): boxed abstract params with logical axes
(`spec`), the params placed on the run's shardings (`load`), a source to
record (`source`), and the codes of a batch of the consumer's pixels
(`codes`, after `set_input_stats` gave the consumer's normalisation),
computed inside its jitted step.

The consumer's token grid must equal the tokenizer's (`grid`): check it
before compiling, e.g. `tokenizer.check_grid(my_grid, "model.image")`.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from florax import export
from florax import restore
from florax.convert import hf_flava
from florax.models import flava_codebook
from florax.models import vqkd as vqkd_lib
from florax.tasks import frozen_tower
from florax.tasks import vqkd as vqkd_task
from florax.train import init_from


def _load_checked(spec, flat, what: str, kind: str, shardings):
  """The params `spec` names, read from `flat` (every one present, of its
  shape: a ValueError naming the first that is not), as fp32, placed."""
  want = export.flatten_params(jax.tree.map(
      lambda b: b.value if isinstance(b, nn.Partitioned) else b, spec,
      is_leaf=lambda b: isinstance(b, nn.Partitioned)))
  missing = sorted(set(want) - set(flat))
  if missing:
    raise ValueError(f"{kind} {what}: {len(missing)} params missing (e.g. "
                     f"{missing[0]})")
  for k, v in want.items():
    if tuple(flat[k].shape) != tuple(v.shape):
      raise ValueError(f"{kind} {what}: {k} has shape {flat[k].shape}, its "
                       f"config needs {v.shape}")
  params = export.unflatten_params(
      {k: np.asarray(flat[k], np.float32) for k in want})
  return jax.device_put(params, shardings)


class FrozenVQTokenizer:
  """The tokenizer of the vqkd run at `path` (checkpoint `step`, -1 latest).

  Args:
    path: a `vqkd` training workdir.
    step: its checkpoint (-1: the latest).
    dtype: compute dtype of the encoder (the consumer's).
  """

  def __init__(self, path: str, step: int = -1, dtype=jnp.float32):
    if not path:
      raise ValueError("no tokenizer: set the tokenizer path to a vqkd "
                       "training workdir (python -m launch.train --config "
                       "configs/vqkd.py:tiny --workdir DIR)")
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
      raise FileNotFoundError(
          f"tokenizer path {path!r} has no config.json: give the workdir of "
          "a vqkd run (configs/vqkd.py)")
    with open(file, encoding="utf-8") as f:
      raw = json.load(f)
    task = raw.get("task")
    if task != vqkd_task.TASK_NAME:
      raise ValueError(
          f"tokenizer path {path!r} is not a VQ-KD tokenizer run: its task is "
          f"{task!r}, not {vqkd_task.TASK_NAME!r} (train one with "
          "configs/vqkd.py)")
    self.config = ml_collections.ConfigDict(raw)
    self.path, self.dtype = path, dtype
    steps = restore.available_steps(path)
    if not steps:
      raise FileNotFoundError(f"tokenizer path {path!r} holds no checkpoint")
    if step not in (-1, None) and step not in steps:
      raise ValueError(f"tokenizer step {step} is not a checkpoint of {path} "
                       f"(it has {steps})")
    self.step = steps[-1] if step in (-1, None) else step
    # The target width only shapes the decoder, which is not loaded.
    self.model_config = vqkd_task.model_config(self.config.model, 1)
    self.module = vqkd_lib.VQKD(self.model_config, dtype)
    self.image_size = int(self.config.data.image_size)
    # The pixel statistics the run trained on (the teacher's reader's rule).
    self.mean, self.std = frozen_tower._pixel_stats(  # pylint: disable=protected-access
        self.config, path)
    self._renormalise = False

  @property
  def num_codes(self) -> int:
    return self.model_config.codebook_size

  @property
  def grid(self) -> int:
    """Tokens per side at the tokenizer's image size."""
    return self.model_config.grid

  def check_grid(self, grid: int, where: str = "the consumer's patch grid"):
    """Raises ValueError unless `grid` (tokens per side) is the tokenizer's."""
    if grid != self.grid:
      raise ValueError(
          f"{where} is {grid}x{grid} but the tokenizer at {self.path} gives a "
          f"{self.grid}x{self.grid} grid of codes ({self.image_size} px, patch "
          f"{self.model_config.encoder.patch_size}): the MIM targets need one "
          "code per patch, so make the grids equal")

  def spec(self):
    """Abstract encoder + codebook params with logical-axis boxes."""
    s = self.image_size
    return jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)),
        method=self.module.encode)["params"])

  def load(self, shardings):
    """The params, checked against the run's config and placed."""
    return _load_checked(self.spec(), *init_from.read_source(
        self.path, self.step), "tokenizer", shardings)

  def source(self) -> str:
    return f"vqkd checkpoint step {self.step} of {os.path.abspath(self.path)}"

  def set_input_stats(self, mean, std):
    """The consumer's pixel (mean, std): x_tok = (x*std + mean - m_t)/s_t."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    m_t = np.asarray(self.mean, np.float32)
    s_t = np.asarray(self.std, np.float32)
    self._renormalise = not (np.allclose(mean, m_t) and np.allclose(std, s_t))
    self._scale = jnp.asarray(std / s_t)
    self._shift = jnp.asarray((mean - m_t) / s_t)

  def codes(self, params, images):
    """int32 (B, grid * grid) codes, row-major over the patch grid.

    `images` (B, H, W, 3) are normalised like the consumer's data; they are
    re-normalised to the tokenizer's statistics and resized to its
    resolution here.
    """
    x = images.astype(jnp.float32)
    if self._renormalise:
      x = x * self._scale + self._shift
    s = self.image_size
    if x.shape[1:3] != (s, s):
      x = jax.image.resize(x, (x.shape[0], s, s, 3), "bilinear")
    _, indices = self.module.apply({"params": params}, x,
                                   method=self.module.encode)
    return jax.lax.stop_gradient(indices.reshape(indices.shape[0], -1))


CODEBOOK_ARCH = "flava_codebook"
KINDS = ("a `vqkd` training workdir (config.json's task 'vqkd': python -m "
         "launch.train --config configs/vqkd.py:tiny --workdir DIR)",
         "a FLAVA image codebook import directory (config.json's model.arch "
         f"{CODEBOOK_ARCH!r}: python -m launch.import_weights --source hf "
         "... --codebook_out DIR)")


def _read_json(file: str):
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _arch_of(raw) -> str | None:
  model = raw.get("model") if isinstance(raw, dict) else None
  return model.get("arch") if isinstance(model, dict) else None


def is_codebook_import(path: str) -> bool:
  """Whether `path` holds the config of a FLAVA image codebook import."""
  return _arch_of(_read_json(os.path.join(path, "config.json"))) == (
      CODEBOOK_ARCH)


class FrozenImageCodebook:
  """FLAVA's image codebook (DALL-E's dVAE encoder, HF FlavaImageCodebook)
  from the import directory at `path` (launch.import_weights --source hf
  --codebook_out), with FrozenVQTokenizer's interface.

  Its codes are the argmax visual words of FLAVA's codebook input: the
  consumer's pixels mapped back to [0, 1] (`set_input_stats`), resized to
  the codebook's input size (image_size = grid * 8: 112 px, a 14x14 grid,
  for facebook/flava-image-codebook, the grid of FLAVA's 224 px / patch 16
  encoder) and mapped to 0.1 + 0.8 x as HF's FlavaImageProcessor does
  (DALL-E's map_pixels; florax.models.flava_codebook.ImageCodebook takes
  pixels already mapped).

  Args:
    path: a codebook import directory.
    step: -1 (an import directory holds one set of weights, no steps).
    dtype: compute dtype of the codebook (the consumer's).
  """

  def __init__(self, path: str, step: int = -1, dtype=jnp.float32):
    if not path:
      raise ValueError("no codebook: give the directory python -m "
                       "launch.import_weights --source hf ... --codebook_out "
                       "DIR wrote")
    raw = _read_json(os.path.join(path, export.CONFIG_FILE))
    if raw is None:
      raise FileNotFoundError(
          f"codebook path {path!r} has no readable config.json: give the "
          "directory launch.import_weights --codebook_out wrote")
    if _arch_of(raw) != CODEBOOK_ARCH:
      raise ValueError(
          f"codebook path {path!r} is not a FLAVA image codebook import: its "
          f"model.arch is {_arch_of(raw)!r}, not {CODEBOOK_ARCH!r}")
    if step not in (-1, None, 0):
      raise ValueError(
          f"tokenizer step {step}: the codebook import {path} holds one set "
          "of weights, no checkpoints (leave tokenizer.step at -1)")
    for name in (export.PARAMS_FILE, export.MANIFEST):
      if not os.path.exists(os.path.join(path, name)):
        raise FileNotFoundError(
            f"codebook import {path} has no {name}: it is incomplete (the "
            "manifest is written last); run launch.import_weights "
            "--codebook_out again")
    self.config = ml_collections.ConfigDict(raw)
    fields = dict(raw["model"].get(CODEBOOK_ARCH) or {})
    try:
      self.model_config = flava_codebook.CodebookConfig(**fields)
    except TypeError as e:
      raise ValueError(f"codebook import {path}: config.json's model."
                       f"{CODEBOOK_ARCH} does not describe a codebook "
                       f"({e})") from None
    flava_codebook.validate(self.model_config)
    self.manifest = _read_json(os.path.join(path, export.MANIFEST)) or {}
    self.path, self.step, self.dtype = path, 0, dtype
    self.module = flava_codebook.ImageCodebook(self.model_config, dtype)
    self.image_size = int(self.model_config.image_size)
    # Until set_input_stats: the consumer's images are [0, 1] pixels.
    self._mean = jnp.zeros((3,), jnp.float32)
    self._std = jnp.ones((3,), jnp.float32)

  @property
  def num_codes(self) -> int:
    return self.model_config.vocab_size

  @property
  def grid(self) -> int:
    """Codes per side at the codebook's input size (image_size / 8)."""
    return self.model_config.grid

  def check_grid(self, grid: int, where: str = "the consumer's patch grid"):
    """Raises ValueError unless `grid` (tokens per side) is the codebook's."""
    if grid != self.grid:
      raise ValueError(
          f"{where} is {grid}x{grid} but the image codebook at {self.path} "
          f"gives a {self.grid}x{self.grid} grid of codes ({self.image_size} "
          "px input, one code per 8x8 cell): the MIM targets need one code "
          "per patch, so make the grids equal")

  def spec(self):
    """Abstract codebook params with logical-axis boxes."""
    s = self.image_size
    return jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"])

  def load(self, shardings):
    """The params (params.safetensors), checked against the config and
    placed."""
    return _load_checked(self.spec(), *init_from.read_source(self.path),
                         "image codebook", shardings)

  def source(self) -> str:
    src = self.manifest.get("source") or {}
    origin = ""
    if src.get("checkpoint"):
      origin = (f" (from {src.get('source')} {src.get('arch')} checkpoint "
                f"{src['checkpoint']}, sha256 "
                f"{str(src.get('checkpoint_sha256'))[:12]})")
    return (f"{CODEBOOK_ARCH} import {os.path.abspath(self.path)}, "
            f"{self.image_size} px{origin}")

  def set_input_stats(self, mean, std):
    """The consumer's pixel (mean, std): pixels = x * std + mean."""
    self._mean = jnp.asarray(np.asarray(mean, np.float32).reshape(3))
    self._std = jnp.asarray(np.asarray(std, np.float32).reshape(3))

  def codes(self, params, images):
    """int32 (B, grid * grid) visual words, row-major over the code grid.

    `images` (B, H, W, 3) are normalised like the consumer's data; they are
    mapped back to [0, 1] pixels, resized to the codebook's input size,
    clipped to [0, 1] and mapped to 0.1 + 0.8 x here.
    """
    x = images.astype(jnp.float32) * self._std + self._mean
    s = self.image_size
    if x.shape[1:3] != (s, s):
      # HF's FlavaImageProcessor resizes the original image to 112 px with
      # PIL's LANCZOS (its torchvision backend: Lanczos from torchvision
      # 0.27, bicubic before). jax.image.resize's antialiased 'lanczos3' is
      # PIL's LANCZOS on float pixels (max difference ~2e-7 at 32 -> 16
      # and 224 -> 112; 'bilinear', which FrozenVQTokenizer uses, is 0.1
      # off; tests/test_flava_codebook_tokenizer.py checks 32 -> 16). What
      # still differs: PIL resamples 8-bit pixels (rounded to 1/255), and
      # HF starts from the original image where this starts from the
      # consumer's already resized (and augmented) one.
      x = jax.image.resize(x, (x.shape[0], s, s, 3), "lanczos3")
    # 8-bit pixels cannot leave [0, 1]: Lanczos' overshoot is clipped as
    # PIL's is.
    x = jnp.clip(x, 0.0, 1.0)
    eps = hf_flava.CODEBOOK_PIXEL_EPS
    x = (1.0 - 2.0 * eps) * x + eps
    indices = self.module.apply({"params": params}, x,
                                method=self.module.indices)
    return jax.lax.stop_gradient(indices.reshape(indices.shape[0], -1))


def load_visual_tokenizer(path: str, step: int, dtype):
  """The frozen visual tokenizer at `path`: a `vqkd` workdir's VQ-KD
  (FrozenVQTokenizer) or a FLAVA image codebook import
  (FrozenImageCodebook); anything else is refused, naming both (a module
  function so tests can substitute one)."""
  if path and is_tokenizer_run(path):
    return FrozenVQTokenizer(path, step, dtype)
  if path and is_codebook_import(path):
    return FrozenImageCodebook(path, step, dtype)
  if not path:
    why = "no path was given"
  elif not os.path.isdir(path):
    why = "it is not a directory"
  else:
    raw = _read_json(os.path.join(path, "config.json"))
    if raw is None:
      why = "it has no readable config.json"
    else:
      task = raw.get("task") if isinstance(raw, dict) else None
      why = (f"its config.json is of task {task!r}, model.arch "
             f"{_arch_of(raw)!r}")
  raise ValueError(f"visual tokenizer path {path!r} is neither {KINDS[0]} "
                   f"nor {KINDS[1]}: {why}")


class VisualTokenizerMixin:
  """A task's frozen visual tokenizer (BEiT-3's MIM, FLAVA's MIM and MMM
  targets): `config.tokenizer.path` (a `vqkd` workdir at
  `config.tokenizer.step`, or a FLAVA image codebook import directory:
  `load_visual_tokenizer`), fed the task's image normalisation
  (`preprocess_spec()`), as the task's frozen variables. The task sets
  `self._vq = None` and has `dtype`."""

  @property
  def visual_tokenizer(self):
    if self._vq is None:
      t = self.config.tokenizer
      if not t.path:
        raise ValueError(f"no visual tokenizer: set tokenizer.path to "
                         f"{KINDS[0]} or {KINDS[1]}")
      self._vq = load_visual_tokenizer(t.path, t.get("step", -1), self.dtype)
      spec = self.preprocess_spec()
      self._vq.set_input_stats(spec["mean"], spec["std"])
    return self._vq

  def check_visual_grid(self, grid: int, what: str):
    """Refuses a tokenizer whose code grid is not the model's patch grid."""
    vq = self.visual_tokenizer
    if vq.grid != grid:
      raise ValueError(
          f"the visual tokenizer ({self.config.tokenizer.path}) gives a "
          f"{vq.grid}x{vq.grid} code grid but {what} has {grid}x{grid} "
          "patches; masked image modeling needs one code per patch")
    if vq.num_codes < 2:
      raise ValueError(f"the visual tokenizer has {vq.num_codes} codes")

  def visual_codes(self, frozen, images):
    """The tokenizer's code of every patch, (B, grid * grid) int32."""
    return jax.lax.stop_gradient(
        self.visual_tokenizer.codes(frozen, images)).astype(jnp.int32)

  def frozen_spec(self):
    return self.visual_tokenizer.spec()

  def load_frozen(self, shardings):
    return self.visual_tokenizer.load(shardings)

  def frozen_source(self):
    return "visual tokenizer: " + self.visual_tokenizer.source()


def is_tokenizer_run(path: str) -> bool:
  """Whether `path` holds the config of a vqkd run."""
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      return json.load(f).get("task") == vqkd_task.TASK_NAME
  except (OSError, ValueError, AttributeError):
    return False

