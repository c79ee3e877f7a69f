"""augment: each RandAugment op against DeepMind's TF behaviour (the TF oracle),
and the drawn random numbers against the recipe's distributions (fixed seeds)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.data import augment as A
from nfnet_jax.data.indexing import CUTMIX, MIXUP
from nfnet_jax.data.policy import OP_NAMES, SIGNED_OPS

tf = pytest.importorskip('tensorflow')
import tf_randaugment as oracle  # noqa: E402

# Ops computed in float in TF (a blend, or AutoContrast's scale and offset): XLA
# may fuse a multiply and an add into one rounding, so a pixel can land one grey
# level off TF's. Every other op is integer arithmetic and must match exactly.
FLOAT_OPS = ('Color', 'Contrast', 'Brightness', 'Sharpness', 'AutoContrast')
MAX_OFF_FRACTION = 0.01          # of the pixels of a float op, each off by at most 1
CONVENTIONS = {'Contrast': [dict(contrast_mode='tf'), dict(contrast_mode='mean')],
               'Posterize': [dict(posterize_mode='keep_bits'),
                             dict(posterize_mode='remove_bits')],
               'Solarize': [dict(solarize_mode='wrap'), dict(solarize_mode='saturate')]}


def natural_image(h, w, seed):
  """Smooth colours plus noise: every op changes it, and blends cross many levels."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([120 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


IMAGES = np.stack([natural_image(48, 40, 0), natural_image(48, 40, 1),
                   np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8),
                   np.full((48, 40, 3), 77, np.uint8)])          # flat: AutoContrast no-op


def assert_matches_tf(out, ref, name, what):
  diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
  if name in FLOAT_OPS:
    assert diff.max() <= 1, f'{what}: {diff.max()} grey levels off'
    assert (diff > 0).mean() <= MAX_OFF_FRACTION, f'{what}: {(diff > 0).mean():.4f} off'
  else:
    np.testing.assert_array_equal(out, ref, err_msg=what)


@pytest.mark.parametrize('magnitude', [5.0, 10.0, 15.0])
@pytest.mark.parametrize('convention', [
    dict(), dict(contrast_mode='mean', posterize_mode='remove_bits', solarize_mode='saturate')])
def test_every_op_matches_tf(magnitude, convention):
  """All 16 ops, both signs, at M = 5, 10, 15 on four images, in one batch of
  128 rows (op x sign x image), for each contrast/posterize/solarize convention."""
  cases = [(name, sign, i) for name in OP_NAMES for sign in (1.0, -1.0)
           for i in range(len(IMAGES))]
  centres = np.array([[7, 31], [0, 0], [47, 39], [20, 5]], np.int32)
  recipe = A.Recipe(magnitude=magnitude, **convention)
  out = np.asarray(jax.jit(A.apply_layer, static_argnums=4)(
      IMAGES[[i for _, _, i in cases]], np.array([OP_NAMES.index(n) for n, _, _ in cases]),
      np.array([s for _, s, _ in cases], np.float32), centres[[i for _, _, i in cases]],
      recipe))
  for row, (name, sign, i) in enumerate(cases):
    ref = oracle.apply_op(IMAGES[i], name, magnitude, sign=sign,
                          centre=tuple(int(c) for c in centres[i]), **convention).numpy()
    assert_matches_tf(out[row], ref, name, f'{name} M={magnitude} sign={sign} '
                      f'{convention} image {i}')


def test_a_batch_of_different_ops_matches_tf_row_by_row():
  """One layer where each row picks its own op: each family leaves the rows of the
  others untouched. Then a whole N=3 policy at M=15 against TF's."""
  rows = 2 * len(OP_NAMES)
  images = np.stack([natural_image(48, 40, i) for i in range(rows)])
  ops = jnp.arange(rows, dtype=jnp.int32) % len(OP_NAMES)
  signs = jnp.where(jnp.arange(rows) < len(OP_NAMES), 1.0, -1.0)
  centres = jnp.stack([jnp.arange(rows) * 3 % 48, jnp.arange(rows) * 7 % 40], -1)
  recipe = A.Recipe(magnitude=10.0)
  layer = jax.jit(A.apply_layer, static_argnums=(4, 5))
  out = np.asarray(layer(images, ops, signs, centres, recipe, False))
  # The row-by-row schedule runs the same functions: the same bytes.
  np.testing.assert_array_equal(layer(images, ops, signs, centres, recipe, True), out)
  for i in range(rows):
    name = OP_NAMES[int(ops[i])]
    ref = oracle.apply_op(images[i], name, 10.0, sign=float(signs[i]),
                          centre=(int(centres[i, 0]), int(centres[i, 1]))).numpy()
    assert_matches_tf(out[i], ref, name, f'{name} row {i}')

  keys = A.row_keys(5, jnp.zeros([rows], jnp.int32), jnp.arange(rows))
  params = A.draw_randaugment(keys, 3, 48, 40)
  out = np.asarray(jax.jit(A.randaugment, static_argnums=2)(images, params,
                                                            A.Recipe(magnitude=15.0)))
  for i in range(rows):
    ref = oracle.randaugment_with_params(images[i], {k: np.asarray(v[i])
                                                     for k, v in params.items()},
                                         magnitude=15.0).numpy()
    diff = np.abs(out[i].astype(int) - ref)
    assert (diff > 0).mean() <= 3 * MAX_OFF_FRACTION, f'row {i}'


def test_mixing_matches_the_formulas():
  """MixUp: lam a + (1 - lam) b; CutMix: b inside the box, label weight = area."""
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (4, 12, 10, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (4, 12, 10, 3), dtype=np.uint8)
  la, lb = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], np.eye(3, dtype=np.float32)[[1, 2, 0, 2]]
  mode = np.array([MIXUP, CUTMIX, -1, CUTMIX], np.int32)
  lam = np.array([0.25, 0.5, 0.5, 0.5], np.float32)
  box = np.array([[0, 0, 0, 0], [2, 8, 1, 6], [0, 12, 0, 10], [0, 12, 0, 10]], np.int32)
  image, label = jax.jit(A.mix)(a, b, la, lb, mode, lam, box)
  image, label = np.asarray(image), np.asarray(label)
  np.testing.assert_allclose(image[0], 0.25 * a[0] + 0.75 * b[0], rtol=1e-6)
  np.testing.assert_allclose(label[0], 0.25 * la[0] + 0.75 * lb[0])
  want = a[1].astype(np.float32)
  want[2:8, 1:6] = b[1, 2:8, 1:6]
  np.testing.assert_array_equal(image[1], want)
  np.testing.assert_allclose(label[1], (1 - 30 / 120) * la[1] + 30 / 120 * lb[1], rtol=1e-6)
  np.testing.assert_array_equal(image[2], a[2])                # no mixing
  np.testing.assert_array_equal(label[2], la[2])
  np.testing.assert_array_equal(image[3], b[3])                # the whole image
  np.testing.assert_allclose(label[3], lb[3])


# --------------------------------------------------------------------------------
# Distributions of the drawn numbers (fixed seeds; thresholds at about p = 1e-3)
# --------------------------------------------------------------------------------

N = 20_000


def chi2_ok(counts: np.ndarray) -> bool:
  """Pearson chi-square against equal expected counts, below the 0.999 quantile
  (Wilson-Hilferty approximation)."""
  k = len(counts)
  expected = counts.sum() / k
  stat = ((counts - expected) ** 2 / expected).sum()
  df = k - 1
  quantile = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
  return stat < quantile


def ks_ok(x: np.ndarray, y: np.ndarray) -> bool:
  """Two-sample Kolmogorov-Smirnov statistic below its 0.999 critical value."""
  grid = np.sort(np.concatenate([x, y]))
  d = np.abs(np.searchsorted(np.sort(x), grid, 'right') / len(x)
             - np.searchsorted(np.sort(y), grid, 'right') / len(y)).max()
  return d < 1.95 * math.sqrt((len(x) + len(y)) / (len(x) * len(y)))


@pytest.fixture(scope='module')
def keys():
  return A.row_keys(11, jnp.arange(N) // 256, jnp.arange(N) % 256)


def test_randaugment_draws_follow_the_recipe(keys):
  """Op uniform over the 16, sign +-1 with equal odds, Cutout centre uniform over
  rows and columns; layers and rows independent of each other."""
  p = jax.device_get(A.draw_randaugment(keys, 2, 48, 40))
  for layer in range(2):
    assert chi2_ok(np.bincount(p['ops'][:, layer], minlength=16)), layer
    assert chi2_ok(np.bincount((p['signs'][:, layer] > 0).astype(int), minlength=2))
    assert set(np.unique(p['signs'])) == {-1.0, 1.0}
    assert chi2_ok(np.bincount(p['centres'][:, layer, 0], minlength=48))
    assert chi2_ok(np.bincount(p['centres'][:, layer, 1], minlength=40))
  # Independence of the two layers' ops: the pair is uniform over 256 cells.
  assert chi2_ok(np.bincount(p['ops'][:, 0] * 16 + p['ops'][:, 1], minlength=256))


def test_mix_draws_follow_the_recipe(keys):
  """MixUp lam ~ Beta(0.2, 0.2); CutMix box = side sqrt(1 - U) * size around a
  uniform centre, rounded and clipped: box area share and box corners have the
  distribution of that formula simulated in numpy."""
  p = jax.device_get(A.draw_mix(keys, 0.2, 48, 40))
  rng = np.random.default_rng(0)
  assert ks_ok(p['lam'], rng.beta(0.2, 0.2, N))
  assert not ks_ok(p['lam'], rng.beta(0.5, 0.5, N))           # the test has power
  kept, cy, cx = rng.random(N), rng.random(N) * 48, rng.random(N) * 40
  cut = np.sqrt(1 - kept)
  ref = np.stack([np.clip(np.round(cy - cut * 24), 0, 48), np.clip(np.round(cy + cut * 24), 0, 48),
                  np.clip(np.round(cx - cut * 20), 0, 40), np.clip(np.round(cx + cut * 20), 0, 40)], -1)
  area = lambda b: (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) / (48 * 40)  # noqa: E731
  assert ks_ok(area(p['box']), area(ref))
  for corner in range(4):
    assert ks_ok(p['box'][:, corner] + 0.0, ref[:, corner]), corner
  assert not ks_ok(area(p['box']), area(ref) ** 0.8)


def test_draws_depend_on_seed_step_and_row_only():
  """Same (seed, step, row): same numbers, whatever the rest of the batch; another
  seed, step or row: different numbers."""
  step, row = jnp.array([3, 3, 4]), jnp.array([7, 8, 7])
  full = A.draw_randaugment(A.row_keys(1, step, row), 4, 48, 40)
  alone = A.draw_randaugment(A.row_keys(1, step[1:2], row[1:2]), 4, 48, 40)
  np.testing.assert_array_equal(full['ops'][1], alone['ops'][0])
  other_seed = A.draw_randaugment(A.row_keys(2, step, row), 4, 48, 40)
  for other in (full['centres'][1], full['centres'][2], other_seed['centres'][0]):
    assert not np.array_equal(full['centres'][0], other)
