"""The skeleton shared by every model family (docs/models.md).

- `signal_schedule`: per residual block, its beta (1 / expected std of its input) and
  stochastic-depth rate; `expected_stds`: the expected std after each block.
- `NFResidualBlock`: the block tail every family shares: pre-activation scaled by
  beta, the shortcut, stochastic depth, the learned skip gain and alpha. A family's
  block builds its convs in `__init__` and implements `residual`.
- `Network`: stem -> blocks -> head -> pool -> dropout -> linear, the
  signal-propagation metrics and the remat / grouped-conv options. A family builds
  its stem, blocks and head modules in `__init__` and implements `stem` and `head`;
  the BatchNorm baselines (`bn_resnet`) are one.
- `NFNetwork`: a `Network` with the Normalizer-Free options (the scaled activation,
  the WS convs' options, gamma placement, skip gain, width rounding).

Submodules are built in `__init__` so Haiku names them `<block>/~/conv0` etc. (modules
made in `__call__` lose the `~`), as in DeepMind's released checkpoints.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers

# 'none': autodiff stores what it needs; 'convs': the whole network under remat,
# keeping only the conv outputs (the elementwise work is recomputed, no conv is);
# 'block_convs': the same per residual block (the stem and head store as usual);
# 'blocks': residual blocks recomputed entirely, convs included.
REMAT_POLICIES = ('none', 'convs', 'block_convs', 'blocks')


def check_options(family: type, remat: str = 'none', groups: str = 'auto') -> None:
  """Raises ValueError for an unknown remat policy or grouped-conv implementation, a
  remat policy for a family without them (`HAS_REMAT`), or a `groups` choice for a
  family without grouped convolutions (`HAS_GROUPED_CONVS`)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {REMAT_POLICIES}, got {remat!r}')
  if remat != 'none' and not family.HAS_REMAT:
    raise ValueError(f'{family.__name__} takes no remat policy; remat={remat!r} '
                     "applies to the Normalizer-Free families only (use 'none')")
  if groups not in layers.GROUPED_CONV_IMPLS:
    raise ValueError(f'groups must be one of {layers.GROUPED_CONV_IMPLS}, got {groups!r}')
  if groups != 'auto' and not family.HAS_GROUPED_CONVS:
    raise ValueError(f'{family.__name__} has no grouped convolutions; groups={groups!r} '
                     "applies to families with grouped convs only (use 'auto')")


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
  """Where a residual block sits and the signal it expects."""
  index: int             # position among all blocks
  stage: int
  first_in_stage: bool   # the stage's transition block
  beta: float            # 1 / expected std of the block's input
  stochdepth_rate: float


def _expected_stds(depths: Sequence[int], alpha: float) -> list[tuple[float, float]]:
  """[(expected input std, expected output std)] per block.

  The expected std grows as sqrt(std^2 + alpha^2) after each block and is reset to 1
  by each stage's transition block (whose shortcut re-normalises the stream) before
  its own growth step.
  """
  stds, std = [], 1.0
  for depth in depths:
    for block_index in range(depth):
      std_in = std
      if block_index == 0:
        std = 1.0
      std = (std ** 2 + alpha ** 2) ** 0.5
      stds.append((std_in, std))
  return stds


def signal_schedule(depths: Sequence[int], alpha: float = 0.2,
                    stochdepth_rate: float = 0.0) -> list[BlockSchedule]:
  """Per block, in order: beta = 1 / expected input std, and the stochastic-depth
  rate, growing linearly: stochdepth_rate * index / num_blocks."""
  num_blocks = sum(depths)
  stds = iter(_expected_stds(depths, alpha))
  schedule = []
  for stage, depth in enumerate(depths):
    for block_index in range(depth):
      index = len(schedule)
      schedule.append(BlockSchedule(
          index=index, stage=stage, first_in_stage=block_index == 0,
          beta=1.0 / next(stds)[0],
          stochdepth_rate=stochdepth_rate * index / num_blocks))
  return schedule


def expected_stds(depths: Sequence[int], alpha: float = 0.2) -> list[float]:
  """Expected output std after each block (the analytic signal-propagation curve)."""
  return [std_out for _, std_out in _expected_stds(depths, alpha)]


# Where the activation gamma goes: 'act' multiplies every activation's output
# (DeepMind's code); 'conv' multiplies every WS conv's standardised kernel instead and
# leaves the activations plain (timm's NF models other than dm_nfnet_*). The two
# differ at the ends: 'conv' scales the stem's first conv (on the images) by gamma and
# leaves the pooled features unscaled.
GAMMA_PLACEMENTS = ('act', 'conv')


@dataclasses.dataclass(frozen=True)
class ConvOptions:
  """How a model's WS convs compute (see layers.WSConv2D): the standardisation's
  epsilon and its mode, the constant `gamma` on the kernel, the padding. Calling it
  builds one: conv(ch, k, name, stride=1, groups=1)."""
  eps: float = 1e-4
  eps_mode: str = 'max'
  gamma: float = 1.0
  padding: str = 'SAME'

  def __call__(self, ch: int, k: int, name: str, stride: int = 1,
               groups: int = 1) -> layers.WSConv2D:
    return layers.WSConv2D(ch, k, stride=stride, feature_group_count=groups,
                           eps=self.eps, eps_mode=self.eps_mode, gamma=self.gamma,
                           padding=self.padding, name=name)


def round_width(width: float, ch_div: Optional[int]) -> int:
  """A channel count: int(width) (DeepMind's), or with `ch_div` the nearest multiple
  of it, as timm rounds its NF models' widths (layers.make_divisible)."""
  return int(width) if ch_div is None else layers.make_divisible(width, ch_div)


def attention_hidden(channels: int, ratio: float, ch_div: Optional[int]) -> int:
  """Hidden width of a squeeze-excite gate: max(1, int(channels * ratio)), or with
  `ch_div` timm's rounding to the nearest multiple (never rounded up for loss)."""
  if ch_div is None:
    return max(1, int(channels * ratio))
  return layers.make_divisible(channels * ratio, ch_div, round_limit=0.0)


def grouped_width(width: float, group_size: int, what: str) -> tuple[int, int]:
  """(groups, channels): `width` rounded down to a multiple of `group_size`."""
  groups = int(width) // group_size
  if groups < 1:
    raise ValueError(f'{what} {width} is below the group width {group_size}')
  return groups, group_size * groups


class NFResidualBlock(hk.Module):
  """out = act(x) * beta; residual(out) -> stochastic depth -> * skip_gain (init 0)
  -> * alpha, added to the shortcut.

  The shortcut is x when neither the stride nor the width changes, else a 1x1 WS conv
  (`conv_shortcut`, built by the family) of `out`: after a 2x2 average pool when
  `avg_pool_shortcut` and strided (NFNet, NF-RegNet, timm's NF-ResNets), or itself
  strided (DeepMind's NF-ResNet). `skipinit=False` leaves out the skip gain (timm's NF
  models other than dm_nfnet_*: their residual branch starts at zero through the last
  conv's gain instead).
  x [N, H, W, in_ch] -> ([N, H/stride, W/stride, out_ch], residual-branch variance).
  """

  AVG_POOL_SHORTCUT = True  # the family's default

  def __init__(self, in_ch: int, out_ch: int, *, stride: int, beta: float, alpha: float,
               stochdepth_rate: float, act: Callable[[jax.Array], jax.Array],
               skipinit: bool = True, avg_pool_shortcut: Optional[bool] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.stochdepth_rate = stochdepth_rate
    self.act = act
    self.skipinit = skipinit
    self.avg_pool_shortcut = (self.AVG_POOL_SHORTCUT if avg_pool_shortcut is None
                              else avg_pool_shortcut)
    self.use_projection = stride > 1 or in_ch != out_ch

  def residual(self, out: jax.Array) -> jax.Array:
    """The residual branch of the pre-activated input, before stochastic depth."""
    raise NotImplementedError

  def _shortcut(self, out: jax.Array, x: jax.Array) -> jax.Array:
    if not self.use_projection:
      return x
    if self.avg_pool_shortcut and self.stride > 1:
      out = hk.avg_pool(out, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1),
                        padding='SAME')
    return self.conv_shortcut(out)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.act(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = self._shortcut(out, x)
    out = self.residual(out)
    res_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = self.stoch_depth(out, is_training)
    if self.skipinit:
      skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
      out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_var


class Network(hk.Module):
  """stem -> residual blocks -> head -> mean pool -> dropout -> linear.

  Call with images [N, H, W, 3] (NHWC, normalised floats). The images' dtype sets the
  compute dtype (pass bfloat16 for mixed precision; parameters stay float32), unless
  `dtype` is given, in which case images are cast to it. Returns a dict with `logits`
  [N, num_classes] (float32) and `pool` [N, C]; with `return_metrics=True` also
  `avg_sq_mean_i`, `avg_var_i` (i = 0 is the stem output, i = k the output of block
  k-1) and `res_avg_var_k` (the residual branch of block k before it is scaled and
  added).

  A family builds in `__init__` its stem modules, `self.blocks` (each called as
  `block(x, is_training) -> (out, residual variance)`), its head modules and `self.fc`
  (the classifier), and implements `stem` and `head`.

  `remat` (one of REMAT_POLICIES) trades recomputation for activation memory without
  changing the function; `groups` picks how grouped convs run
  (`layers.GROUPED_CONV_IMPLS`; 'auto' = split on CPU, one XLA grouped conv elsewhere).
  """

  HAS_GROUPED_CONVS = True
  HAS_REMAT = True

  def __init__(self, variants: dict[str, dict[str, Any]], variant: str, *,
               drop_rate: Optional[float], dtype: Any, remat: str = 'none',
               groups: str = 'auto', name: str):
    super().__init__(name=name)
    if variant not in variants:
      raise ValueError(f'Unknown {type(self).__name__} variant {variant!r}; valid: '
                       f'{list(variants)}')
    check_options(type(self), remat, groups)
    self.variant = variant
    self.drop_rate = variants[variant]['drop_rate'] if drop_rate is None else drop_rate
    self.dtype = dtype
    self.remat, self.groups = remat, groups
    self.blocks: list[hk.Module] = []

  def stem(self, x: jax.Array, is_training: bool) -> jax.Array:
    """The images -> the first block's input."""
    raise NotImplementedError

  def head(self, out: jax.Array, is_training: bool) -> jax.Array:
    """The last block's output -> the features that are pooled."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    forward = lambda x: self._forward(x, is_training, return_metrics)
    with layers.grouped_conv_impl(self.groups):
      if self.remat == 'convs':
        return hk.remat(forward, policy=_SAVE_CONVS)(x)
      return forward(x)

  def _forward(self, x: jax.Array, is_training: bool,
               return_metrics: bool) -> dict[str, jax.Array]:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    outputs: dict[str, jax.Array] = {}
    out = self.stem(x, is_training)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    for index, block in enumerate(self.blocks):
      call = lambda x, block=block: block(x, is_training)
      if self.remat in ('block_convs', 'blocks'):
        policy = _SAVE_CONVS if self.remat == 'block_convs' else None
        call = hk.remat(call, policy=policy)
      out, res_var = call(out)
      if return_metrics:
        outputs.update(layers.signal_metrics(out, index + 1))
        outputs[f'res_avg_var_{index}'] = res_var
    out = self.head(out, is_training)
    pool = jnp.mean(out.astype(jnp.float32), axis=(1, 2)).astype(out.dtype)
    outputs['pool'] = pool
    pool = layers.dropout(pool, self.drop_rate, is_training)
    outputs['logits'] = self.fc(pool).astype(jnp.float32)
    return outputs


class NFNetwork(Network):
  """A `Network` of Normalizer-Free residual blocks (`NFResidualBlock`): a scaled
  activation, WS convs, no normalization layer.

  Options that change the function, for computing what other implementations compute
  (timm's: `nfnet_jax.models.timm_models`): `gamma_placement` (GAMMA_PLACEMENTS),
  `padding` (layers.PADDINGS), `ws_eps`/`ws_eps_mode` (layers.standardize_weight),
  `skipinit` (the learned skip gain, NFResidualBlock), `ch_div` (round_width).
  """

  def __init__(self, variants: dict[str, dict[str, Any]], variant: str, *,
               drop_rate: Optional[float], activation: str, dtype: Any, remat: str,
               groups: str, name: str, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               gamma_placement: str = 'act', padding: str = 'SAME',
               skipinit: bool = True, ch_div: Optional[int] = None):
    super().__init__(variants, variant, drop_rate=drop_rate, dtype=dtype, remat=remat,
                     groups=groups, name=name)
    if gamma_placement not in GAMMA_PLACEMENTS:
      raise ValueError(f'gamma_placement must be one of {GAMMA_PLACEMENTS}, got '
                       f'{gamma_placement!r}')
    if padding not in layers.PADDINGS:
      raise ValueError(f'padding must be one of {layers.PADDINGS}, got {padding!r}')
    if ch_div is not None and ch_div < 1:
      raise ValueError(f'ch_div must be a positive integer or None, got {ch_div!r}')
    in_conv = gamma_placement == 'conv'
    self.act = layers.activation(activation, scaled=not in_conv)
    self.conv_options = ConvOptions(
        eps=ws_eps, eps_mode=ws_eps_mode,
        gamma=layers.GAMMAS[activation] if in_conv else 1.0, padding=padding)
    self.skipinit, self.ch_div = skipinit, ch_div


_SAVE_CONVS = jax.checkpoint_policies.save_only_these_names(layers.CONV_NAME)
