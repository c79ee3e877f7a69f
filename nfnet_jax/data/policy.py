"""RandAugment's op list and magnitude rules (no TensorFlow, no JAX).

Read by `augment` (and by the TF oracle of the tests). Magnitude M is on the 0-10 scale and extrapolated linearly above
10; `op_args` gives each op's unsigned argument at M.
"""
from __future__ import annotations

OP_NAMES = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
SIGNED_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
CONTRAST_MODES = ('tf', 'mean')
POSTERIZE_MODES = ('keep_bits', 'remove_bits')
SOLARIZE_MODES = ('wrap', 'saturate')


def solarize_threshold(threshold: int, mode: str = 'wrap') -> int:
  """The effective int threshold of Solarize: 'wrap' -> threshold % 256 (what a
  uint8 comparison with a Python int does in a TF graph), 'saturate' -> clipped
  to [0, 256] (256: identity)."""
  if mode == 'wrap':
    return int(threshold) % 256
  if mode == 'saturate':
    return min(max(int(threshold), 0), 256)
  raise ValueError(f'solarize mode must be one of {SOLARIZE_MODES}, got {mode!r}')


def op_args(name: str, magnitude: float, posterize_mode: str = 'keep_bits',
            translate_const: float = 100.0, cutout_const: float = 40.0):
  """The (unsigned) argument of op `name` at magnitude M (a Python number)."""
  m = magnitude / 10.0
  if name == 'Rotate':
    return 30.0 * m
  if name in ('ShearX', 'ShearY'):
    return 0.3 * m
  if name in ('TranslateX', 'TranslateY'):
    return translate_const * m
  if name == 'Posterize':
    bits = int(4 * m)
    if posterize_mode == 'keep_bits':
      return bits
    if posterize_mode == 'remove_bits':
      return 8 - bits
    raise ValueError(f'posterize mode must be one of {POSTERIZE_MODES}, got {posterize_mode!r}')
  if name == 'Solarize':
    return int(256 * m)
  if name == 'SolarizeAdd':
    return int(110 * m)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return 0.1 + 1.8 * m
  if name == 'Cutout':
    return int(cutout_const * m)
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  raise ValueError(f'Unknown RandAugment op {name!r}')
