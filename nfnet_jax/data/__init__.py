"""Input pipeline: TFDS / folder / offline sources, Inception crop, MixUp/CutMix,
RandAugment, per-host sharding; a numpy path for the offline dataset. See
docs/data.md.

TensorFlow is imported lazily, only when a TF pipeline is built, and then with
every GPU/TPU hidden from it; it and tensorflow-datasets come with the data extra
(`pip install 'nfnet_jax[data]'`), which the offline source's numpy path
(data.use_tf=False) does not need. Public API:

  default_config() -> ConfigDict
  check_config(cfg) -> None (ValueError for a bad value, errors.MissingExtra for a
      path that needs the data extra when it is not installed; reads no data)
  dataset_info(cfg) -> {num_classes, num_train, num_eval, train_size, eval_size}
  describe_eval(cfg) -> one line saying what the eval transform does
  build_train_iter(cfg, global_batch_size, seed, start_step=0,
                   process_index=None, process_count=None)
      -> infinite iterator of {images [local, H, W, 3] float32|bfloat16,
                               labels [local, K] float32 (soft), mask [local]}
      With cfg.augment_on='device' the batch is the uint8 input of
      `augment.augment` (images [local, m, H, W, 3], labels [local, m, K], aug_step,
      aug_row, mix_mode, mask), which the train step applies; see
      docs/augmentation.md.
  build_eval_iter(cfg, global_batch_size, process_index=None, process_count=None)
      -> finite iterator of the same, last batch padded with mask 0
  imagenet_class_names() / imagenet_wnids() -> 1000 strings, label order
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Iterator, List, Optional

import numpy as np

from nfnet_jax.data.config import check_config, default_config, describe_eval, image_sizes

__all__ = ['default_config', 'check_config', 'dataset_info', 'describe_eval',
           'build_train_iter',
           'build_eval_iter', 'imagenet_class_names', 'imagenet_wnids']

_HERE = os.path.dirname(os.path.abspath(__file__))
Batch = Dict[str, np.ndarray]


def _read_lines(name: str) -> List[str]:
  with open(os.path.join(_HERE, name), encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f if line.strip()]


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> List[str]:
  """The 1000 ILSVRC-2012 class names (WordNet lemmas, e.g. 'tench, Tinca tinca'),
  in the standard label order (sorted WordNet IDs, as TFDS imagenet2012)."""
  return _read_lines('imagenet_classes.txt')


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> List[str]:
  """The 1000 WordNet IDs ('n01440764', ...) in label order."""
  return _read_lines('imagenet_wnids.txt')


def dataset_info(cfg) -> Dict[str, int]:
  """{num_classes, num_train, num_eval, train_size, eval_size} of the configured data.

  Raises FileNotFoundError (with preparation instructions) for a missing dataset.
  """
  check_config(cfg)
  train_size, eval_size = image_sizes(cfg)
  if cfg.source == 'offline':
    o = cfg.offline
    k, train_n, eval_n = int(o.num_classes), int(o.num_train), int(o.num_eval)
  else:
    from nfnet_jax.data import sources
    train = sources.get_source(cfg, 'train')
    k, train_n = train.num_classes, train.num_examples
    try:
      eval_n = sources.get_source(cfg, 'eval').num_examples
    except ValueError:  # A folder dataset without an eval split.
      eval_n = 0
  return dict(num_classes=k, num_train=train_n, num_eval=eval_n,
              train_size=train_size, eval_size=eval_size)


def build_train_iter(cfg, global_batch_size: int, seed: int, start_step: int = 0,
                     process_index: Optional[int] = None,
                     process_count: Optional[int] = None) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches, starting at `start_step`.

  The global batch of step s is a function of (cfg, seed, s) only; process p gets
  its rows [p * local, (p + 1) * local), local = global_batch_size / process_count.
  """
  check_config(cfg)
  p, n = _processes(process_index, process_count, global_batch_size)
  if not cfg.use_tf:
    from nfnet_jax.data import numpy_pipeline
    return numpy_pipeline.train_iter(cfg, global_batch_size, seed, start_step, p, n)
  from nfnet_jax.data import pipeline
  return pipeline.train_iter(cfg, global_batch_size, seed, start_step, p, n)


def build_eval_iter(cfg, global_batch_size: int, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> Iterator[Batch]:
  """Finite iterator over the eval split: ceil(N / global_batch) batches per
  process; across processes every example appears exactly once with mask 1."""
  check_config(cfg)
  p, n = _processes(process_index, process_count, global_batch_size)
  if not cfg.use_tf:
    from nfnet_jax.data import numpy_pipeline
    return numpy_pipeline.eval_iter(cfg, global_batch_size, p, n)
  from nfnet_jax.data import pipeline
  return pipeline.eval_iter(cfg, global_batch_size, p, n)


def _processes(process_index, process_count, global_batch_size):
  from nfnet_jax.data import indexing
  p, n = indexing.resolve_processes(process_index, process_count)
  indexing.local_batch_size(global_batch_size, n)  # Fails early with a clear error.
  return p, n
