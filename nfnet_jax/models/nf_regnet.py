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

from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers

# variant -> stage widths (before the 0.75 multiplier), depths, train/test resolution,
# dropout before the classifier (DESIGN.md; identical to DeepMind's base.py).
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


class NFBlock(hk.Module):
  """Normalizer-Free RegNet block (inverted bottleneck with grouped 3x3 conv and SE).

  out = act(x) * beta; shortcut = 2x2 avg-pool then 1x1 WS conv of `out` when strided,
  a 1x1 WS conv of `out` when only the width changes, else x; residual: 1x1 to the
  expanded width (int(in_ch * expansion) rounded down to a multiple of `group_size`)
  -> act -> grouped 3x3 (stride) -> SE (hidden = se_ratio * expanded width, gate x2)
  -> act -> 1x1 to out_ch; stochastic depth; skip gain (init 0); residual * alpha +
  shortcut.

  x [N, H, W, in_ch] -> ([N, H/stride, W/stride, out_ch], residual-branch variance).
  """

  def __init__(self, in_ch: int, out_ch: int, *, expansion: float = 2.25,
               se_ratio: float = 0.5, group_size: int = 8, stride: int = 1,
               beta: float = 1.0, alpha: float = 0.2, stochdepth_rate: float = 0.0,
               act: Any = None, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               name: Optional[str] = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    groups = int(in_ch * expansion) // group_size
    if groups < 1:
      raise ValueError(f'Expanded width {in_ch * expansion} is below the group width '
                       f'{group_size}')
    self.groups = groups
    self.width = group_size * groups
    self.se_ratio = se_ratio
    self.stochdepth_rate = stochdepth_rate
    self.act = act
    self.use_projection = stride > 1 or in_ch != out_ch
    # Submodules are built in __init__ so Haiku names them `nf_block/~/conv0` etc.
    # (modules made in __call__ lose the `~`), as DeepMind's code does.
    conv = lambda ch, k, name, stride=1, groups=1: layers.WSConv2D(
        ch, k, stride=stride, feature_group_count=groups, eps=ws_eps,
        eps_mode=ws_eps_mode, name=name)
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride, groups)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut')
    self.se = layers.SqueezeExcite(self.width, self.width, se_ratio)
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
    out = out * (2 * self.se(out))
    out = self.conv2(self.act(out))
    res_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
    out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_var


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet, variants B0..B8.

  Call with images [N, H, W, 3] (NHWC, normalised floats). The images' dtype sets the
  compute dtype (parameters stay float32) unless `dtype` is given, in which case images
  are cast to it. Returns a dict with `logits` [N, num_classes] (float32) and `pool`
  [N, final_conv channels]; with `return_metrics=True` also `avg_sq_mean_i`, `avg_var_i`
  (i = 0 is the stem output, i = k the output of block k-1) and `res_avg_var_k` (the
  residual branch of block k before the skip gain).
  """

  def __init__(self, num_classes: int, variant: str = 'B0', width: float = 0.75,
               expansion: float = 2.25, group_size: int = 8, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'silu',
               dtype: Any = None, ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               name: str = 'NF_RegNet'):
    super().__init__(name=name)
    if variant not in VARIANTS:
      raise ValueError(f'Unknown NF-RegNet variant {variant!r}; valid: {list(VARIANTS)}')
    self.num_classes = num_classes
    self.variant = variant
    params = VARIANTS[variant]
    self.train_imsize, self.test_imsize = params['train_imsize'], params['test_imsize']
    self.widths = [int(w * width) for w in params['width']]
    self.stem_width = int(params['width'][0] * width)
    self.depths = params['depth']
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.alpha = alpha
    self.stochdepth_rate = stochdepth_rate
    self.act = layers.activation(activation)
    self.dtype = dtype
    # Stem: one 3x3 stride-2 WS conv.
    self.initial_conv = layers.WSConv2D(self.stem_width, 3, stride=2, eps=ws_eps,
                                        eps_mode=ws_eps_mode, name='initial_conv')
    self.blocks = []
    ch = self.stem_width
    num_blocks = sum(self.depths)
    expected_std = 1.0
    for width, depth in zip(self.widths, self.depths):
      for block_index in range(depth):
        index = len(self.blocks)
        self.blocks.append(NFBlock(
            ch, width, expansion=1.0 if index == 0 else expansion, se_ratio=se_ratio,
            group_size=group_size, stride=2 if block_index == 0 else 1,
            beta=1.0 / expected_std, alpha=alpha,
            stochdepth_rate=stochdepth_rate * index / num_blocks, act=self.act,
            ws_eps=ws_eps, ws_eps_mode=ws_eps_mode))
        ch = width
        # Reset the expected std after a transition block, still giving it one growth.
        if block_index == 0:
          expected_std = 1.0
        expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
    # Head (EfficientNet-like): 1x1 conv to 1280 * ch // 440, act, mean pool, dropout,
    # zero-initialised linear classifier.
    self.final_conv = layers.WSConv2D(int(1280 * ch // 440), 1, eps=ws_eps,
                                      eps_mode=ws_eps_mode, name='final_conv')
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros)

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    outputs: dict[str, jax.Array] = {}
    out = self.initial_conv(x)
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
