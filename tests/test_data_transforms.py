"""Per-image transforms against numpy/PIL references: the two eval crops, the
Inception crop's fallback, normalisation constants."""
import io

import numpy as np
import pytest

pytest.importorskip('tensorflow')
from PIL import Image  # noqa: E402

from nfnet_jax.data import normalize  # noqa: E402
from nfnet_jax.data import transforms as T  # noqa: E402
from nfnet_jax.data._tf import tf  # noqa: E402

# A non-square test image (h != w), smaller than the resize targets so that every
# resize below upsamples.
H, W, S, MARGIN = 30, 45, 24, 32


def _keys_matrix(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """[out, in] bicubic (Keys, a=-0.5) interpolation matrix with half-pixel centres;
  taps outside the image are dropped and the rest renormalised. The fractional
  position is rounded to 1/1024, the resolution of TF's kernel table."""
  x = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  x0 = np.floor(x).astype(int)
  frac = np.round((x - x0) * 1024) / 1024
  taps = x0[:, None] + np.arange(-1, 3)
  d = np.abs(frac[:, None] - np.arange(-1, 3))
  w = np.where(d <= 1, (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1,
               np.where(d < 2, a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a, 0.0))
  w = np.where((taps >= 0) & (taps < in_size), w, 0.0)
  w /= w.sum(1, keepdims=True)
  m = np.zeros([out_size, in_size])
  np.add.at(m, (np.repeat(np.arange(out_size), 4), np.clip(taps, 0, in_size - 1).ravel()),
            w.ravel())
  return m


def ref_resize(image: np.ndarray, size: int) -> np.ndarray:
  """numpy bicubic resize of uint8 [h, w, 3] to [size, size, 3] float64."""
  x = np.einsum('pw,hwc->hpc', _keys_matrix(image.shape[1], size), image.astype(np.float64))
  return np.einsum('oh,hwc->owc', _keys_matrix(image.shape[0], size), x)


def ref_center_box(h: int, w: int, size: int, margin: int):
  """The centre square DeepMind's crop_resize takes, as a PIL box (left, top,
  right, bottom): side int(min(h, w) / (size + margin) * size)."""
  side = max(1, int(min(h / (size + margin), w / (size + margin)) * size))
  top, left = (h - side + 1) // 2, (w - side + 1) // 2
  return left, top, left + side, top + side


@pytest.fixture(scope='module')
def image():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'PNG')
  return buf.getvalue()


def test_resize_reference_is_tf_bicubic(image):
  got = T.resize(tf.constant(image), 50).numpy()
  np.testing.assert_allclose(got, ref_resize(image, 50), atol=1e-3)


@pytest.mark.parametrize('raw', [True, False])
def test_eval_squash_resizes_whole_image_then_centre_crops(image, raw):
  data = tf.constant(image) if raw else tf.constant(_png(image))
  got = T.eval_image(data, S, S + MARGIN, raw=raw, crop='squash').numpy()
  ref = ref_resize(image, S + MARGIN)[16:16 + S, 16:16 + S]
  assert got.shape == (S, S, 3)
  np.testing.assert_allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize('raw', [True, False])
def test_eval_center_crop_keeps_aspect_then_resizes(image, raw):
  data = tf.constant(image) if raw else tf.constant(_png(image))
  got = T.eval_image(data, S, S + MARGIN, raw=raw, crop='center_crop').numpy()
  box = ref_center_box(H, W, S, MARGIN)
  assert box == (17, 9, 29, 21)         # side int(30 * 24 / 56) = 12, centred
  ref = ref_resize(np.asarray(Image.fromarray(image).crop(box)), S)
  assert got.shape == (S, S, 3)
  np.testing.assert_allclose(got, ref, atol=1e-3)
  squash = T.eval_image(data, S, S + MARGIN, raw=raw, crop='squash').numpy()
  assert np.abs(got - squash).mean() > 10  # the two transforms really differ


def test_eval_center_crop_on_jpeg_decodes_only_the_window(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=95)
  full = tf.io.decode_jpeg(buf.getvalue(), channels=3).numpy()
  got = T.eval_image(tf.constant(buf.getvalue()), S, S + MARGIN, crop='center_crop').numpy()
  ref = ref_resize(np.asarray(Image.fromarray(full).crop(ref_center_box(H, W, S, MARGIN))), S)
  np.testing.assert_allclose(got, ref, atol=1e-3)


def test_unknown_eval_crop_is_refused(image):
  with pytest.raises(ValueError, match='center_crop'):
    T.eval_image(tf.constant(image), S, S + MARGIN, raw=True, crop='crop_resize')


def test_inception_crop_falls_back_to_the_eval_centre_crop():
  """A 12x200 strip: no window of >= 50 % of the area has aspect 3/4..4/3, so the
  sampler gives up (after max_attempts) and returns the whole image; the crop is
  then the centre square of side int(12 * S / (S + 32)), as DeepMind's code does."""
  rng = np.random.default_rng(1)
  strip = rng.integers(0, 256, (12, 200, 3), dtype=np.uint8)
  left, top, right, bottom = ref_center_box(12, 200, S, MARGIN)
  ref = strip[top:bottom, left:right]
  assert ref.shape == (5, 5, 3)
  for raw, data in ((True, tf.constant(strip)), (False, tf.constant(_png(strip)))):
    for s in range(5):
      got = T.inception_crop(data, tf.constant([s, 7]), raw=raw, area_range=(0.5, 1.0),
                             size=S, resized=S + MARGIN).numpy()
      np.testing.assert_array_equal(got, ref)


def test_inception_crop_is_random_when_the_sampler_succeeds(image):
  shapes = set()
  for s in range(20):
    got = T.inception_crop(tf.constant(image), tf.constant([s, 3]), raw=True,
                           size=S, resized=S + MARGIN).numpy()
    assert got.shape[0] * got.shape[1] >= 0.08 * H * W * 0.99
    shapes.add(got.shape)
  assert len(shapes) > 5                               # not the fixed fallback window


def test_one_pixel_image_gives_a_one_pixel_crop():
  px = np.full([1, 1, 3], 77, np.uint8)
  got = T.inception_crop(tf.constant(px), tf.constant([0, 0]), raw=True, size=S).numpy()
  np.testing.assert_array_equal(got, px)
  out = T.eval_image(tf.constant(px), S, S + MARGIN, raw=True, crop='center_crop').numpy()
  np.testing.assert_allclose(out, 77.0, atol=1e-3)


def test_normalisation_constants_live_once():
  np.testing.assert_allclose(normalize.MEAN_RGB, [123.675, 116.28, 103.53], rtol=1e-6)
  np.testing.assert_allclose(normalize.STDDEV_RGB, [58.395, 57.12, 57.375], rtol=1e-6)
  x = np.random.default_rng(2).uniform(0, 255, (4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(T.normalize(tf.constant(x)).numpy(), normalize.normalize(x),
                             rtol=1e-6, atol=1e-6)
  from nfnet_jax.data import augment, numpy_pipeline
  assert T.MEAN_RGB is normalize.MEAN_RGB and augment.MEAN_RGB is normalize.MEAN_RGB
  assert numpy_pipeline.normalize is normalize.normalize
  np.testing.assert_allclose(augment.normalize(x), normalize.normalize(x), rtol=1e-6,
                             atol=1e-6)
