"""The one place the data package imports TensorFlow (CPU only).

Importing this module hides every GPU/TPU from TensorFlow before any op runs, so
TF never claims accelerator memory that JAX needs.
"""
from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top


def _hide_accelerators() -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # RuntimeError: devices already initialised (someone ran TF ops first);
      # ValueError: no such device type in this build.
      pass


_hide_accelerators()

__all__ = ['tf']
