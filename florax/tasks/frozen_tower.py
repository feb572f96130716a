"""A frozen image tower read from another florax run: a teacher or tokenizer.

EVA regresses a frozen CLIP's patch features; BEiT v2's VQ-KD tokenizer
distills one. The tower is any florax image encoder (CoSwin or ViT) whose
params live in a training workdir (a checkpoint) or an export directory
(`launch.export`, or `launch.import_weights` for an open_clip/timm model),
both of which keep the run's `config.json` next to the weights.

The tower's params become the task's frozen variables (florax.tasks.base):
boxed with the model's logical axes, placed by the run's sharding rules,
fed to every step and never trained or checkpointed; `source()` names the
path and step, recorded in the workdir so a resume with another teacher is
refused.
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
from florax.models import two_tower
from florax.train import init_from

#: Params of the image tower inside a two-tower model (florax's layout).
PREFIX = "image_encoder"


def _read_config(path: str) -> ml_collections.ConfigDict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(
        f"teacher path {path!r} has no config.json: give a florax training "
        "workdir or an export directory (launch.export / "
        "launch.import_weights)")
  with open(file, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _pixel_stats(config, path: str) -> tuple[list, list]:
  """(mean, std) of the pixels the tower was trained on."""
  manifest = os.path.join(path, "manifest.json")
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      pre = json.load(f).get("preprocess") or {}
    if "mean" in pre:
      return list(pre["mean"]), list(pre["std"])
  data = config.get("data") or {}
  if data.get("name", "digits") == "digits":
    return [0.5] * 3, [0.5] * 3  # digits are scaled to [-1, 1]
  return list(data.records.mean), list(data.records.std)


class FrozenImageTower:
  """The image tower of the run at `path` (checkpoint `step`, -1 latest).

  Args:
    path: a training workdir or an export directory.
    step: the workdir's checkpoint (ignored for an export).
    dtype: compute dtype (the student's: a bf16 run runs its teacher in bf16).
  """

  def __init__(self, path: str, step: int = -1, dtype=jnp.float32):
    if not path:
      raise ValueError("no teacher: set teacher.path to a florax training "
                       "workdir or export directory")
    self.path, self.step = path, step
    self.config = _read_config(path)
    model_cfg = self.config.model
    self.image_size = int(self._image_size())
    two_tower.validate_image(model_cfg, self.image_size)
    self.arch = two_tower.image_arch(model_cfg)
    self.image_cfg = two_tower.image_config(model_cfg)
    self.module = two_tower.image_encoder(model_cfg, dtype)
    self.mean, self.std = _pixel_stats(self.config, path)
    self._is_export = os.path.exists(os.path.join(path, "params.safetensors"))
    if not self._is_export:
      steps = restore.available_steps(path)
      if not steps:
        raise FileNotFoundError(f"teacher path {path!r} holds no checkpoint")
      if step not in (-1, None) and step not in steps:
        raise ValueError(f"teacher.step={step} is not a checkpoint of {path} "
                         f"(it has {steps})")
      self.step = steps[-1] if step in (-1, None) else step

  def _image_size(self) -> int:
    manifest = os.path.join(self.path, "manifest.json")
    if os.path.exists(manifest):
      with open(manifest, encoding="utf-8") as f:
        return json.load(f)["image_size"]
    return self.config.data.image_size

  @property
  def width(self) -> int:
    """Channels of the patch features (CoSwin: its last stage)."""
    cfg = self.image_cfg
    if self.arch == "vit":
      return cfg.width
    return cfg.embed_dim * 2 ** (len(cfg.depths) - 1)

  @property
  def grid(self) -> int:
    """Side of the patch-feature map."""
    if self.arch == "vit":
      return self.image_cfg.grid
    from florax.models import coswin  # pylint: disable=g-import-not-at-top
    return coswin.stage_grids(self.image_size, self.image_cfg)[-1]

  def spec(self):
    """Abstract params with logical-axis boxes (the frozen_spec)."""
    s = self.image_size
    return jax.eval_shape(
        lambda: self.module.init(jax.random.key(0),
                                 jnp.zeros((1, s, s, 3)))["params"])

  def load(self, shardings):
    """The params, checked against the config's model and placed."""
    flat, what = init_from.read_source(self.path, self.step)
    # Not nn.unbox: under the run's logical rules it would add sharding
    # constraints to these abstract values.
    want = export.flatten_params(jax.tree.map(
        lambda b: b.value if isinstance(b, nn.Partitioned) else b,
        self.spec(), is_leaf=lambda b: isinstance(b, nn.Partitioned)))
    prefix = PREFIX + "/"
    got = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    missing = sorted(set(want) - set(got))
    if missing:
      raise ValueError(f"teacher {what}: {len(missing)} image-tower params "
                       f"missing (e.g. {prefix}{missing[0]}); is it a florax "
                       "image-text or image model?")
    for k, v in want.items():
      if tuple(got[k].shape) != tuple(v.shape):
        raise ValueError(f"teacher {what}: {prefix}{k} has shape "
                         f"{got[k].shape}, its config needs {v.shape}")
    params = export.unflatten_params(
        {k: np.asarray(got[k], np.float32) for k in want})
    return jax.device_put(params, shardings)

  def source(self) -> str:
    if self._is_export:
      return f"export {os.path.abspath(self.path)}"
    return f"checkpoint step {self.step} of {os.path.abspath(self.path)}"

  def patch_features(self, params, images):
    """(B, grid, grid, width) float32: a ViT's final patch tokens (after its
    final norm when it pools the class token), or CoSwin's last stage after
    its final norm.

    `images` are normalised like the student's data; they are re-normalised
    to the tower's pixel statistics and resized to its resolution here.
    """
    x = images.astype(jnp.float32)
    if self._renormalise:
      x = (x * self._scale) + self._shift
    s = self.image_size
    if x.shape[1:3] != (s, s):
      x = jax.image.resize(x, (x.shape[0], s, s, 3), "bilinear")
    _, aux = self.module.apply({"params": params}, x, True)
    tokens = aux["tokens"].astype(jnp.float32)
    if self.arch == "vit":
      tokens = tokens[:, self.image_cfg.num_prefix:]
      g = self.image_cfg.grid
      tokens = tokens.reshape(tokens.shape[0], g, g, tokens.shape[-1])
    return tokens

  def set_input_stats(self, mean, std):
    """The student's pixel (mean, std): x_teacher = (x*std + mean - m_t)/s_t."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    m_t, s_t = np.asarray(self.mean, np.float32), np.asarray(self.std,
                                                            np.float32)
    self._renormalise = not (np.allclose(mean, m_t) and np.allclose(std, s_t))
    self._scale = jnp.asarray(std / s_t)
    self._shift = jnp.asarray((mean - m_t) / s_t)

  _renormalise = False


def from_config(teacher_cfg, dtype, input_spec: dict) -> FrozenImageTower:
  """The teacher of `config.teacher` (path, step), fed pixels normalised by
  the consumer's `input_spec` (its preprocess spec's mean/std)."""
  tower = FrozenImageTower(teacher_cfg.path, teacher_cfg.get("step", -1),
                           dtype)
  tower.set_input_stats(input_spec["mean"], input_spec["std"])
  return tower


def resample_to_grid(features, grid: int):
  """(B, g, g, C) teacher features on the student's (grid x grid) patches:
  average-pooled when the teacher's grid is a multiple of the student's,
  repeated (nearest) when the student's is a multiple of the teacher's."""
  g = features.shape[1]
  if g == grid:
    return features
  if g % grid == 0:
    f = g // grid
    b, _, _, c = features.shape
    return features.reshape(b, grid, f, grid, f, c).mean(axis=(2, 4))
  if grid % g == 0:
    f = grid // g
    return jnp.repeat(jnp.repeat(features, f, axis=1), f, axis=2)
  raise ValueError(f"the teacher's {g}x{g} feature grid and the student's "
                   f"{grid}x{grid} patches are not multiples of each other")
