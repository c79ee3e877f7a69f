"""Benchmark-only baselines and compile helpers.

- :func:`naive_model`: the "plain" baseline of `train_step.py` -- what a
  straightforward mixed-precision port does (jmp/`hk.mixed_precision`-style): every
  float32 parameter is cast to the compute dtype each time it is read, and weight
  standardisation then runs in the compute dtype on the rounded weights, with one
  XLA grouped conv on every backend. In float32 it is exactly the reference model.
- :data:`XLA_PRESETS` and :func:`compile_step`: `jit(...).lower(...).compile()` with
  XLA options that are dropped (and reported) when this XLA build does not know them,
  instead of aborting.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import registry

# XLA option sets tried by the benchmarks (compile options, i.e. DebugOptions fields;
# unknown ones are dropped by `compile_step`). Defaults of XLA are tuned already, so
# the optimised step uses none; these are experiments measured side by side.
XLA_PRESETS: dict[str, dict[str, Any]] = {
    'none': {},
    # cuDNN graph fusions of convolutions with their elementwise neighbours
    # (bias, GELU, gamma/beta scaling) instead of separate XLA loop fusions.
    'conv_fusion': {'xla_gpu_experimental_enable_conv_fusion': True},
    # cuDNN runtime-compiled conv + bias + activation fusion (older mechanism).
    'runtime_fusion': {'xla_gpu_use_runtime_fusion': True},
    # Exhaustive conv/GEMM autotuning (level 4 is XLA's default already).
    'autotune4': {'xla_gpu_autotune_level': 4},
}


def _naive_ws_conv(next_f, args, kwargs, context):
  """Method interceptor: WSConv2D as a naive port writes it (statistics in the
  compute dtype, one XLA grouped conv)."""
  mod = context.module
  if not (isinstance(mod, layers.WSConv2D) and context.method_name == '__call__'):
    return next_f(*args, **kwargs)
  x = args[0] if args else kwargs['x']
  p = mod.params(x.shape[-1])  # already cast to the compute dtype by the getter
  kernel = layers.standardize_weight(p['w'], p['gain'], mod.eps, mod.eps_mode,
                                     dtype=x.dtype)
  with layers.grouped_conv_impl('lax'):
    return mod.conv(x, kernel, p['bias'])


def naive_model(name: str, num_classes: int = 1000, compute_dtype: Any = jnp.bfloat16,
                **overrides) -> hk.Transformed:
  """The "plain" baseline: params cast to `compute_dtype` on read, WS in that dtype.

  Same parameters and names as `models.create(name, num_classes, **overrides)`;
  with compute_dtype float32 it computes the same function.
  """
  make = registry.module_fn(name, num_classes, **overrides)
  cdt = jnp.dtype(compute_dtype)

  def cast_getter(next_getter, value, context):
    del context
    value = next_getter(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(cdt)
    return value

  def forward(images, is_training: bool, return_metrics: bool = False):
    with hk.custom_getter(cast_getter), hk.intercept_methods(_naive_ws_conv):
      return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)


def compile_step(jitted: Callable, args: tuple, options: Optional[Mapping[str, Any]] = None,
                 log: Callable[[str], None] = print):
  """Lowers and compiles `jitted(*args)` with XLA compile options.

  Options this XLA does not know ('No such compile option') are dropped one by one
  and reported through `log`; any other compile error propagates. Returns
  (compiled, options actually used).
  """
  opts = dict(options or {})
  lowered = jitted.lower(*args)
  while True:
    try:
      return (lowered.compile(opts) if opts else lowered.compile()), opts
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e)
      bad = [k for k in opts if k in msg and 'No such compile option' in msg]
      if not bad:
        raise
      for k in bad:
        log(f'XLA option {k!r} unknown to this XLA build; dropped')
        opts.pop(k)
