"""The numpy input path (`data.use_tf=False`): the offline shapes dataset without
TensorFlow.

No TensorFlow here (and none may be imported): this path lets the training loop
run end to end on a machine that has only numpy and JAX. It follows the TF path's
layout (`indexing`), normalisation (`normalize`) and mixing rules: output row j
mixes input rows 2j and 2j+1, MixUp in the first half of the global batch and
CutMix in the second (`indexing.mix_modes`), the CutMix box rounded and clipped as
in `mixing.cutmix_mask` and the label weight equal to the pasted area share. Its
random numbers come from one numpy Generator per (seed, step), so its batches are
not the TF path's batches, but they are a function of (seed, step) only.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Dict, Iterator, Tuple

import numpy as np

from nfnet_jax.data import indexing
from nfnet_jax.data import shapes
from nfnet_jax.data.normalize import normalize


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int [n] -> float32 [n, num_classes]."""
  return np.eye(num_classes, dtype=np.float32)[labels]


def cutmix_box(ratio: float, cy: float, cx: float, h: int, w: int) -> Tuple[int, int, int, int]:
  """CutMix box (y0, y1, x0, x1): side sqrt(1-ratio)*size centred at (cy, cx), clipped.

  Rounding is round-half-even, as in the TF path (`mixing.cutmix_mask`).
  """
  ch, cw = np.sqrt(1.0 - ratio) * h, np.sqrt(1.0 - ratio) * w
  y0, y1 = np.round(cy - ch / 2), np.round(cy + ch / 2)
  x0, x1 = np.round(cx - cw / 2), np.round(cx + cw / 2)
  return (int(np.clip(y0, 0, h)), int(np.clip(y1, 0, h)),
          int(np.clip(x0, 0, w)), int(np.clip(x1, 0, w)))


def mix_pairs(images: np.ndarray, labels: np.ndarray, modes: np.ndarray,
              lam: np.ndarray, ratio: np.ndarray, centres: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray]:
  """Pairs rows (2j, 2j+1) -> one row j.

  images [2b, H, W, 3] float32, labels [2b, K]; per output row: modes [b]
  (indexing.MIXUP | indexing.CUTMIX), lam [b] MixUp weight of the first image,
  ratio [b] CutMix kept-area ratio, centres [b, 2] CutMix box centre as (y, x)
  fractions of (H, W). Returns (images [b, H, W, 3], labels [b, K]).
  """
  a, b = images[0::2], images[1::2]
  la, lb = labels[0::2], labels[1::2]
  h, w = images.shape[1:3]
  out, weight = np.empty_like(a), np.empty([a.shape[0]], np.float32)
  for j, mode in enumerate(modes):
    if mode == indexing.MIXUP:
      out[j] = lam[j] * a[j] + (1 - lam[j]) * b[j]
      weight[j] = lam[j]
    else:
      y0, y1, x0, x1 = cutmix_box(ratio[j], centres[j, 0] * h, centres[j, 1] * w, h, w)
      out[j] = a[j]
      out[j, y0:y1, x0:x1] = b[j, y0:y1, x0:x1]
      weight[j] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
  return out, weight[:, None] * la + (1 - weight[:, None]) * lb


def _check_cfg(cfg) -> None:
  """The config itself is checked by `nfnet_jax.data` (`_validate`) before this runs."""
  if cfg.randaugment.enabled:
    logging.warning('use_tf=False: RandAugment is not available in the numpy path; '
                    'skipped (set randaugment.enabled=False to silence).')


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


def train_iter(cfg, global_batch_size: int, seed: int, start_step: int,
                     process_index: int, process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """Train batches of the offline dataset with numpy only (see `indexing`).

  Per step, one Generator seeded by (seed, step) draws the random numbers of the
  whole global batch (flips, crop offsets, mixing ratios/boxes); each process uses
  its rows, so the batch does not depend on the process count.
  Yields {images [local, S, S, 3], labels [local, K], mask [local]}.
  """
  _check_cfg(cfg)
  local = indexing.local_batch_size(global_batch_size, process_count)
  images, labels = shapes.load(cfg, 'train')
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
      x, y = mix_pairs(x, y, modes[rout], lam[rout], ratio[rout], centres[rout])
    return dict(images=_finish(x, cfg), labels=y, mask=np.ones([local], np.float32))

  def gen():
    step = start_step
    while True:
      yield make(step)
      step += 1

  return _prefetch(gen(), int(cfg.prefetch))


def eval_iter(cfg, global_batch_size: int, process_index: int,
                    process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """Finite eval batches of the offline dataset; padded rows have mask 0."""
  _check_cfg(cfg)
  images, labels = shapes.load(cfg, 'eval')
  k = int(cfg.offline.num_classes)
  for ids, mask in indexing.eval_batches(images.shape[0], global_batch_size,
                                         process_index, process_count):
    yield dict(images=_finish(images[ids], cfg),
               labels=one_hot(labels[ids], k) * mask[:, None], mask=mask)
