"""Matching a params tree to a registered model: module names and leaf shapes.

A checkpoint read from a file (`pretrained.load`) or converted from timm's names
(`timm_convert.from_timm`) is renamed to the model's own module names and checked
leaf by leaf against the shapes of the model's init. Module paths are matched on
their canonical form (every `~` component dropped), so DeepMind's released naming
(`NFNet/~/nf_block_3/~/conv1b`) and the model's (`NFNet/nf_block_3/conv1b`) meet.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import numpy as np

from nfnet_jax.safe_pickle import Params

__all__ = ['canonical_name', 'released_name', 'to_released_names', 'model_shapes',
           'model_leaves', 'classifier_module', 'format_list', 'match_to_model']


def canonical_name(module_path: str) -> str:
  """`NFNet/~/nf_block/~/conv0` -> `NFNet/nf_block/conv0` (drops `~` components)."""
  return '/'.join(p for p in module_path.split('/') if p != '~')


def released_name(module_path: str) -> str:
  """`NFNet/nf_block/conv0` -> `NFNet/~/nf_block/~/conv0`: DeepMind's checkpoint name.

  In DeepMind's NFNet every submodule is built in its parent's constructor, which
  Haiku marks with `~`, so every separator of the released names is `/~/`.
  """
  return '/~/'.join(canonical_name(module_path).split('/'))


def to_released_names(params: Mapping[str, Mapping[str, Any]]) -> dict:
  """Renames the modules of a params tree to DeepMind's released naming."""
  return {released_name(m): dict(leaves) for m, leaves in params.items()}


def _init_shapes(model: str, num_classes: int, overrides: Mapping[str, Any]) -> dict:
  """The abstract params (jax.ShapeDtypeStruct leaves) of `create(model, ...)`'s init."""
  import jax  # pylint: disable=g-import-not-at-top  (keeps this module light to import)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from nfnet_jax import models  # pylint: disable=g-import-not-at-top

  net = models.create(model, num_classes=num_classes, **overrides)
  return jax.eval_shape(lambda rng, x: net.init(rng, x, is_training=False),
                        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


@functools.lru_cache(maxsize=32)
def model_leaves(model: str, num_classes: int) -> tuple:
  """((module, ((leaf, shape, dtype name), ...)), ...) of a registered model's init
  (jax.eval_shape, cached). Raises ValueError for an unknown model."""
  return tuple((m, tuple((leaf, tuple(s.shape), np.dtype(s.dtype).name)
                         for leaf, s in leaves.items()))
               for m, leaves in _init_shapes(model, num_classes, {}).items())


def model_shapes(model: str, num_classes: int = 1000,
                 overrides: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, dict[str, tuple]]:
  """{module: {leaf: shape}} of `models.create(model, num_classes, **overrides)`'s init
  (via jax.eval_shape; cached when there are no overrides)."""
  if overrides:
    return {m: {leaf: tuple(v.shape) for leaf, v in leaves.items()}
            for m, leaves in _init_shapes(model, int(num_classes), overrides).items()}
  return {m: {leaf: shape for leaf, shape, _ in leaves}
          for m, leaves in model_leaves(model, int(num_classes))}


def classifier_module(shapes: Mapping[str, Any]) -> Optional[str]:
  """The top-level `linear` module (the classifier) of a params/shape tree."""
  for m in shapes:
    parts = canonical_name(m).split('/')
    if len(parts) == 2 and parts[1] == 'linear':
      return m
  return None


def format_list(items: list[str], limit: int = 5) -> str:
  """The first `limit` items, comma-separated, and how many more there are."""
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit else '')


def match_to_model(params: Params, expected: dict[str, dict[str, tuple]], source: str,
                   model: str, skip_classifier: bool = False) -> Params:
  """Renames `params` to the model's module names and checks names and shapes.

  Raises ValueError naming the first missing / unexpected / shape-differing keys.
  """
  by_canon = {canonical_name(m): m for m in expected}
  classifier = classifier_module(expected)
  out: Params = {}
  missing, unexpected, mismatched = [], [], []
  seen = set()
  for module, leaves in params.items():
    target = by_canon.get(canonical_name(module))
    if target is None:
      unexpected.extend(f'{module}/{leaf}' for leaf in leaves)
      continue
    seen.add(target)
    for leaf, array in leaves.items():
      want = expected[target].get(leaf)
      if want is None:
        unexpected.append(f'{module}/{leaf}')
      elif tuple(array.shape) != want and not (skip_classifier and target == classifier):
        mismatched.append(f'{module}/{leaf} {tuple(array.shape)} (model: {want})')
      else:
        out.setdefault(target, {})[leaf] = array
    for leaf in expected[target]:
      if leaf not in leaves:
        missing.append(f'{target}/{leaf}')
  for target, leaves in expected.items():
    if target not in seen and not (skip_classifier and target == classifier):
      missing.extend(f'{target}/{leaf}' for leaf in leaves)
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing: {format_list(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected: {format_list(unexpected)}')
    if mismatched:
      parts.append(f'{len(mismatched)} with other shapes: {format_list(mismatched)}')
    raise ValueError(f'{source} does not match model {model!r}: ' + '; '.join(parts))
  # Keep the model's module order.
  return {m: out[m] for m in expected if m in out}
