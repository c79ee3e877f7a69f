r"""One-time preparation of a TFDS dataset in ArrayRecord format (random access).

  python -m nfnet_jax.data.prepare --name=imagenet2012 \
      --data_dir=/data/tfds --manual_dir=/data/imagenet_tars

For imagenet2012, `manual_dir` holds ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar exactly as downloaded from image-net.org. Other datasets
are downloaded by TFDS (needs network). Run it once, on one machine, before
training; every host then reads the prepared copy from `data_dir`.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from nfnet_jax import errors


def prepare_tfds(name: str, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None, file_format: str = 'array_record'):
  """Runs `download_and_prepare` (manual_dir through DownloadConfig); returns the builder.

  data_dir None or '': $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  """
  errors.require_extra('data', 'Preparing a TFDS dataset', 'tensorflow',
                       'tensorflow_datasets')
  from nfnet_jax.data import _tf  # noqa: F401  (hides accelerators first)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR')
                                or '~/tensorflow_datasets')
  manual_dir = manual_dir or None
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  if builder.is_prepared():
    logging.info('%s already prepared in %s', name, builder.data_dir)
    return builder
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) and not manual_dir:
    raise FileNotFoundError(
        f'{name} needs manually downloaded files; pass manual_dir.\n'
        + str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS))
  logging.info('Preparing %s into %s (format %s)', name, builder.data_dir, file_format)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  return tfds.builder(name, data_dir=data_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m nfnet_jax.data.prepare', description=__doc__.split('\n\n')[0],
      epilog='\n\n'.join(__doc__.split('\n\n')[1:]),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', default='imagenet2012',
                      help='TFDS dataset name, as data.name in the training config '
                      '(default: %(default)s)')
  parser.add_argument('--data_dir', default='',
                      help='where the prepared copy is written, as data.data_dir '
                      '(default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)')
  parser.add_argument('--manual_dir', default='',
                      help='folder holding the manually downloaded files; for '
                      'imagenet2012 ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
                      '(default: none; other datasets are downloaded by TFDS)')
  parser.add_argument('--file_format', default='array_record',
                      choices=('array_record', 'tfrecord'),
                      help='storage format; the training pipeline reads by index and '
                      'needs array_record (default: %(default)s)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    builder = prepare_tfds(args.name, args.data_dir, args.manual_dir, args.file_format)
  except errors.MissingExtra as e:
    parser.exit(1, f'{parser.prog}: error: {e}\n')
  print(f'{args.name}: prepared at {builder.data_dir}')
  for split, info in builder.info.splits.items():
    print(f'  {split}: {info.num_examples} examples')


if __name__ == '__main__':
  main()
