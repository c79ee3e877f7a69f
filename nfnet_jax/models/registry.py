"""Name -> model registry: `create('F0')`, `names()`, `info('F0')`."""
from __future__ import annotations

from typing import Any, Callable

import haiku as hk

from nfnet_jax import errors
from nfnet_jax.models import nf_regnet, nf_resnet, nfnet


def _table() -> dict[str, tuple[Callable[..., hk.Module], str, dict[str, Any]]]:
  """name -> (module class, variant, variant facts)."""
  table = {}
  for v, facts in nfnet.VARIANTS.items():
    table[v] = (nfnet.NFNet, v, facts)
  for v, facts in nf_resnet.VARIANTS.items():
    table[f'nf_resnet{v}'] = (nf_resnet.NFResNet, v, facts)
  for v, facts in nf_regnet.VARIANTS.items():
    table[f'nf_regnet_{v.lower()}'] = (nf_regnet.NFRegNet, v, facts)
  return table


_TABLE = _table()


def names() -> list[str]:
  """All registered model names, e.g. 'F0', 'F0+', 'nf_resnet50', 'nf_regnet_b0'."""
  return list(_TABLE)


def _lookup(name: str):
  if name not in _TABLE:
    raise ValueError(errors.unknown_name('model', name, _TABLE))
  return _TABLE[name]


def info(name: str) -> dict[str, Any]:
  """Facts of a registered model: family, variant, train/test resolution, dropout..."""
  cls, variant, facts = _lookup(name)
  return dict(facts, family=cls.__name__, variant=variant)


def module_fn(name: str, num_classes: int = 1000, **overrides) -> Callable[..., hk.Module]:
  """A zero-argument constructor of the hk.Module (call inside hk.transform)."""
  cls, variant, _ = _lookup(name)
  return lambda: cls(num_classes=num_classes, variant=variant, **overrides)


def create(name: str, num_classes: int = 1000, **overrides) -> hk.Transformed:
  """Returns hk.transform of the model.

  `apply(params, rng, images, is_training, return_metrics=False)` gives a dict with
  `logits` [N, num_classes] and `pool` [N, C]. `overrides` go to the module's
  constructor (e.g. stochdepth_rate, drop_rate, width, activation, dtype).
  """
  make = module_fn(name, num_classes, **overrides)
  # Build once outside a transform to surface bad overrides early with a clear error.
  def forward(images, is_training: bool, return_metrics: bool = False):
    return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)
