"""The one place the data package imports TensorFlow (CPU only).

Importing this module hides every GPU/TPU from TensorFlow before any op runs, so
TF never claims accelerator memory that JAX needs, keeps TensorFlow's C++ start-up
lines below TF_CPP_MIN_LOG_LEVEL (2 unless the caller set it) off the terminal, and
silences TFDS's warnings about version folders that do not exist.
"""
from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from nfnet_jax import console  # noqa: E402  pylint: disable=g-import-not-at-top
from nfnet_jax import errors  # noqa: E402  pylint: disable=g-import-not-at-top

try:
  with console.tf_cpp_log_level_applied():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
except ModuleNotFoundError as e:  # TF, or a module it needs, is not installed.
  raise errors.missing_extra('data', 'The TF input pipeline', e.name) from None


def _hide_accelerators() -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # RuntimeError: devices already initialised (someone ran TF ops first);
      # ValueError: no such device type in this build.
      pass


_hide_accelerators()
# TFDS warns about version folders that do not exist (a dataset not prepared yet);
# the pipeline's own error says that, with the command that prepares it.
console.quiet_missing_tfds_variants()

__all__ = ['tf']
