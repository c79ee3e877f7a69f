"""Default input-pipeline configuration (an `ml_collections.ConfigDict`).

Nothing here imports TensorFlow. Every stage of the training transform can be
switched off from the config; the defaults are the NFNet ImageNet recipe (see
docs/data.md and docs/augmentation.md). Every field has a concrete type so that
`--config.data.<field>=...` works from the command line; an empty string means
"not set" for the path fields.
"""
from __future__ import annotations

from typing import Tuple

import ml_collections

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
  # Eval transform: 'squash' = bicubic resize of the whole image to
  # (eval_size + margin)^2, centre crop eval_size (NFNets); 'center_crop' = the
  # aspect-preserving centre square of side short_side * S / (S + margin), bicubic
  # resize to S (NF-ResNets, NF-RegNets).
  c.eval_crop = 'squash'
  c.eval_resize_margin = 32
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
  # quantize_inputs: clip+truncate the resized images to uint8 before mixing
  # (always so with augment_on='device'; False mixes the unclamped bicubic output).
  c.mix = ml_collections.ConfigDict(dict(enabled=True, mixup_alpha=0.2, cutmix=True,
                                         pairing='paper', quantize_inputs=False))

  # 'host': the tf.data/numpy pipeline mixes, augments and normalises. 'device': it
  # emits uint8 images plus the random numbers of those stages and
  # `device_augment.apply_device_augment` applies them in JAX (same numbers).
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
  if cfg.eval_crop not in EVAL_CROPS:
    raise ValueError(f'Unknown data.eval_crop {cfg.eval_crop!r}; one of {EVAL_CROPS}')
  return cfg.eval_crop


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
