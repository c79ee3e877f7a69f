"""NFNet-F0..F7 and F0+..F7+ (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization").

Module names reproduce DeepMind's released checkpoints exactly (`NFNet/~/stem_conv0`,
`NFNet/~/nf_block_3/~/conv1b`, `NFNet/~/linear`, ...), so a released file applies to
this module tree without renaming.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import haiku as hk
import jax

from nfnet_jax import layers
from nfnet_jax.models import base

_BASE_WIDTHS = [256, 512, 1536, 1536]
_PLUS_WIDTHS = [384, 768, 2048, 2048]
_STRIDES = [1, 2, 2, 2]

# variant -> depths per stage, train/test resolution, RandAugment (layers, magnitude),
# dropout rate before the classifier: the paper's variant table and DeepMind's released
# code (docs/models.md).
_BASE_VARIANTS = {
    'F0': dict(depth=[1, 2, 6, 3], train_imsize=192, test_imsize=256, randaug=(4, 5),
               drop_rate=0.2),
    'F1': dict(depth=[2, 4, 12, 6], train_imsize=224, test_imsize=320, randaug=(4, 10),
               drop_rate=0.3),
    'F2': dict(depth=[3, 6, 18, 9], train_imsize=256, test_imsize=352, randaug=(4, 10),
               drop_rate=0.4),
    'F3': dict(depth=[4, 8, 24, 12], train_imsize=320, test_imsize=416, randaug=(4, 15),
               drop_rate=0.4),
    'F4': dict(depth=[5, 10, 30, 15], train_imsize=384, test_imsize=512, randaug=(4, 15),
               drop_rate=0.5),
    'F5': dict(depth=[6, 12, 36, 18], train_imsize=416, test_imsize=544, randaug=(4, 15),
               drop_rate=0.5),
    'F6': dict(depth=[7, 14, 42, 21], train_imsize=448, test_imsize=576, randaug=(4, 15),
               drop_rate=0.5),
    'F7': dict(depth=[8, 16, 48, 24], train_imsize=480, test_imsize=608, randaug=(4, 15),
               drop_rate=0.5),
}

# The channel gate of each block: squeeze-excite or efficient channel attention.
ATTENTIONS = ('se', 'eca')

VARIANTS: dict[str, dict[str, Any]] = {}
for _name, _v in _BASE_VARIANTS.items():
  VARIANTS[_name] = dict(_v, width=_BASE_WIDTHS)
  VARIANTS[_name + '+'] = dict(_v, width=_PLUS_WIDTHS)

class NFNetBlock(base.NFResidualBlock):
  """Pre-activation NF bottleneck block with two grouped 3x3 convs and a channel gate.

  Residual: 1x1 to the bottleneck width (expansion * out_ch, rounded by `ch_div` as
  base.round_width, then down to a multiple of `group_size`) -> act -> grouped 3x3
  (stride) -> act -> grouped 3x3 -> act -> 1x1 to out_ch -> gate (x2): squeeze-excite
  (`attention='se'`, hidden se_ratio * out_ch) or efficient channel attention ('eca').
  Haiku name `nf_block` (released checkpoints).
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, expansion: float = 0.5, group_size: Optional[int] = 128,
               se_ratio: float = 0.5, attention: str = 'se', stochdepth_rate: float = 0.0,
               act: Any = None, conv: base.ConvOptions = base.ConvOptions(),
               skipinit: bool = True, ch_div: Optional[int] = None,
               name: Optional[str] = 'nf_block'):
    super().__init__(in_ch, out_ch, stride=stride, beta=beta, alpha=alpha,
                     stochdepth_rate=stochdepth_rate, act=act, skipinit=skipinit,
                     name=name)
    if attention not in ATTENTIONS:
      raise ValueError(f'attention must be one of {ATTENTIONS}, got {attention!r}')
    width = base.round_width(out_ch * expansion, ch_div)
    # group_size None: ordinary (ungrouped) 3x3 convs, for small models on CPU.
    groups, self.width = base.grouped_width(width, group_size or width, 'Bottleneck width')
    self.groups = groups
    self.se_ratio = se_ratio
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride, groups)
    self.conv1b = conv(self.width, 3, 'conv1b', 1, groups)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut')
    if attention == 'se':
      self.attn = layers.SqueezeExcite(
          out_ch, out_ch, hidden_ch=base.attention_hidden(out_ch, se_ratio, ch_div))
    else:
      self.attn = layers.ECA(out_ch)
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def residual(self, out: jax.Array) -> jax.Array:
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv1b(self.act(out))
    out = self.conv2(self.act(out))
    return out * (2 * self.attn(out))


class NFNet(base.NFNetwork):
  """Normalizer-Free Network, variants F0..F7 and F0+..F7+ (see base.Network for
  inputs, outputs, `remat` and `groups`, base.NFNetwork for the options that compute
  what timm computes).

  `width` multiplies the stage widths; `group_size` (128 in the paper; None =
  ungrouped), `depths`, `widths` (per stage) and `stem_widths` (the four stem convs)
  exist for small models (the quickstart) and change the
  architecture away from the paper's. `bottleneck` (the bottleneck width over the
  block width, 0.5 in the paper), `attention` ('se' or 'eca'), `se_ratio` and
  `final_conv_mult` give timm's NFNet-L layouts (`timm_models`).
  """

  def __init__(self, num_classes: int, variant: str = 'F0', width: float = 1.0,
               se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'gelu',
               final_conv_mult: float = 2, dtype: Any = None, ws_eps: float = 1e-4,
               ws_eps_mode: str = 'max', group_size: Optional[int] = 128,
               depths: Optional[Sequence[int]] = None,
               widths: Optional[Sequence[int]] = None,
               stem_widths: Optional[Sequence[int]] = None, bottleneck: float = 0.5,
               attention: str = 'se', gamma_placement: str = 'act', padding: str = 'SAME',
               skipinit: bool = True, ch_div: Optional[int] = None, remat: str = 'none',
               groups: str = 'auto', name: str = 'NFNet'):
    super().__init__(VARIANTS, variant, drop_rate=drop_rate, activation=activation,
                     dtype=dtype, remat=remat, groups=groups, name=name, ws_eps=ws_eps,
                     ws_eps_mode=ws_eps_mode, gamma_placement=gamma_placement,
                     padding=padding, skipinit=skipinit, ch_div=ch_div)
    params = VARIANTS[variant]
    # depths/widths (the table's stage widths, before `width`): overrides for small
    # models.
    self.widths = [base.round_width(w * width, ch_div) for w in widths or params['width']]
    self.depths = list(depths or params['depth'])
    conv = self.conv_options
    # Stem: 3x3 convs 16 (s2), 32, 64, width[0]/2 (s2), activations between
    # (`stem_widths` overrides the four, for small models).
    stem = list(stem_widths or (16, 32, 64, self.widths[0] // 2))
    if len(stem) != 4:
      raise ValueError(f'stem_widths must hold 4 widths, got {stem}')
    self.stem_convs = [conv(c, 3, f'stem_conv{i}', 2 if i in (0, 3) else 1)
                       for i, c in enumerate(stem)]
    ch = stem[-1]
    for b in base.signal_schedule(self.depths, alpha, stochdepth_rate):
      width = self.widths[b.stage]
      self.blocks.append(NFNetBlock(
          ch, width, stride=_STRIDES[b.stage] if b.first_in_stage else 1, beta=b.beta,
          alpha=alpha, expansion=bottleneck, se_ratio=se_ratio, attention=attention,
          stochdepth_rate=b.stochdepth_rate, group_size=group_size, act=self.act,
          conv=conv, skipinit=skipinit, ch_div=ch_div))
      ch = width
    self.final_conv = conv(base.round_width(final_conv_mult * ch, ch_div), 1, 'final_conv')
    self.fc = layers.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01))

  def stem(self, x: jax.Array, is_training: bool) -> jax.Array:
    for i, conv in enumerate(self.stem_convs):
      x = conv(self.act(x) if i else x)
    return x

  def head(self, out: jax.Array, is_training: bool) -> jax.Array:
    return self.act(self.final_conv(out))
