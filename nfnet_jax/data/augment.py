"""MixUp/CutMix, RandAugment, Cutout and normalisation of a uint8 batch, in JAX.

The one implementation of the training augmentation. `augment(batch, recipe, seed)`
is jittable and works on whatever rows it is given: the train step applies it to
each device's rows (`data.augment_on='device'`), the input pipelines apply the same
jitted function on the host's CPU backend (`'host'`). Each row draws its own random
numbers from a key folded from (seed, step, global output row), so a batch does not
depend on where it is augmented, on the device or process count, or on resuming.

Batch (local rows B; m = 2 with the paper's pairing and mixing on, else 1; S the
train size, K classes):

  images    uint8   [B, m, S, S, 3]  decoded, cropped, flipped, resized inputs
  labels    float32 [B, m, K]        their one-hot labels
  aug_step  int32   [B]              training step of each row
  aug_row   int32   [B]              global output row (index in the global batch)
  mix_mode  int32   [B]              indexing.MIXUP, CUTMIX or NO_MIX (layout, not random)
  mask      float32 [B]

With `mix.pairing='within_batch'` (m = 1) output row i mixes rows i and i ^ 1.

Cost: a layer never computes every op for every row. The 16 ops fall into four
families, each one computation with per-row parameters that is the identity on
rows that picked another family:
  geometric (Rotate, ShearX/Y, TranslateX/Y): one gather by a per-row source map
    (10 maps, one per op and sign, computed once in numpy with the arithmetic of
    TF's ImageProjectiveTransformV3, plus the identity map);
  colour (Color, Contrast, Brightness, Sharpness): one blend toward a per-row
    degenerate image with a per-row factor (1 = identity);
  point (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd): one
    per-row, per-channel 256-entry lookup table; AutoContrast's min/max and
    Equalize's histogram both come from one scatter-add histogram of the batch;
  Cutout: one mask with a per-row box (empty = identity).
Two schedules run these same functions (`apply_layer`): on an accelerator the four
families over the whole batch (wide and branch-free: a layer costs four passes
whichever ops were picked); on the CPU a loop over the rows with one branch per
op, that op's family with the op fixed, so a row costs only the op it picked.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax import cpu_workarounds
from nfnet_jax.data.config import check_augment_config, mix_on
from nfnet_jax.data.indexing import CUTMIX, MIXUP
from nfnet_jax.data.normalize import MEAN_RGB, STDDEV_RGB
from nfnet_jax.data.policy import OP_NAMES, SIGNED_OPS, op_args, solarize_threshold

_F32 = jnp.float32
GEOMETRIC = SIGNED_OPS                                    # Rotate, ShearX/Y, TranslateX/Y
COLOUR = ('Color', 'Contrast', 'Brightness', 'Sharpness')
POINT = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize', 'SolarizeAdd')
_OP = {name: i for i, name in enumerate(OP_NAMES)}
# Tags folded into a row's key so that each stage draws independent numbers.
_MIX_TAG, _RA_TAG = 3, 4


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static (hashable) settings of the augmentation, from a data config."""
  randaugment: bool = True
  num_layers: int = 2
  magnitude: float = 10.0
  contrast_mode: str = 'tf'
  posterize_mode: str = 'keep_bits'
  solarize_mode: str = 'wrap'
  fill: int = 128
  translate_const: float = 100.0
  cutout_const: float = 40.0
  mix: bool = False
  mixup_alpha: float = 0.2
  normalize: bool = True
  bfloat16: bool = False

  @classmethod
  def from_config(cls, cfg) -> 'Recipe':
    """From a data config (or a config with a `data` field); checks its values."""
    cfg = cfg.data if 'data' in cfg else cfg
    check_augment_config(cfg)
    rac = cfg.randaugment
    return cls(randaugment=bool(rac.enabled), num_layers=int(rac.num_layers),
               magnitude=float(rac.magnitude), contrast_mode=rac.contrast_mode,
               posterize_mode=rac.posterize_mode, solarize_mode=rac.get('solarize', 'wrap'),
               fill=int(rac.fill), translate_const=float(rac.translate_const),
               cutout_const=float(rac.cutout_const), mix=mix_on(cfg),
               mixup_alpha=float(cfg.mix.mixup_alpha), normalize=bool(cfg.normalize),
               bfloat16=bool(cfg.bfloat16))

  def arg(self, name: str):
    return op_args(name, self.magnitude, self.posterize_mode, self.translate_const,
                   self.cutout_const)


def to_uint8(x: jax.Array) -> jax.Array:
  """Clip to [0, 255] and truncate to uint8 (the explicit floor matters: fused into
  a reduction, XLA:CPU's float -> uint8 convert can round to nearest)."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


# --------------------------------------------------------------------------------
# Random numbers of each row
# --------------------------------------------------------------------------------

def row_keys(seed: int, step: jax.Array, row: jax.Array) -> jax.Array:
  """Keys [B] (raw uint32 [B, 2]) of rows with training step `step` [B] and global
  output row `row` [B]."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.fold_in(base, s), r))(
      step.astype(jnp.uint32), row.astype(jnp.uint32))


def draw_randaugment(keys: jax.Array, num_layers: int, height: int, width: int
                     ) -> Dict[str, jax.Array]:
  """{ops int32 [B, N] uniform over OP_NAMES, signs float32 [B, N] +-1 with equal
  odds, centres int32 [B, N, 2] Cutout centre (cy, cx) uniform over the pixels}."""
  def one(key):
    k_op, k_sign, k_y, k_x = jax.random.split(jax.random.fold_in(key, _RA_TAG), 4)
    return dict(
        ops=jax.random.randint(k_op, [num_layers], 0, len(OP_NAMES), jnp.int32),
        signs=jnp.where(jax.random.bernoulli(k_sign, 0.5, [num_layers]), 1.0, -1.0),
        centres=jnp.stack([jax.random.randint(k_y, [num_layers], 0, height, jnp.int32),
                           jax.random.randint(k_x, [num_layers], 0, width, jnp.int32)], -1))
  return jax.vmap(one)(keys)


def cutmix_box(kept: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int
               ) -> jax.Array:
  """int32 [..., 4] (y0, y1, x0, x1): a box of side sqrt(1 - kept) * (H, W) centred
  at (cy, cx) pixels, corners rounded half to even and clipped to the image."""
  cut = jnp.sqrt(1.0 - kept)
  h, w = np.float32(height), np.float32(width)
  y0 = jnp.clip(jnp.round(cy - cut * h / 2), 0, h)
  y1 = jnp.clip(jnp.round(cy + cut * h / 2), 0, h)
  x0 = jnp.clip(jnp.round(cx - cut * w / 2), 0, w)
  x1 = jnp.clip(jnp.round(cx + cut * w / 2), 0, w)
  return jnp.stack([y0, y1, x0, x1], -1).astype(jnp.int32)


def draw_mix(keys: jax.Array, alpha: float, height: int, width: int
             ) -> Dict[str, jax.Array]:
  """{lam float32 [B]: MixUp weight of the first image, Beta(alpha, alpha) (1 when
  alpha is 0); box int32 [B, 4]: CutMix box for a kept-area share ~ U(0, 1) at a
  uniform random centre (`cutmix_box`)}. Every row draws both; its mode picks."""
  def one(key):
    k_beta, k_kept, k_centre = jax.random.split(jax.random.fold_in(key, _MIX_TAG), 3)
    lam = jax.random.beta(k_beta, alpha, alpha) if alpha > 0 else jnp.float32(1.0)
    # Both gammas can underflow to 0 for small alpha: then an even mix.
    lam = jnp.where(jnp.isfinite(lam), lam, 0.5).astype(_F32)
    kept = jax.random.uniform(k_kept, [])
    centre = jax.random.uniform(k_centre, [2]) * np.array([height, width], np.float32)
    return dict(lam=lam, box=cutmix_box(kept, centre[0], centre[1], height, width))
  return jax.vmap(one)(keys)


# --------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------

def _box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
  """bool [B, H, W]: rows [y0, y1) x cols [x0, x1) of each row's box [B, 4]."""
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  b = box[:, :, None, None]
  return (ys >= b[:, 0]) & (ys < b[:, 1]) & (xs >= b[:, 2]) & (xs < b[:, 3])


def mix(a, b, la, lb, mode, lam, box) -> Tuple[jax.Array, jax.Array]:
  """a, b uint8 [B, H, W, 3]; la, lb [B, K]; mode [B] (MIXUP, CUTMIX or other: no
  mixing); lam [B]; box [B, 4]. Returns (float32 [B, H, W, 3], labels [B, K]).

  MixUp: lam a + (1 - lam) b. CutMix: b inside the box, label weight of b = the
  box's share of the image."""
  h, w = a.shape[1:3]
  af, bf = a.astype(_F32), b.astype(_F32)
  lam4 = lam[:, None, None, None]
  mixed = lam4 * af + (1.0 - lam4) * bf
  cut = jnp.where(_box_mask(box, h, w)[..., None], bf, af)
  # (Clipped: XLA may divide by multiplying with the rounded reciprocal.)
  share = jnp.clip(((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).astype(_F32)
                   / (h * w), 0.0, 1.0)
  m4 = mode[:, None, None, None]
  image = jnp.where(m4 == MIXUP, mixed, jnp.where(m4 == CUTMIX, cut, af))
  weight_b = jnp.where(mode == MIXUP, 1.0 - lam, jnp.where(mode == CUTMIX, share, 0.0))
  return image, (1.0 - weight_b[:, None]) * la + weight_b[:, None] * lb


# --------------------------------------------------------------------------------
# RandAugment: the four families
# --------------------------------------------------------------------------------

def _round_half_away(v: np.ndarray) -> np.ndarray:
  r = np.trunc(v)
  return r + np.sign(v) * (np.abs(v - r) >= 0.5)


def source_index(height: int, width: int, matrix) -> np.ndarray:
  """int32 [H * W]: flat source pixel of each output pixel under the projective
  `matrix` (8 floats: output (x, y) -> input ((a0 x + a1 y + a2) / k,
  (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1), H * W (the fill) outside; float32
  arithmetic and nearest rounding (half away from zero) as TF's kernel."""
  t = np.asarray(matrix, np.float32)
  y, x = np.mgrid[:height, :width].astype(np.float32)
  k = t[6] * x + t[7] * y + np.float32(1)
  in_x = (t[0] * x + t[1] * y + t[2]) / k
  in_y = (t[3] * x + t[4] * y + t[5]) / k
  xi, yi = _round_half_away(in_x), _round_half_away(in_y)
  inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height) & (k != 0)
  return np.where(inside, yi * width + xi, height * width).astype(np.int32).reshape(-1)


def affine_matrix(name: str, arg: float, height: int, width: int) -> np.ndarray:
  """float32 [8]: the matrix of geometric op `name` at signed argument `arg`,
  computed in float32 as DeepMind's TF ops compute it."""
  f = np.float32
  arg = f(arg)
  if name == 'Rotate':
    a = f(arg * f(math.pi / 180.0))
    cos, sin = f(math.cos(float(a))), f(math.sin(float(a)))
    h, w = f(height), f(width)
    x_off = ((w - f(1)) - (cos * (w - f(1)) - sin * (h - f(1)))) / f(2)
    y_off = ((h - f(1)) - (sin * (w - f(1)) + cos * (h - f(1)))) / f(2)
    return np.array([cos, -sin, x_off, sin, cos, y_off, 0, 0], np.float32)
  rows = {'ShearX': [1, arg, 0, 0, 1, 0, 0, 0], 'ShearY': [1, 0, 0, arg, 1, 0, 0, 0],
          'TranslateX': [1, 0, -arg, 0, 1, 0, 0, 0],
          'TranslateY': [1, 0, 0, 0, 1, -arg, 0, 0]}
  if name not in rows:
    raise ValueError(f'{name!r} is not a geometric op')
  return np.array(rows[name], np.float32)


@functools.lru_cache(maxsize=16)
def _warp_maps(recipe: Recipe, height: int, width: int) -> np.ndarray:
  """int32 [1 + 2 * 5, H * W]: the identity map, then per geometric op its map for
  sign -1 and +1."""
  maps = [np.arange(height * width, dtype=np.int32)]
  for name in GEOMETRIC:
    for sign in (-1.0, 1.0):
      arg = sign * np.float32(recipe.arg(name))
      maps.append(source_index(height, width, affine_matrix(name, arg, height, width)))
  return np.stack(maps)


def _warp_choice(ops: jax.Array, signs: jax.Array) -> jax.Array:
  """int32 [B]: row of `_warp_maps` for each row's op and sign (0: identity)."""
  choice = jnp.zeros_like(ops)
  for g, name in enumerate(GEOMETRIC):
    choice = jnp.where(ops == _OP[name], 1 + 2 * g + (signs > 0).astype(jnp.int32), choice)
  return choice


def warp(images: jax.Array, ops: jax.Array, signs: jax.Array, recipe: Recipe) -> jax.Array:
  """The geometric family: uint8 [B, H, W, 3] gathered through each row's map."""
  b, h, w, c = images.shape
  maps = jnp.asarray(_warp_maps(recipe, h, w))[_warp_choice(ops, signs)]     # [B, H*W]
  flat = jnp.concatenate([images.reshape(b, h * w, c),
                          jnp.full([b, 1, c], recipe.fill, images.dtype)], 1)
  return jnp.take_along_axis(flat, maps[..., None], axis=1).reshape(b, h, w, c)


@functools.lru_cache(maxsize=1)
def _gray_tables() -> np.ndarray:
  """float32 [3, 256]: level v of channel c -> float32(float32(v / 255) * weight_c),
  the per-channel terms of tf.image.rgb_to_grayscale."""
  v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
  return v[None, :] * np.array([0.2989, 0.5870, 0.1140], np.float32)[:, None]


def grayscale(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W] of uint8 [..., H, W, 3] as tf.image.rgb_to_grayscale."""
  t = jnp.asarray(_gray_tables())
  x = images.astype(jnp.int32)
  gray = (t[0][x[..., 0]] + t[1][x[..., 1]]) + t[2][x[..., 2]]
  return to_uint8(gray * np.float32(255.5))


def _smooth(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3]: the interior smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13
  (truncated), the 1-pixel border kept (Sharpness' degenerate image)."""
  x = images.astype(jnp.int32)
  h, w = images.shape[1:3]
  box = sum(x[:, dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  # Integer sums, so the truncated quotient equals TF's float one.
  smooth = ((box + 4 * x[:, 1:-1, 1:-1]) // 13).astype(jnp.uint8)
  return images.at[:, 1:-1, 1:-1].set(smooth)


def colour(images: jax.Array, ops: jax.Array, recipe: Recipe) -> jax.Array:
  """The colour family: blend toward each row's degenerate image, uint8 [B, H, W, 3]."""
  b, h, w, _ = images.shape
  gray = grayscale(images)[..., None]                                       # [B, H, W, 1]
  if recipe.contrast_mode == 'tf':
    level = jnp.full([b], min(math.floor(h * w / 256.0), 255), jnp.uint8)
  else:   # 'mean': the truncated mean grey level (integer quotient of an exact sum)
    level = jnp.minimum(jnp.sum(gray.astype(jnp.int32), axis=(1, 2, 3)) // (h * w),
                        255).astype(jnp.uint8)
  o = ops[:, None, None, None]
  degenerate = jnp.where(
      o == _OP['Color'], gray,
      jnp.where(o == _OP['Contrast'], level[:, None, None, None],
                jnp.where(o == _OP['Brightness'], jnp.uint8(0), _smooth(images))))
  picked = jnp.isin(ops, jnp.array([_OP[n] for n in COLOUR]))
  # Factor 1 gives d + (x - d) = x exactly: the identity for the other rows.
  factor = jnp.where(picked, np.float32(recipe.arg('Color')), np.float32(1.0))
  d = degenerate.astype(_F32)
  return to_uint8(d + factor[:, None, None, None] * (images.astype(_F32) - d))


@functools.lru_cache(maxsize=16)
def _static_luts(recipe: Recipe) -> np.ndarray:
  """uint8 [16, 256]: the table of each op that does not depend on the image
  (identity for the ops that are not point ops, or depend on the image)."""
  v = np.arange(256, dtype=np.int32)
  luts = np.tile(v, (len(OP_NAMES), 1))
  luts[_OP['Invert']] = 255 - v
  bits = min(max(int(recipe.arg('Posterize')), 0), 8)
  luts[_OP['Posterize']] = v & ((256 - (1 << (8 - bits))) & 0xFF)
  t = solarize_threshold(recipe.arg('Solarize'), recipe.solarize_mode)
  luts[_OP['Solarize']] = np.where(v < t, v, 255 - v)
  luts[_OP['SolarizeAdd']] = np.where(v < 128, np.clip(v + recipe.arg('SolarizeAdd'), 0, 255), v)
  return luts.astype(np.uint8)


def _lut_index(images: jax.Array) -> jax.Array:
  """int32 [B, H, W, 3]: each pixel's entry in a flattened [B, 3, 256] table."""
  b = images.shape[0]
  return (images.astype(jnp.int32) + jnp.array([0, 256, 512], jnp.int32)
          + (jnp.arange(b, dtype=jnp.int32) * 768)[:, None, None, None])


def histogram(images: jax.Array) -> jax.Array:
  """int32 [B, 3, 256]: per row and channel, the count of each level (one
  scatter-add over the batch)."""
  b = images.shape[0]
  idx = _lut_index(images).reshape(-1)
  return jnp.zeros([b * 768], jnp.int32).at[idx].add(1).reshape(b, 3, 256)


def _autocontrast_luts(hist: jax.Array) -> jax.Array:
  """uint8 [B, 3, 256]: per channel, [min, max] stretched to [0, 255] in float32
  (TF's scale = 255 / (max - min), offset = -min * scale); identity if max == min."""
  levels = jnp.arange(256, dtype=jnp.int32)
  present = hist > 0
  lo = jnp.min(jnp.where(present, levels, 255), axis=-1)
  hi = jnp.max(jnp.where(present, levels, 0), axis=-1)
  scale = np.float32(255.0) / jnp.maximum(hi - lo, 1).astype(_F32)
  offset = -lo.astype(_F32) * scale
  lut = to_uint8(levels.astype(_F32) * scale[..., None] + offset[..., None])
  return jnp.where((hi > lo)[..., None], lut, levels.astype(jnp.uint8))


def _equalize_luts(hist: jax.Array) -> jax.Array:
  """uint8 [B, 3, 256]: PIL's equalisation table per channel (integer arithmetic):
  step = (count - count of the last present level) // 255, lut[v] = (cumulative
  count below v + step // 2) // step; identity when step is 0."""
  levels = jnp.arange(256)
  last = jnp.max(jnp.where(hist > 0, levels, -1), axis=-1)
  last_count = jnp.take_along_axis(hist, last[..., None], axis=-1)[..., 0]
  step = (hist.sum(axis=-1) - last_count) // 255
  cum = jnp.cumsum(hist, axis=-1) - hist                    # count below each level
  lut = jnp.clip((cum + (step // 2)[..., None]) // jnp.maximum(step, 1)[..., None], 0, 255)
  return jnp.where((step > 0)[..., None], lut, levels).astype(jnp.uint8)


def point(images: jax.Array, ops: jax.Array, recipe: Recipe) -> jax.Array:
  """The point family: each row's pixels looked up in its per-channel table."""
  b, h, w, c = images.shape
  hist = jax.lax.optimization_barrier(histogram(images))
  o = ops[:, None, None]
  luts = jnp.broadcast_to(jnp.asarray(_static_luts(recipe))[ops][:, None, :], [b, 3, 256])
  luts = jnp.where(o == _OP['AutoContrast'], _autocontrast_luts(hist), luts)
  luts = jnp.where(o == _OP['Equalize'], _equalize_luts(hist), luts)
  # The barrier keeps XLA from fusing the table computation into the gather (which
  # would recompute it per pixel).
  luts = jax.lax.optimization_barrier(luts)
  return jnp.take(luts.reshape(-1), _lut_index(images), mode='clip')


def cutout(images: jax.Array, ops: jax.Array, centres: jax.Array, recipe: Recipe
           ) -> jax.Array:
  """Cutout: rows [cy - s, cy + s) x cols [cx - s, cx + s) (clipped) set to the
  fill on rows that picked it; centres int32 [B, 2]."""
  s = int(recipe.arg('Cutout'))
  box = jnp.stack([centres[:, 0] - s, centres[:, 0] + s, centres[:, 1] - s,
                   centres[:, 1] + s], -1)
  hit = _box_mask(box, *images.shape[1:3]) & (ops == _OP['Cutout'])[:, None, None]
  return jnp.where(hit[..., None], jnp.uint8(recipe.fill), images)


def _families(ops: jax.Array, signs: jax.Array, centres: jax.Array, recipe: Recipe
              ) -> Tuple[Callable[[jax.Array], jax.Array], ...]:
  """The four families as functions of uint8 [B, H, W, 3] (ops, signs [B],
  centres [B, 2]), in the order a layer applies them."""
  return (lambda x: warp(x, ops, signs, recipe), lambda x: colour(x, ops, recipe),
          lambda x: point(x, ops, recipe), lambda x: cutout(x, ops, centres, recipe))


# Family (index into `_families`) of each op of OP_NAMES; Cutout is the fourth.
_FAMILY = np.array([0 if name in GEOMETRIC else 1 if name in COLOUR else
                    2 if name in POINT else 3 for name in OP_NAMES], np.int32)


def apply_layer(images: jax.Array, ops: jax.Array, signs: jax.Array, centres: jax.Array,
                recipe: Recipe, per_row: bool = False) -> jax.Array:
  """One RandAugment layer: uint8 [B, H, W, 3], each row its own op `ops` [B] (index
  into OP_NAMES), sign `signs` [B] (+-1) and Cutout centre `centres` [B, 2].

  per_row=False: every family runs on the whole batch, the identity on the rows
  that picked another one (wide, branch-free: for accelerators). per_row=True: a
  loop over the rows runs only the op each row picked, as its family with the op
  fixed (for the CPU, where a branch is cheap and every pass over the pixels
  costs). The same numbers either way: the families are the same functions."""
  if not per_row:
    for family in _families(ops, signs, centres, recipe):
      images = family(images)
    return images

  def one(args):
    x, op, sign, centre = args
    # One branch per op: its family with the op fixed, so XLA drops the parts of
    # the family that the op does not use (e.g. the histogram for Invert).
    branches = [lambda x, i=i: _families(jnp.full([1], i, jnp.int32), sign[None],
                                         centre[None], recipe)[_FAMILY[i]](x[None])[0]
                for i in range(len(OP_NAMES))]
    return jax.lax.switch(op, branches, x)
  return jax.lax.map(one, (images, ops, signs, centres))


def randaugment(images: jax.Array, params: Dict[str, jax.Array], recipe: Recipe,
                per_row: bool = False) -> jax.Array:
  """The layers of `params` (`draw_randaugment`) in order on uint8 [B, H, W, 3]
  (`per_row`: see `apply_layer`)."""
  def layer(x, p):
    return apply_layer(x, p[0], p[1], p[2], recipe, per_row), None
  xs = (params['ops'].T, params['signs'].T, jnp.swapaxes(params['centres'], 0, 1))
  return jax.lax.scan(layer, images, xs)[0]


# --------------------------------------------------------------------------------
# The whole batch
# --------------------------------------------------------------------------------

def normalize(images: jax.Array) -> jax.Array:
  """0-255 [..., 3] -> float32 (x - MEAN_RGB) / STDDEV_RGB."""
  return (images.astype(_F32) - jnp.asarray(MEAN_RGB)) / jnp.asarray(STDDEV_RGB)


def augment(batch: Dict[str, jax.Array], recipe: Recipe, seed: int,
            per_row: Optional[bool] = None) -> Dict[str, jax.Array]:
  """Batch of the module docstring -> {images [B, S, S, 3] float32 (bfloat16 with
  recipe.bfloat16), labels [B, K], mask [B]}. per_row (see `apply_layer`): None
  takes the CPU-workaround switch (True on the CPU backend)."""
  if per_row is None:
    per_row = cpu_workarounds.enabled()
  images, labels = batch['images'], batch['labels'].astype(_F32)
  b, _, h, w, _ = images.shape
  keys = row_keys(seed, batch['aug_step'], batch['aug_row'])
  a, la = images[:, 0], labels[:, 0]
  if recipe.mix:
    if images.shape[1] == 2:
      other, lother = images[:, 1], labels[:, 1]
    else:                      # Within-batch pairing: row i with row i ^ 1.
      if b % 2:
        raise ValueError(f"mix.pairing='within_batch' needs an even number of rows per "
                         f'device, got {b}.')
      partner = jnp.arange(b) ^ 1
      other, lother = a[partner], la[partner]
    p = draw_mix(keys, recipe.mixup_alpha, h, w)
    out, labels = mix(a, other, la, lother, batch['mix_mode'], p['lam'], p['box'])
  else:
    out, labels = a.astype(_F32), la
  if recipe.randaugment:
    params = draw_randaugment(keys, recipe.num_layers, h, w)
    out = randaugment(to_uint8(out), params, recipe, per_row)
  out = normalize(out) if recipe.normalize else out.astype(_F32)
  if recipe.bfloat16:
    out = out.astype(jnp.bfloat16)
  return dict(images=out, labels=labels, mask=batch['mask'])


@functools.lru_cache(maxsize=8)
def _jit(recipe: Recipe, seed: int):
  # Always the host's CPU backend: the row-by-row schedule.
  return jax.jit(functools.partial(augment, recipe=recipe, seed=seed, per_row=True))


def augment_on_host(batch: Dict[str, np.ndarray], recipe: Recipe, seed: int
                    ) -> Dict[str, np.ndarray]:
  """`augment` jitted on the host's CPU backend (inputs placed there, so the jit
  runs there whatever accelerator is attached); numpy in, numpy out. This process's own
  CPU device: in a multi-process job the first global CPU device belongs to process 0."""
  cpu = jax.local_devices(backend='cpu')[0]
  return jax.device_get(_jit(recipe, seed)(jax.device_put(dict(batch), cpu)))
