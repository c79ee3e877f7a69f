"""The numpy input path (`data.use_tf=False`): the offline shapes dataset without
TensorFlow.

No TensorFlow here (and none may be imported): this path lets the training loop
run end to end on a machine that has only numpy and JAX. It follows the TF path's
layout (`indexing`): per output row its m decoded inputs (m = 2 with the paper's
pairing and mixing), the step, the global row and the mixing mode, the batch that
`augment` takes, which then runs on the host's CPU (augment_on='host') or in the
train step ('device'). Crop offsets and flips come from one numpy Generator per
(seed, step), so its batches are not the TF path's batches, but they are a
function of (seed, step) only.
"""
from __future__ import annotations

import queue
import threading
from typing import Dict, Iterator

import numpy as np

from nfnet_jax.data import augment
from nfnet_jax.data import indexing
from nfnet_jax.data import shapes
from nfnet_jax.data.config import mix_on
from nfnet_jax.data.normalize import normalize


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int [n] -> float32 [n, num_classes]."""
  return np.eye(num_classes, dtype=np.float32)[labels]


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
  local = indexing.local_batch_size(global_batch_size, process_count)
  images, labels = shapes.load(cfg, 'train')
  n, size, k = images.shape[0], images.shape[1], int(cfg.offline.num_classes)
  mixing = mix_on(cfg)
  m = 2 if mixing and cfg.mix.get('pairing', 'paper') == 'paper' else 1
  if m == 1 and mixing and local % 2:
    raise ValueError(f"mix.pairing='within_batch' pairs rows (2i, 2i+1): the per-process "
                     f'batch ({local}) must be even.')
  rows_in, local_in = m * global_batch_size, m * local
  modes = indexing.mix_modes(global_batch_size, mixing and cfg.mix.mixup_alpha > 0,
                             bool(cfg.mix.cutmix))
  pad = int(cfg.pad_crop_padding) if cfg.crop in ('auto', 'pad_crop') else 0
  recipe = augment.Recipe.from_config(cfg)
  on_host = cfg.get('augment_on', 'host') == 'host'
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
    batch = dict(images=x.reshape(local, m, size, size, 3),
                 labels=one_hot(labels[ids], k).reshape(local, m, k),
                 aug_step=np.full([local], step, np.int32),
                 aug_row=np.arange(rout.start, rout.stop, dtype=np.int32),
                 mix_mode=modes[rout], mask=np.ones([local], np.float32))
    return augment.augment_on_host(batch, recipe, seed) if on_host else batch

  def gen():
    step = start_step
    while True:
      yield make(step)
      step += 1

  return _prefetch(gen(), int(cfg.prefetch))


def eval_iter(cfg, global_batch_size: int, process_index: int,
                    process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """Finite eval batches of the offline dataset; padded rows have mask 0."""
  images, labels = shapes.load(cfg, 'eval')
  k = int(cfg.offline.num_classes)
  for ids, mask in indexing.eval_batches(images.shape[0], global_batch_size,
                                         process_index, process_count):
    yield dict(images=_finish(images[ids], cfg),
               labels=one_hot(labels[ids], k) * mask[:, None], mask=mask)
