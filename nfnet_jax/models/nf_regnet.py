"""NF-RegNets B0..B8 (Brock, De, Smith 2021, "Characterizing signal propagation to
close the performance gap in unnormalized ResNets"): Normalizer-Free RegNet-style
networks with inverted-bottleneck grouped-conv blocks and squeeze-excite.

Module tree (DeepMind's `nf_regnet.py` names): `NF_RegNet/~/initial_conv`,
`NF_RegNet/~/nf_block/~/conv0`, `.../conv1`, `.../conv2`, `.../conv_shortcut` (only where
the shape changes), `.../squeeze_excite/~/linear{,_1}`, the block's `skip_gain`,
`NF_RegNet/~/final_conv` and the classifier `NF_RegNet/~/linear`.

`VARIANTS[v]['width']` holds the table widths; the model multiplies every stage width by
`width` (default 0.75, as the paper).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from nfnet_jax import layers
from nfnet_jax.models import base

# variant -> stage widths (before the 0.75 multiplier), depths, train/test resolution,
# dropout before the classifier, as DeepMind's released code (docs/models.md).
VARIANTS: dict[str, dict[str, Any]] = {
    'B0': dict(width=[48, 104, 208, 440], depth=[1, 3, 6, 6], train_imsize=192,
               test_imsize=224, drop_rate=0.2),
    'B1': dict(width=[48, 104, 208, 440], depth=[2, 4, 7, 7], train_imsize=224,
               test_imsize=256, drop_rate=0.2),
    'B2': dict(width=[56, 112, 232, 488], depth=[2, 4, 8, 8], train_imsize=240,
               test_imsize=272, drop_rate=0.3),
    'B3': dict(width=[56, 128, 248, 528], depth=[2, 5, 9, 9], train_imsize=288,
               test_imsize=320, drop_rate=0.3),
    'B4': dict(width=[64, 144, 288, 616], depth=[2, 6, 11, 11], train_imsize=320,
               test_imsize=384, drop_rate=0.4),
    'B5': dict(width=[80, 168, 336, 704], depth=[3, 7, 14, 14], train_imsize=384,
               test_imsize=456, drop_rate=0.4),
    'B6': dict(width=[88, 184, 376, 792], depth=[3, 8, 16, 16], train_imsize=448,
               test_imsize=528, drop_rate=0.5),
    'B7': dict(width=[96, 208, 416, 880], depth=[4, 10, 19, 19], train_imsize=512,
               test_imsize=600, drop_rate=0.5),
    'B8': dict(width=[104, 232, 456, 968], depth=[4, 11, 22, 22], train_imsize=600,
               test_imsize=672, drop_rate=0.5),
}


class NFRegNetBlock(base.NFResidualBlock):
  """Normalizer-Free RegNet block (inverted bottleneck with grouped 3x3 conv and SE).

  Residual: 1x1 to the expanded width (in_ch * expansion, rounded by `ch_div` as
  base.round_width, then down to a multiple of `group_size`) -> act -> grouped 3x3
  (stride) -> SE (hidden = se_ratio * expanded width, gate x2) -> act -> 1x1 to
  out_ch. Haiku name `nf_block` (as DeepMind's code).
  """

  def __init__(self, in_ch: int, out_ch: int, *, expansion: float = 2.25,
               se_ratio: float = 0.5, group_size: int = 8, stride: int = 1,
               beta: float = 1.0, alpha: float = 0.2, stochdepth_rate: float = 0.0,
               act: Any = None, conv: base.ConvOptions = base.ConvOptions(),
               skipinit: bool = True, ch_div: Optional[int] = None,
               name: Optional[str] = 'nf_block'):
    super().__init__(in_ch, out_ch, stride=stride, beta=beta, alpha=alpha,
                     stochdepth_rate=stochdepth_rate, act=act, skipinit=skipinit,
                     name=name)
    groups, self.width = base.grouped_width(
        base.round_width(in_ch * expansion, ch_div) if ch_div else in_ch * expansion,
        group_size, 'Expanded width')
    self.groups = groups
    self.se_ratio = se_ratio
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride, groups)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut')
    self.se = layers.SqueezeExcite(
        self.width, self.width, hidden_ch=base.attention_hidden(self.width, se_ratio, ch_div))
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def residual(self, out: jax.Array) -> jax.Array:
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = out * (2 * self.se(out))
    return self.conv2(self.act(out))


class NFRegNet(base.NFNetwork):
  """Normalizer-Free RegNet, variants B0..B8 (see base.Network for inputs, outputs,
  `remat` and `groups`, base.NFNetwork for the options that compute what timm
  computes). `pool` is
  [N, final_conv channels]. `depths` and `widths` override the variant's for small
  models."""

  def __init__(self, num_classes: int, variant: str = 'B0', width: float = 0.75,
               expansion: float = 2.25, group_size: int = 8, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'silu',
               dtype: Any = None, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               gamma_placement: str = 'act', padding: str = 'SAME', skipinit: bool = True,
               ch_div: Optional[int] = None, depths: Optional[Sequence[int]] = None,
               widths: Optional[Sequence[int]] = None, remat: str = 'none',
               groups: str = 'auto', name: str = 'NF_RegNet'):
    super().__init__(VARIANTS, variant, drop_rate=drop_rate, activation=activation,
                     dtype=dtype, remat=remat, groups=groups, name=name, ws_eps=ws_eps,
                     ws_eps_mode=ws_eps_mode, gamma_placement=gamma_placement,
                     padding=padding, skipinit=skipinit, ch_div=ch_div)
    params = VARIANTS[variant]
    multiplier = width
    # depths/widths (the table's stage widths, before `width`): overrides for small
    # models.
    table_widths = list(widths or params['width'])
    self.widths = [base.round_width(w * multiplier, ch_div) for w in table_widths]
    self.stem_width = self.widths[0]
    self.depths = list(depths or params['depth'])
    conv = self.conv_options
    # Stem: one 3x3 stride-2 WS conv.
    self.initial_conv = conv(self.stem_width, 3, 'initial_conv', 2)
    ch = self.stem_width
    for b in base.signal_schedule(self.depths, alpha, stochdepth_rate):
      width = self.widths[b.stage]
      self.blocks.append(NFRegNetBlock(
          ch, width, expansion=1.0 if b.index == 0 else expansion, se_ratio=se_ratio,
          group_size=group_size, stride=2 if b.first_in_stage else 1, beta=b.beta,
          alpha=alpha, stochdepth_rate=b.stochdepth_rate, act=self.act, conv=conv,
          skipinit=skipinit, ch_div=ch_div))
      ch = width
    # Head (EfficientNet-like): 1x1 conv to 1280 * ch // 440 channels (timm, with
    # ch_div: width * (1280 * table width // 440), rounded), act, mean pool, dropout,
    # zero-initialised linear classifier.
    features = (int(1280 * ch // 440) if ch_div is None else
                base.round_width(multiplier * (1280 * table_widths[-1] // 440), ch_div))
    self.final_conv = conv(features, 1, 'final_conv')
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros)

  def stem(self, x: jax.Array, is_training: bool) -> jax.Array:
    return self.initial_conv(x)

  def head(self, out: jax.Array, is_training: bool) -> jax.Array:
    return self.act(self.final_conv(out))
