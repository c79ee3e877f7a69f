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

VARIANTS: dict[str, dict[str, Any]] = {}
for _name, _v in _BASE_VARIANTS.items():
  VARIANTS[_name] = dict(_v, width=_BASE_WIDTHS)
  VARIANTS[_name + '+'] = dict(_v, width=_PLUS_WIDTHS)

class NFNetBlock(base.NFResidualBlock):
  """Pre-activation NF bottleneck block with two grouped 3x3 convs and SE.

  Residual: 1x1 to the bottleneck width (expansion * out_ch rounded down to a
  multiple of `group_size`) -> act -> grouped 3x3 (stride) -> act -> grouped 3x3 ->
  act -> 1x1 to out_ch -> SE (gate x2). Haiku name `nf_block` (released checkpoints).
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, expansion: float = 0.5, group_size: Optional[int] = 128,
               se_ratio: float = 0.5, stochdepth_rate: float = 0.0,
               act: Any = None, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               name: Optional[str] = 'nf_block'):
    super().__init__(in_ch, out_ch, stride=stride, beta=beta, alpha=alpha,
                     stochdepth_rate=stochdepth_rate, act=act, name=name)
    # group_size None: ordinary (ungrouped) 3x3 convs, for small models on CPU.
    group_size = group_size or int(out_ch * expansion)
    groups, self.width = base.grouped_width(out_ch * expansion, group_size,
                                            'Bottleneck width')
    self.groups = groups
    self.se_ratio = se_ratio
    conv = base.ws_conv_maker(ws_eps, ws_eps_mode)
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride, groups)
    self.conv1b = conv(self.width, 3, 'conv1b', 1, groups)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def residual(self, out: jax.Array) -> jax.Array:
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv1b(self.act(out))
    out = self.conv2(self.act(out))
    return out * (2 * self.se(out))


class NFNet(base.NFNetwork):
  """Normalizer-Free Network, variants F0..F7 and F0+..F7+ (see base.NFNetwork for
  inputs, outputs, `remat` and `groups`).

  `width` multiplies the stage widths; `group_size` (128 in the paper; None =
  ungrouped) and `depths` exist for small models (the quickstart) and change the
  architecture away from the paper's.
  """

  def __init__(self, num_classes: int, variant: str = 'F0', width: float = 1.0,
               se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'gelu',
               final_conv_mult: float = 2, dtype: Any = None, ws_eps: float = 1e-4,
               ws_eps_mode: str = 'max', group_size: Optional[int] = 128,
               depths: Optional[Sequence[int]] = None, remat: str = 'none',
               groups: str = 'auto', name: str = 'NFNet'):
    super().__init__(VARIANTS, variant, drop_rate=drop_rate, activation=activation,
                     dtype=dtype, remat=remat, groups=groups, name=name)
    params = VARIANTS[variant]
    self.widths = [int(w * width) for w in params['width']]
    self.depths = list(depths or params['depth'])  # override for small/debug models
    conv = lambda ch, k, stride, name: layers.WSConv2D(
        ch, k, stride=stride, eps=ws_eps, eps_mode=ws_eps_mode, name=name)
    # Stem: 3x3 convs 16 (s2), 32, 64, width[0]/2 (s2), activations between.
    ch = self.widths[0] // 2
    self.stem_convs = [conv(16, 3, 2, 'stem_conv0'), conv(32, 3, 1, 'stem_conv1'),
                       conv(64, 3, 1, 'stem_conv2'), conv(ch, 3, 2, 'stem_conv3')]
    for b in base.signal_schedule(self.depths, alpha, stochdepth_rate):
      width = self.widths[b.stage]
      self.blocks.append(NFNetBlock(
          ch, width, stride=_STRIDES[b.stage] if b.first_in_stage else 1, beta=b.beta,
          alpha=alpha, se_ratio=se_ratio, stochdepth_rate=b.stochdepth_rate,
          group_size=group_size, act=self.act, ws_eps=ws_eps, ws_eps_mode=ws_eps_mode))
      ch = width
    self.final_conv = conv(int(final_conv_mult * ch), 1, 1, 'final_conv')
    self.fc = layers.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01))

  def stem(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.stem_convs):
      x = conv(self.act(x) if i else x)
    return x

  def head(self, out: jax.Array) -> jax.Array:
    return self.act(self.final_conv(out))
