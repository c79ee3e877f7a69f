"""Built-in offline dataset ("shapes") and the pure-numpy input path.

No TensorFlow here (and none may be imported): this module lets the training loop
run end to end on a machine that has only numpy and JAX.

The dataset: 32x32 RGB images (size configurable) of one filled shape on a noisy
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
import queue
import threading
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from nfnet_jax.data import indexing

_CHUNK = 512
NUM_SHAPES = 5
NUM_TEXTURES = 4
MAX_CLASSES = NUM_SHAPES * NUM_TEXTURES
SHAPES = ('disc', 'square', 'triangle', 'plus', 'ring')
TEXTURES = ('solid', 'stripes', 'checker', 'dots')
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
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
  """Offline split from a data config (`cfg.offline` fields)."""
  o = cfg.offline
  n = o.num_train if split == 'train' else o.num_eval
  return generate(split, int(n), int(o.num_classes), int(o.image_size), int(o.seed))


# ----------------------------------------------------------------------------------
# numpy input path (use_tf=False)
# ----------------------------------------------------------------------------------

def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[labels]


def normalize(images: np.ndarray) -> np.ndarray:
  """[..., 3] 0-255 -> ImageNet mean/std normalised float32."""
  return (images.astype(np.float32) - MEAN_RGB) / STDDEV_RGB


def cutmix_box(ratio: float, cy: float, cx: float, h: int, w: int) -> Tuple[int, int, int, int]:
  """CutMix box (y0, y1, x0, x1): side sqrt(1-ratio)*size centred at (cy, cx), clipped.

  Rounding is round-half-even, as in the TF path.
  """
  ch, cw = np.sqrt(1.0 - ratio) * h, np.sqrt(1.0 - ratio) * w
  y0, y1 = np.round(cy - ch / 2), np.round(cy + ch / 2)
  x0, x1 = np.round(cx - cw / 2), np.round(cx + cw / 2)
  return (int(np.clip(y0, 0, h)), int(np.clip(y1, 0, h)),
          int(np.clip(x0, 0, w)), int(np.clip(x1, 0, w)))


def _mix_numpy(images: np.ndarray, labels: np.ndarray, modes: np.ndarray,
               lam: np.ndarray, ratio: np.ndarray, centres: np.ndarray):
  """Pairs rows (2j, 2j+1) -> one row j. images [2b,H,W,3] float32, labels [2b,K]."""
  a, b = images[0::2], images[1::2]
  la, lb = labels[0::2], labels[1::2]
  h, w = images.shape[1:3]
  out, weight = np.empty_like(a), np.empty([a.shape[0]], np.float32)
  for j, mode in enumerate(modes):
    if mode == 0:
      out[j] = lam[j] * a[j] + (1 - lam[j]) * b[j]
      weight[j] = lam[j]
    else:
      y0, y1, x0, x1 = cutmix_box(ratio[j], centres[j, 0] * h, centres[j, 1] * w, h, w)
      out[j] = a[j]
      out[j, y0:y1, x0:x1] = b[j, y0:y1, x0:x1]
      weight[j] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
  return out, weight[:, None] * la + (1 - weight[:, None]) * lb


def _check_numpy_cfg(cfg) -> None:
  if cfg.source != 'offline':
    raise ValueError(f"use_tf=False only supports source='offline', got {cfg.source!r}; "
                     'install tensorflow for tfds/folder sources.')
  if cfg.crop not in ('auto', 'pad_crop', 'none'):
    raise ValueError(f"use_tf=False supports crop 'auto'|'pad_crop'|'none', got {cfg.crop!r}")


def _prefetch(it: Iterator, size: int) -> Iterator:
  """Runs `it` in one background thread, `size` items ahead (order is kept)."""
  if size <= 0:
    yield from it
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def work():
    try:
      for item in it:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # Re-raised in the consumer.
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def _finish(images: np.ndarray, cfg) -> np.ndarray:
  if cfg.normalize:
    images = normalize(images)
  else:
    images = images.astype(np.float32)
  if cfg.bfloat16:
    import ml_dtypes  # Ships with JAX.
    images = images.astype(ml_dtypes.bfloat16)
  return images


def numpy_train_iter(cfg, global_batch_size: int, seed: int, start_step: int,
                     process_index: int, process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """Train batches of the offline dataset with numpy only (see `indexing`).

  Per step, one Generator seeded by (seed, step) draws the random numbers of the
  whole global batch (flips, crop offsets, mixing ratios/boxes); each process uses
  its rows, so the batch does not depend on the process count.
  Yields {images [local, S, S, 3], labels [local, K], mask [local]}.
  """
  _check_numpy_cfg(cfg)
  local = indexing.local_batch_size(global_batch_size, process_count)
  images, labels = load(cfg, 'train')
  n, size, k = images.shape[0], images.shape[1], int(cfg.offline.num_classes)
  mixing = bool(cfg.mix.enabled) and (cfg.mix.mixup_alpha > 0 or cfg.mix.cutmix)
  m = 2 if mixing else 1
  rows_in, local_in = m * global_batch_size, m * local
  modes = indexing.mix_modes(global_batch_size, cfg.mix.mixup_alpha > 0, cfg.mix.cutmix)
  pad = int(cfg.pad_crop_padding) if cfg.crop in ('auto', 'pad_crop') else 0
  perms: Dict[int, np.ndarray] = {}

  def example_ids(step: int) -> np.ndarray:
    pos = step * rows_in + process_index * local_in + np.arange(local_in, dtype=np.int64)
    epoch, within = pos // n, pos % n
    out = np.empty_like(pos)
    for e in np.unique(epoch):
      if e not in perms:
        if len(perms) > 2:
          perms.clear()
        perms[int(e)] = indexing.epoch_permutation(seed, int(e), n, cfg.shuffle)
      sel = epoch == e
      out[sel] = perms[int(e)][within[sel]]
    return out

  def make(step: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, step, 0xDA7A])
    flips = rng.random(rows_in) < 0.5
    offsets = rng.integers(0, 2 * pad + 1, (rows_in, 2))
    lam = rng.beta(cfg.mix.mixup_alpha, cfg.mix.mixup_alpha, global_batch_size) \
        if cfg.mix.mixup_alpha > 0 else np.ones(global_batch_size)
    ratio = rng.random(global_batch_size)
    centres = rng.random((global_batch_size, 2))
    rin = slice(process_index * local_in, (process_index + 1) * local_in)
    rout = slice(process_index * local, (process_index + 1) * local)
    ids = example_ids(step)
    x = images[ids]
    if pad:
      padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
      x = np.stack([padded[i, oy:oy + size, ox:ox + size]
                    for i, (oy, ox) in enumerate(offsets[rin])])
    if cfg.flip:
      x = np.where(flips[rin][:, None, None, None], x[:, :, ::-1], x)
    x = x.astype(np.float32)
    y = one_hot(labels[ids], k)
    if mixing:
      x, y = _mix_numpy(x, y, modes[rout], lam[rout], ratio[rout], centres[rout])
    if cfg.randaugment.enabled:   # JAX ops of device_augment; own stream, global rows.
      from nfnet_jax.data import device_augment
      params = device_augment.draw_randaugment_params(
          np.random.default_rng([seed, step, 0xA06]), global_batch_size,
          int(cfg.randaugment.num_layers), size, size)
      x = device_augment.randaugment_numpy(x, {k: v[rout] for k, v in params.items()}, cfg)
    return dict(images=_finish(x, cfg), labels=y, mask=np.ones([local], np.float32))

  def gen():
    step = start_step
    while True:
      yield make(step)
      step += 1

  return _prefetch(gen(), int(cfg.prefetch))


def numpy_eval_iter(cfg, global_batch_size: int, process_index: int,
                    process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """Finite eval batches of the offline dataset; padded rows have mask 0."""
  _check_numpy_cfg(cfg)
  images, labels = load(cfg, 'eval')
  k = int(cfg.offline.num_classes)
  for ids, mask in indexing.eval_batches(images.shape[0], global_batch_size,
                                         process_index, process_count):
    yield dict(images=_finish(images[ids], cfg),
               labels=one_hot(labels[ids], k) * mask[:, None], mask=mask)
