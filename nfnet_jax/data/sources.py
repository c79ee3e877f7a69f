"""Random-access example sources: TFDS (ArrayRecord), image folders, offline.

A `Source` is a split that can be read by global example index, which is what
makes the pipeline deterministic and independent of the process count (see
`indexing`). `fetch(indices)` runs inside tf.data; it returns the encoded image
bytes (or, for the offline source, raw uint8 pixels) and integer labels.

Only the TFDS and fetch parts need TensorFlow; folder scanning is plain Python.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'GIF87a', b'GIF89a')


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
      return (tf.gather(tf.constant(self.paths), indices),
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
  from nfnet_jax.data import offline
  images, labels = offline.load(cfg, 'train' if split == 'train' else 'eval')

  def read(idx):
    return images[idx], labels[idx]
  return Source(images.shape[0], int(cfg.offline.num_classes), raw=True,
                raw_size=images.shape[1], read=read)


# ---------------------------------------------------------------------------------
# Folder
# ---------------------------------------------------------------------------------

@dataclasses.dataclass
class FolderIndex:
  """Result of scanning a folder dataset (paths sorted, labels by class name)."""
  classes: List[str]
  train: List[Tuple[str, int]]
  eval: List[Tuple[str, int]]
  skipped: Dict[str, str]   # path -> reason


def _check_image(path: str, verify: str) -> Optional[str]:
  """None if `path` looks like a readable image, else the reason it is skipped."""
  try:
    with open(path, 'rb') as f:
      head = f.read(16)
  except OSError as e:
    return f'unreadable ({e})'
  if not head.startswith(_MAGIC):
    return 'not an image'
  if verify == 'none':
    return None
  try:
    from PIL import Image
    with Image.open(path) as im:
      if verify == 'decode':
        im.load()
      else:
        im.verify()
  except ImportError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f'corrupt ({type(e).__name__}: {e})'
  return None


def _scan_dir(root: str, classes: Sequence[str], verify: str,
              skipped: Dict[str, str]) -> List[Tuple[str, int]]:
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
        reason = _check_image(path, verify)
        if reason:
          skipped[path] = reason
        else:
          items.append((path, label))
  return items


@functools.lru_cache(maxsize=8)
def scan_folder(root: str, holdout_fraction: float = 0.0, verify: str = 'open',
                seed: int = 0) -> FolderIndex:
  """Scans `root` laid out as root/{train,val}/CLASS/*.jpg or root/CLASS/*.jpg.

  Without a val/ (or validation/) folder, `holdout_fraction` of every class
  (a seeded, deterministic choice) becomes the eval split. Files that are not
  images, or that fail the `verify` check ('open': PIL header/structure check;
  'decode': full decode; 'none'), are skipped and counted in the log.
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
  train = _scan_dir(train_dir, classes, verify, skipped)
  evals: List[Tuple[str, int]] = []
  if holdout_fraction > 0:
    rng = np.random.default_rng([seed, 0xF01D])
    kept = []
    for label in range(len(classes)):
      items = [t for t in train if t[1] == label]
      k = int(round(holdout_fraction * len(items)))
      chosen = set(rng.permutation(len(items))[:k].tolist())
      evals += [t for i, t in enumerate(items) if i in chosen]
      kept += [t for i, t in enumerate(items) if i not in chosen]
    train = kept
  elif eval_dir is not None:
    extra = sorted(d for d in os.listdir(eval_dir)
                   if os.path.isdir(os.path.join(eval_dir, d)) and d not in classes)
    if extra:
      raise ValueError(f'{eval_dir} has classes missing from {train_dir}: {extra[:5]}')
    evals = _scan_dir(eval_dir, classes, verify, skipped)
  if not train:
    raise FileNotFoundError(f'No readable images under {train_dir!r}.')
  msg = (f'Folder dataset {root}: {len(classes)} classes, {len(train)} train and '
         f'{len(evals)} eval images; skipped {len(skipped)} file(s)')
  if skipped:
    msg += ': ' + '; '.join(f'{p} ({r})' for p, r in list(skipped.items())[:5])
    logging.warning(msg)
  else:
    logging.info(msg)
  return FolderIndex(classes, train, evals, skipped)


def folder_source(cfg, split: str) -> Source:
  index = scan_folder(cfg.folder, float(cfg.holdout_fraction), cfg.folder_verify)
  items = index.train if split == 'train' else index.eval
  if not items:
    raise ValueError(f'Folder dataset {cfg.folder!r} has no eval split: add a val/ '
                     'folder or set data.holdout_fraction > 0.')
  return Source(len(items), len(index.classes), paths=[p for p, _ in items],
                labels=np.array([l for _, l in items], np.int32))


# ---------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------

def prepare_instructions(name: str, data_dir: Optional[str]) -> str:
  dd = data_dir or '~/tensorflow_datasets'
  text = (f'Prepare it once (ArrayRecord format, needed for random access):\n'
          f'  python -m nfnet_jax.data.prepare --name={name} --data_dir={dd}')
  if name.startswith('imagenet2012'):
    text += (' --manual_dir=DIR\n  where DIR holds ILSVRC2012_img_train.tar and '
             'ILSVRC2012_img_val.tar from image-net.org (the tars, not extracted).')
  return text


def tfds_builder(cfg, prepare: bool = True):
  """The TFDS builder of `cfg.name`; prepares it from `cfg.manual_dir` if needed."""
  from nfnet_jax.data import _tf  # noqa: F401  (hides accelerators first)
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown TFDS dataset {cfg.name!r}.') from e
  if prepare and cfg.manual_dir and not builder.is_prepared():
    from nfnet_jax.data import prepare as prepare_lib
    builder = prepare_lib.prepare_tfds(cfg.name, cfg.data_dir, cfg.manual_dir)
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
  import tensorflow_datasets as tfds
  split_name = _tfds_split_name(cfg, split, builder)
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  try:
    src = builder.as_data_source(split_name, decoders={image_key: tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {cfg.name!r} is not prepared in data_dir='
          f'{cfg.data_dir or "~/tensorflow_datasets"}.\n'
          + prepare_instructions(cfg.name, cfg.data_dir)) from e
    raise ValueError(
        f'Cannot read split {split_name!r} of {cfg.name!r} by index ({e}).\nThe pipeline '
        'needs a random-access copy (ArrayRecord). Convert the prepared copy with\n'
        f'  tfds convert_format --dataset_dir=<data_dir>/{cfg.name}/<version> '
        '--out_file_format=array_record\nor re-prepare: '
        + prepare_instructions(cfg.name, cfg.data_dir)) from e
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
