"""Batch-normalized ResNets: the baselines the NF-ResNets and NFNets are compared with.

The stem, stage and bottleneck layout of the NF-ResNets (`nf_resnet.py`: depths 26 ..
600, output widths [256, 512, 1024, 2048] at `width=1.0`, 7x7 stride-2 stem conv to 64
channels, 3x3 stride-2 max-pool, bottleneck ratio 0.25, the stride on the 3x3 conv, a
strided 1x1 projection shortcut where the shape changes) with plain convolutions (no
weight standardisation, no bias) and BatchNorm instead of the signal-propagation
scalars (no beta, no alpha, no skip gain). Two block layouts:

- `preactivation=True` (default): ResNet-v2, BN -> relu -> conv, the layout of
  DeepMind's BN baseline (`nfnets/resnet.py`, `ResNet` with `preactivation=True`, which
  their baseline config trains) and the layout the NF-ResNets were derived from: where
  an NF block scales `act(x) * beta`, this block normalizes `act(bn(x))`. A last
  BN + relu (`final_bn`) precedes the pool. The residual branch ends in a conv, so no BN
  sits at its end to start at zero; its BNs start at scale 1.
- `preactivation=False`: ResNet-v1, conv -> BN (-> relu) after every conv, relu after
  the sum, BN on the projection shortcut, BN + relu after the stem conv. The last BN of
  each residual branch (`bn2`) starts with scale 0 (Goyal et al. 2017), so every block
  starts as its shortcut.

BatchNorm: `hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9,
eps=1e-5)` as in DeepMind's baseline config; statistics and normalisation run in float32
whatever the compute dtype. In training (`is_training=True`) each BN normalizes with
the statistics of the batch it sees, mean and biased variance E[x^2] - E[x]^2 over
(N, H, W) (over all devices' batches when `cross_replica_axis` names a mapped axis),
and updates its moving averages (Haiku's zero-debiased EMA, per BN `mean_ema` and
`var_ema`, each with state `counter`, `hidden`, `average`):

    counter <- counter + 1;  hidden <- 0.9 * hidden + 0.1 * batch_stat
    average <- hidden / (1 - 0.9 ** counter)

so after the first update `average` is that batch's statistic. In evaluation
(`is_training=False`) it normalizes with `average`. `hk.transform_with_state`
carries these in the `state` tree, next to `params` (`scale`, `offset` per BN, `w` per
conv, the classifier's `w`, `b`).

Module tree: `BN_ResNet/~/initial_conv` (+ `initial_bn` in v1), blocks
`BN_ResNet/~/bn_res_block{,_1,...}/~/{bn0,conv0,bn1,conv1,bn2,conv2,conv_shortcut}`
(+ `shortcut_bn` in v1, `squeeze_excite` with `use_se`), `BN_ResNet/~/final_bn` (v2),
`BN_ResNet/~/linear` (initialised to zeros as DeepMind's baseline).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import base, nf_resnet

BN_DECAY = 0.9
BN_EPS = 1e-5

# Same depths as the NF-ResNets (one table, imported); resolution 224.
VARIANTS: dict[str, dict[str, Any]] = {
    name: dict(depth=list(depth), width=list(nf_resnet.WIDTHS), train_imsize=224,
               test_imsize=224, drop_rate=0.0, stateful=True)
    for name, depth in nf_resnet.DEPTHS.items()
}


class Conv2D(hk.Module):
  """Plain 2D convolution without bias, computed in the input's dtype.

  `w` [kh, kw, in, out] float32, variance-scaling(1, fan_in, normal); SAME padding.
  x [N, H, W, in] -> [N, H/stride, W/stride, out].
  """

  feature_group_count = 1  # Read by the MAC counter (models/summary.py).

  def __init__(self, output_channels: int, kernel_shape: int = 1, stride: int = 1,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels, self.stride = output_channels, stride
    self.kernel_shape = (kernel_shape, kernel_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = hk.get_parameter('w', (*self.kernel_shape, x.shape[-1], self.output_channels),
                         jnp.float32,
                         init=hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal'))
    return layers.conv2d(x, w.astype(x.dtype), self.stride, 'SAME')


def batch_norm(name: str, cross_replica_axis: Union[str, Sequence[str], None] = None,
               zero_init: bool = False) -> hk.BatchNorm:
  """The baseline's BN. The cross-replica axis is dropped while Haiku runs `init`
  (outside any mapped axis); the parameter and state trees do not depend on it."""
  return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=BN_DECAY,
                      eps=BN_EPS, scale_init=jnp.zeros if zero_init else None,
                      cross_replica_axis=None if hk.running_init() else cross_replica_axis,
                      name=name)


def _bn(module: hk.BatchNorm, x: jax.Array, is_training: bool) -> jax.Array:
  """BN in float32 (bfloat16 batch statistics are too coarse), result in x's dtype.

  `init` always runs the training path, so the state tree is the same whichever
  `is_training` the caller initialises with (the eval path reads state it cannot
  create)."""
  training = is_training or hk.running_init()
  return module(x.astype(jnp.float32), is_training=training).astype(x.dtype)


class BNResBlock(hk.Module):
  """Batch-normalized bottleneck block (ratio 0.25), pre- or post-activation.

  v2: out = act(bn0(x)); shortcut = conv_shortcut(out) or x; out = conv0(out);
      out = conv1(act(bn1(out))); out = conv2(act(bn2(out))); [SE]; stoch. depth;
      returns out + shortcut.
  v1: shortcut = shortcut_bn(conv_shortcut(x)) or x; out = act(bn0(conv0(x)));
      out = act(bn1(conv1(out))); out = bn2(conv2(out)) (scale init 0); [SE];
      stoch. depth; returns act(out + shortcut).

  x [N, H, W, in_ch] -> ([N, H/stride, W/stride, out_ch], residual-branch variance).
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1,
               preactivation: bool = True, bottleneck_ratio: float = 0.25,
               use_se: bool = False, se_ratio: float = 0.25,
               stochdepth_rate: float = 0.0, act: Any = None,
               cross_replica_axis: Union[str, Sequence[str], None] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.preactivation = preactivation
    self.width = int(out_ch * bottleneck_ratio)
    self.use_se = use_se
    self.act = act
    self.use_projection = stride > 1 or in_ch != out_ch
    bn = lambda name, zero_init=False: batch_norm(name, cross_replica_axis, zero_init)
    self.bn0, self.conv0 = bn('bn0'), Conv2D(self.width, 1, name='conv0')
    self.bn1, self.conv1 = bn('bn1'), Conv2D(self.width, 3, stride, name='conv1')
    self.bn2 = bn('bn2', zero_init=not preactivation)
    self.conv2 = Conv2D(out_ch, 1, name='conv2')
    if self.use_projection:
      self.conv_shortcut = Conv2D(out_ch, 1, stride, name='conv_shortcut')
      if not preactivation:
        self.shortcut_bn = bn('shortcut_bn')
    if use_se:
      self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    bn = lambda module, y: _bn(module, y, is_training)
    if self.preactivation:
      out = self.act(bn(self.bn0, x))
      shortcut = self.conv_shortcut(out) if self.use_projection else x
      out = self.conv0(out)
      out = self.conv1(self.act(bn(self.bn1, out)))
      out = self.conv2(self.act(bn(self.bn2, out)))
    else:
      shortcut = (bn(self.shortcut_bn, self.conv_shortcut(x)) if self.use_projection
                  else x)
      out = self.act(bn(self.bn0, self.conv0(x)))
      out = self.act(bn(self.bn1, self.conv1(out)))
      out = bn(self.bn2, self.conv2(out))
    if self.use_se:
      out = out * (2 * self.se(out))
    res_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = self.stoch_depth(out, is_training) + shortcut
    return (out if self.preactivation else self.act(out)), res_var


class BNResNet(base.Network):
  """Batch-normalized ResNet, variants '26', '50', ..., '600' (the NF-ResNet depths).

  Call with images [N, H, W, 3] (NHWC, normalised floats) under
  `hk.transform_with_state`. Inputs and outputs as `base.Network`'s: `pool` is
  [N, 2048 * width]; metric index 0 is the stem output after max-pooling, as in
  `NFResNet`.

  `depths`: blocks per stage instead of the variant's (1 to 4 stages; fewer stages
  end at a narrower width). `cross_replica_axis`: a mapped axis name (e.g. the
  training loop's data axis) over which training batch statistics are averaged; None
  (default): each device normalizes with its own batch's statistics. No grouped
  convolutions and no remat policy: `remat` and `groups` other than the defaults are
  refused (base.check_options).
  """

  HAS_GROUPED_CONVS = False
  HAS_REMAT = False

  def __init__(self, num_classes: int, variant: str = '50', width: float = 1.0,
               preactivation: bool = True, stochdepth_rate: float = 0.0,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25,
               bottleneck_ratio: float = 0.25, dtype: Any = None,
               cross_replica_axis: Union[str, Sequence[str], None] = None,
               depths: Optional[Sequence[int]] = None, remat: str = 'none',
               groups: str = 'auto', name: str = 'BN_ResNet'):
    super().__init__(VARIANTS, variant, drop_rate=drop_rate, dtype=dtype, remat=remat,
                     groups=groups, name=name)
    self.num_classes = num_classes
    params = VARIANTS[variant]
    self.train_imsize, self.test_imsize = params['train_imsize'], params['test_imsize']
    self.widths = [int(w * width) for w in params['width']]
    self.stem_width = int(nf_resnet.STEM_WIDTH * width)
    # `depths` (blocks per stage, up to 4 stages) overrides the variant's: small test
    # models.
    self.depths = list(params['depth'] if depths is None else depths)
    if not 1 <= len(self.depths) <= 4 or min(self.depths) < 1:
      raise ValueError(f'depths={depths!r}: 1 to 4 stages of at least one block each')
    self.preactivation = preactivation
    if activation not in layers.BASE_ACTIVATIONS:  # Plain (BN needs no gamma scaling).
      raise ValueError(f'Unknown activation {activation!r}; valid: '
                       f'{sorted(layers.BASE_ACTIVATIONS)}')
    self.act = layers.BASE_ACTIVATIONS[activation]
    self.initial_conv = Conv2D(self.stem_width, 7, 2, name='initial_conv')
    if not preactivation:
      self.initial_bn = batch_norm('initial_bn', cross_replica_axis)
    ch = self.stem_width
    # The NF-ResNets' block order and stochastic-depth rates (their beta is not used).
    for b in base.signal_schedule(self.depths, stochdepth_rate=stochdepth_rate):
      width = self.widths[b.stage]
      self.blocks.append(BNResBlock(
          ch, width, stride=nf_resnet.STRIDES[b.stage] if b.first_in_stage else 1,
          preactivation=preactivation, bottleneck_ratio=bottleneck_ratio,
          use_se=use_se, se_ratio=se_ratio, stochdepth_rate=b.stochdepth_rate,
          act=self.act, cross_replica_axis=cross_replica_axis))
      ch = width
    if preactivation:
      self.final_bn = batch_norm('final_bn', cross_replica_axis)
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros)

  def stem(self, x: jax.Array, is_training: bool) -> jax.Array:
    """7x7 stride-2 conv (v1: then BN and act), 3x3 stride-2 max-pool."""
    out = self.initial_conv(x)
    if not self.preactivation:
      out = self.act(_bn(self.initial_bn, out, is_training))
    return hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                       padding='SAME')

  def head(self, out: jax.Array, is_training: bool) -> jax.Array:
    """v2: the last BN and act (each block's output is its sum, not activated);
    v1: the blocks' output as is."""
    if self.preactivation:
      return self.act(_bn(self.final_bn, out, is_training))
    return out
