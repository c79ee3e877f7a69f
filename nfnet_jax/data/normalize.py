"""Image normalisation: the ImageNet channel mean and standard deviation.

The one home of these constants: the TF transforms, the numpy path and any
on-device code import them from here. Values are on the 0-255 scale, RGB order
(the torchvision/DeepMind convention: 0.485, 0.456, 0.406 and 0.229, 0.224,
0.225 times 255), float32.
"""
from __future__ import annotations

import numpy as np

MEAN_RGB = np.array([0.485 * 255, 0.456 * 255, 0.406 * 255], np.float32)
STDDEV_RGB = np.array([0.229 * 255, 0.224 * 255, 0.225 * 255], np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
  """[..., 3] on the 0-255 scale -> (x - MEAN_RGB) / STDDEV_RGB, float32."""
  return (np.asarray(images, np.float32) - MEAN_RGB) / STDDEV_RGB
