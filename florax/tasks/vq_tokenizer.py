"""A trained VQ-KD tokenizer as the frozen network of another task.

BEiT v2 / BEiT-3 masked image modeling predicts, at every masked patch, the
code a frozen visual tokenizer gives that patch. `FrozenVQTokenizer` reads a
`vqkd` training workdir (florax.tasks.vqkd) and gives a consumer task what
it needs to hold the tokenizer as frozen variables (florax.tasks.base):
boxed abstract params with logical axes (`spec`), the params placed on the
run's shardings (`load`), a source to record (`source`), and the codes of a
batch of the consumer's pixels (`codes`), computed inside its jitted step.

Only the encoder, its task layer and the codebook are read: the decoder
(which only served to train the tokenizer) is not loaded.

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
from florax.models import vqkd as vqkd_lib
from florax.tasks import frozen_tower
from florax.tasks import vqkd as vqkd_task
from florax.train import init_from


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
    flat, what = init_from.read_source(self.path, self.step)
    want = export.flatten_params(jax.tree.map(
        lambda b: b.value if isinstance(b, nn.Partitioned) else b,
        self.spec(), is_leaf=lambda b: isinstance(b, nn.Partitioned)))
    missing = sorted(set(want) - set(flat))
    if missing:
      raise ValueError(f"tokenizer {what}: {len(missing)} params missing "
                       f"(e.g. {missing[0]})")
    for k, v in want.items():
      if tuple(flat[k].shape) != tuple(v.shape):
        raise ValueError(f"tokenizer {what}: {k} has shape {flat[k].shape}, "
                         f"its config needs {v.shape}")
    params = export.unflatten_params(
        {k: np.asarray(flat[k], np.float32) for k in want})
    return jax.device_put(params, shardings)

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


def load_visual_tokenizer(path: str, step: int, dtype):
  """The frozen VQ-KD tokenizer of a `vqkd` workdir (a module function so
  tests can substitute one)."""
  return FrozenVQTokenizer(path, step, dtype)


class VisualTokenizerMixin:
  """A task's frozen visual tokenizer (BEiT-3's MIM, FLAVA's MIM and MMM
  targets): `config.tokenizer.path` (a `vqkd` workdir) at
  `config.tokenizer.step`, fed the task's image normalisation
  (`preprocess_spec()`), as the task's frozen variables. The task sets
  `self._vq = None` and has `dtype`."""

  @property
  def visual_tokenizer(self):
    if self._vq is None:
      t = self.config.tokenizer
      if not t.path:
        raise ValueError("no visual tokenizer: set tokenizer.path to a "
                         "`vqkd` training workdir (configs/vqkd.py)")
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
  except (OSError, ValueError):
    return False

