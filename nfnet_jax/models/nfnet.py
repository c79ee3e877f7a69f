"""NFNet-F0..F7 and F0+..F7+ (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization").

Module names reproduce DeepMind's released checkpoints exactly (`NFNet/~/stem_conv0`,
`NFNet/~/nf_block_3/~/conv1b`, `NFNet/~/linear`, ...), so a released file applies to
this module tree without renaming.
"""
from __future__ import annotations

from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers

_BASE_WIDTHS = [256, 512, 1536, 1536]
_PLUS_WIDTHS = [384, 768, 2048, 2048]
_STRIDES = [1, 2, 2, 2]

# variant -> depths per stage, train/test resolution, RandAugment (layers, magnitude),
# dropout rate before the classifier.
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

# ImageNet top-1 of the paper (F6 with SAM).
PAPER_TOP1 = {'F0': 83.6, 'F1': 84.7, 'F2': 85.1, 'F3': 85.7, 'F4': 85.9, 'F5': 86.0,
              'F6': 86.5}


class NFBlock(hk.Module):
  """Pre-activation NF bottleneck block with two grouped 3x3 convs and SE.

  x [N, H, W, in_ch] -> ([N, H/stride, W/stride, out_ch], residual-branch variance).
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, expansion: float = 0.5, group_size: Optional[int] = 128,
               se_ratio: float = 0.5, stochdepth_rate: float = 0.0,
               act: Any = None, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               name: Optional[str] = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.act = act
    # group_size None: ordinary (ungrouped) 3x3 convs, for small models on CPU, where
    # XLA's grouped convolutions are slow.
    group_size = group_size or int(out_ch * expansion)
    groups = int(out_ch * expansion) // group_size
    if groups < 1:
      raise ValueError(f'Bottleneck width {out_ch * expansion} is below the group width '
                       f'{group_size}')
    self.groups = groups
    self.width = group_size * groups
    self.se_ratio = se_ratio
    self.stochdepth_rate = stochdepth_rate
    self.use_projection = stride > 1 or in_ch != out_ch
    # Submodules are built in __init__ so Haiku names them `nf_block/~/conv0` etc.,
    # exactly as in the released checkpoints (modules made in __call__ lose the `~`).
    conv = lambda ch, k, name, stride=1, groups=1: layers.WSConv2D(
        ch, k, stride=stride, feature_group_count=groups, eps=ws_eps,
        eps_mode=ws_eps_mode, name=name)
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride, groups)
    self.conv1b = conv(self.width, 3, 'conv1b', 1, groups)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.act(x) * jnp.asarray(self.beta, x.dtype)
    if self.stride > 1:
      shortcut = hk.avg_pool(out, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1),
                             padding='SAME')
      shortcut = self.conv_shortcut(shortcut)
    elif self.use_projection:
      shortcut = self.conv_shortcut(out)
    else:
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv1b(self.act(out))
    out = self.conv2(self.act(out))
    out = out * (2 * self.se(out))
    res_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
    out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_var


class NFNet(hk.Module):
  """Normalizer-Free Network, variants F0..F7 and F0+..F7+.

  Call with images [N, H, W, 3] (NHWC, normalised floats). The images' dtype sets the
  compute dtype (pass bfloat16 for mixed precision; parameters stay float32), unless
  `dtype` is given, in which case images are cast to it. `width` multiplies the stage
  widths; `group_size` (128 in the paper; None = ungrouped) and `depths` exist for small models (the
  quickstart) and change the architecture away from the paper's. Returns a dict with `logits`
  [N, num_classes] (float32) and `pool` [N, C]; with `return_metrics=True` also per-block
  `avg_sq_mean_i`, `avg_var_i` (i = 0 is the stem output, i = k the output of block k-1)
  and `res_avg_var_k` (the residual branch of block k before the skip gain).
  """

  def __init__(self, num_classes: int, variant: str = 'F0', width: float = 1.0,
               se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'gelu',
               final_conv_mult: float = 2, dtype: Any = None, ws_eps: float = 1e-4,
               ws_eps_mode: str = 'max', group_size: Optional[int] = 128,
               depths: Optional[list[int]] = None, name: str = 'NFNet'):
    super().__init__(name=name)
    if variant not in VARIANTS:
      raise ValueError(f'Unknown NFNet variant {variant!r}; valid: {list(VARIANTS)}')
    self.num_classes = num_classes
    self.variant = variant
    params = VARIANTS[variant]
    self.train_imsize, self.test_imsize = params['train_imsize'], params['test_imsize']
    self.widths = [int(w * width) for w in params['width']]
    self.depths = list(depths or params['depth'])  # override for small/debug models
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.se_ratio, self.alpha = se_ratio, alpha
    self.stochdepth_rate = stochdepth_rate
    self.act = layers.activation(activation)
    self.final_conv_mult = final_conv_mult
    self.dtype = dtype
    conv = lambda ch, k, stride, name: layers.WSConv2D(
        ch, k, stride=stride, eps=ws_eps, eps_mode=ws_eps_mode, name=name)
    # Stem: 3x3 convs 16 (s2), 32, 64, width[0]/2 (s2), activations between.
    ch = self.widths[0] // 2
    self.stem = [conv(16, 3, 2, 'stem_conv0'), conv(32, 3, 1, 'stem_conv1'),
                 conv(64, 3, 1, 'stem_conv2'), conv(ch, 3, 2, 'stem_conv3')]
    self.blocks = []
    num_blocks = sum(self.depths)
    expected_std = 1.0
    for width, depth, stride in zip(self.widths, self.depths, _STRIDES):
      for block_index in range(depth):
        self.blocks.append(NFBlock(
            ch, width, stride=stride if block_index == 0 else 1,
            beta=1.0 / expected_std, alpha=alpha, se_ratio=se_ratio,
            stochdepth_rate=stochdepth_rate * len(self.blocks) / num_blocks,
            group_size=group_size, act=self.act, ws_eps=ws_eps, ws_eps_mode=ws_eps_mode))
        ch = width
        if block_index == 0:
          expected_std = 1.0
        expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
    self.final_conv = conv(int(final_conv_mult * ch), 1, 1, 'final_conv')
    self.fc = layers.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01))

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    outputs: dict[str, jax.Array] = {}
    out = x
    for i, conv in enumerate(self.stem):
      out = conv(self.act(out) if i else out)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    for index, block in enumerate(self.blocks):
      out, res_var = block(out, is_training)
      if return_metrics:
        outputs.update(layers.signal_metrics(out, index + 1))
        outputs[f'res_avg_var_{index}'] = res_var
    out = self.act(self.final_conv(out))
    pool = jnp.mean(out.astype(jnp.float32), axis=(1, 2)).astype(out.dtype)
    outputs['pool'] = pool
    pool = layers.dropout(pool, self.drop_rate, is_training)
    outputs['logits'] = self.fc(pool).astype(jnp.float32)
    return outputs


def expected_stds(depths, alpha: float = 0.2) -> list[float]:
  """Expected output std after each block (the analytic signal-propagation curve)."""
  stds, expected_std = [], 1.0
  for depth in depths:
    for block_index in range(depth):
      if block_index == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
      stds.append(expected_std)
  return stds
