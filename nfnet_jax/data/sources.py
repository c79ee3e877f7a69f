"""Random-access example sources: TFDS (ArrayRecord), image folders, offline.

A `Source` is a split that can be read by global example index, which is what
makes the pipeline deterministic and independent of the process count (see
`indexing`). `fetch(indices)` runs inside tf.data; it returns the encoded image
bytes (or, for the offline source, raw uint8 pixels) and integer labels.

Only the TFDS and fetch parts need TensorFlow; folder scanning is plain Python.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nfnet_jax import errors
from nfnet_jax.data import headers
from nfnet_jax.data import tfds_location
from nfnet_jax.data.config import FOLDER_VERIFY, MAX_IMAGE_PIXELS
from nfnet_jax.data.tfds_location import prepare_instructions, tfds_data_dir

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'GIF87a', b'GIF89a', b'RIFF')


@dataclasses.dataclass
class Source:
  """One split, readable by index.

  Attributes:
    num_examples: N; valid indices are [0, N).
    num_classes: K.
    raw: False: `read` gives encoded image bytes (JPEG/PNG/...), decoded by the
      transform; True: it gives uint8 pixels [S, S, 3] of fixed size `raw_size`.
    read: numpy function: int64 indices [n] -> (images [n] object-bytes or
      [n, S, S, 3] uint8, labels [n] int32). None for the folder source, which
      reads files inside the graph from `paths`.
    paths: folder source only: [N] file paths; labels in `labels`.
  """
  num_examples: int
  num_classes: int
  raw: bool = False
  raw_size: Optional[int] = None
  read: Optional[Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]] = None
  paths: Optional[List[str]] = None
  labels: Optional[np.ndarray] = None

  def fetch(self, indices):
    """tf.int64 [n] -> (tf.string [n] or tf.uint8 [n,S,S,3], tf.int32 [n])."""
    from nfnet_jax.data._tf import tf
    if self.paths is not None:  # Paths now, file contents in `load_one`.
      paths = np.array([os.fsencode(p) for p in self.paths], object)  # Any file name.
      return (tf.gather(tf.constant(paths), indices),
              tf.gather(tf.constant(self.labels, tf.int32), indices))
    dtype = tf.uint8 if self.raw else tf.string
    images, labels = tf.numpy_function(self.read, [indices], [dtype, tf.int32],
                                       stateful=False)
    n = tf.shape(indices)[0]
    if self.raw:
      images = tf.reshape(images, [n, self.raw_size, self.raw_size, 3])
    else:
      images = tf.reshape(images, [n])
    return images, tf.reshape(labels, [n])

  def load_one(self, payload):
    """Per-example second stage of `fetch` (runs in the parallel map)."""
    if self.paths is not None:
      from nfnet_jax.data._tf import tf
      return tf.io.read_file(payload)
    return payload


# ---------------------------------------------------------------------------------
# Offline
# ---------------------------------------------------------------------------------

def offline_source(cfg, split: str) -> Source:
  from nfnet_jax.data import shapes
  images, labels = shapes.load(cfg, 'train' if split == 'train' else 'eval')

  def read(idx):
    return images[idx], labels[idx]
  return Source(images.shape[0], int(cfg.offline.num_classes), raw=True,
                raw_size=images.shape[1], read=read)


# ---------------------------------------------------------------------------------
# Folder
# ---------------------------------------------------------------------------------

@dataclasses.dataclass
class FolderIndex:
  """Result of scanning a folder dataset (paths sorted, labels by class name).

  Paths are `str`; a file name that is not valid UTF-8 is kept with Python's
  surrogate escapes (`os.fsencode` gives back its bytes).
  """
  classes: List[str]
  train: List[Tuple[str, int]]
  eval: List[Tuple[str, int]]
  skipped: Dict[str, str]   # path -> reason


def _printable(path: str) -> str:
  """A path for log lines and errors (undecodable bytes as \\xNN)."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _too_large(h: int, w: int, max_pixels: int) -> str:
  return f'too large ({w}x{h} pixels, over data.max_image_pixels={max_pixels})'


def _header_check(path: str) -> Optional[str]:
  """'open' verification, after `_decode_check(decode=False)`: magic bytes and
  PIL's structure check, no decode."""
  try:
    with open(path, 'rb') as f:
      head = f.read(16)
  except OSError as e:
    return f'unreadable ({e.strerror})'
  if not head.startswith(_MAGIC):
    return 'not an image'
  try:
    from PIL import Image
  except ImportError:
    return None
  try:
    with Image.open(path) as im:
      im.verify()
  except Exception as e:  # pylint: disable=broad-except
    return f'corrupt ({type(e).__name__})'
  return None


def _decode_check(paths: Sequence[str], max_pixels: int = MAX_IMAGE_PIXELS,
                  decode: bool = True) -> List[Optional[str]]:
  """'decode' verification: reads every header (`headers.inspect`) and decodes
  every file within `max_pixels` once with the decoder training uses (TF, in
  parallel); None where it decodes, else the reason. decode=False: the header
  check alone."""
  if not paths:
    return []
  from nfnet_jax.data import transforms
  from nfnet_jax.data._tf import tf
  encoded = np.array([os.fsencode(p) for p in paths], object)
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), encoded))

  def check(i, path):
    data = tf.io.read_file(path)
    header = headers.inspect(data, max_pixels)       # (status, h, w)
    if not decode:
      return i, header, tf.ones([2], tf.int32)
    hw = tf.cond(tf.equal(header[0], headers.OK),
                 lambda: tf.shape(transforms.decode(data))[:2],
                 lambda: tf.zeros([2], tf.int32))
    return i, header, hw
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  default = 'cannot be decoded' if decode else 'corrupt (header)'
  reasons: List[Optional[str]] = [default] * len(paths)
  for i, (status, h, w), hw in ds.ignore_errors().as_numpy_iterator():
    if status == headers.TOO_LARGE:
      reasons[i] = _too_large(int(h), int(w), max_pixels)
    elif status == headers.OK and hw.min() > 0:
      reasons[i] = None
  return reasons


def _cache_path(root: str, verify: str, cache_dir: str) -> str:
  base = cache_dir or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'nfnet_jax',
      'folders')
  key = hashlib.sha1(os.fsencode(os.path.realpath(root)) + b'\0' + verify.encode())
  return os.path.join(base, key.hexdigest()[:20] + '.json')


def _load_cache(path: str) -> Dict[str, list]:
  try:
    with open(path, encoding='utf-8') as f:
      entries = json.load(f)['files']
    return entries if isinstance(entries, dict) else {}
  except (OSError, ValueError, KeyError, TypeError):
    return {}  # No cache yet, or a damaged one: verify again.


def _save_cache(path: str, root: str, entries: Dict[str, list]) -> None:
  """Atomic write (temp file + rename): a reader sees the old cache or the new one,
  never part of one. A read-only location only costs time (the next run verifies
  again); a full disk ends the run (errors.RunError), the temp file removed."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(dict(root=_printable(os.path.realpath(root)), files=entries), f)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass  # Never created.
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise errors.RunError(
          f'Disk full while writing the folder verification cache {path} '
          f'({e.strerror}); free space there or set data.folder_cache_dir to another '
          'disk.') from None
    logging.info('Could not write the folder verification cache %s (%s)', path, e)


def verify_files(root: str, paths: Sequence[str], verify: str,
                 cache_dir: str = '', max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> Tuple[Dict[str, str], int]:
  """Checks every candidate image once: ({path: reason} of the bad ones, number
  of files actually checked now). Verdicts are cached per file, keyed by (size,
  mtime), in `cache_dir` (default: ~/.cache/nfnet_jax/folders), so a re-run only
  checks new or changed files. Images declaring more than `max_pixels` pixels
  are bad, found from their header alone."""
  if verify not in FOLDER_VERIFY:
    raise ValueError(f'data.folder_verify must be one of {FOLDER_VERIFY}, got {verify!r}')
  bad: Dict[str, str] = {}
  stats: Dict[str, Tuple[int, int]] = {}
  for p in paths:
    try:
      st = os.stat(p)
    except OSError as e:
      bad[p] = f'unreadable ({e.strerror})'
      continue
    if st.st_size == 0:
      bad[p] = 'empty file'
    else:
      stats[p] = (st.st_size, st.st_mtime_ns)
  if verify == 'none':
    return bad, 0
  cache_file = _cache_path(root, f'{verify}:{max_pixels}', cache_dir)
  cached = _load_cache(cache_file)
  rel = {p: os.path.relpath(p, root) for p in stats}
  valid = lambda e, st: (isinstance(e, list) and len(e) == 3 and e[:2] == list(st)
                         and isinstance(e[2], str))
  todo = [p for p in stats if not valid(cached.get(rel[p]), stats[p])]
  if todo:
    logging.info('Verifying %d image file(s) under %s (cached for the next run)...',
                 len(todo), _printable(root))
  if verify == 'decode':
    reasons = _decode_check(todo, max_pixels)
  else:
    reasons = [r or _header_check(p)
               for p, r in zip(todo, _decode_check(todo, max_pixels, decode=False))]
  fresh = {rel[p]: [*stats[p], r or ''] for p, r in zip(todo, reasons)}
  entries = {rel[p]: fresh.get(rel[p]) or cached[rel[p]] for p in stats}
  for p in stats:
    if entries[rel[p]][2]:
      bad[p] = entries[rel[p]][2]
  if todo or len(entries) != len(cached):
    _save_cache(cache_file, root, entries)
  return bad, len(todo)


def _list_dir(root: str, classes: Sequence[str],
              skipped: Dict[str, str]) -> List[Tuple[str, int]]:
  """(path, label) of the files with an image extension under root/CLASS/."""
  items = []
  for label, name in enumerate(classes):
    cdir = os.path.join(root, name)
    if not os.path.isdir(cdir):
      continue
    for dirpath, dirnames, filenames in os.walk(cdir):
      dirnames.sort()
      for fname in sorted(filenames):
        path = os.path.join(dirpath, fname)
        if fname.startswith('.'):
          continue
        if not fname.lower().endswith(IMAGE_EXTENSIONS):
          skipped[path] = 'not an image (extension)'
          continue
        items.append((path, label))
  return items


@functools.lru_cache(maxsize=8)
def scan_folder(root: str, holdout_fraction: float = 0.0, verify: str = 'decode',
                seed: int = 0, cache_dir: str = '',
                max_pixels: int = MAX_IMAGE_PIXELS) -> FolderIndex:
  """Scans `root` laid out as root/{train,val}/CLASS/*.jpg or root/CLASS/*.jpg.

  With root/train/, the eval split is root/val/ (or validation/, test/) when there
  is one, whatever `holdout_fraction` says; without one, `holdout_fraction` of
  every class (a seeded, deterministic choice) becomes the eval split; the log line
  names the split used. Files that are not images, are empty, declare more than
  `max_pixels` pixels, or fail the `verify` check ('decode': decoded once with TF;
  'open': header and PIL structure check; 'none': no check, not even of the size)
  are skipped and counted in one log line; the verdicts are cached (`verify_files`).
  A training class folder left without a usable image is an error that names it.
  """
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
        f'Folder dataset {root!r} not found. Expected root/train/CLASS/*.jpg (and '
        'root/val/CLASS/*.jpg), or root/CLASS/*.jpg with data.holdout_fraction > 0.')
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    train_dir = root
  eval_dir = next((os.path.join(root, d) for d in ('val', 'validation', 'test')
                   if train_dir != root and os.path.isdir(os.path.join(root, d))), None)
  classes = sorted(d for d in os.listdir(train_dir)
                   if os.path.isdir(os.path.join(train_dir, d)) and not d.startswith('.'))
  if not classes:
    raise FileNotFoundError(f'No class subfolders in {train_dir!r}.')
  skipped: Dict[str, str] = {}
  train = _list_dir(train_dir, classes, skipped)
  evals: List[Tuple[str, int]] = []
  if eval_dir is not None:
    extra = sorted(d for d in os.listdir(eval_dir)
                   if os.path.isdir(os.path.join(eval_dir, d)) and d not in classes
                   and not d.startswith('.'))
    if extra:
      raise ValueError(f'{eval_dir} has classes missing from {train_dir}: {extra[:5]}')
    evals = _list_dir(eval_dir, classes, skipped)
  bad, checked = verify_files(root, [p for p, _ in train + evals], verify, cache_dir,
                              max_pixels)
  skipped.update(bad)
  train = [t for t in train if t[0] not in bad]
  evals = [t for t in evals if t[0] not in bad]
  counts = np.bincount([label for _, label in train], minlength=len(classes))
  empty = [os.path.join(train_dir, classes[k]) for k in np.flatnonzero(counts == 0)]
  if empty:
    raise ValueError(
        f'Class folder {_printable(empty[0])} has no usable image'
        + (f' (and {len(empty) - 1} more: {", ".join(map(_printable, empty[1:4]))})'
           if len(empty) > 1 else '')
        + '; add images or remove the folder.')
  # The log names the split in use: a user's val/ folder always wins.
  if eval_dir is not None:
    split = f'eval split {_printable(eval_dir)}'
    if holdout_fraction > 0:
      split += (f' (data.holdout_fraction={holdout_fraction:g} unused: the eval folder '
                'wins)')
  elif holdout_fraction <= 0:
    split = 'no eval split'
  else:
    split = (f'eval split {holdout_fraction:g} of each class of {_printable(train_dir)} '
             '(data.holdout_fraction)')
    rng = np.random.default_rng([seed, 0xF01D])
    kept = []
    for label in range(len(classes)):
      items = [t for t in train if t[1] == label]
      k = int(round(holdout_fraction * len(items)))
      chosen = set(rng.permutation(len(items))[:k].tolist())
      evals += [t for i, t in enumerate(items) if i in chosen]
      kept += [t for i, t in enumerate(items) if i not in chosen]
    train = kept
  msg = (f'Folder dataset {_printable(root)}: {len(classes)} classes, {len(train)} train '
         f'and {len(evals)} eval images, {split} ({checked} file(s) verified now, the '
         f'rest from the cache); skipped {len(skipped)} file(s)')
  if skipped:
    msg += ': ' + '; '.join(f'{_printable(p)} ({r})' for p, r in list(skipped.items())[:5])
    msg += ' ...' if len(skipped) > 5 else ''
    logging.warning(msg)
  else:
    logging.info(msg)
  return FolderIndex(classes, train, evals, skipped)


def folder_source(cfg, split: str) -> Source:
  index = scan_folder(cfg.folder, float(cfg.holdout_fraction), cfg.folder_verify,
                      cache_dir=cfg.get('folder_cache_dir', ''),
                      max_pixels=int(cfg.get('max_image_pixels', MAX_IMAGE_PIXELS)))
  items = index.train if split == 'train' else index.eval
  if not items:
    raise ValueError(f'Folder dataset {cfg.folder!r} has no eval split: add a val/ '
                     'folder or set data.holdout_fraction > 0.')
  return Source(len(items), len(index.classes), paths=[p for p, _ in items],
                labels=np.array([l for _, l in items], np.int32))


# ---------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------

def tfds_builder(cfg, prepare: bool = True):
  """The TFDS builder of `cfg.name`; prepares it from `cfg.manual_dir` if needed."""
  from nfnet_jax.data import _tf  # noqa: F401  (hides accelerators first)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise errors.missing_extra('data', "data.source='tfds'", e.name) from None
  try:
    builder = tfds.builder(cfg.name, data_dir=tfds_data_dir(cfg))
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown TFDS dataset data.name={cfg.name!r}.') from None
  if prepare and cfg.manual_dir and not builder.is_prepared():
    from nfnet_jax.data import prepare as prepare_lib
    builder = prepare_lib.prepare_tfds(cfg.name, tfds_data_dir(cfg), cfg.manual_dir)
  return builder


def _tfds_split_name(cfg, split: str, builder) -> str:
  """Maps 'train'/'eval' to a TFDS split string, applying holdout_fraction."""
  if cfg.holdout_fraction <= 0:
    return cfg.train_split if split == 'train' else cfg.eval_split
  n = builder.info.splits[cfg.train_split].num_examples
  k = int(round(n * cfg.holdout_fraction))
  return f'{cfg.train_split}[:{n - k}]' if split == 'train' else f'{cfg.train_split}[{n - k}:]'


def tfds_source(cfg, split: str) -> Source:
  builder = tfds_builder(cfg)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (as above)
  split_name = _tfds_split_name(cfg, split, builder)
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  data_dir = tfds_data_dir(cfg)
  try:
    src = builder.as_data_source(split_name, decoders={image_key: tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    # `from None`: TFDS's own error for a missing dataset speaks of a wrong file
    # format and of deleting data, which would only mislead.
    if not builder.is_prepared():
      raise tfds_location.not_prepared(cfg) from None
    raise ValueError(
        f'Cannot read split {split_name!r} of {cfg.name!r} in {data_dir} by index '
        f'({type(e).__name__}: {str(e).splitlines()[0]}).\nThe pipeline needs a '
        'random-access copy (ArrayRecord). ' + prepare_instructions(cfg.name, data_dir)
    ) from None
  num_classes = builder.info.features[label_key].num_classes

  def read(idx):
    keys = [int(i) for i in idx]
    try:
      records = src.__getitems__(keys)
    except TypeError:  # tfds.testing.mock_data's source lacks a working __getitems__.
      records = [src[k] for k in keys]
    images = np.empty([len(keys)], object)
    images[:] = [r[image_key] for r in records]
    return images, np.array([r[label_key] for r in records], np.int32)
  return Source(len(src), int(num_classes), read=read)


def get_source(cfg, split: str) -> Source:
  """split: 'train' | 'eval'."""
  if cfg.source == 'offline':
    return offline_source(cfg, split)
  if cfg.source == 'folder':
    return folder_source(cfg, split)
  if cfg.source == 'tfds':
    return tfds_source(cfg, split)
  raise ValueError(f"data.source must be 'tfds', 'folder' or 'offline', got {cfg.source!r}")
