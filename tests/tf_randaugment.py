"""The TF oracle of the tests: RandAugment on uint8 images in DeepMind's TF
"autoaugment" convention, against which `nfnet_jax.data.augment` is checked.

Images are uint8 [H, W, 3]. For each of N layers one of the 16 ops in `OP_NAMES`
is drawn uniformly and always applied at magnitude M (0-10 scale, extrapolated
linearly above 10). Magnitude -> argument (`op_args`):

  Rotate 30*M/10 deg, ShearX/Y 0.3*M/10, TranslateX/Y translate_const*M/10 px
  (these five get a random sign), Posterize keeps int(4*M/10) bits ('keep_bits')
  or removes that many ('remove_bits'), Solarize threshold int(256*M/10) taken
  modulo 256 ('wrap', the default: M=10 inverts every pixel, M=15 solarizes at
  128) or capped at 256 ('saturate': identity from M=10),
  SolarizeAdd adds int(110*M/10) below 128, Color/Contrast/Brightness/Sharpness
  blend factor 0.1 + 1.8*M/10, Cutout square of side 2*int(cutout_const*M/10)
  at a uniform random centre; AutoContrast, Equalize, Invert ignore M.

The 'wrap' reading is what DeepMind's TF code did: it compares the uint8 image
with the Python int threshold inside a tf.data graph, and TF converts the int to
uint8 modulo 256. docs/augmentation.md has the details.

The random parts of a policy (op index, sign, Cutout centre per layer) are drawn
by `randaugment_params` and applied by `randaugment_with_params`, so the numbers
`augment.draw_randaugment` drew can drive these ops too.

Geometric ops use `tf.raw_ops.ImageProjectiveTransformV3` (nearest, constant fill
`fill`, default 128). Blends compute degenerate + f * (image - degenerate),
clip to [0, 255] and truncate to uint8.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

from nfnet_jax.data._tf import tf
from nfnet_jax.data.policy import (CONTRAST_MODES, OP_NAMES, POSTERIZE_MODES,  # noqa: F401
                                   SIGNED_OPS, SOLARIZE_MODES, op_args, solarize_threshold)


# --------------------------------------------------------------------------------
# Ops with explicit arguments
# --------------------------------------------------------------------------------

def blend(degenerate, image, factor) -> tf.Tensor:
  """uint8(clip(degenerate + factor * (image - degenerate), 0, 255)), truncating."""
  d = tf.cast(degenerate, tf.float32)
  out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def grayscale(image) -> tf.Tensor:
  """uint8 [H, W, 1]: tf.image.rgb_to_grayscale (0.2989 R + 0.587 G + 0.114 B)."""
  return tf.image.rgb_to_grayscale(image)


def invert(image) -> tf.Tensor:
  return 255 - tf.convert_to_tensor(image)


def solarize(image, threshold, mode: str = 'wrap') -> tf.Tensor:
  """Pixels >= the effective threshold (see `solarize_threshold`) are inverted:
  with 'wrap' a threshold of 256 inverts every pixel, with 'saturate' it is the
  identity."""
  if mode not in SOLARIZE_MODES:
    raise ValueError(f'solarize mode must be one of {SOLARIZE_MODES}, got {mode!r}')
  t = tf.cast(threshold, tf.int32)
  t = tf.math.floormod(t, 256) if mode == 'wrap' else tf.clip_by_value(t, 0, 256)
  return tf.where(tf.cast(image, tf.int32) < t, image, 255 - image)


def solarize_add(image, addition, threshold: int = 128) -> tf.Tensor:
  """Pixels < threshold get `addition` added (clipped to 255)."""
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def posterize(image, bits) -> tf.Tensor:
  """Keeps the top `bits` bits (clamped to 0..8; 0 bits gives black)."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  keep_mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), keep_mask), tf.uint8)


def color(image, factor) -> tf.Tensor:
  return blend(tf.image.grayscale_to_rgb(grayscale(image)), image, factor)


def contrast(image, factor, mode: str = 'tf') -> tf.Tensor:
  """Blend toward a flat grey: 'tf' uses min(H*W/256, 255) (the TF quirk: the
  mean of the grey histogram's counts), 'mean' the mean grey level; both truncated
  to uint8."""
  gray = tf.cast(grayscale(image), tf.float32)
  if mode == 'tf':
    level = tf.cast(tf.size(gray), tf.float32) / 256.0
  elif mode == 'mean':
    level = tf.reduce_mean(gray)
  else:
    raise ValueError(f'contrast mode must be one of {CONTRAST_MODES}, got {mode!r}')
  level = tf.cast(tf.clip_by_value(level, 0.0, 255.0), tf.uint8)
  return blend(tf.fill(tf.shape(image), level), image, factor)


def brightness(image, factor) -> tf.Tensor:
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor) -> tf.Tensor:
  """Blend with a 3x3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13, truncated to uint8)
  of the interior; the 1-pixel border is left as is."""
  image = tf.convert_to_tensor(image)
  x = tf.cast(image, tf.float32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  box = tf.add_n([x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3)])
  smooth = (box + 4.0 * x[1:-1, 1:-1]) / 13.0   # shifted slices: faster than a conv on CPU
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def autocontrast(image) -> tf.Tensor:
  """Per channel, stretch [min, max] to [0, 255] (unchanged where max == min)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.cast(tf.clip_by_value(x * scale + offset, 0.0, 255.0), tf.uint8)


def equalize(image) -> tf.Tensor:
  """Per-channel histogram equalisation (PIL's rule): with h the 256-bin histogram
  and step = (sum(h) - h[last non-zero]) // 255, level v -> min(255,
  (cumsum(h)[v - 1] + step // 2) // step); channels with step == 0 are unchanged.
  All three channels in one bincount/gather."""
  c = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])          # [H, W, 3]
  hist = tf.reshape(tf.math.bincount(tf.reshape(c, [-1]), minlength=768, maxlength=768),
                    [3, 256])
  levels = tf.range(256)
  last = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1)          # [3]
  last_count = tf.gather(hist, last, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255               # [3]
  lut = (tf.cumsum(hist, axis=1) + (step // 2)[:, None]) // tf.maximum(step, 1)[:, None]
  lut = tf.clip_by_value(tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], 1), 0, 255)
  lut = tf.where((step > 0)[:, None], lut, levels[None, :])
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), c), tf.uint8)


def transform(image, matrix, fill: int = 128) -> tf.Tensor:
  """Projective warp: output (x, y) samples input at (a0 x + a1 y + a2,
  b0 x + b1 y + b2) (with a projective divide); nearest; outside -> fill."""
  shape = tf.shape(image)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=shape[:2], fill_value=tf.cast(fill, tf.float32),
      interpolation='NEAREST', fill_mode='CONSTANT')[0]


def rotate(image, degrees, fill: int = 128) -> tf.Tensor:
  """Rotates about the image centre by `degrees` (counter-clockwise on screen)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  a = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(a), tf.sin(a)
  x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]), fill)


def shear_x(image, level, fill: int = 128) -> tf.Tensor:
  """output(x, y) = input(x + level * y, y)."""
  return transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def shear_y(image, level, fill: int = 128) -> tf.Tensor:
  """output(x, y) = input(x, y + level * x)."""
  return transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]), fill)


def translate_x(image, pixels, fill: int = 128) -> tf.Tensor:
  """Moves the content right by `pixels`: output(x, y) = input(x - pixels, y)."""
  return transform(image, tf.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def translate_y(image, pixels, fill: int = 128) -> tf.Tensor:
  """Moves the content down by `pixels`."""
  return transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0]), fill)


def cutout(image, half_size, cy, cx, fill: int = 128) -> tf.Tensor:
  """Fills rows [cy - half, cy + half) x cols [cx - half, cx + half) (clipped)."""
  shape = tf.shape(image)
  ys = tf.range(shape[0])[:, None]
  xs = tf.range(shape[1])[None, :]
  box = (ys >= cy - half_size) & (ys < cy + half_size) & \
        (xs >= cx - half_size) & (xs < cx + half_size)
  return tf.where(box[..., None], tf.cast(fill, image.dtype), image)


# --------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------

def apply_op(image, name: str, magnitude: float, seed=None, *, sign: Optional[float] = None,
             centre: Optional[Tuple[int, int]] = None, contrast_mode: str = 'tf',
             posterize_mode: str = 'keep_bits', solarize_mode: str = 'wrap', fill: int = 128,
             translate_const: float = 100.0, cutout_const: float = 40.0) -> tf.Tensor:
  """Applies op `name` at magnitude M to uint8 [H, W, 3].

  Random parts (the sign of signed ops, the Cutout centre) come from `seed`
  ([2] int, drawn as `randaugment_params` draws one layer) unless given as
  `sign` (+1/-1) / `centre` (cy, cx).
  """
  image = tf.convert_to_tensor(image)
  arg = op_args(name, magnitude, posterize_mode, translate_const, cutout_const)
  if seed is None:
    seed = tf.constant([0, 0], tf.int32)
  if sign is None or centre is None:
    drawn_sign, drawn_centre = _layer_draws(seed, tf.shape(image)[0], tf.shape(image)[1])
    sign = drawn_sign if sign is None else sign
    centre = (drawn_centre[0], drawn_centre[1]) if centre is None else centre
  if name in SIGNED_OPS:
    arg = tf.cast(sign, tf.float32) * arg
  if name == 'AutoContrast':
    return autocontrast(image)
  if name == 'Equalize':
    return equalize(image)
  if name == 'Invert':
    return invert(image)
  if name == 'Rotate':
    return rotate(image, arg, fill)
  if name == 'Posterize':
    return posterize(image, arg)
  if name == 'Solarize':
    return solarize(image, arg, solarize_mode)
  if name == 'SolarizeAdd':
    return solarize_add(image, arg)
  if name == 'Color':
    return color(image, arg)
  if name == 'Contrast':
    return contrast(image, arg, contrast_mode)
  if name == 'Brightness':
    return brightness(image, arg)
  if name == 'Sharpness':
    return sharpness(image, arg)
  if name == 'ShearX':
    return shear_x(image, arg, fill)
  if name == 'ShearY':
    return shear_y(image, arg, fill)
  if name == 'TranslateX':
    return translate_x(image, arg, fill)
  if name == 'TranslateY':
    return translate_y(image, arg, fill)
  if name == 'Cutout':
    return cutout(image, arg, centre[0], centre[1], fill)
  raise ValueError(f'Unknown RandAugment op {name!r}')


def _layer_draws(seed, height, width):
  """(sign float32 +-1, [cy, cx] int32) of one layer from its argument seed [2]."""
  s_sign, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
  cy = tf.random.stateless_uniform([], s_y, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, width, tf.int32)
  return sign, tf.stack([cy, cx])


def randaugment_params(seed, num_layers: int, height, width) -> Dict[str, tf.Tensor]:
  """The random numbers of one image's policy, from its seed ([2] int).

  Returns {ops [N] int32 (index into OP_NAMES), signs [N] float32 (+-1, used by
  the signed ops), centres [N, 2] int32 (Cutout centre (cy, cx))}. Layer i uses
  seed fold_in(seed, i) split into (op seed, argument seed).
  """
  ops, signs, centres = [], [], []
  for i in range(int(num_layers)):
    s_op, s_args = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, i), 2))
    ops.append(tf.random.stateless_uniform([], s_op, 0, len(OP_NAMES), tf.int32))
    sign, centre = _layer_draws(s_args, height, width)
    signs.append(sign)
    centres.append(centre)
  if not ops:
    return dict(ops=tf.zeros([0], tf.int32), signs=tf.zeros([0], tf.float32),
                centres=tf.zeros([0, 2], tf.int32))
  return dict(ops=tf.stack(ops), signs=tf.stack(signs), centres=tf.stack(centres))


def _check_modes(contrast_mode, posterize_mode, solarize_mode):
  for value, allowed, what in ((contrast_mode, CONTRAST_MODES, 'contrast_mode'),
                               (posterize_mode, POSTERIZE_MODES, 'posterize_mode'),
                               (solarize_mode, SOLARIZE_MODES, 'solarize')):
    if value not in allowed:
      raise ValueError(f'randaugment.{what} must be one of {allowed}, got {value!r}')


def randaugment_with_params(image, params: Dict[str, tf.Tensor], magnitude: float = 10.0,
                            contrast_mode: str = 'tf', posterize_mode: str = 'keep_bits',
                            solarize_mode: str = 'wrap', fill: int = 128,
                            translate_const: float = 100.0,
                            cutout_const: float = 40.0) -> tf.Tensor:
  """Applies the layers of `params` (see `randaugment_params`) in order.
  uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment expects uint8 images, got {image.dtype}')
  _check_modes(contrast_mode, posterize_mode, solarize_mode)
  kw = dict(contrast_mode=contrast_mode, posterize_mode=posterize_mode,
            solarize_mode=solarize_mode, fill=fill, translate_const=translate_const,
            cutout_const=cutout_const)
  ops = tf.convert_to_tensor(params['ops'], tf.int32)
  signs = tf.convert_to_tensor(params['signs'], tf.float32)
  centres = tf.convert_to_tensor(params['centres'], tf.int32)

  def layer(i, image):
    sign, centre = signs[i], (centres[i, 0], centres[i, 1])
    branches = [(lambda name=name: apply_op(image, name, magnitude, sign=sign,
                                            centre=centre, **kw))
                for name in OP_NAMES]
    out = tf.switch_case(ops[i], branches)
    out.set_shape(image.shape)
    return i + 1, out

  # A while loop traces the 16 branches once instead of once per layer.
  _, image = tf.while_loop(lambda i, _: i < tf.shape(ops)[0], layer,
                           [tf.constant(0), image])
  return image


def randaugment(image, seed, num_layers: int = 2, magnitude: float = 10.0,
                contrast_mode: str = 'tf', posterize_mode: str = 'keep_bits',
                solarize_mode: str = 'wrap', fill: int = 128,
                translate_const: float = 100.0, cutout_const: float = 40.0) -> tf.Tensor:
  """N layers of one uniformly drawn op each. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment expects uint8 images, got {image.dtype}')
  params = randaugment_params(seed, num_layers, tf.shape(image)[0], tf.shape(image)[1])
  return randaugment_with_params(image, params, magnitude, contrast_mode, posterize_mode,
                                 solarize_mode, fill, translate_const, cutout_const)
