"""Name -> model registry: `create('F0')`, `names()`, `info('F0')`."""
from __future__ import annotations

from typing import Any, Callable

import haiku as hk

from nfnet_jax import errors
from nfnet_jax.models import base, bn_resnet, nf_regnet, nf_resnet, nfnet, timm_models


_Entry = tuple[Callable[..., hk.Module], str, dict[str, Any], dict[str, Any]]


def _table() -> dict[str, _Entry]:
  """name -> (module class, variant, variant facts, constructor options)."""
  table: dict[str, _Entry] = {}
  for v, facts in nfnet.VARIANTS.items():
    table[v] = (nfnet.NFNet, v, facts, {})
  for v, facts in nf_resnet.VARIANTS.items():
    table[f'nf_resnet{v}'] = (nf_resnet.NFResNet, v, facts, {})
  for v, facts in nf_regnet.VARIANTS.items():
    table[f'nf_regnet_{v.lower()}'] = (nf_regnet.NFRegNet, v, facts, {})
  for v, facts in bn_resnet.VARIANTS.items():  # Stateful (BatchNorm): see create().
    table[f'bn_resnet{v}'] = (bn_resnet.BNResNet, v, facts, {})
  # timm's architectures: a family variant with options, and timm's pretrained facts.
  for timm_name, (base_name, options, timm_facts) in timm_models.TIMM_MODELS.items():
    cls, v, facts, _ = table[base_name]
    table[timm_models.registry_name(timm_name)] = (
        cls, v, dict(facts, **timm_facts, timm_name=timm_name), dict(options))
  return table


_TABLE = _table()


def names() -> list[str]:
  """All registered model names, e.g. 'F0', 'F0+', 'nf_resnet50', 'nf_regnet_b0',
  'eca_nfnet_l0', 'timm/nf_resnet50' (timm_models.registry_name)."""
  return list(_TABLE)


def _lookup(name: str):
  if name not in _TABLE:
    raise ValueError(errors.unknown_name('model', name, _TABLE))
  return _TABLE[name]


def info(name: str) -> dict[str, Any]:
  """Facts of a registered model: family, variant, train/test resolution, dropout,
  its constructor `options` (timm's models: also timm_name, crop_fraction,
  interpolation)..."""
  cls, variant, facts, options = _lookup(name)
  return dict(facts, family=cls.__name__, variant=variant, options=dict(options))


def module_fn(name: str, num_classes: int = 1000, **overrides) -> Callable[..., hk.Module]:
  """A zero-argument constructor of the hk.Module (call inside hk.transform)."""
  cls, variant, _, options = _lookup(name)
  kwargs = dict(options, **overrides)
  return lambda: cls(num_classes=num_classes, variant=variant, **kwargs)


def is_stateful(name: str) -> bool:
  """True for models with state besides parameters (BatchNorm statistics)."""
  return bool(info(name).get('stateful', False))


def check_options(name: str, remat: str = 'none', groups: str = 'auto') -> None:
  """Raises ValueError (one line) for implementation options the model does not take
  (base.check_options): before anything is traced."""
  base.check_options(_lookup(name)[0], remat, groups)


def create(name: str, num_classes: int = 1000,
           **overrides) -> hk.Transformed | hk.TransformedWithState:
  """Returns hk.transform of the model, or hk.transform_with_state if it is stateful
  (`is_stateful(name)`, `info(name)['stateful']`: the BatchNorm baselines).

  `apply(params, rng, images, is_training, return_metrics=False)` gives a dict with
  `logits` [N, num_classes] and `pool` [N, C]; a stateful model's `init` returns
  (params, state) and its `apply(params, state, rng, images, is_training)` returns
  (that dict, new state). `overrides` go to the module's constructor (e.g.
  stochdepth_rate, drop_rate, width, activation, dtype, and for the NF families the
  implementation options `remat` (one of REMAT_POLICIES) and `groups` of
  base.Network, which do not change the function; the BatchNorm models take neither).
  """
  check_options(name, overrides.get('remat', 'none'), overrides.get('groups', 'auto'))
  make = module_fn(name, num_classes, **overrides)
  def forward(images, is_training: bool, return_metrics: bool = False):
    return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform_with_state(forward) if is_stateful(name) else hk.transform(forward)
