"""Where a TFDS dataset lives, how to prepare it, and the one refusal for a dataset
that is certainly not there: all without TensorFlow, so that `--check_config` of a
TFDS config on a machine without the data does not load it.

TFDS keeps a prepared dataset in <data_dir>/<name>/[<config>/]<version>/; with no
<data_dir>/<name>/ folder at all nothing of it is prepared. Whether a folder that
exists holds a readable copy is for TFDS to say (`sources.tfds_source`). The check
before a run (`configs.check_run`) asks here first; `data.dataset_info` asks TFDS
only, so that TFDS's test doubles (`tfds.testing.mock_data`) stand in for the data.
"""
from __future__ import annotations

import os

from nfnet_jax import errors


def tfds_data_dir(cfg) -> str:
  """The TFDS data_dir in use: data.data_dir, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets (TFDS's own rule), with ~ expanded."""
  return os.path.expanduser(cfg.data_dir or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets')


def prepare_instructions(name: str, data_dir: str) -> str:
  """The commands that make `name` readable by index under `data_dir`."""
  text = (f'Prepare it once (ArrayRecord format, needed for random access):\n'
          f'  python -m nfnet_jax.data.prepare --name={name} --data_dir={data_dir}')
  if name.startswith('imagenet2012'):
    text += (' --manual_dir=DIR\n  where DIR holds ILSVRC2012_img_train.tar and '
             'ILSVRC2012_img_val.tar from image-net.org (the tars, not extracted).')
  text += ('\nA copy already prepared as TFRecord (the TFDS default) can be converted '
           'instead:\n  tfds convert_format '
           f'--dataset_dir={data_dir}/{name}/<version> --out_file_format=array_record')
  return text


def not_prepared(cfg) -> FileNotFoundError:
  """The error for data.name not prepared under the data_dir in use."""
  data_dir = tfds_data_dir(cfg)
  return FileNotFoundError(
      f'TFDS dataset {cfg.name!r} is not prepared in {data_dir} (data.data_dir, else '
      '$TFDS_DATA_DIR, else ~/tensorflow_datasets).\n'
      + prepare_instructions(cfg.name, data_dir))


def refuse_if_absent(cfg) -> None:
  """Raises `not_prepared(cfg)` when a local data_dir has no folder for data.name
  and there is no data.manual_dir to prepare it from (ValueError for a name TFDS
  does not know); returns otherwise, having imported no TensorFlow."""
  data_dir = tfds_data_dir(cfg)
  base = cfg.name.split(':')[0].split('/')[0]
  if cfg.manual_dir or '://' in data_dir or os.path.isdir(os.path.join(data_dir, base)):
    return
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise errors.missing_extra('data', "data.source='tfds'", e.name) from None
  try:  # A misspelt name is named as such, not as missing data.
    tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown TFDS dataset data.name={cfg.name!r}.') from None
  raise not_prepared(cfg) from None
