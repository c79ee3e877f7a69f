"""Frozen copy of the former `nfnet_jax/data/device_augment.py` (all 16 ops per layer
under `lax.switch` in `vmap`), kept only so that `input_pipeline.py` can time it
beside `nfnet_jax.data.augment` in one run. Not used by the package.

Its original docstring follows.

MixUp/CutMix, RandAugment and normalisation in JAX, from the host's random numbers.

No TensorFlow. With `data.augment_on='device'` the input pipeline decodes, crops,
flips and resizes, quantises to uint8 and emits, per output row, the random
numbers that the host path would have used (`PARAM_KEYS`, drawn from (seed, step,
global row) exactly as there). `apply_device_augment(batch, cfg)` then runs the
remaining stages on the accelerator; it is jittable and works row by row, so each
device of a sharded step can apply it to its own rows.

Batch from the pipeline (local rows B, m = 2 for the paper's pairing with mixing,
else 1; S the train size, K classes):

  images      uint8   [B, m, S, S, 3]   decoded inputs of each output row
  labels      float32 [B, m, K]         their one-hot labels
  mix_mode    int32   [B]               0 MixUp, 1 CutMix, -1 no mixing
  mix_ratio   float32 [B]               MixUp: weight of the first image;
                                        CutMix: the box's share of the image
  mix_box     int32   [B, 4]            CutMix box (y0, y1, x0, x1), rows/cols
                                        [y0, y1) x [x0, x1) from the second image
  ra_ops      int32   [B, N]            RandAugment op per layer (policy.OP_NAMES)
  ra_signs    float32 [B, N]            +-1, sign of the signed ops
  ra_centres  int32   [B, N, 2]         Cutout centre (cy, cx)
  mask        float32 [B]

With `mix.pairing='within_batch'` m = 1 and output row i mixes row i with row
i ^ 1 (rows 2j and 2j+1 swap partners), so B must be even.

Every op reproduces the TF op of `randaugment` (see docs/augmentation.md for
where they agree bit for bit and where within one grey level). XLA contracts a
float multiply feeding an add into one fused multiply-add, whose single rounding
differs from TF's two; `mul_int` and static tables keep TF's roundings.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The numpy source maps of the geometric ops are the same arithmetic in both.
from nfnet_jax.data.augment import affine_matrix, source_index
from nfnet_jax.data.config import check_augment_config, mix_on
from nfnet_jax.data.policy import OP_NAMES, op_args, solarize_threshold

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
PARAM_KEYS = ('mix_mode', 'mix_ratio', 'mix_box', 'ra_ops', 'ra_signs', 'ra_centres')
MIXUP, CUTMIX = 0, 1
_F32 = jnp.float32


def mul_int(r, k) -> jax.Array:
  """float32(r * k), rounded once to nearest-even, for float32 r >= 0 and integer
  |k| <= 255 (shapes broadcast).

  Computed with integer arithmetic: XLA fuses a float multiply that feeds an add
  into one FMA, whose single rounding differs from TF's separate multiply and add
  (and so can move a blend across an integer, i.e. one grey level). Products too
  small to be normal floats are rounded twice (irrelevant at 0-255 scale).
  """
  r = jnp.asarray(r, _F32)
  k = jnp.asarray(k, jnp.int32)
  bits = jax.lax.bitcast_convert_type(r, jnp.uint32)
  exp = (bits >> 23) & 0xFF
  mant = jnp.where(exp > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
  exp = jnp.maximum(exp, 1).astype(jnp.int32)
  p = mant * jnp.abs(k).astype(jnp.uint32)              # exact: < 2^24 * 2^8
  length = 32 - jax.lax.clz(p).astype(jnp.int32)
  shift = jnp.maximum(length - 24, 0)
  ushift = shift.astype(jnp.uint32)
  q = p >> ushift
  rem = p & ((jnp.uint32(1) << ushift) - 1)
  half = (jnp.uint32(1) << ushift) >> 1
  up = (shift > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
  q = q + up.astype(jnp.uint32)
  carry = (q >> 24).astype(jnp.int32)                    # q rounded up to 2^24
  q = q >> carry.astype(jnp.uint32)
  e = shift + carry + exp - 150                          # value = q * 2^e, q < 2^24
  # q * 2^e in two exact steps, so no factor is subnormal (XLA flushes those to 0).
  lo = e < -100
  pow2_a = jax.lax.bitcast_convert_type(
      (jnp.where(lo, e + 100, e) + 127).astype(jnp.uint32) << 23, _F32)
  pow2_b = jnp.where(lo, np.float32(2.0 ** -100), np.float32(1.0))
  value = (q.astype(_F32) * pow2_a) * pow2_b
  return jnp.where(k < 0, -value, value)


def to_uint8(x: jax.Array) -> jax.Array:
  """Clip to [0, 255] and truncate to uint8. (The explicit floor matters: fused
  into a reduction, XLA:CPU's float -> uint8 convert can round to nearest.)"""
  return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


# --------------------------------------------------------------------------------
# RandAugment ops on one uint8 image [H, W, 3]
# --------------------------------------------------------------------------------

def blend(degenerate, image, factor: float) -> jax.Array:
  """uint8(clip(degenerate + factor * (image - degenerate), 0, 255)), truncating."""
  diff = image.astype(jnp.int32) - degenerate.astype(jnp.int32)
  return to_uint8(degenerate.astype(_F32) + mul_int(np.float32(factor), diff))


@functools.lru_cache(maxsize=1)
def _gray_tables() -> np.ndarray:
  """float32 [3, 256]: level v of channel c -> float32(float32(v / 255) * weight_c),
  the two roundings of tf.image.rgb_to_grayscale."""
  v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
  return v[None, :] * np.array([0.2989, 0.5870, 0.1140], np.float32)[:, None]


def grayscale(image) -> jax.Array:
  """uint8 [H, W, 1] as tf.image.rgb_to_grayscale: ((r' + g') + b') * 255.5
  truncated, with c' the per-channel terms of `_gray_tables`."""
  t = jnp.asarray(_gray_tables())
  x = image.astype(jnp.int32)
  gray = (t[0][x[..., 0]] + t[1][x[..., 1]]) + t[2][x[..., 2]]
  return to_uint8(gray * np.float32(255.5))[..., None]


def invert(image) -> jax.Array:
  return 255 - image


def solarize(image, threshold: int, mode: str = 'wrap') -> jax.Array:
  t = solarize_threshold(threshold, mode)
  return jnp.where(image.astype(jnp.int32) < t, image, 255 - image)


def solarize_add(image, addition: int, threshold: int = 128) -> jax.Array:
  added = jnp.clip(image.astype(jnp.int32) + addition, 0, 255).astype(jnp.uint8)
  return jnp.where(image.astype(jnp.int32) < threshold, added, image)


def posterize(image, bits: int) -> jax.Array:
  bits = min(max(int(bits), 0), 8)
  return image & np.uint8((256 - (1 << (8 - bits))) & 0xFF)


def color(image, factor: float) -> jax.Array:
  return blend(jnp.broadcast_to(grayscale(image), image.shape), image, factor)


def contrast(image, factor: float, mode: str = 'tf') -> jax.Array:
  """Blend toward a flat grey: min(H*W/256, 255) ('tf') or the mean grey ('mean')."""
  if mode == 'tf':
    level = np.float32(image.shape[0] * image.shape[1] / 256.0)
    level = to_uint8(level)
  elif mode == 'mean':
    # The truncated mean as an integer quotient (TF's float mean truncates to the
    # same level while the sum is exact, H W 255 < 2^24).
    total = jnp.sum(grayscale(image).astype(jnp.int32))
    level = jnp.minimum(total // (image.shape[0] * image.shape[1]), 255).astype(jnp.uint8)
  else:
    raise ValueError(f"contrast mode must be 'tf' or 'mean', got {mode!r}")
  return blend(jnp.broadcast_to(level, image.shape), image, factor)


def brightness(image, factor: float) -> jax.Array:
  return blend(jnp.zeros_like(image), image, factor)


def sharpness(image, factor: float) -> jax.Array:
  """Blend with the 3x3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13, truncated) of
  the interior; the 1-pixel border is kept."""
  x = image.astype(_F32)
  h, w = image.shape[:2]
  box = sum(x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  # Integer division: the truncated float quotient of these integers is the
  # same, and XLA:CPU's float division (a reciprocal multiply) is not.
  smooth = ((box + 4.0 * x[1:-1, 1:-1]).astype(jnp.int32) // 13).astype(jnp.uint8)
  degenerate = image.at[1:-1, 1:-1].set(smooth)
  return blend(degenerate, image, factor)


def autocontrast(image) -> jax.Array:
  """Per channel, stretch [min, max] to [0, 255] (unchanged where max == min)."""
  x = image.astype(jnp.int32)
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  scale = jnp.asarray(_SCALES)[hi - lo]                  # 255 / (hi - lo); 1 if equal
  offset = jnp.where(hi > lo, -mul_int(scale, lo), 0.0)
  return to_uint8(mul_int(scale, x) + offset)


# float32(255 / d) for d = 1..255 (index 0: 1.0), as TF divides.
_SCALES = np.concatenate([[np.float32(1)], np.float32(255) / np.arange(1, 256, dtype=np.float32)])


def equalize(image) -> jax.Array:
  """Per-channel histogram equalisation with PIL's rule (as `randaugment.equalize`)."""
  c = image.astype(jnp.int32) + jnp.array([0, 256, 512], jnp.int32)
  hist = jnp.bincount(c.reshape(-1), length=768).reshape(3, 256)
  levels = jnp.arange(256)
  last = jnp.max(jnp.where(hist > 0, levels, -1), axis=1)
  last_count = jnp.take_along_axis(hist, last[:, None], axis=1)[:, 0]
  step = (hist.sum(axis=1) - last_count) // 255
  lut = (jnp.cumsum(hist, axis=1) + (step // 2)[:, None]) // jnp.maximum(step, 1)[:, None]
  lut = jnp.clip(jnp.concatenate([jnp.zeros([3, 1], lut.dtype), lut[:, :-1]], 1), 0, 255)
  lut = jnp.where((step > 0)[:, None], lut, levels[None, :])
  return lut.reshape(-1)[c].astype(jnp.uint8)


def cutout(image, half_size: int, cy, cx, fill: int = 128) -> jax.Array:
  """Fills rows [cy - half, cy + half) x cols [cx - half, cx + half) (clipped)."""
  ys = jnp.arange(image.shape[0])[:, None]
  xs = jnp.arange(image.shape[1])[None, :]
  box = (ys >= cy - half_size) & (ys < cy + half_size) & \
        (xs >= cx - half_size) & (xs < cx + half_size)
  return jnp.where(box[..., None], jnp.uint8(fill), image)


# Geometric ops: the magnitude is static, so for each sign the source pixel of
# every output pixel is computed once, in numpy float32 with the arithmetic of
# TF's ImageProjectiveTransformV3 kernel (nearest = round half away from zero),
# and the device only gathers.

def _signed_maps(name: str, arg: float, height: int, width: int) -> np.ndarray:
  """int32 [2, H * W]: `source_index` for sign -1 (row 0) and +1 (row 1)."""
  return np.stack([source_index(height, width, affine_matrix(name, s * np.float32(arg),
                                                             height, width))
                   for s in (-1.0, 1.0)])


def warp(image, index, fill: int = 128) -> jax.Array:
  """Gathers image pixels by flat `index` [H * W] (H * W = fill)."""
  h, w, c = image.shape
  flat = jnp.concatenate([image.reshape(h * w, c), jnp.full([1, c], fill, image.dtype)])
  return flat[index].reshape(h, w, c)


def geometric(image, name: str, arg: float, sign, fill: int = 128) -> jax.Array:
  maps = jnp.asarray(_signed_maps(name, float(arg), image.shape[0], image.shape[1]))
  return warp(image, jnp.where(sign > 0, maps[1], maps[0]), fill)


# --------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------

def apply_op(image, name: str, magnitude: float, sign=1.0, centre=(0, 0), *,
             contrast_mode: str = 'tf', posterize_mode: str = 'keep_bits',
             solarize_mode: str = 'wrap', fill: int = 128, translate_const: float = 100.0,
             cutout_const: float = 40.0) -> jax.Array:
  """Op `name` at static magnitude M on uint8 [H, W, 3]; `sign` (+-1) and
  `centre` (cy, cx) may be traced."""
  arg = op_args(name, magnitude, posterize_mode, translate_const, cutout_const)
  if name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
    return geometric(image, name, arg, sign, fill)
  ops = {'AutoContrast': lambda: autocontrast(image), 'Equalize': lambda: equalize(image),
         'Invert': lambda: invert(image), 'Posterize': lambda: posterize(image, arg),
         'Solarize': lambda: solarize(image, arg, solarize_mode),
         'SolarizeAdd': lambda: solarize_add(image, arg), 'Color': lambda: color(image, arg),
         'Contrast': lambda: contrast(image, arg, contrast_mode),
         'Brightness': lambda: brightness(image, arg),
         'Sharpness': lambda: sharpness(image, arg),
         'Cutout': lambda: cutout(image, arg, centre[0], centre[1], fill)}
  if name in ops:
    return ops[name]()
  raise ValueError(f'Unknown RandAugment op {name!r}')


def randaugment(image, ops, signs, centres, magnitude: float, **kw) -> jax.Array:
  """Layers in order: uint8 [H, W, 3], ops [N] int32, signs [N], centres [N, 2]."""
  def layer(image, params):
    op, sign, centre = params
    branches = [functools.partial(lambda name, x: apply_op(
        x, name, magnitude, sign, (centre[0], centre[1]), **kw), name)
                for name in OP_NAMES]
    return jax.lax.switch(op, branches, image), None
  # A scan traces the 16 branches once, not once per layer.
  return jax.lax.scan(layer, image, (ops, signs, centres))[0]


# --------------------------------------------------------------------------------
# Mixing and the whole batch
# --------------------------------------------------------------------------------

def mix(a, b, la, lb, mode, ratio, box) -> Tuple[jax.Array, jax.Array]:
  """One output row: a, b uint8 [H, W, 3], la, lb [K] one-hot; mode MIXUP|CUTMIX|-1.
  Returns (float32 [H, W, 3], [K]).

  MixUp: ratio a + (1 - ratio) b. CutMix: b inside `box`; `ratio` is then the
  box's share of the image (drawn by the host, where it is a correctly rounded
  mean: XLA:CPU divides by multiplying with the reciprocal), the label weight of b.
  -1: a unchanged.
  """
  h, w = a.shape[:2]
  up = mul_int(ratio, a) + mul_int(1.0 - ratio, b)
  up_label = ratio * la + (1.0 - ratio) * lb        # one-hot: products are exact
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
  cut = jnp.where(inside[..., None], b, a).astype(_F32)
  cut_label = (1.0 - ratio) * la + ratio * lb
  image = jnp.where(mode == MIXUP, up, jnp.where(mode == CUTMIX, cut, a.astype(_F32)))
  label = jnp.where(mode == MIXUP, up_label, jnp.where(mode == CUTMIX, cut_label, la))
  return image, label


@functools.lru_cache(maxsize=1)
def _normalize_table() -> np.ndarray:
  levels = np.arange(256, dtype=np.float32)[None, :]
  return ((levels - np.array(MEAN_RGB, np.float32)[:, None])
          / np.array(STDDEV_RGB, np.float32)[:, None])


def normalize(images) -> jax.Array:
  """0-255 [..., 3] -> (x - mean) / std, float32. uint8 input goes through a
  table computed on the host (bit for bit TF's float32 division); float input is
  divided on the device (XLA:CPU's division can be one ulp off)."""
  if images.dtype == jnp.uint8:
    table = jnp.asarray(_normalize_table())
    return jnp.stack([table[c][images[..., c]] for c in range(3)], -1)
  return (images.astype(_F32) - np.array(MEAN_RGB, np.float32)) / np.array(STDDEV_RGB,
                                                                             np.float32)


def _data_cfg(cfg):
  return cfg.data if 'data' in cfg else cfg


def augment_uint8(batch: Dict[str, jax.Array], cfg) -> Tuple[jax.Array, jax.Array]:
  """(images [B, S, S, 3], labels [B, K]) after mixing and RandAugment, before
  normalisation: uint8 when RandAugment is on, else float32 (mixed, unclipped)."""
  cfg = _data_cfg(cfg)
  images, labels = batch['images'], batch['labels'].astype(_F32)
  a, la = images[:, 0], labels[:, 0]
  if mix_on(cfg):
    if images.shape[1] == 2:
      b, lb = images[:, 1], labels[:, 1]
    else:                     # Within-batch pairing: row i with row i ^ 1.
      if images.shape[0] % 2:
        raise ValueError(f"mix.pairing='within_batch' needs an even number of rows per "
                         f'device, got {images.shape[0]}.')
      partner = jnp.arange(images.shape[0]) ^ 1
      b, lb = images[partner, 0], labels[partner, 0]
    out, label = jax.vmap(mix)(a, b, la, lb, batch['mix_mode'],
                               batch['mix_ratio'], batch['mix_box'])
  else:
    out, label = a.astype(_F32), la
  rac = cfg.randaugment
  if rac.enabled:
    kw = dict(contrast_mode=rac.contrast_mode, posterize_mode=rac.posterize_mode,
              solarize_mode=rac.get('solarize', 'wrap'), fill=int(rac.fill),
              translate_const=float(rac.translate_const),
              cutout_const=float(rac.cutout_const))
    out = jax.vmap(lambda x, o, s, c: randaugment(x, o, s, c, float(rac.magnitude), **kw))(
        to_uint8(out), batch['ra_ops'], batch['ra_signs'], batch['ra_centres'])
  return out, label


def apply_device_augment(batch: Dict[str, jax.Array], cfg) -> Dict[str, jax.Array]:
  """The device half of `augment_on='device'`: pipeline batch (module docstring)
  -> {images [B, S, S, 3] float32 (bfloat16 with data.bfloat16), labels [B, K],
  mask [B]}, the batch the host path would have built. A batch without the
  parameters (augment_on='host', eval batches) is returned as is, so a train step
  can call this unconditionally. `cfg` is the data config (or a config with a
  `data` field); its values are static."""
  if 'mix_mode' not in batch:
    return batch
  cfg = _data_cfg(cfg)
  check_augment_config(cfg)
  images, labels = augment_uint8(batch, cfg)
  images = normalize(images) if cfg.normalize else images.astype(_F32)
  if cfg.bfloat16:
    images = images.astype(jnp.bfloat16)
  return dict(images=images, labels=labels, mask=batch['mask'])


# --------------------------------------------------------------------------------
# The numpy (TF-free) pipeline
# --------------------------------------------------------------------------------

def draw_randaugment_params(rng: np.random.Generator, rows: int, num_layers: int,
                            height: int, width: int) -> Dict[str, np.ndarray]:
  """{ops [rows, N] int32, signs [rows, N] float32, centres [rows, N, 2] int32}
  drawn with numpy (uniform op, sign and Cutout centre), for the numpy path."""
  return dict(ops=rng.integers(0, len(OP_NAMES), (rows, num_layers)).astype(np.int32),
              signs=np.where(rng.random((rows, num_layers)) < 0.5, -1.0, 1.0).astype(np.float32),
              centres=np.stack([rng.integers(0, height, (rows, num_layers)),
                                rng.integers(0, width, (rows, num_layers))], -1).astype(np.int32))


@functools.lru_cache(maxsize=8)
def _jitted_policy(magnitude, contrast_mode, posterize_mode, solarize_mode, fill,
                   translate_const, cutout_const):
  kw = dict(contrast_mode=contrast_mode, posterize_mode=posterize_mode,
            solarize_mode=solarize_mode, fill=fill, translate_const=translate_const,
            cutout_const=cutout_const)
  return jax.jit(jax.vmap(lambda x, o, s, c: randaugment(to_uint8(x), o, s, c, magnitude,
                                                         **kw)))


def randaugment_numpy(images: np.ndarray, params: Dict[str, np.ndarray], cfg) -> np.ndarray:
  """RandAugment of float [B, H, W, 3] 0-255 images (clipped and truncated to uint8
  first) with `params` of `draw_randaugment_params`, through the jitted JAX policy;
  returns float32 [B, H, W, 3] holding uint8 levels."""
  rac = _data_cfg(cfg).randaugment
  fn = _jitted_policy(float(rac.magnitude), rac.contrast_mode, rac.posterize_mode,
                      rac.get('solarize', 'wrap'), int(rac.fill), float(rac.translate_const),
                      float(rac.cutout_const))
  out = fn(np.asarray(images, np.float32), params['ops'], params['signs'], params['centres'])
  return np.asarray(out).astype(np.float32)
