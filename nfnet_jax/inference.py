"""Faster inference of trained or released weights: Scaled WS folded out of the step.

Every `WSConv2D` standardises its kernel on each call (docs/models.md). For
evaluation the kernels do not change, so `fold_params` standardises them once (and
casts them to the compute dtype), and `folded_model` is the same network whose convs
read those kernels directly:

    net = folded_model('F0')
    folded = jax.jit(lambda p: fold_params(p, jnp.bfloat16))(params)
    logits = net.apply(folded, None, images.astype(jnp.bfloat16))['logits']

The logits equal `models.create('F0').apply(params, ...)` up to the one rounding of
the kernel to the compute dtype, which the reference model does too. No gradients
flow through the folding: use `models.create` for training.
"""
from __future__ import annotations

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import registry

PyTree = Any

__all__ = ['fold_params', 'folded_model']


def _is_ws_conv(leaves: Mapping[str, Any]) -> bool:
  return set(leaves) == {'w', 'gain', 'bias'} and getattr(leaves['w'], 'ndim', 0) == 4


def fold_params(params: PyTree, dtype: Any = jnp.bfloat16, eps: float = 1e-4,
                eps_mode: str = 'max', gamma: float = 1.0) -> PyTree:
  """WS conv modules {w, gain, bias} -> {kernel (standardised, dtype), bias (dtype)}.

  Other modules are kept as they are. Pass the model's `ws_eps`/`ws_eps_mode` (the
  defaults are the models'), and for a model with `gamma_placement='conv'` (timm's
  NF models other than dm_nfnet_*: `models.info(name)['options']`) its activation's
  gamma, `layers.GAMMAS[activation]`. Run it once per set of weights (it is jittable); feed
  the result to :func:`folded_model`'s apply.
  """
  out = {}
  for mod, leaves in params.items():
    if _is_ws_conv(leaves):
      out[mod] = {'kernel': layers.standardize_weight(
          leaves['w'], leaves['gain'], eps, eps_mode, gamma=gamma).astype(dtype),
                  'bias': leaves['bias'].astype(dtype)}
    else:
      out[mod] = dict(leaves)
  return out


def _folded_conv(next_f, args, kwargs, context):
  """Method interceptor: a WSConv2D convolves with its folded kernel."""
  mod = context.module
  if not (isinstance(mod, layers.WSConv2D) and context.method_name == '__call__'):
    return next_f(*args, **kwargs)
  x = args[0] if args else kwargs['x']
  p = mod.params(x.shape[-1], folded=True, dtype=x.dtype)
  return mod.conv(x, p['kernel'], p['bias'])


def folded_model(name: str, num_classes: int = 1000, **overrides) -> hk.Transformed:
  """`models.create(name, num_classes, **overrides)` reading folded parameters.

  apply(folded_params, rng, images, is_training=False, return_metrics=False) with
  `folded_params = fold_params(params, images.dtype)`; outputs as models.create.
  """
  make = registry.module_fn(name, num_classes, **overrides)

  def forward(images: jax.Array, is_training: bool = False,
              return_metrics: bool = False):
    with hk.intercept_methods(_folded_conv):
      return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)
