"""Parameter and multiply-add (MAC) counting: convs and linears, as the papers count.

`python -m nfnet_jax.models` prints the table for every registered model.
"""
from __future__ import annotations

import math
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import bn_resnet, registry


def summarize(name: str, num_classes: int = 1000, image_size: Optional[int] = None,
              **overrides) -> tuple[int, int]:
  """(parameters, multiply-adds of one forward pass on one image) of a registered model.

  Shape-only (nothing is allocated). MACs count every WSConv2D (H_out * W_out * kh * kw *
  C_in/groups * C_out) and Linear (in * out) at `image_size` (default: the test
  resolution): the number the NFNet paper's table reports (labelled FLOPs there),
  and ECA's 1-D conv (C * k); element-wise ops, pooling and biases are not counted.
  """
  size = image_size or registry.info(name)['test_imsize']
  total = [0]

  def interceptor(next_f, args, kwargs, context):
    out = next_f(*args, **kwargs)
    mod = context.module
    if context.method_name == '__call__':
      if isinstance(mod, (layers.WSConv2D, bn_resnet.Conv2D)):
        kh, kw = mod.kernel_shape
        total[0] += (math.prod(out.shape[1:3]) * kh * kw *
                     (args[0].shape[-1] // mod.feature_group_count) * mod.output_channels)
      elif isinstance(mod, layers.Linear):
        total[0] += args[0].shape[-1] * mod.output_size
      elif isinstance(mod, layers.ECA):  # a 1-D conv over the pooled channels
        total[0] += args[0].shape[-1] * mod.kernel_size
    return out

  make = registry.module_fn(name, num_classes, **overrides)

  def forward(images):
    with hk.intercept_methods(interceptor):
      return make()(images, is_training=False)

  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  # with_state: BatchNorm models have state (not counted as parameters).
  shapes, _ = jax.eval_shape(hk.transform_with_state(forward).init, jax.random.PRNGKey(0),
                             images)
  params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  return params, total[0]


def count_params(name: str, num_classes: int = 1000, **overrides) -> int:
  """Number of parameters of a registered model."""
  return summarize(name, num_classes, **overrides)[0]


def count_macs(name: str, num_classes: int = 1000, image_size: Optional[int] = None,
               **overrides) -> int:
  """Multiply-adds of one forward pass on one image (see `summarize`)."""
  return summarize(name, num_classes, image_size, **overrides)[1]


def table(names=None) -> list[dict]:
  """Rows {name, params, macs, train_px, test_px} for the given models."""
  rows = []
  for name in names or registry.names():
    facts = registry.info(name)
    params, macs = summarize(name)
    rows.append(dict(name=name, params=params, macs=macs,
                     train_px=facts['train_imsize'], test_px=facts['test_imsize']))
  return rows
