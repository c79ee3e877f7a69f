"""MixUp / CutMix: label mass equals pixel-area share, label rows sum to 1."""
import numpy as np
import pytest

from nfnet_jax.data import indexing, offline


def test_mix_modes_layout():
  np.testing.assert_array_equal(indexing.mix_modes(8, True, True), [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(indexing.mix_modes(4, True, False), [0] * 4)
  np.testing.assert_array_equal(indexing.mix_modes(4, False, True), [1] * 4)
  np.testing.assert_array_equal(indexing.mix_modes(4, False, False), [-1] * 4)


def test_numpy_cutmix_box_area_matches_label():
  rng = np.random.default_rng(0)
  h, w = 20, 28
  a, b = np.zeros([h, w, 3], np.float32), np.ones([h, w, 3], np.float32)
  for _ in range(50):
    ratio, cy, cx = rng.random(), rng.random() * h, rng.random() * w
    images, labels = offline._mix_numpy(
        np.stack([a, b]), np.eye(3, dtype=np.float32)[[0, 2]], np.array([1]),
        np.array([0.5]), np.array([ratio]), np.array([[cy / h, cx / w]]))
    assert labels.sum() == pytest.approx(1.0)
    assert labels[0, 2] == pytest.approx(images.mean(), abs=1e-6)   # mass of b == area of b
    y0, y1, x0, x1 = offline.cutmix_box(ratio, cy, cx, h, w)
    # Unclipped box side is sqrt(1 - ratio) * size.
    if 0 < y0 and y1 < h:
      assert abs((y1 - y0) - np.sqrt(1 - ratio) * h) <= 1


tf = pytest.importorskip('tensorflow')
from nfnet_jax.data import mixing  # noqa: E402


def test_cutmix_and_mixup_label_mass_equals_pixel_share():
  h, w, k = 24, 20, 5
  images = np.stack([np.zeros([h, w, 3]), np.ones([h, w, 3])]).astype(np.float32)
  labels = np.eye(k, dtype=np.float32)[[1, 3]]
  for mode in (mixing.MIXUP, mixing.CUTMIX):
    weights = []
    for s in range(40):
      image, label = mixing.mix_pair(images, labels, tf.constant(mode), tf.constant([s, 7]), 0.2)
      image, label = image.numpy(), label.numpy()
      assert label.sum() == pytest.approx(1.0, abs=1e-6)
      assert label[3] == pytest.approx(image.mean(), abs=1e-6)     # share of image b
      assert label[1] == pytest.approx(1 - image.mean(), abs=1e-6)
      if mode == mixing.CUTMIX:
        assert set(np.unique(image)) <= {0.0, 1.0}                 # pasted, not blended
      weights.append(label[3])
    assert len(set(np.round(weights, 5))) > 30                     # per-example ratios


def test_cutmix_mask_matches_numpy_box():
  rng = np.random.default_rng(1)
  for _ in range(30):
    h, w = rng.integers(5, 40, 2)
    ratio, cy, cx = rng.random(), rng.random() * h, rng.random() * w
    mask = mixing.cutmix_mask(int(h), int(w), np.float32(ratio), np.float32(cy),
                              np.float32(cx)).numpy()
    y0, y1, x0, x1 = offline.cutmix_box(np.float32(ratio), np.float32(cy), np.float32(cx), h, w)
    expected = np.zeros([h, w])
    expected[y0:y1, x0:x1] = 1
    np.testing.assert_array_equal(mask, expected)


def test_mixup_ratio_is_beta_02():
  lam = np.array([mixing.sample_beta(tf.constant([i, 3]), 0.2).numpy() for i in range(400)])
  assert 0.4 < lam.mean() < 0.6
  assert ((lam > 0.1) & (lam < 0.9)).mean() < 0.45          # U-shaped: mass near 0 and 1
  assert lam.min() >= 0 and lam.max() <= 1
