"""Performance variants of the NFNet forward pass that compute the same function.

Everything here swaps the *implementation* of existing layers through Haiku method
interceptors and custom getters, so parameter trees, names and checkpoints are the
ones of `nfnet_jax.models`; `tests/test_perf_equivalence.py` checks each variant's
logits and gradients against the reference.

- :func:`naive_model`: the "plain" baseline of `benchmarks/train_step.py` -- what a
  straightforward mixed-precision port does (jmp/`hk.mixed_precision`-style): every
  float32 parameter is cast to the compute dtype each time it is read, and weight
  standardisation then runs in the compute dtype on the rounded weights (DeepMind's
  reference does this). In float32 it is exactly the reference model.
- :func:`model`: the real model with optional experimental implementations:
  `remat='convs'` recomputes each block's elementwise work in the backward pass from
  saved conv outputs (less activation memory, no conv recomputed);
  `groups='split'` / `'lax'` force how grouped convolutions run (default 'auto':
  split into dense per-group convs on CPU, where XLA's grouped convs are slow, one
  XLA grouped conv on GPU/TPU; the GPU benchmarks measure 'split' there).
- :func:`fold_params` + :func:`folded_model`: inference with weight
  standardisation done once, outside the step (kernels pre-standardised and stored
  in the compute dtype), instead of on every call.
- :func:`compile_step`: `jit(...).lower(...).compile()` with XLA options that are
  dropped (and reported) when this XLA build does not know them, instead of aborting.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import nfnet, registry

PyTree = Any

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


# ---------------------------------------------------------------------------
# Plain (naive mixed precision) reference.
# ---------------------------------------------------------------------------
def _naive_ws_conv(module: layers.WSConv2D, x: jax.Array) -> jax.Array:
  """WSConv2D as a naive port writes it: statistics in the compute dtype."""
  in_ch = x.shape[-1]
  w_shape = (*module.kernel_shape, in_ch // module.feature_group_count,
             module.output_channels)
  w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
  w = hk.get_parameter('w', w_shape, jnp.float32, init=w_init)  # cast by the getter
  gain = hk.get_parameter('gain', (module.output_channels,), jnp.float32, init=jnp.ones)
  bias = hk.get_parameter('bias', (module.output_channels,), jnp.float32, init=jnp.zeros)
  dt = x.dtype
  w = w.astype(dt)
  fan_in = math.prod(w_shape[:-1])
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
  if module.eps_mode == 'max':
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, jnp.asarray(module.eps, dt)))
  else:
    scale = jax.lax.rsqrt(var + jnp.asarray(module.eps, dt)) * jnp.asarray(
        fan_in ** -0.5, dt)
  scale = scale * gain.astype(dt)
  kernel = w * scale - mean * scale  # the reference's formula, in the compute dtype
  # One XLA grouped conv on every backend (the unoptimised port; no CPU split).
  out = jax.lax.conv_general_dilated(
      x, kernel.astype(dt), window_strides=(module.stride, module.stride),
      padding=module.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=module.feature_group_count)
  return out + bias.astype(dt)


def naive_model(name: str, num_classes: int = 1000, compute_dtype: Any = jnp.bfloat16,
                **overrides) -> hk.Transformed:
  """The "plain" baseline: params cast to `compute_dtype` on read, WS in that dtype.

  Same parameters and names as `models.create(name, num_classes, **overrides)`;
  with compute_dtype float32 it computes exactly the same function.
  """
  make = registry.module_fn(name, num_classes, **overrides)
  cdt = jnp.dtype(compute_dtype)

  def cast_getter(next_getter, value, context):
    del context
    value = next_getter(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(cdt)
    return value

  def interceptor(next_f, args, kwargs, context):
    if isinstance(context.module, layers.WSConv2D) and context.method_name == '__call__':
      return _naive_ws_conv(context.module, *args, **kwargs)
    return next_f(*args, **kwargs)

  def forward(images, is_training: bool, return_metrics: bool = False):
    with hk.custom_getter(cast_getter), hk.intercept_methods(interceptor):
      return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)


# ---------------------------------------------------------------------------
# Optimised / experimental implementations.
# ---------------------------------------------------------------------------
def split_grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: str,
                       groups: int) -> jax.Array:
  """A grouped NHWC/HWIO convolution as `groups` dense convolutions, concatenated.

  Same arithmetic as `feature_group_count=groups`; its backward pass is the dense
  filter/input gradients per group instead of XLA's batch-grouped form. (What
  `layers.conv2d` does on CPU by default.)
  """
  with layers.grouped_conv_impl('split'):
    return layers.conv2d(x, kernel, stride, padding, groups)


REMAT_POLICIES = ('none', 'convs', 'block_convs', 'blocks')
CONV_NAME = 'nfnet_conv'  # checkpoint_name of every WSConv2D output under remat


def model(name: str, num_classes: int = 1000, groups: str = 'auto', remat: str = 'none',
          **overrides) -> hk.Transformed:
  """`models.create` with implementation knobs (same params, same function).

  groups: how grouped convs run (`layers.GROUPED_CONV_IMPLS`): 'auto' (as
    models.create: split on CPU, one XLA grouped conv elsewhere), 'lax' or 'split'.
  remat: 'none'; 'convs' = the whole network (any registry model) under hk.remat
    saving only the conv outputs (named CONV_NAME): the backward pass recomputes the
    elementwise work (activations and their intermediates, gamma/beta/alpha
    scalings, SE gates, stochastic-depth and dropout masks) from them instead of
    storing it, and never recomputes a convolution; 'block_convs' = the same per
    NFNet block (the stem stores as usual); 'blocks' = NFNet blocks recomputed
    entirely (convs included). Batch-sized residuals of F0 at b256/192 px bf16 as JAX
    hands them to XLA: 28.27 GiB with 'none', 4.89 GiB with 'convs', 8.28 GiB with
    'block_convs' (`benchmarks/step_memory.py`; on a GPU it adds XLA's peak).
  """
  if groups not in layers.GROUPED_CONV_IMPLS:
    raise ValueError(f'groups must be one of {layers.GROUPED_CONV_IMPLS}, got {groups!r}')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {REMAT_POLICIES}, got {remat!r}')
  make = registry.module_fn(name, num_classes, **overrides)
  save_convs = remat in ('convs', 'block_convs')
  policy = (jax.checkpoint_policies.save_only_these_names(CONV_NAME)
            if save_convs else None)

  def interceptor(next_f, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__':
      return next_f(*args, **kwargs)
    if isinstance(m, layers.WSConv2D):
      out = next_f(*args, **kwargs)
      return checkpoint_name(out, CONV_NAME) if save_convs else out
    if remat in ('block_convs', 'blocks') and isinstance(m, nfnet.NFBlock):
      x, *rest = args
      return hk.remat(lambda x: next_f(x, *rest, **kwargs), policy=policy)(x)
    return next_f(*args, **kwargs)

  def forward(images, is_training: bool, return_metrics: bool = False):
    def net(x):
      with hk.intercept_methods(interceptor):
        return make()(x, is_training=is_training, return_metrics=return_metrics)
    with layers.grouped_conv_impl(groups):
      if remat == 'convs':
        return hk.remat(net, policy=policy)(images)
      return net(images)

  return hk.transform(forward)


# ---------------------------------------------------------------------------
# Inference with weight standardisation folded out of the step.
# ---------------------------------------------------------------------------
def _is_ws_conv(leaves: Mapping[str, Any]) -> bool:
  return set(leaves) == {'w', 'gain', 'bias'} and getattr(leaves['w'], 'ndim', 0) == 4


def fold_params(params: PyTree, dtype: Any = jnp.bfloat16, eps: float = 1e-4,
                eps_mode: str = 'max') -> PyTree:
  """WS conv modules {w, gain, bias} -> {kernel (standardised, dtype), bias (dtype)}.

  Other modules are kept as they are. Pass the model's `ws_eps`/`ws_eps_mode`.
  Run it once per set of weights (it is jittable); feed the result to
  :func:`folded_model`'s apply.
  """
  out = {}
  for mod, leaves in params.items():
    if _is_ws_conv(leaves):
      out[mod] = {'kernel': layers.standardize_weight(
          leaves['w'], leaves['gain'], eps, eps_mode).astype(dtype),
                  'bias': leaves['bias'].astype(dtype)}
    else:
      out[mod] = dict(leaves)
  return out


def folded_model(name: str, num_classes: int = 1000, **overrides) -> hk.Transformed:
  """Model whose WS convs read pre-standardised kernels (see :func:`fold_params`).

  apply(folded_params, rng, images, is_training=False) equals
  models.create(...).apply(params, ...) up to the one rounding of the kernel that
  the reference does too. For inference (no gradients through the folding).
  """
  make = registry.module_fn(name, num_classes, **overrides)

  def interceptor(next_f, args, kwargs, context):
    m = context.module
    if isinstance(m, layers.WSConv2D) and context.method_name == '__call__':
      x = args[0]
      k_shape = (*m.kernel_shape, x.shape[-1] // m.feature_group_count, m.output_channels)
      kernel = hk.get_parameter('kernel', k_shape, x.dtype, init=jnp.zeros)
      bias = hk.get_parameter('bias', (m.output_channels,), x.dtype, init=jnp.zeros)
      out = layers.conv2d(x, kernel.astype(x.dtype), m.stride, m.padding,
                          m.feature_group_count)
      return out + bias.astype(x.dtype)
    return next_f(*args, **kwargs)

  def forward(images, is_training: bool = False, return_metrics: bool = False):
    with hk.intercept_methods(interceptor):
      return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)


# ---------------------------------------------------------------------------
# Compilation with optional XLA options.
# ---------------------------------------------------------------------------
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
