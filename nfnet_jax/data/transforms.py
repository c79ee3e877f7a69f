"""Per-image TF transforms: decode+crop, flip, resize, eval crop, normalisation.

Images are HWC, RGB. Decoders give uint8 [h, w, 3]; `tf.image.resize(bicubic)`
gives float32 [S, S, 3] on the 0-255 scale, not clamped (bicubic overshoots).
All randomness is stateless: every function takes a `seed` tensor of shape [2].
"""
from __future__ import annotations

from typing import Sequence, Tuple

from nfnet_jax.data._tf import tf

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def fold_in(seed, *data) -> tf.Tensor:
  """Derives a new [2] int32 stateless seed from `seed` and integers `data`."""
  seed = tf.cast(seed, tf.int64)
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return tf.cast(seed, tf.int32)


def image_shape(data, raw: bool) -> tf.Tensor:
  """[h, w] int32 of encoded bytes (JPEG header only, else full decode) or pixels."""
  if raw:
    return tf.shape(data)[:2]
  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.image.extract_jpeg_shape(data)[:2],
                 lambda: tf.shape(decode(data))[:2])


def decode(data) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [h, w, 3]."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def inception_crop(data, seed, raw: bool = False,
                   area_range: Sequence[float] = (0.08, 1.0),
                   aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
                   min_object_covered: float = 0.1, max_attempts: int = 10) -> tf.Tensor:
  """Random area/aspect crop -> uint8 [h', w', 3]; decodes only the crop of a JPEG.

  The window comes from `tf.image.stateless_sample_distorted_bounding_box` with
  the whole image as the object box; if no window is found in `max_attempts`,
  the whole image is used.
  """
  shape = image_shape(data, raw)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=min_object_covered, aspect_ratio_range=list(aspect_ratio_range),
      area_range=list(area_range), max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  if raw:
    return tf.slice(data, begin, size)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])

  def jpeg():
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3,
                                          try_recover_truncated=True)
    image.set_shape([None, None, 3])
    return image
  return tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.slice(decode(data), begin, size))


def resize(image, size: int) -> tf.Tensor:
  """Bicubic resize (no antialiasing, no clamping) -> float32 [size, size, 3]."""
  return tf.image.resize(tf.cast(image, tf.float32), [size, size], method='bicubic')


def pad_crop(image, seed, padding: int) -> tf.Tensor:
  """Zero-pad by `padding` on each side, random crop back to the input size."""
  shape = tf.shape(image)
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed)


def flip(image, seed) -> tf.Tensor:
  return tf.image.stateless_random_flip_left_right(image, seed)


def eval_image(data, size: int, margin: int = 32, raw: bool = False) -> tf.Tensor:
  """Squash to (size+margin)^2 (bicubic), centre crop size -> float32 [size, size, 3]."""
  image = data if raw else decode(data)
  image = resize(image, size + margin)
  off = margin // 2
  return image[off:off + size, off:off + size]


def normalize(image) -> tf.Tensor:
  """0-255 float/uint8 [..., 3] -> (x - mean) / std, float32."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def to_uint8(image) -> tf.Tensor:
  """Clip to [0, 255] and cast (truncating) to uint8."""
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
