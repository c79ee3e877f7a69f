"""Default input-pipeline configuration (an `ml_collections.ConfigDict`).

Nothing here imports TensorFlow. Every stage of the training transform can be
switched off from the config; the defaults are the NFNet ImageNet recipe (see
docs/data.md and docs/augmentation.md). Every field has a concrete type so that
`--config.data.<field>=...` works from the command line; an empty string means
"not set" for the path fields.
"""
from __future__ import annotations

import math
from typing import Tuple

import ml_collections

from nfnet_jax import errors

SOURCES = ('tfds', 'folder', 'offline')
CROPS = ('auto', 'inception', 'pad_crop', 'resize', 'none')
EVAL_CROPS = ('squash', 'center_crop')
FOLDER_VERIFY = ('decode', 'open', 'none')
AUGMENT_ON = ('host', 'device')
PAIRINGS = ('paper', 'within_batch')
# An image whose header declares more pixels than this is skipped (and counted)
# before it is decoded: 100 megapixels, 300 MB of RGB, beyond any photo a
# training set needs, while a 1 MB PNG can declare 20000 x 20000 (1.2 GB).
MAX_IMAGE_PIXELS = 100_000_000
# Training stops with one error line after this many consecutive training
# records that could not be used (undecodable or over the pixel limit), instead
# of searching forever for a good one. A dataset where even half the records are
# bad meets such a run with probability 2**-1000.
MAX_CONSECUTIVE_BAD_RECORDS = 1000


def default_config() -> ml_collections.ConfigDict:
  """Returns the data config; see the inline comments for each field."""
  c = ml_collections.ConfigDict()
  c.source = 'tfds'              # 'tfds' | 'folder' | 'offline'
  c.name = 'imagenet2012'        # TFDS builder name (source='tfds')
  c.data_dir = ''                # TFDS data_dir ('': $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.manual_dir = ''              # where ILSVRC2012_img_{train,val}.tar live (prepare step)
  c.folder = ''                  # root of a folder dataset (source='folder')
  c.holdout_fraction = 0.0       # >0: eval on this fraction of the train split instead
  c.train_split = 'train'
  c.eval_split = 'validation'    # folder source: the 'val' subfolder is used when present

  # Image sizes (square). 0: the model's train/test size from its variant table
  # (`nfnet_jax.models.registry.info(model)`). A training config links `model` to
  # its top-level `config.model`, so set that one there.
  c.model = 'F0'
  c.image_size = 0               # train resolution
  c.eval_size = 0                # test resolution
  # Eval transform: 'squash' = bicubic resize of the whole image to R x R, centre
  # crop eval_size (NFNets); 'center_crop' = the aspect-preserving centre square of
  # side short_side * S / R, bicubic resize to S (NF-ResNets, NF-RegNets). R, the
  # side the image is resized to before the crop, comes from `eval_crop_fraction`,
  # the share S / R of the side the crop keeps (`eval_resize_side`): 0 = auto (the
  # paper's R = S + 32 at the sizes it uses, 6/7 of small images, no crop after a
  # whole-image training crop); a value in (0, 1] = that share (1.0: no crop).
  c.eval_crop = 'squash'
  c.eval_crop_fraction = 0.0
  # 'auto' = 'inception' for tfds/folder, 'pad_crop' for offline; 'inception' =
  # random area/aspect crop (fused decode-and-crop on JPEG) then bicubic resize;
  # 'pad_crop' = zero-pad by `pad_crop_padding`, random crop back to the size;
  # 'resize' = bicubic squash of the whole image; 'none' = image used as is.
  c.crop = 'auto'
  c.inception = ml_collections.ConfigDict(dict(
      area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0.1, max_attempts=10))
  c.pad_crop_padding = 4
  c.flip = True

  c.randaugment = ml_collections.ConfigDict(dict(
      enabled=True, num_layers=4, magnitude=5.0,
      contrast_mode='tf',          # 'tf': blend toward min(H*W/256, 255); 'mean': mean grey
      posterize_mode='keep_bits',  # 'keep_bits': keep int(4M/10) bits; 'remove_bits'
      solarize='wrap',             # threshold int(256M/10) % 256 ('wrap', as the paper's
                                   # runs) or capped at 256 ('saturate': identity at M>=10)
      fill=128, translate_const=100.0, cutout_const=40.0))

  # Mixing: 2B decoded images in, B out. With both MixUp and CutMix on, the first
  # half of the global batch is MixUp, the second half CutMix.
  # pairing 'paper': 2B decoded -> B; 'within_batch': B decoded -> B, output rows
  # 2i and 2i+1 both mix decoded rows 2i and 2i+1 (in the two orders).
  # The resized images are clipped and truncated to uint8 before mixing.
  c.mix = ml_collections.ConfigDict(dict(enabled=True, mixup_alpha=0.2, cutmix=True,
                                         pairing='paper'))

  # Where `augment` (mixing, RandAugment, normalisation; one JAX function) runs:
  # 'host' = jitted on the host's CPU backend in the input pipeline, 'device' = in
  # the train step, each device on its own rows. The same batch either way.
  c.augment_on = 'host'

  c.normalize = True             # ImageNet mean/std on the 0-255 scale
  c.bfloat16 = False             # emit images as bfloat16
  c.shuffle = True               # per-epoch permutation of the whole split
  c.num_parallel_calls = -1      # -1 = tf.data.AUTOTUNE
  c.prefetch = 2                 # batches prefetched (tf.data and numpy paths)
  c.threadpool_size = 0          # >0: private tf.data threadpool of this size
  # Folder source: 'decode' = decode every file once before training and skip (and
  # count) the ones that fail; 'open' = header check only; 'none' = only drop
  # empty files. Verdicts are cached per file in `folder_cache_dir` ('':
  # $XDG_CACHE_HOME or ~/.cache, under nfnet_jax/folders), so a re-run only checks
  # new or changed files.
  c.folder_verify = 'decode'
  c.folder_cache_dir = ''
  # Any source: images declaring more pixels than this (header only) are skipped
  # and counted before decoding; training stops with one error line after this
  # many consecutive unusable training records (see MAX_* above).
  c.max_image_pixels = MAX_IMAGE_PIXELS
  c.max_consecutive_bad_records = MAX_CONSECUTIVE_BAD_RECORDS

  # The built-in shapes dataset, rendered at the train/eval image sizes.
  c.offline = ml_collections.ConfigDict(dict(
      num_classes=10, num_train=10_000, num_eval=2_000, seed=0))
  c.use_tf = True                # False: pure-numpy path (offline source only)
  return c


def resolve_crop(cfg) -> str:
  """The crop actually used: 'auto' is 'pad_crop' for offline, else 'inception'."""
  if cfg.crop == 'auto':
    return 'pad_crop' if cfg.source == 'offline' else 'inception'
  if cfg.crop not in CROPS:
    raise ValueError(f'Unknown data.crop {cfg.crop!r}; one of {CROPS}')
  return cfg.crop


def resolve_eval_crop(cfg) -> str:
  """data.eval_crop, checked; also checks data.eval_crop_fraction."""
  if cfg.eval_crop not in EVAL_CROPS:
    raise ValueError(f'Unknown data.eval_crop {cfg.eval_crop!r}; one of {EVAL_CROPS}')
  fraction = cfg.get('eval_crop_fraction', 0.0)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'data.eval_crop_fraction must be in (0, 1] (the share of the '
                     f'image side the eval crop keeps; 1.0 = no crop) or 0 (auto), '
                     f'got {fraction!r}')
  return cfg.eval_crop


# The paper's eval rule (DeepMind's NFNet code): resize to S + 32, crop S. Fixed in
# pixels, it keeps 6/7 of the side at 192 px (the smallest size the paper trains or
# tests at) and more at larger sizes, but only half of a 32 px image. Below the size
# where the 32 px margin is more than 1/7 of S, the margin stays at S / 6 (the
# paper's share at 192 px), so the rule is continuous and every registered model's
# train and test sizes (all >= 192 px) keep the paper's exact window.
PAPER_MARGIN = 32
# Training crops that show the model the whole image: evaluating on a centre crop
# would zoom in where training never did (CIFAR-style pad_crop, the 'resize' squash,
# none).
WHOLE_IMAGE_CROPS = ('pad_crop', 'resize', 'none')


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def eval_resize_side(size: int, fraction: float = 0.0, crop: str = 'inception') -> int:
  """R, the side the eval transform resizes to before cutting the centred `size`
  (the 'center_crop' transform keeps the share size / R of the short side).

  `fraction` > 0: R = round(size / fraction) (1.0: R = size, no crop). 0 (auto):
  R = size for a whole-image training `crop` (`WHOLE_IMAGE_CROPS`), else
  size + min(32, round(size / 6)): the paper's size + 32 from 192 px up, the
  share 6/7 below. E.g. 256 -> 288 (F0's test size), 192 -> 224, 32 -> 37.
  """
  if fraction > 0:
    return max(size, _round_half_up(size / fraction))
  if crop in WHOLE_IMAGE_CROPS:
    return size
  small = (size + 3) // 6  # round(size / 6), half up, in integers: the share 6/7
  return size + min(PAPER_MARGIN, small)


def eval_rendered_as_is(cfg) -> bool:
  """Whether eval images are used as the offline source renders them (already
  S x S): the offline source with a whole-image training crop other than 'resize'."""
  return cfg.source == 'offline' and resolve_crop(cfg) in ('pad_crop', 'none')


def describe_eval(cfg) -> str:
  """One line saying what the eval transform does, e.g. 'eval: bicubic resize of the
  whole image to 37x37, centre crop 32x32 (86.5% of each side) ...'."""
  _, size = image_sizes(cfg)
  fraction = float(cfg.get('eval_crop_fraction', 0.0))
  how = 'auto' if fraction == 0 else f'{fraction:g}'
  keys = f'data.eval_crop={cfg.eval_crop}, data.eval_crop_fraction={how}'
  if eval_rendered_as_is(cfg):
    return f'eval: the offline images as rendered, {size}x{size}, no crop'
  side = eval_resize_side(size, fraction, resolve_crop(cfg))
  kept = f'{100 * size / side:.1f}%'
  if resolve_eval_crop(cfg) == 'center_crop':
    if side == size:
      return (f'eval: centre square of the whole short side, bicubic resize to '
              f'{size}x{size}, no crop ({keys})')
    return (f'eval: centre square of {kept} of the short side, bicubic resize to '
            f'{size}x{size} ({keys})')
  if side == size:
    return f'eval: bicubic resize of the whole image to {size}x{size}, no crop ({keys})'
  return (f'eval: bicubic resize of the whole image to {side}x{side}, centre crop '
          f'{size}x{size} ({kept} of each side; {keys})')


def image_sizes(cfg) -> Tuple[int, int]:
  """(train, eval) image sizes: `image_size`/`eval_size` when set (> 0), else the
  train/test sizes of `cfg.model`'s variant table."""
  train, test = int(cfg.image_size or 0), int(cfg.eval_size or 0)
  if train > 0 and test > 0:
    return train, test
  if train < 0 or test < 0:
    raise ValueError(f'data.image_size/eval_size must be positive (or 0: from the '
                     f'model), got {train}/{test}')
  model = cfg.get('model', '')
  if not model:
    raise ValueError('data.image_size/eval_size are 0 (use the model\'s sizes) but no '
                     'model is named: set data.image_size and data.eval_size, or '
                     'data.model (a training config sets it from config.model).')
  from nfnet_jax.models import registry  # TF-free; lazy so the config stays light.
  info = registry.info(model)
  return train or int(info['train_imsize']), test or int(info['test_imsize'])


def mix_on(cfg) -> bool:
  """Whether the train transform mixes pairs of images (MixUp and/or CutMix)."""
  return bool(cfg.mix.enabled) and (cfg.mix.mixup_alpha > 0 or bool(cfg.mix.cutmix))


def check_augment_config(cfg) -> None:
  """One-line ValueErrors for bad augment_on / mix.pairing / RandAugment modes."""
  checks = ((cfg.get('augment_on', 'host'), AUGMENT_ON, 'data.augment_on'),
            (cfg.mix.get('pairing', 'paper'), PAIRINGS, 'data.mix.pairing'),
            (cfg.randaugment.get('solarize', 'wrap'), ('wrap', 'saturate'),
             'data.randaugment.solarize'),
            (cfg.randaugment.contrast_mode, ('tf', 'mean'), 'data.randaugment.contrast_mode'),
            (cfg.randaugment.posterize_mode, ('keep_bits', 'remove_bits'),
             'data.randaugment.posterize_mode'))
  for value, allowed, name in checks:
    if value not in allowed:
      raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def check_config(cfg) -> None:
  """The data config's checks, before any data is read: one clear ValueError naming
  the key, with the closest valid value for a misspelled one."""
  for key, kind, valid in (('source', 'source', SOURCES),
                           ('crop', 'train crop', CROPS),
                           ('eval_crop', 'eval crop', EVAL_CROPS),
                           ('folder_verify', 'verification', FOLDER_VERIFY)):
    if cfg[key] not in valid:
      raise ValueError(f'data.{key}: ' + errors.unknown_name(kind, cfg[key], valid))
  resolve_crop(cfg)
  resolve_eval_crop(cfg)
  image_sizes(cfg)
  for key, low in (('max_image_pixels', 1), ('max_consecutive_bad_records', 1)):
    if key in cfg and int(cfg[key]) < low:
      raise ValueError(f'data.{key} must be >= {low}, got {cfg[key]}')
  if not cfg.use_tf:
    if cfg.source != 'offline':
      raise ValueError("data.use_tf=False (numpy path) only supports source='offline'; "
                       'the tfds and folder sources need data.use_tf=True.')
    if cfg.crop not in ('auto', 'pad_crop', 'none'):
      raise ValueError("data.use_tf=False (numpy path) supports data.crop 'auto', "
                       f"'pad_crop' or 'none', got {cfg.crop!r}")
  elif cfg.source == 'offline':
    errors.require_extra('data', 'data.use_tf=True (the TF input pipeline; '
                         'data.use_tf=False is the numpy one)', 'tensorflow')
  else:
    errors.require_extra('data', f'data.source={cfg.source!r}', 'tensorflow',
                         *(('tensorflow_datasets',) if cfg.source == 'tfds' else ()))
