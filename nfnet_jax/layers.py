"""Building blocks shared by NFNets, NF-ResNets and NF-RegNets.

Layouts: activations are NHWC, conv kernels HWIO (H, W, in/groups, out), linear
kernels (in, out). Parameters are created in float32; every layer computes in the
dtype of its input (bf16 inputs give bf16 matmuls/convs), so a model runs in bfloat16
by casting its images, with float32 master weights and no per-layer promotion.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import haiku as hk
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from nfnet_jax import cpu_workarounds

# ---------------------------------------------------------------------------
# Gamma-scaled activations.
# ---------------------------------------------------------------------------
# act(z) * gamma has unit variance for z ~ N(0, 1). These constants are the ones the
# released checkpoints were trained with (measured empirically; a hair above the exact
# 1/std); they are kept verbatim for weight compatibility (docs/models.md).
GAMMAS: dict[str, float] = {
    'gelu': 1.7015043497085571,
    'gelu_exact': 1.7015043497085571,  # timm's port: erf GELU with the same gamma.
    'relu': 1.7139588594436646,
    'silu': 1.7881293296813965,
    'elu': 1.2716004848480225,
    'tanh': 1.5939117670059204,
    'sigmoid': 4.803835391998291,
    'softplus': 1.9203323125839233,
    'leaky_relu': 1.70590341091156,
    'identity': 1.0,
}

BASE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'elu': jax.nn.elu,
    'tanh': jnp.tanh,
    'sigmoid': jax.nn.sigmoid,
    'softplus': jax.nn.softplus,
    'leaky_relu': jax.nn.leaky_relu,
    'identity': lambda x: x,
}


def compute_gamma(fn: Callable[[jax.Array], jax.Array], num_samples: int = 1 << 22,
                  seed: int = 0) -> float:
  """Returns 1 / std(fn(z)) for z ~ N(0, 1), estimated in float64 numpy.

  Use it to get a gamma for an activation that is not in `GAMMAS`.
  """
  z = np.random.default_rng(seed).standard_normal(num_samples)
  y = np.asarray(fn(jnp.asarray(z, jnp.float32)), np.float64)
  return float(1.0 / np.std(y))


def activation(name: str, scaled: bool = True) -> Callable[[jax.Array], jax.Array]:
  """The gamma-scaled activation `act(x) * gamma` for a name in `GAMMAS`; with
  `scaled=False` the plain `act(x)` (for models that put gamma into their convs, see
  `WSConv2D`'s `gamma`)."""
  if name not in BASE_ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; valid: {sorted(BASE_ACTIVATIONS)}')
  fn, gamma = BASE_ACTIVATIONS[name], GAMMAS[name]
  if not scaled:
    return fn

  def scaled(x: jax.Array) -> jax.Array:
    return fn(x) * jnp.asarray(gamma, x.dtype)

  scaled.__name__ = f'scaled_{name}'
  return scaled


# ---------------------------------------------------------------------------
# Weight standardisation.
# ---------------------------------------------------------------------------
def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4,
                       eps_mode: str = 'max', dtype=jnp.float32,
                       gamma: float = 1.0) -> jax.Array:
  """Scaled Weight Standardisation of an HWIO kernel (docs/models.md).

  Args:
    w: [H, W, I, O] kernel (I is the per-group input width).
    gain: [O] per-output-channel gain.
    eps: floor on the variance term.
    eps_mode: 'max' (DeepMind): w_hat = gain * (w - mean) * rsqrt(max(var * fan_in,
      eps)); 'add' (timm's port): w_hat = gain * (w - mean) * rsqrt(var + eps) /
      sqrt(fan_in).
    dtype: the dtype the statistics are computed in. The model uses float32; a
      lower precision reproduces ports that standardise rounded weights.
    gamma: a constant multiplying the result: the activation gamma of models that
      apply it here rather than after each activation (timm's NF models other than
      dm_nfnet_*); 1 for DeepMind's layout.
  Returns:
    [H, W, I, O] standardised kernel in `dtype`.
  """
  w = w.astype(dtype)
  fan_in = math.prod(w.shape[:-1])
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)  # biased (ddof 0)
  if eps_mode == 'max':
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
  elif eps_mode == 'add':
    scale = jax.lax.rsqrt(var + eps) * (fan_in ** -0.5)
  else:
    raise ValueError(f"eps_mode must be 'max' or 'add', got {eps_mode!r}")
  scale = scale * (gain.astype(dtype) * gamma if gamma != 1.0 else gain.astype(dtype))
  return w * scale - mean * scale


def make_divisible(v: float, divisor: int, round_limit: float = 0.9) -> int:
  """`v` rounded to the nearest multiple of `divisor` (at least `divisor`), one
  multiple up if rounding lost more than 1 - round_limit of `v`: the channel rounding
  of timm's NF models (their `ch_div`)."""
  out = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return out + divisor if out < round_limit * v else out


# Padding of WSConv2D and of the NF-ResNet stem pool: 'SAME' (TensorFlow's, DeepMind's
# code: the extra row/column of an even total pad goes after the image) or 'SYMMETRIC'
# (PyTorch's: ((stride - 1) + (kernel - 1)) // 2 on every side, timm's NF models other
# than dm_nfnet_*). They differ for strided convs on even inputs.
PADDINGS = ('SAME', 'SYMMETRIC')


def explicit_padding(padding: str, kernel_shape: Sequence[int],
                     stride: int) -> Union[str, list[tuple[int, int]]]:
  """`padding` as lax takes it: 'SAME' as is, 'SYMMETRIC' as [(lo, hi)] per axis."""
  if padding == 'SAME':
    return padding
  if padding != 'SYMMETRIC':
    raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')
  return [(((stride - 1) + (k - 1)) // 2,) * 2 for k in kernel_shape]


# How grouped convolutions run: 'lax' (one feature-grouped XLA convolution), 'split'
# (one dense convolution per group, concatenated: the same arithmetic) or 'auto':
# split where cpu_workarounds.split_grouped_convs() (on CPU), lax elsewhere. 'auto'
# leaves tiny convs (fewer than SPLIT_MIN_POSITIONS output positions N*H*W) grouped,
# where one conv per group only adds compile time. docs/models.md has the reasoning.
GROUPED_CONV_IMPLS = ('auto', 'lax', 'split')
SPLIT_MIN_POSITIONS = 256
_GROUPED_CONV_IMPL: list[str] = ['auto']


@contextlib.contextmanager
def grouped_conv_impl(impl: str) -> Iterator[None]:
  """Within this context (at trace time), grouped convs run as `impl`."""
  if impl not in GROUPED_CONV_IMPLS:
    raise ValueError(f'grouped conv impl must be one of {GROUPED_CONV_IMPLS}, got {impl!r}')
  _GROUPED_CONV_IMPL.append(impl)
  try:
    yield
  finally:
    _GROUPED_CONV_IMPL.pop()


def conv2d(x: jax.Array, kernel: jax.Array, stride: int,
           padding: Union[str, Sequence[tuple[int, int]]], groups: int = 1) -> jax.Array:
  """NHWC x [N, H, W, C] * HWIO kernel [kh, kw, C/groups, O] -> [N, H', W', O]."""
  conv = lambda x, k, g: jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)
  impl = _GROUPED_CONV_IMPL[-1]
  if impl == 'auto':
    positions = x.shape[0] * x.shape[1] * x.shape[2] // (stride * stride)
    impl = ('split' if cpu_workarounds.split_grouped_convs()
            and positions >= SPLIT_MIN_POSITIONS else 'lax')
  if groups == 1 or impl == 'lax':
    return conv(x, kernel, groups)
  cin, cout = x.shape[-1] // groups, kernel.shape[-1] // groups
  return jnp.concatenate([conv(x[..., g * cin:(g + 1) * cin],
                               kernel[..., g * cout:(g + 1) * cout], 1)
                          for g in range(groups)], axis=-1)


# checkpoint_name of every WSConv2D output: remat policies that keep conv outputs
# save exactly these (an identity outside jax.checkpoint).
CONV_NAME = 'nfnet_conv'


class WSConv2D(hk.Module):
  """2D convolution with Scaled Weight Standardisation, a per-channel gain and bias.

  Parameters (`params`): `w` [kh, kw, in/groups, out] (variance-scaling(1, fan_in,
  normal)), `gain` [out] (ones), `bias` [out] (zeros). `padding` one of PADDINGS
  ('SAME': TF-style, asymmetric for stride 2). `gamma` multiplies the standardised
  kernel (models that move the activation gamma into their convs). Input [N, H, W, C] -> output [N, H', W', out] in the
  input's dtype; the standardisation runs in float32 and the kernel is cast once to
  the input dtype. Other implementations of the layer (folded inference, the plain
  conv of the signal-propagation plots, benchmark baselines) intercept `__call__`
  and reuse `params` and `conv`, so parameter names, shapes and initialisers have
  this one home.
  """

  def __init__(self, output_channels: int, kernel_shape: Union[int, Sequence[int]] = 1,
               stride: int = 1, padding: str = 'SAME', feature_group_count: int = 1,
               eps: float = 1e-4, eps_mode: str = 'max', gamma: float = 1.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = ((kernel_shape, kernel_shape) if isinstance(kernel_shape, int)
                         else tuple(kernel_shape))
    self.stride = stride
    self.padding = explicit_padding(padding, self.kernel_shape, stride)
    self.feature_group_count = feature_group_count
    self.eps = eps
    self.eps_mode = eps_mode
    self.gamma = gamma

  def params(self, in_ch: int, folded: bool = False,
             dtype=jnp.float32) -> dict[str, jax.Array]:
    """Gets (creating at init) this layer's parameters for `in_ch` input channels.

    {'w' [kh, kw, in_ch/groups, out], 'gain' [out], 'bias' [out]}, float32. With
    `folded=True` the inference form instead: {'kernel' [kh, kw, in_ch/groups, out]
    (the standardised kernel, see nfnet_jax.inference.fold_params), 'bias' [out]}, in
    `dtype`.
    """
    if in_ch % self.feature_group_count:
      raise ValueError(f'{self.module_name}: {in_ch} input channels do not divide into '
                       f'{self.feature_group_count} groups')
    w_shape = (*self.kernel_shape, in_ch // self.feature_group_count, self.output_channels)
    b_shape = (self.output_channels,)
    if folded:
      return {'kernel': hk.get_parameter('kernel', w_shape, dtype, init=jnp.zeros),
              'bias': hk.get_parameter('bias', b_shape, dtype, init=jnp.zeros)}
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    return {'w': hk.get_parameter('w', w_shape, jnp.float32, init=w_init),
            'gain': hk.get_parameter('gain', b_shape, jnp.float32, init=jnp.ones),
            'bias': hk.get_parameter('bias', b_shape, jnp.float32, init=jnp.zeros)}

  def conv(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x [N, H, W, C] * kernel [kh, kw, C/groups, out] + bias [out], in x's dtype,
    named CONV_NAME for remat."""
    out = conv2d(x, kernel.astype(x.dtype), self.stride, self.padding,
                 self.feature_group_count)
    return checkpoint_name(out + bias.astype(x.dtype), CONV_NAME)

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.params(x.shape[-1])
    kernel = standardize_weight(p['w'], p['gain'], self.eps, self.eps_mode,
                                gamma=self.gamma)
    return self.conv(x, kernel, p['bias'])


class Linear(hk.Module):
  """Dense layer `x @ w + b` computed in the input's dtype.

  Parameters `w` [in, out] and `b` [out] are float32 (names as hk.Linear, so released
  checkpoints apply). x: [..., in] -> [..., out].
  """

  def __init__(self, output_size: int, w_init: Optional[hk.initializers.Initializer] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.w_init = w_init

  def __call__(self, x: jax.Array) -> jax.Array:
    in_size = x.shape[-1]
    w_init = self.w_init or hk.initializers.TruncatedNormal(1.0 / math.sqrt(in_size))
    w = hk.get_parameter('w', (in_size, self.output_size), jnp.float32, init=w_init)
    b = hk.get_parameter('b', (self.output_size,), jnp.float32, init=jnp.zeros)
    return jnp.dot(x, w.astype(x.dtype)) + b.astype(x.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite gate: mean-pool, linear, relu, linear, sigmoid.

  x: [N, H, W, C] -> gate [N, 1, 1, out_ch] in (0, 1); the caller multiplies by 2.
  Submodules `linear` (C -> hidden) and `linear_1` (hidden -> out_ch).
  """

  def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5,
               hidden_ch: Optional[int] = None, name: Optional[str] = None):
    super().__init__(name=name)
    hidden_ch = hidden_ch if hidden_ch is not None else max(1, int(in_ch * se_ratio))
    # Submodules are built here, not in __call__, so their names are `.../~/linear`
    # and `.../~/linear_1` as in the released checkpoints.
    self.fc0 = Linear(hidden_ch)
    self.fc1 = Linear(out_ch)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    h = self.fc1(jax.nn.relu(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None, :]


def eca_kernel_size(channels: int) -> int:
  """Kernel size of efficient channel attention over `channels` channels (Wang et al.
  2020, as timm's EcaModule): t = int(|log2(C) + 1| / 2), made odd (t + 1 if even),
  at least 3."""
  t = int(abs(math.log(channels, 2) + 1) / 2)
  return max(t if t % 2 else t + 1, 3)


class ECA(hk.Module):
  """Efficient channel attention gate: mean-pool, a 1-D convolution across channels
  (kernel `eca_kernel_size(C)`, zero padding, no bias), sigmoid.

  Parameter `w` [k] (the Conv1d weight (1, 1, k) of timm's EcaModule, flattened).
  x: [N, H, W, C] -> gate [N, 1, 1, C] in (0, 1); the caller multiplies by 2.
  """

  def __init__(self, channels: int, name: Optional[str] = None):
    super().__init__(name=name)
    self.kernel_size = eca_kernel_size(channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    # U(-1/sqrt(k), 1/sqrt(k)): PyTorch's default init of the Conv1d (fan-in k).
    w = hk.get_parameter('w', (k,), jnp.float32,
                         init=hk.initializers.RandomUniform(-k ** -0.5, k ** -0.5))
    y = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)    # [N, C]
    pad = (k - 1) // 2
    y_pad = jnp.pad(y, ((0, 0), (pad, k - 1 - pad)))
    channels = y.shape[-1]
    # Cross-correlation (PyTorch's conv): out[c] = sum_j w[j] * y_pad[c + j].
    out = sum(w[j].astype(y.dtype) * y_pad[:, j:j + channels] for j in range(k))
    return jax.nn.sigmoid(out)[:, None, None, :]


# ---------------------------------------------------------------------------
# Randomness per example, independent of how the batch is split over devices.
# ---------------------------------------------------------------------------
_EXAMPLE_OFFSET: list = [0]


@contextlib.contextmanager
def example_offset(offset: Union[int, jax.Array]) -> Iterator[None]:
  """Within this context, row i of the local batch is global example `offset + i`.

  The data-parallel step sets it to `device_index * local_batch`, so dropout and
  stochastic-depth masks depend on (rng, global example index) only, and 1 device or
  8 devices draw the same masks for the same global batch.
  """
  _EXAMPLE_OFFSET.append(offset)
  try:
    yield
  finally:
    _EXAMPLE_OFFSET.pop()


def per_example_uniform(key: jax.Array, batch: int, shape: Sequence[int] = (),
                        dtype=jnp.float32) -> jax.Array:
  """[batch, *shape] uniforms in [0, 1); row i depends only on (key, global index)."""
  ids = _EXAMPLE_OFFSET[-1] + jnp.arange(batch, dtype=jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)
  return jax.vmap(lambda k: jax.random.uniform(k, tuple(shape), dtype))(keys)


class StochDepth(hk.Module):
  """Stochastic depth: drops the whole residual branch per example in training.

  Keep probability 1 - drop_rate, no rescaling (as the NFNet recipe). x: [N, ...].
  """

  def __init__(self, drop_rate: float, name: Optional[str] = None):
    super().__init__(name=name)
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    if not is_training or self.drop_rate <= 0.0:
      return x
    r = per_example_uniform(hk.next_rng_key(), x.shape[0])
    keep = (r >= self.drop_rate).astype(x.dtype)
    return x * keep.reshape((-1,) + (1,) * (x.ndim - 1))


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  """Inverted dropout with per-example masks (see `per_example_uniform`). x: [N, ...]."""
  if not is_training or rate <= 0.0:
    return x
  r = per_example_uniform(hk.next_rng_key(), x.shape[0], x.shape[1:])
  keep = 1.0 - rate
  return jnp.where(r < keep, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def signal_metrics(x: jax.Array, index: int) -> dict[str, jax.Array]:
  """Signal-propagation statistics of an NHWC activation, in float32.

  avg_sq_mean: mean over channels of the squared per-channel mean (over N, H, W);
  avg_var: mean over channels of the per-channel variance.
  """
  x = x.astype(jnp.float32)
  return {f'avg_sq_mean_{index}': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
          f'avg_var_{index}': jnp.mean(jnp.var(x, axis=(0, 1, 2)))}
