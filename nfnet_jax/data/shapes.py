"""The built-in offline dataset ("shapes"): procedurally generated, no download.

numpy only (no TensorFlow, no JAX), so the training loop runs end to end on a
machine without either data library (see `numpy_pipeline`).

The dataset: square RGB images (32x32 by default) of one filled shape on a noisy
background. Class k = (shape k % 5, texture k // 5) with shapes {disc, square,
triangle, plus, ring} and textures {solid, stripes, checker, dots}, so 5..20
classes. Position, scale, rotation, stripe angle/period/phase and all colours are
random (colours carry no class information), so a linear classifier on raw pixels
does poorly while a small convnet learns the classes. Generation is vectorised and
deterministic in chunks of `_CHUNK` examples seeded by (seed, split, chunk): example i
does not depend on how many examples are requested; 10k images take a few seconds.
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

_CHUNK = 512
NUM_SHAPES = 5
NUM_TEXTURES = 4
MAX_CLASSES = NUM_SHAPES * NUM_TEXTURES
SHAPES = ('disc', 'square', 'triangle', 'plus', 'ring')
TEXTURES = ('solid', 'stripes', 'checker', 'dots')
_SPLIT_IDS = {'train': 0, 'eval': 1}


def class_names(num_classes: int = 10) -> list[str]:
  """Human-readable names, e.g. 'disc/solid', index order."""
  return [f'{SHAPES[k % NUM_SHAPES]}/{TEXTURES[k // NUM_SHAPES]}'
          for k in range(num_classes)]


_S3 = float(np.sqrt(3.0))
# Shape masks on local coordinates (u, v) in units of the radius.
_SHAPE_FNS = (
    lambda u, v: u * u + v * v <= 1.0,                                   # disc
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,                # square
    lambda u, v: (v <= 0.5) & (_S3 * u - v <= 1.0) & (-_S3 * u - v <= 1.0),  # triangle
    lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3)
    & (np.maximum(np.abs(u), np.abs(v)) <= 1.0),                          # plus
    lambda u, v: (u * u + v * v >= 0.3025) & (u * u + v * v <= 1.0),     # ring
)
# Textures: True where the first colour is used; (a, b) are stripe phases.
_TEXTURE_FNS = (
    lambda a, b: np.ones(a.shape, bool),                                 # solid
    lambda a, b: np.sin(a) > 0,                                          # stripes
    lambda a, b: np.sin(a) * np.sin(b) > 0,                              # checker
    lambda a, b: np.cos(a) + np.cos(b) < 0.8,                            # dots
)


def _render_chunk(rng: np.random.Generator, n: int, size: int,
                  num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """Renders n examples: (images [n, size, size, 3] uint8, labels [n] int32)."""
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  shape, texture = labels % NUM_SHAPES, labels // NUM_SHAPES
  f32 = np.float32
  yy, xx = np.meshgrid(np.arange(size, dtype=f32), np.arange(size, dtype=f32),
                       indexing='ij')                                    # [S, S]
  col = lambda a: a.astype(f32)[:, None, None]                           # [n,1,1]
  cx = col(rng.uniform(0.3, 0.7, n) * size)
  cy = col(rng.uniform(0.3, 0.7, n) * size)
  radius = col(rng.uniform(0.25, 0.38, n) * size)
  theta = col(rng.uniform(0, 2 * np.pi, n))
  dx, dy = xx - cx, yy - cy
  u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
  v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
  inside = np.zeros(u.shape, bool)                                       # [n,S,S]
  for k, fn in enumerate(_SHAPE_FNS):
    sel = shape == k
    inside[sel] = fn(u[sel], v[sel])
  phi = col(rng.uniform(0, np.pi, n))
  period = col(rng.uniform(4.0, 6.0, n))
  phase = col(rng.uniform(0, 2 * np.pi, n))
  a = 2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period + phase
  b = 2 * np.pi * (-xx * np.sin(phi) + yy * np.cos(phi)) / period + phase
  second = np.zeros(u.shape, bool)        # pixels of the shape in the second colour
  for k, fn in enumerate(_TEXTURE_FNS):
    sel = texture == k
    second[sel] = ~fn(a[sel], b[sel])
  # Colours: both shape colours differ from the background by 64..192 per channel
  # (mod 256), and from each other by 48..128.
  bg = rng.uniform(0, 256, (n, 3)).astype(f32)
  fg1 = np.mod(bg + rng.uniform(64, 104, (n, 3)), 256).astype(f32)
  fg2 = np.mod(bg + rng.uniform(152, 192, (n, 3)), 256).astype(f32)
  ramp = (col(rng.uniform(-30, 30, n)) * (xx - size / 2) / size
          + col(rng.uniform(-30, 30, n)) * (yy - size / 2) / size)      # [n,S,S]
  img = bg[:, None, None, :] + ramp[..., None]
  fg = np.where(second[..., None], fg2[:, None, None, :], fg1[:, None, None, :])
  img = np.where(inside[..., None], fg, img)
  img += rng.standard_normal(img.shape, dtype=f32) * 10
  return np.clip(np.round(img), 0, 255).astype(np.uint8), labels


@functools.lru_cache(maxsize=4)
def generate(split: str, num_examples: int, num_classes: int = 10, image_size: int = 32,
             seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (images [N, S, S, 3] uint8, labels [N] int32) of split 'train'|'eval'.

  Cached; the returned arrays are read-only.
  """
  if not 2 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'offline dataset has 2..{MAX_CLASSES} classes, got {num_classes}')
  if split not in _SPLIT_IDS:
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  images = np.empty([num_examples, image_size, image_size, 3], np.uint8)
  labels = np.empty([num_examples], np.int32)
  for c, start in enumerate(range(0, num_examples, _CHUNK)):
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], c, num_classes, image_size])
    x, y = _render_chunk(rng, _CHUNK, image_size, num_classes)
    stop = min(start + _CHUNK, num_examples)
    images[start:stop], labels[start:stop] = x[:stop - start], y[:stop - start]
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load(cfg, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """Split 'train'|'eval' of a data config: `cfg.offline` fields, rendered at the
  config's train or eval image size (`config.image_sizes`)."""
  from nfnet_jax.data.config import image_sizes
  o = cfg.offline
  train_size, eval_size = image_sizes(cfg)
  n, size = (o.num_train, train_size) if split == 'train' else (o.num_eval, eval_size)
  return generate(split, int(n), int(o.num_classes), int(size), int(o.seed))
