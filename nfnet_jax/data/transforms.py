"""Per-image TF transforms: decode+crop, flip, resize, eval crops, normalisation.

Images are HWC, RGB. Decoders give uint8 [h, w, 3]; `tf.image.resize(bicubic)`
gives float32 [S, S, 3] on the 0-255 scale, not clamped (bicubic overshoots).
All randomness is stateless: every function takes a `seed` tensor of shape [2].
"""
from __future__ import annotations

from typing import Optional, Sequence

from nfnet_jax.data._tf import tf
from nfnet_jax.data.config import eval_resize_side
from nfnet_jax.data.normalize import MEAN_RGB, STDDEV_RGB


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


def center_window(shape, size: int, resized: int) -> tf.Tensor:
  """[4] int32 (y, x, h, w): the centred square that keeps the share size / resized
  of the short side, i.e. side int(min(h, w) / resized * size) (at least 1), offset
  ((h - side + 1) // 2, (w - side + 1) // 2). `resized` = size + 32 is DeepMind's
  crop_resize window."""
  h, w = shape[0], shape[1]
  scale = tf.minimum(tf.cast(h, tf.float32), tf.cast(w, tf.float32)) / float(resized)
  side = tf.maximum(tf.cast(scale * float(size), tf.int32), 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def crop_window(data, window, raw: bool = False) -> tf.Tensor:
  """uint8 [h', w', 3] of `window` (y, x, h, w); JPEG bytes decode only the window."""
  begin, size = tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3])
  if raw:
    return tf.slice(data, begin, size)

  def jpeg():
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    image.set_shape([None, None, 3])
    return image
  return tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.slice(decode(data), begin, size))


def inception_crop(data, seed, raw: bool = False,
                   area_range: Sequence[float] = (0.08, 1.0),
                   aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
                   min_object_covered: float = 0.1, max_attempts: int = 10,
                   size: int = 224, resized: Optional[int] = None) -> tf.Tensor:
  """Random area/aspect crop -> uint8 [h', w', 3]; decodes only the crop of a JPEG.

  The window comes from `tf.image.stateless_sample_distorted_bounding_box` with
  the whole image as the object box. When the sampler gives up after
  `max_attempts` it returns the whole image; that window is replaced by the eval
  centre crop at the train resolution `size` (`center_window(shape, size,
  resized)`; default `resized`: `config.eval_resize_side(size)`, size + 32 from
  192 px up), as DeepMind's pipeline does.
  """
  resized = eval_resize_side(size) if resized is None else resized
  shape = image_shape(data, raw)
  begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=min_object_covered, aspect_ratio_range=list(aspect_ratio_range),
      area_range=list(area_range), max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], box[0], box[1]])
  gave_up = tf.reduce_all(tf.equal(box[:2], shape))
  window = tf.where(gave_up, center_window(shape, size, resized), window)
  return crop_window(data, window, raw)


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


def eval_image(data, size: int, resized: int, raw: bool = False,
               crop: str = 'squash') -> tf.Tensor:
  """The eval transform -> float32 [size, size, 3] (0-255 scale, unclamped).

  'squash': bicubic resize of the whole image to resized x resized (aspect ratio
  not kept), then the size x size window at offset (resized - size + 1) // 2
  (resized == size: the whole image, no crop). 'center_crop': the
  aspect-preserving centre square of side min(h, w) * size / resized
  (`center_window`), bicubic resize to size. `resized` comes from
  `config.eval_resize_side`.
  """
  if resized < size:
    raise ValueError(f'eval resize side {resized} is smaller than the crop {size}')
  if crop == 'center_crop':
    window = center_window(image_shape(data, raw), size, resized)
    return resize(crop_window(data, window, raw), size)
  if crop != 'squash':
    raise ValueError(f"eval crop must be 'squash' or 'center_crop', got {crop!r}")
  image = data if raw else decode(data)
  image = resize(image, resized)
  off = (resized - size + 1) // 2
  return image[off:off + size, off:off + size]


def normalize(image) -> tf.Tensor:
  """0-255 float/uint8 [..., 3] -> (x - mean) / std, float32."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def to_uint8(image) -> tf.Tensor:
  """Clip to [0, 255] and cast (truncating) to uint8."""
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
