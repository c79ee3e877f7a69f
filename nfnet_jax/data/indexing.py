"""Which examples go where: the batch layout shared by the TF and numpy paths.

Pure Python/numpy (no TensorFlow). The layout is a function of (seed, step, global
row) only, so the batches do not depend on the number of processes:

* A training step `s` consumes `rows_in = m * global_batch` consecutive positions
  `s * rows_in + r` (r in [0, rows_in)) of an endless stream made of epochs; epoch
  `e` is a permutation of [0, N) drawn from (seed, e). `m = 2` when mixing (two
  decoded images per output image, output row `j` mixes input rows `2j, 2j+1`),
  else 1.
* Process `p` of `P` owns output rows [p * local, (p + 1) * local) of every global
  batch, hence input rows [p * m * local, (p + 1) * m * local).
* Evaluation batch `b` holds positions b * global_batch + r; positions >= N are
  padding (mask 0, example 0 repeated), so every example is seen exactly once.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

# Per-output-row mixing modes (`mix_modes`), shared by the TF and numpy paths.
NO_MIX, MIXUP, CUTMIX = -1, 0, 1


def resolve_processes(process_index: Optional[int],
                      process_count: Optional[int]) -> Tuple[int, int]:
  """Fills in (process_index, process_count) from JAX when not given."""
  if process_index is None or process_count is None:
    import jax  # Lazy: the data package itself does not need JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Bad process_index={process_index} for '
                     f'process_count={process_count}.')
  return int(process_index), int(process_count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """global_batch / process_count, or a ValueError that says what to change."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % process_count:
    raise ValueError(
        f'Global batch size {global_batch_size} does not divide by the number of '
        f'processes ({process_count}); pick a multiple of {process_count}.')
  return global_batch_size // process_count


def mix_modes(global_batch_size: int, mixup: bool, cutmix: bool) -> np.ndarray:
  """[B] int32 per output row of the global batch: MIXUP, CUTMIX or NO_MIX.

  With both on, the first half (floor(B/2) rows) is MixUp, the rest CutMix.
  """
  rows = np.arange(global_batch_size)
  if mixup and cutmix:
    return np.where(rows < global_batch_size // 2, MIXUP, CUTMIX).astype(np.int32)
  if mixup or cutmix:
    return np.full([global_batch_size], MIXUP if mixup else CUTMIX, np.int32)
  return np.full([global_batch_size], NO_MIX, np.int32)


def epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
  """[n] int64 permutation used by the numpy path for epoch `epoch`."""
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


def eval_batches(num_examples: int, global_batch_size: int, process_index: int,
                 process_count: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (indices [local] int64, mask [local] float32) for this process.

  ceil(N / global_batch) batches; rows past the end point at example 0 with mask 0.
  """
  local = local_batch_size(global_batch_size, process_count)
  num_batches = -(-num_examples // global_batch_size)
  for b in range(num_batches):
    pos = b * global_batch_size + process_index * local + np.arange(local, dtype=np.int64)
    valid = pos < num_examples
    yield np.where(valid, pos, 0), valid.astype(np.float32)
