"""MixUp and CutMix on a pair of images (TF, stateless).

The pipeline batches 2B decoded images and emits B: output row j mixes input
rows 2j and 2j+1. With both methods on, the first half of the global batch is
MixUp (ratio ~ Beta(alpha, alpha), drawn per example), the second half CutMix
(kept-area ratio ~ U(0, 1); a box of side sqrt(1 - ratio) * size at a uniform
random centre, clipped to the image; the label weight is the mean of the actual
mask, so label mass equals pixel-area share).

`mix_params` draws the random numbers of one output row (MixUp ratio, CutMix box)
and `mix_with_params` applies them; `device_augment` applies the same numbers in
JAX. With `mix.pairing='within_batch'` the pipeline pairs rows (2i, 2i+1) of a
batch of B decoded images and emits both orders (2i mixes in 2i+1 and vice versa).
"""
from __future__ import annotations

from typing import Tuple

from nfnet_jax.data._tf import tf

MIXUP, CUTMIX = 0, 1


def sample_beta(seed, alpha: float) -> tf.Tensor:
  """Scalar Beta(alpha, alpha) as G1 / (G1 + G2); 0.5 if both gammas underflow."""
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  g1 = tf.random.stateless_gamma([], s1, alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha)
  total = g1 + g2
  return tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)


def mixup(a, b, la, lb, ratio) -> Tuple[tf.Tensor, tf.Tensor]:
  """ratio * a + (1 - ratio) * b for images [H,W,3] float and labels [K]."""
  return ratio * a + (1 - ratio) * b, ratio * la + (1 - ratio) * lb


def cutmix_mask(height, width, ratio, cy, cx) -> tf.Tensor:
  """[H, W] float32, 1 inside the box taken from the second image.

  Box side sqrt(1 - ratio) * (H, W) centred at (cy, cx) (pixels, float); corners
  rounded half-to-even then clipped to the image (same as `offline.cutmix_box`).
  """
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  cut = tf.sqrt(1.0 - ratio)
  y0 = tf.clip_by_value(tf.round(cy - cut * h / 2), 0, h)
  y1 = tf.clip_by_value(tf.round(cy + cut * h / 2), 0, h)
  x0 = tf.clip_by_value(tf.round(cx - cut * w / 2), 0, w)
  x1 = tf.clip_by_value(tf.round(cx + cut * w / 2), 0, w)
  ys = tf.range(h)[:, None]
  xs = tf.range(w)[None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return tf.cast(inside, tf.float32)


def cutmix(a, b, la, lb, mask) -> Tuple[tf.Tensor, tf.Tensor]:
  """Pastes b where mask == 1; label weight of b = mean(mask)."""
  weight_b = tf.reduce_mean(mask)
  image = a * (1 - mask[..., None]) + b * mask[..., None]
  return image, (1 - weight_b) * la + weight_b * lb


def cutmix_box(height, width, ratio, cy, cx) -> tf.Tensor:
  """[4] int32 (y0, y1, x0, x1): the box of `cutmix_mask` (rows y0..y1-1, cols
  x0..x1-1 come from the second image)."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  cut = tf.sqrt(1.0 - ratio)
  y0 = tf.clip_by_value(tf.round(cy - cut * h / 2), 0, h)
  y1 = tf.clip_by_value(tf.round(cy + cut * h / 2), 0, h)
  x0 = tf.clip_by_value(tf.round(cx - cut * w / 2), 0, w)
  x1 = tf.clip_by_value(tf.round(cx + cut * w / 2), 0, w)
  return tf.cast(tf.stack([y0, y1, x0, x1]), tf.int32)


def mix_params(mode, seed, alpha: float, height, width) -> Tuple[tf.Tensor, tf.Tensor]:
  """(ratio float32, box [4] int32) of one output row; mode MIXUP|CUTMIX.

  MixUp: ratio ~ Beta(alpha, alpha) (1.0 when alpha is 0), the weight of the
  first image; box all zeros. CutMix: box of `cutmix_box` for a kept-area ratio
  ~ U(0, 1) at a uniform random centre, and ratio = the box's share of the image
  (the mean of the mask: the label weight of the second image).
  """
  s_beta, s_ratio, s_centre = tf.unstack(tf.random.experimental.stateless_split(seed, 3))

  def mixup_params():
    ratio = sample_beta(s_beta, alpha) if alpha > 0 else tf.constant(1.0)
    return ratio, tf.zeros([4], tf.int32)

  def cutmix_params():
    kept = tf.random.stateless_uniform([], s_ratio)
    centre = tf.random.stateless_uniform([2], s_centre)
    cy = centre[0] * tf.cast(height, tf.float32)
    cx = centre[1] * tf.cast(width, tf.float32)
    box = cutmix_box(height, width, kept, cy, cx)
    return tf.reduce_mean(_box_mask(height, width, box)), box

  return tf.cond(tf.equal(mode, MIXUP), mixup_params, cutmix_params)


def _box_mask(height, width, box) -> tf.Tensor:
  """[H, W] float32, 1 on rows [y0, y1) x cols [x0, x1)."""
  ys = tf.range(height)[:, None]
  xs = tf.range(width)[None, :]
  inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
  return tf.cast(inside, tf.float32)


def mix_with_params(a, b, la, lb, mode, ratio, box) -> Tuple[tf.Tensor, tf.Tensor]:
  """Mixes float [H, W, 3] images a, b and labels [K] with `mix_params`' numbers."""
  def do_mixup():
    return mixup(a, b, la, lb, ratio)

  def do_cutmix():
    shape = tf.shape(a)
    return cutmix(a, b, la, lb, _box_mask(shape[0], shape[1], box))

  return tf.cond(tf.equal(mode, MIXUP), do_mixup, do_cutmix)


def mix_pair(images, labels, mode, seed, alpha: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """images [2, H, W, 3] float32, labels [2, K], mode MIXUP|CUTMIX (int32 scalar).

  Returns (image [H, W, 3], label [K]).
  """
  shape = tf.shape(images)
  ratio, box = mix_params(mode, seed, alpha, shape[1], shape[2])
  return mix_with_params(images[0], images[1], labels[0], labels[1], mode, ratio, box)
