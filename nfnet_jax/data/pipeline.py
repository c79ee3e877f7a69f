"""tf.data train/eval pipelines (the `use_tf=True` path).

Train graph, per process (see `indexing` for the layout):

  counter i -> (step, input row, example index via a per-epoch stateless
  index shuffle) -> batch, fetch (read records by index) -> unbatch
  -> per input image [parallel]: header check (`headers`), decode + crop (+flip) +
     bicubic resize, seeded by (seed, step, global input row); a record that fails
     to decode or declares more than `max_image_pixels` is dropped and counted
     (`train_iter` logs the count), and `max_consecutive_bad_records` of them in a
     row stop the run (errors.RunError)
     -> clip + truncate to uint8
  -> batch(m) -> per output row: its m inputs, step, global row and mixing mode
  -> batch(local) -> prefetch -> numpy
  -> augment_on='host': `augment.augment_on_host` (mixing, RandAugment,
     normalisation, jitted on the host's CPU); 'device': the train step applies
     `augment.augment` to each device's rows.

With `mix.pairing='within_batch'` one image is decoded per output row and the
augmentation pairs rows (2i, 2i+1).

Nothing depends on a tf.data RNG state, so `start_step` starts the stream at any
step without decoding the earlier ones, and the global batch of a step does not
depend on the number of processes.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterator

import numpy as np

from nfnet_jax import errors
from nfnet_jax.data import augment
from nfnet_jax.data import headers
from nfnet_jax.data import indexing
from nfnet_jax.data.config import check_augment_config, image_sizes, resolve_crop
from nfnet_jax.data.config import eval_rendered_as_is, eval_resize_side
from nfnet_jax.data.config import resolve_eval_crop
from nfnet_jax.data.config import MAX_CONSECUTIVE_BAD_RECORDS, MAX_IMAGE_PIXELS
from nfnet_jax.data.config import mix_on as _mix_on
from nfnet_jax.data import sources
from nfnet_jax.data import transforms as T
from nfnet_jax.data._tf import tf

_INT64_MAX = np.iinfo(np.int64).max
# The map functions are plain graph code; skipping AutoGraph's source conversion
# makes building the pipeline many times faster.
_no_autograph = tf.autograph.experimental.do_not_convert
# Stage tags folded into the per-row seeds, so stages draw independent numbers.
_CROP, _FLIP = 1, 2
# Tag of the in-graph error that stops training after too many unusable records in
# a row, followed by the length of that run and the counts of undecodable and
# too-large records so far.
_STALL = 'NFNET_JAX_INPUT_STALL'
# Training records decoded per tf.data sub-dataset (see `train_dataset`); a status
# after headers.OK/BROKEN/TOO_LARGE marks the end of one.
_CHUNK, _END = 16, 3


def _max_pixels(cfg) -> int:
  return int(cfg.get('max_image_pixels', MAX_IMAGE_PIXELS))


def _limit(cfg) -> int:
  # At least 1: check_config, which every builder runs first.
  return int(cfg.get('max_consecutive_bad_records', MAX_CONSECUTIVE_BAD_RECORDS))


def _usable(data, max_pixels: int):
  """Encoded bytes -> the same bytes, once `headers.inspect` found them within the
  pixel limit and not broken; else an InvalidArgumentError (the record is dropped
  by `ignore_errors`, before any decoder sees it)."""
  status = headers.inspect(data, max_pixels)[0]
  check = tf.debugging.Assert(tf.equal(status, headers.OK),
                              ['image header broken or over data.max_image_pixels'])
  with tf.control_dependencies([check]):
    return tf.identity(data)


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # Parallelism across images (parallel map) rather than inside each op.
  options.threading.max_intra_op_parallelism = 1
  if cfg.threadpool_size:
    options.threading.private_threadpool_size = int(cfg.threadpool_size)
  return options


def _parallel(cfg) -> int:
  return tf.data.AUTOTUNE if cfg.num_parallel_calls in (None, -1) else int(cfg.num_parallel_calls)


def _finish(image, cfg):
  if cfg.normalize:
    image = T.normalize(image)
  else:
    image = tf.cast(image, tf.float32)
  return tf.cast(image, tf.bfloat16) if cfg.bfloat16 else image


def train_dataset(cfg, global_batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """The training tf.data.Dataset of this process (infinite)."""
  local = indexing.local_batch_size(global_batch_size, process_count)
  src = sources.get_source(cfg, 'train')
  n, k = src.num_examples, src.num_classes
  crop = resolve_crop(cfg)
  size, _ = image_sizes(cfg)
  # The Inception crop's fallback window: the eval centre crop at the train size.
  fallback_side = eval_resize_side(size, float(cfg.eval_crop_fraction), 'inception')
  check_augment_config(cfg)
  within = _mix_on(cfg) and cfg.mix.get('pairing', 'paper') == 'within_batch'
  m = _inputs_per_row(cfg)
  if within and local % 2:
    raise ValueError(f"mix.pairing='within_batch' pairs rows (2i, 2i+1): the per-process "
                     f'batch ({local}) must be even.')
  rows_in, local_in = m * global_batch_size, m * local
  modes = tf.constant(indexing.mix_modes(global_batch_size, _mix_on(cfg) and
                                         cfg.mix.mixup_alpha > 0, bool(cfg.mix.cutmix)))
  base = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)
  par = _parallel(cfg)
  max_pixels = _max_pixels(cfg)
  limit = _limit(cfg)
  image_dtype = tf.uint8

  @_no_autograph
  def locate(i):
    """Local element counter -> (step, global input row, example index)."""
    step = i // local_in
    row = process_index * local_in + i % local_in
    pos = step * rows_in + row
    epoch, within = pos // n, pos % n
    if cfg.shuffle:
      key = tf.stack([tf.cast(seed, tf.int64), epoch, tf.constant(0x5EED, tf.int64)])
      within = tf.raw_ops.RandomIndexShuffle(index=within, seed=key,
                                             max_index=tf.constant(n - 1, tf.int64), rounds=4)
    return step, row, within

  @_no_autograph
  def fetch(step, row, idx):
    images, labels = src.fetch(idx)
    return step, row, images, labels

  def transform(step, row, data):
    """Record -> image_dtype [size, size, 3]: decode, crop, flip, resize."""
    s = T.fold_in(base, step, row)
    if crop == 'inception':
      ic = cfg.inception
      image = T.inception_crop(data, T.fold_in(s, _CROP), raw=src.raw,
                               area_range=tuple(ic.area_range),
                               aspect_ratio_range=tuple(ic.aspect_ratio_range),
                               min_object_covered=ic.min_object_covered,
                               max_attempts=ic.max_attempts, size=size,
                               resized=fallback_side)
    else:
      image = data if src.raw else T.decode(data)
      if crop == 'pad_crop':
        image = T.pad_crop(image, T.fold_in(s, _CROP), int(cfg.pad_crop_padding))
    if cfg.flip:
      image = T.flip(image, T.fold_in(s, _FLIP))
    if crop in ('inception', 'resize'):
      image = T.resize(image, size)
    else:
      image = tf.cast(image, tf.float32)
      image.set_shape([size, size, 3])
    return T.to_uint8(image)

  @_no_autograph
  def per_input(step, row, data, label):
    """-> (step, row, image, one-hot label, status): status headers.OK, or
    BROKEN / TOO_LARGE (from the header) with a zero image, nothing decoded. A
    record that still fails to decode raises here and is dropped."""
    data = src.load_one(data)
    if src.raw:
      status, image = tf.constant(headers.OK, tf.int64), transform(step, row, data)
    else:
      status = headers.inspect(data, max_pixels)[0]
      image = tf.cond(tf.equal(status, headers.OK), lambda: transform(step, row, data),
                      lambda: tf.zeros([size, size, 3], image_dtype))
    return step, row, image, tf.one_hot(label, k, dtype=tf.float32), status

  @_no_autograph
  def per_chunk(step, row, data, label):
    """_CHUNK consecutive records -> the ones per_input gives (failures dropped),
    then one _END element at the chunk's last position, so that a chunk where
    nothing decodes still yields something to count."""
    good = tf.data.Dataset.from_tensor_slices((step, row, data, label))
    end = (step[-1], row[-1], tf.zeros([size, size, 3], image_dtype),
           tf.zeros([k], tf.float32), tf.constant(_END, tf.int64))
    return (good.map(per_input).ignore_errors()
            .concatenate(tf.data.Dataset.from_tensors(end)))

  @_no_autograph
  def count(state, element):
    """state int64 [4]: (last position seen, last usable position, undecodable so
    far, too large so far). Positions are local element counters; a position
    skipped over (never seen) failed to decode. Fails with the _STALL tag once
    `limit` positions in a row were unusable."""
    step, row, status = element[0], element[1], element[-1]
    pos = step * local_in + row - process_index * local_in
    end = tf.equal(status, _END)
    missing = pos - state[0] - 1 + tf.cast(end, tf.int64)
    undecodable = state[2] + missing + tf.cast(tf.equal(status, headers.BROKEN), tf.int64)
    large = state[3] + tf.cast(tf.equal(status, headers.TOO_LARGE), tf.int64)
    usable = tf.where(tf.equal(status, headers.OK), pos, state[1])
    run = pos - usable
    check = tf.debugging.Assert(
        run < limit, [tf.strings.format(_STALL + ' {} {} {} ', (run, undecodable, large))])
    with tf.control_dependencies([check]):
      state = tf.stack([pos, usable, undecodable, large])
    return state, (*element, state[2:])

  @_no_autograph
  def per_output(step, row, images, labels, skipped):
    """m consecutive decoded rows -> output row row[0] // m (uint8 inputs, the
    numbers `augment` folds into its key, the mixing mode)."""
    out_row = row[0] // m
    return dict(images=images, labels=labels, aug_step=tf.cast(step[0], tf.int32),
                aug_row=tf.cast(out_row, tf.int32), mix_mode=tf.gather(modes, out_row),
                mask=tf.constant(1.0), _skipped=skipped[-1])

  ds = tf.data.Dataset.range(start_step * local_in, _INT64_MAX)
  ds = ds.map(locate).batch(local_in).map(fetch, num_parallel_calls=par).unbatch()
  if src.raw:  # Pixels: nothing to decode, nothing ever skipped.
    ds = ds.map(lambda step, row, data, label: (*per_input(step, row, data, label)[:4],
                                                tf.zeros([2], tf.int64)),
                num_parallel_calls=par)
  else:
    # Chunks decoded in parallel, each read whole before the next (block_length
    # covers a chunk and its _END), so the order of the records is kept.
    ds = ds.batch(_CHUNK).interleave(per_chunk, cycle_length=par,
                                     block_length=_CHUNK + 1, num_parallel_calls=par,
                                     deterministic=True)
    first = start_step * local_in - 1
    ds = ds.scan(tf.constant([first, first, 0, 0], tf.int64), count)
    ds = ds.filter(lambda step, row, image, label, status, skipped:
                   tf.equal(status, headers.OK))
    ds = ds.map(lambda step, row, image, label, status, skipped:
                (step, row, image, label, skipped))
  ds = ds.batch(m).map(per_output, num_parallel_calls=par)
  ds = ds.batch(local, drop_remainder=True).prefetch(int(cfg.prefetch))
  return ds.with_options(_options(cfg))


def eval_dataset(cfg, global_batch_size: int, process_index: int,
                 process_count: int) -> tf.data.Dataset:
  """Finite eval dataset of this process; padded rows have mask 0, labels 0."""
  local = indexing.local_batch_size(global_batch_size, process_count)
  src = sources.get_source(cfg, 'eval')
  crop, eval_crop = resolve_crop(cfg), resolve_eval_crop(cfg)
  _, size = image_sizes(cfg)
  resized = eval_resize_side(size, float(cfg.eval_crop_fraction), crop)
  as_rendered = eval_rendered_as_is(cfg)
  plan = list(indexing.eval_batches(src.num_examples, global_batch_size,
                                    process_index, process_count))
  idx = np.concatenate([p[0] for p in plan]) if plan else np.zeros([0], np.int64)
  mask = np.concatenate([p[1] for p in plan]) if plan else np.zeros([0], np.float32)
  k = src.num_classes
  par = _parallel(cfg)
  max_pixels = _max_pixels(cfg)

  @_no_autograph
  def fetch(idx, mask):
    images, labels = src.fetch(idx)
    return images, labels, mask

  @_no_autograph
  def per_example(data, label, mask):
    data = src.load_one(data)
    if not src.raw:
      data = _usable(data, max_pixels)
    if as_rendered:
      image = tf.cast(data, tf.float32)
      image.set_shape([size, size, 3])
    else:
      image = T.eval_image(data, size, resized, raw=src.raw, crop=eval_crop)
    label = tf.one_hot(label, k, dtype=tf.float32) * mask
    return dict(images=_finish(image, cfg), labels=label, mask=mask)

  ds = tf.data.Dataset.from_tensor_slices((idx, mask)).batch(local)
  ds = ds.map(fetch, num_parallel_calls=par).unbatch()
  # A record that fails to decode or is over the pixel limit is dropped; `eval_iter`
  # pads the short batches.
  ds = ds.map(per_example, num_parallel_calls=par).ignore_errors()
  ds = ds.batch(local).prefetch(int(cfg.prefetch))
  return ds.with_options(_options(cfg))


def _inputs_per_row(cfg) -> int:
  """Decoded images per output row: 2 when mixing with the paper's pairing, else 1."""
  within = cfg.mix.get('pairing', 'paper') == 'within_batch'
  return 2 if _mix_on(cfg) and not within else 1


def train_iter(cfg, global_batch_size: int, seed: int, start_step: int,
               process_index: int, process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """numpy batches of `train_dataset`, augmented on the host's CPU with
  augment_on='host' (see `augment`). Counts the records dropped because they
  failed to decode or declared more than `data.max_image_pixels` pixels, and logs
  the running counts when they first grow and each time their sum doubles.

  Raises errors.RunError (one line, with the counts) after
  `data.max_consecutive_bad_records` unusable records in a row.
  """
  ds = train_dataset(cfg, global_batch_size, seed, start_step, process_index,
                     process_count)
  recipe = augment.Recipe.from_config(cfg)
  on_host = cfg.get('augment_on', 'host') == 'host'
  max_pixels = _max_pixels(cfg)
  reported = 0
  batches = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(batches)
    except tf.errors.InvalidArgumentError as e:
      found = re.search(_STALL + r' (\d+) (\d+) (\d+) ', str(e))
      if not found:
        raise
      run, undecodable, large = map(int, found.groups())
      raise errors.RunError(
          f'Training stopped: {run} consecutive training records could not be used '
          f'(data.max_consecutive_bad_records={_limit(cfg)}; skipped so far: '
          f'{undecodable} undecodable, {large} over data.max_image_pixels={max_pixels}). '
          'Check the data, e.g. with data.folder_verify=decode for a folder.') from None
    undecodable, large = (int(v) for v in batch.pop('_skipped')[-1])
    if undecodable + large > reported and undecodable + large >= 2 * reported:
      logging.warning('Skipped %d training record(s) so far: %d failed to decode, %d '
                      'declared more than data.max_image_pixels=%d pixels.',
                      undecodable + large, undecodable, large, max_pixels)
      reported = undecodable + large
    yield augment.augment_on_host(batch, recipe, seed) if on_host else batch


def eval_iter(cfg, global_batch_size: int, process_index: int,
              process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """numpy batches of `eval_dataset`: ceil(N / global_batch) batches of the local
  size on every process, whatever failed to decode. Short batches (records
  dropped) are padded with mask-0 rows; the count is logged at the end."""
  local = indexing.local_batch_size(global_batch_size, process_count)
  src = sources.get_source(cfg, 'eval')
  plan = list(indexing.eval_batches(src.num_examples, global_batch_size, process_index,
                                    process_count))
  expected = int(sum(mask.sum() for _, mask in plan))
  pending, seen, batches = [], 0, 0
  ds = eval_dataset(cfg, global_batch_size, process_index, process_count)
  for batch in ds.as_numpy_iterator():
    pending.append(batch)
    rows = sum(len(b['mask']) for b in pending)
    while rows >= local:
      full = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
      out = {k: v[:local] for k, v in full.items()}
      pending = [{k: v[local:] for k, v in full.items()}]
      rows -= local
      seen += int(out['mask'].sum())
      batches += 1
      yield out
  if pending:
    template = pending[0]
  else:  # Nothing decoded at all: empty arrays of the right shapes.
    size = image_sizes(cfg)[1]
    image_dtype = tf.bfloat16.as_numpy_dtype if cfg.bfloat16 else np.float32
    template = dict(images=np.zeros([0, size, size, 3], image_dtype),
                    labels=np.zeros([0, src.num_classes], np.float32),
                    mask=np.zeros([0], np.float32))
  while batches < len(plan):
    rows = len(template['mask'])
    out = {k: np.concatenate([v, np.zeros((local - rows,) + v.shape[1:], v.dtype)])
           for k, v in template.items()}
    template = {k: v[:0] for k, v in template.items()}
    seen += int(out['mask'].sum())
    batches += 1
    yield out
  if seen < expected:
    logging.warning('Evaluation skipped %d of %d record(s) that failed to decode or '
                    'declared more than data.max_image_pixels=%d pixels.',
                    expected - seen, expected, _max_pixels(cfg))
