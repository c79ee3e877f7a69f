"""NF-ResNets (Brock, De, Smith 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets"): Normalizer-Free pre-activation bottleneck
ResNets, depths 26 .. 600, optionally with squeeze-excite.

Module tree (DeepMind's `nf_resnet.py` names): `NF_ResNet/~/initial_conv`,
`NF_ResNet/~/nf_res_block/~/conv0`, `.../conv1`, `.../conv2`, `.../conv_shortcut` (only
where the shape changes), `.../squeeze_excite/~/linear{,_1}` (only with `use_se`), the
block's `skip_gain`, and the classifier `NF_ResNet/~/linear`.

Width convention: `width=1.0` gives output widths [256, 512, 1024, 2048] and a 64-channel
stem; DeepMind's code writes the same model as `width=4` on a base of [64, 128, 256, 512]
(stem 16 * width), so their `width=w` is our `width=w / 4`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import base

# The ResNet layout, shared with the BatchNorm baselines (bn_resnet): output widths
# per stage at width=1.0, the stem's width, the stride of each stage's first block.
# The ResNet layout, shared with the BatchNorm baselines (bn_resnet): output widths
# per stage at width=1.0, the stem's width, the stride of each stage's first block.
WIDTHS = [256, 512, 1024, 2048]
STEM_WIDTH = 64
STRIDES = [1, 2, 2, 2]

# variant -> depths per stage (the paper's and DeepMind's released code). No official
# dropout for NF-ResNets: 0 unless the caller sets one. Train/test resolution 224
# (DeepMind's ImageNet config). See docs/models.md.
DEPTHS = {
    '26': [2, 2, 2, 2],
    '50': [3, 4, 6, 3],
    '101': [3, 4, 23, 3],
    '152': [3, 8, 36, 3],
    '200': [3, 24, 36, 3],
    '288': [24, 24, 24, 24],
    '600': [50, 50, 50, 50],
}

VARIANTS: dict[str, dict[str, Any]] = {
    name: dict(depth=depth, width=list(WIDTHS), train_imsize=224, test_imsize=224,
               drop_rate=0.0)
    for name, depth in DEPTHS.items()
}


class NFResBlock(base.NFResidualBlock):
  """Normalizer-Free pre-activation bottleneck block (bottleneck ratio 0.25).

  Residual: 1x1 -> act -> 3x3 (stride) -> act -> 1x1, optional SE (gate x2); the
  shortcut, when the shape changes, is a strided 1x1 WS conv (DeepMind's) or, with
  `avg_pool_shortcut`, a 2x2 average pool then a 1x1 WS conv (timm's).
  """

  AVG_POOL_SHORTCUT = False

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, bottleneck_ratio: float = 0.25, use_se: bool = False,
               se_ratio: float = 0.25, stochdepth_rate: float = 0.0, act: Any = None,
               conv: base.ConvOptions = base.ConvOptions(), skipinit: bool = True,
               avg_pool_shortcut: bool = False, ch_div: Optional[int] = None,
               name: Optional[str] = None):
    super().__init__(in_ch, out_ch, stride=stride, beta=beta, alpha=alpha,
                     stochdepth_rate=stochdepth_rate, act=act, skipinit=skipinit,
                     avg_pool_shortcut=avg_pool_shortcut, name=name)
    self.width = base.round_width(out_ch * bottleneck_ratio, ch_div)
    self.use_se, self.se_ratio = use_se, se_ratio
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut',
                                1 if avg_pool_shortcut else stride)
    if use_se:
      self.se = layers.SqueezeExcite(
          out_ch, out_ch, hidden_ch=base.attention_hidden(out_ch, se_ratio, ch_div))
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def residual(self, out: jax.Array) -> jax.Array:
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv2(self.act(out))
    if self.use_se:
      out = out * (2 * self.se(out))
    return out


class NFResNet(base.NFNetwork):
  """Normalizer-Free pre-activation ResNet, variants '26', '50', ..., '600' (see
  base.Network for inputs, outputs and `remat`, base.NFNetwork for the options that
  compute what timm computes; `avg_pool_shortcut` is NFResBlock's). `depths` and
  `widths` override the variant's for small models.

  `pool` is [N, 2048 * width]; metric index 0 is the stem output after max-pooling.
  NF-ResNets have no grouped convolutions, so `groups` other than 'auto' is refused.
  """

  HAS_GROUPED_CONVS = False

  def __init__(self, num_classes: int, variant: str = '50', width: float = 1.0,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25,
               bottleneck_ratio: float = 0.25, dtype: Any = None, ws_eps: float = 1e-4,
               ws_eps_mode: str = 'max', gamma_placement: str = 'act',
               padding: str = 'SAME', skipinit: bool = True, ch_div: Optional[int] = None,
               avg_pool_shortcut: bool = False, depths: Optional[Sequence[int]] = None,
               widths: Optional[Sequence[int]] = None, remat: str = 'none',
               groups: str = 'auto', name: str = 'NF_ResNet'):
    super().__init__(VARIANTS, variant, drop_rate=drop_rate, activation=activation,
                     dtype=dtype, remat=remat, groups=groups, name=name, ws_eps=ws_eps,
                     ws_eps_mode=ws_eps_mode, gamma_placement=gamma_placement,
                     padding=padding, skipinit=skipinit, ch_div=ch_div)
    params = VARIANTS[variant]
    # depths/widths (the output widths per stage, before `width`): overrides for
    # small models.
    self.widths = [base.round_width(w * width, ch_div) for w in widths or params['width']]
    self.stem_width = base.round_width(STEM_WIDTH * width, ch_div)
    self.depths = list(depths or params['depth'])
    self.padding = padding
    conv = self.conv_options
    # Stem: 7x7 stride-2 WS conv (then a 3x3 stride-2 max-pool in `stem`).
    self.initial_conv = conv(self.stem_width, 7, 'initial_conv', 2)
    ch = self.stem_width
    for b in base.signal_schedule(self.depths, alpha, stochdepth_rate):
      width = self.widths[b.stage]
      self.blocks.append(NFResBlock(
          ch, width, stride=STRIDES[b.stage] if b.first_in_stage else 1, beta=b.beta,
          alpha=alpha, bottleneck_ratio=bottleneck_ratio, use_se=use_se,
          se_ratio=se_ratio, stochdepth_rate=b.stochdepth_rate, act=self.act, conv=conv,
          skipinit=skipinit, avg_pool_shortcut=avg_pool_shortcut, ch_div=ch_div))
      ch = width
    # Head: act, global mean pool, dropout, linear N(0, 0.01).
    self.fc = layers.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01))

  def stem(self, x: jax.Array, is_training: bool) -> jax.Array:
    out = self.initial_conv(x)
    # 3x3 stride-2 max pool. Symmetric: pad 1 on every side with -inf (never the max).
    if self.padding == 'SAME':
      return hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                         padding='SAME')
    out = jnp.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                       padding='VALID')

  def head(self, out: jax.Array, is_training: bool) -> jax.Array:
    return self.act(out)
