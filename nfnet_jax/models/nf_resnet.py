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

from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnet_jax import layers

_WIDTHS = [256, 512, 1024, 2048]
_STEM_WIDTH = 64
_STRIDES = [1, 2, 2, 2]

# variant -> depths per stage. No official dropout for NF-ResNets (DESIGN.md): 0 unless
# the caller sets one. Train/test resolution 224 (DeepMind's ImageNet config).
_DEPTHS = {
    '26': [2, 2, 2, 2],
    '50': [3, 4, 6, 3],
    '101': [3, 4, 23, 3],
    '152': [3, 8, 36, 3],
    '200': [3, 24, 36, 3],
    '288': [24, 24, 24, 24],
    '600': [50, 50, 50, 50],
}

VARIANTS: dict[str, dict[str, Any]] = {
    name: dict(depth=depth, width=list(_WIDTHS), train_imsize=224, test_imsize=224,
               drop_rate=0.0)
    for name, depth in _DEPTHS.items()
}


class NFResBlock(hk.Module):
  """Normalizer-Free pre-activation bottleneck block (bottleneck ratio 0.25).

  out = act(x) * beta; shortcut = strided 1x1 WS conv of `out` when the stride or the
  width changes, else x; residual 1x1 -> act -> 3x3 (stride) -> act -> 1x1, optional SE
  (gate x2), stochastic depth, skip gain (init 0); returns residual * alpha + shortcut.

  x [N, H, W, in_ch] -> ([N, H/stride, W/stride, out_ch], residual-branch variance).
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, bottleneck_ratio: float = 0.25, use_se: bool = False,
               se_ratio: float = 0.25, stochdepth_rate: float = 0.0, act: Any = None,
               ws_eps: float = 1e-4, ws_eps_mode: str = 'max',
               name: Optional[str] = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.width = int(out_ch * bottleneck_ratio)
    self.use_se, self.se_ratio = use_se, se_ratio
    self.stochdepth_rate = stochdepth_rate
    self.act = act
    self.use_projection = stride > 1 or in_ch != out_ch
    # Submodules are built in __init__ so Haiku names them `nf_res_block/~/conv0` etc.
    # (modules made in __call__ lose the `~`), as DeepMind's code does.
    conv = lambda ch, k, name, stride=1: layers.WSConv2D(
        ch, k, stride=stride, eps=ws_eps, eps_mode=ws_eps_mode, name=name)
    self.conv0 = conv(self.width, 1, 'conv0')
    self.conv1 = conv(self.width, 3, 'conv1', stride)
    self.conv2 = conv(out_ch, 1, 'conv2')
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, 'conv_shortcut', stride)
    if use_se:
      self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.act(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv2(self.act(out))
    if self.use_se:
      out = out * (2 * self.se(out))
    res_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
    out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_var


class NFResNet(hk.Module):
  """Normalizer-Free pre-activation ResNet, variants '26', '50', ..., '600'.

  Call with images [N, H, W, 3] (NHWC, normalised floats). The images' dtype sets the
  compute dtype (parameters stay float32) unless `dtype` is given, in which case images
  are cast to it. Returns a dict with `logits` [N, num_classes] (float32) and `pool`
  [N, 2048 * width]; with `return_metrics=True` also `avg_sq_mean_i`, `avg_var_i` (i = 0
  is the stem output after max-pooling, i = k the output of block k-1) and
  `res_avg_var_k` (the residual branch of block k before the skip gain).
  """

  def __init__(self, num_classes: int, variant: str = '50', width: float = 1.0,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25,
               bottleneck_ratio: float = 0.25, dtype: Any = None, ws_eps: float = 1e-4,
               ws_eps_mode: str = 'max', name: str = 'NF_ResNet'):
    super().__init__(name=name)
    if variant not in VARIANTS:
      raise ValueError(f'Unknown NF-ResNet variant {variant!r}; valid: {list(VARIANTS)}')
    self.num_classes = num_classes
    self.variant = variant
    params = VARIANTS[variant]
    self.train_imsize, self.test_imsize = params['train_imsize'], params['test_imsize']
    self.widths = [int(w * width) for w in params['width']]
    self.stem_width = int(_STEM_WIDTH * width)
    self.depths = params['depth']
    self.drop_rate = params['drop_rate'] if drop_rate is None else drop_rate
    self.alpha = alpha
    self.stochdepth_rate = stochdepth_rate
    self.act = layers.activation(activation)
    self.use_se, self.se_ratio = use_se, se_ratio
    self.dtype = dtype
    # Stem: 7x7 stride-2 WS conv (then a 3x3 stride-2 max-pool in __call__).
    self.initial_conv = layers.WSConv2D(self.stem_width, 7, stride=2, eps=ws_eps,
                                        eps_mode=ws_eps_mode, name='initial_conv')
    self.blocks = []
    ch = self.stem_width
    num_blocks = sum(self.depths)
    expected_std = 1.0
    for width, depth, stride in zip(self.widths, self.depths, _STRIDES):
      for block_index in range(depth):
        self.blocks.append(NFResBlock(
            ch, width, stride=stride if block_index == 0 else 1,
            beta=1.0 / expected_std, alpha=alpha, bottleneck_ratio=bottleneck_ratio,
            use_se=use_se, se_ratio=se_ratio,
            stochdepth_rate=stochdepth_rate * len(self.blocks) / num_blocks,
            act=self.act, ws_eps=ws_eps, ws_eps_mode=ws_eps_mode))
        ch = width
        # Reset the expected std after a transition block, still giving it one growth.
        if block_index == 0:
          expected_std = 1.0
        expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
    # Head: act, global mean pool, dropout, linear N(0, 0.01).
    self.fc = layers.Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01))

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    outputs: dict[str, jax.Array] = {}
    out = self.initial_conv(x)
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding='SAME')
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    for index, block in enumerate(self.blocks):
      out, res_var = block(out, is_training)
      if return_metrics:
        outputs.update(layers.signal_metrics(out, index + 1))
        outputs[f'res_avg_var_{index}'] = res_var
    out = self.act(out)
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
