"""The eval transform imported weights expect (timm / open_clip: shorter
side resized bicubically, centre crop) against torchvision's own transforms
where installed, and by construction on an image whose crop is known."""

import numpy as np
import pytest
from PIL import Image

from florax.data import preprocess
from tests.fixtures import torch_env


def _image(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))


def test_resize_center_crop_without_resizing_is_the_centre_square():
  """With the shorter side already at resize_size nothing is resampled:
  the output is the centred crop (torchvision's rounding), normalised."""
  img = _image(40, 24)
  spec = preprocess.resize_center_crop_spec(16, 24, [0.5] * 3, [0.25] * 3)
  got = preprocess.apply(img, spec)
  top, left = int(round((24 - 16) / 2)), int(round((40 - 16) / 2))
  want = np.asarray(img)[top:top + 16, left:left + 16] / 255.0
  np.testing.assert_allclose(got, (want - 0.5) / 0.25, atol=1e-5)


@pytest.mark.parametrize("size,resize,wh", [(32, 35, (50, 37)),
                                            (24, 24, (30, 61))])
def test_resize_center_crop_matches_torchvision(size, resize, wh):
  torch_env.require_timm()  # imports torchvision with the CPU workaround
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  img = _image(*wh, seed=size)
  ref = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                   T.CenterCrop(size)])(img)
  spec = preprocess.resize_center_crop_spec(size, resize, [0.0] * 3,
                                            [1.0] * 3)
  got = preprocess.apply(img, spec)
  np.testing.assert_allclose(got, np.asarray(ref, np.float32) / 255.0,
                             atol=1e-6)
