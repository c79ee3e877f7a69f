"""RandAugment ops: identities, hand-computed references, direction with M, range."""
import numpy as np
import pytest

pytest.importorskip('tensorflow')
import tf_randaugment as ra  # noqa: E402  (the TF oracle of test_augment)

# 2x2 RGB test image; values chosen so no reference lands on a rounding boundary.
P = np.array([[[65, 157, 195], [98, 117, 255]],
              [[206, 251, 97], [175, 243, 166]]], np.uint8)
B = np.arange(1, 26).reshape(5, 5)
G = np.stack([B, B + 100, B + 200], -1).astype(np.uint8)   # 5x5, distinct pixels
FILL = 128


def op(image, name, magnitude, **kw):
  return ra.apply_op(image, name, magnitude, **kw).numpy()


def natural_image(size=32, seed=0):
  """Smooth random colours plus texture: something every op visibly changes."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  base = np.stack([120 + 80 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
  return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ identities

def test_identities():
  img = natural_image()
  np.testing.assert_array_equal(ra.invert(ra.invert(img)).numpy(), img)
  np.testing.assert_array_equal(ra.solarize(img, 256, 'saturate').numpy(), img)
  np.testing.assert_array_equal(op(img, 'Solarize', 10, solarize_mode='saturate'), img)
  np.testing.assert_array_equal(op(img, 'Solarize', 10), 255 - img)  # 256 wraps to 0
  np.testing.assert_array_equal(ra.posterize(img, 8).numpy(), img)
  np.testing.assert_array_equal(op(img, 'Posterize', 20), img)      # keeps int(8) bits
  np.testing.assert_array_equal(op(img, 'Posterize', 0, posterize_mode='remove_bits'), img)
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
    for sign in (1.0, -1.0):
      np.testing.assert_array_equal(op(img, name, 0, sign=sign), img, err_msg=name)
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):           # factor 1.0
    np.testing.assert_array_equal(op(img, name, 5), img, err_msg=name)
  np.testing.assert_array_equal(op(img, 'Cutout', 0, centre=(5, 5)), img)
  np.testing.assert_array_equal(op(img, 'SolarizeAdd', 0), img)


def test_magnitude_rules():
  a = ra.op_args
  assert a('Rotate', 5) == pytest.approx(15.0)
  assert a('ShearX', 5) == pytest.approx(0.15)
  assert a('TranslateY', 5) == pytest.approx(50.0)
  assert a('Posterize', 5) == 2 and a('Posterize', 10) == 4 and a('Posterize', 15) == 6
  assert a('Posterize', 5, 'remove_bits') == 6 and a('Posterize', 10, 'remove_bits') == 4
  assert a('Solarize', 5) == 128 and a('Solarize', 10) == 256
  assert a('SolarizeAdd', 5) == 55 and a('SolarizeAdd', 10) == 110
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    assert a(name, 0) == pytest.approx(0.1) and a(name, 10) == pytest.approx(1.9)
    assert a(name, 15) == pytest.approx(2.8)                  # linear above 10
  assert a('Cutout', 5) == 20 and a('Cutout', 10) == 40        # side 2 * int(40 M/10)
  assert len(ra.OP_NAMES) == 16 and len(set(ra.OP_NAMES)) == 16


# ------------------------------------------------------------ hand references

def test_pixel_ops_reference():
  np.testing.assert_array_equal(op(P, 'Invert', 5), [[[190, 98, 60], [157, 138, 0]],
                                                     [[49, 4, 158], [80, 12, 89]]])
  # Solarize M=5: threshold 128, pixels >= 128 inverted.
  np.testing.assert_array_equal(op(P, 'Solarize', 5), [[[65, 98, 60], [98, 117, 0]],
                                                       [[49, 4, 97], [80, 12, 89]]])
  # SolarizeAdd M=5: +55 to pixels < 128.
  np.testing.assert_array_equal(op(P, 'SolarizeAdd', 5), [[[120, 157, 195], [153, 172, 255]],
                                                          [[206, 251, 152], [175, 243, 166]]])
  # Posterize keep_bits M=5: keep 2 bits (x & 0b11000000).
  np.testing.assert_array_equal(op(P, 'Posterize', 5), [[[64, 128, 192], [64, 64, 192]],
                                                        [[192, 192, 64], [128, 192, 128]]])
  # Posterize remove_bits M=5: remove 2 bits (x & 0b11111100).
  np.testing.assert_array_equal(op(P, 'Posterize', 5, posterize_mode='remove_bits'),
                                [[[64, 156, 192], [96, 116, 252]],
                                 [[204, 248, 96], [172, 240, 164]]])
  # AutoContrast: per channel (x - min) * 255 / (max - min), truncated.
  np.testing.assert_array_equal(op(P, 'AutoContrast', 5), [[[0, 76, 158], [59, 0, 255]],
                                                           [[255, 255, 0], [198, 239, 111]]])


def test_blend_ops_reference():
  # Blend factor f = 0.1 + 1.8 M/10: M=2 -> 0.46, M=8 -> 1.54; out = trunc(clip(d + f(x-d))).
  # Brightness: d = 0.
  np.testing.assert_array_equal(op(P, 'Brightness', 2), [[[29, 72, 89], [45, 53, 117]],
                                                         [[94, 115, 44], [80, 111, 76]]])
  np.testing.assert_array_equal(op(P, 'Brightness', 8), [[[100, 241, 255], [150, 180, 255]],
                                                         [[255, 255, 149], [255, 255, 255]]])
  # Color: d = grey (0.2989 R + 0.587 G + 0.114 B) -> [[134, 127], [220, 214]].
  np.testing.assert_array_equal(ra.grayscale(P).numpy()[..., 0], [[134, 127], [220, 214]])
  np.testing.assert_array_equal(op(P, 'Color', 2), [[[102, 144, 162], [113, 122, 185]],
                                                    [[213, 234, 163], [196, 227, 191]]])
  np.testing.assert_array_equal(op(P, 'Color', 8), [[[27, 169, 227], [82, 111, 255]],
                                                    [[198, 255, 30], [153, 255, 140]]])
  # Contrast 'mean': d = trunc(mean grey) = 173.
  np.testing.assert_array_equal(op(P, 'Contrast', 2, contrast_mode='mean'),
                                [[[123, 165, 183], [138, 147, 210]],
                                 [[188, 208, 138], [173, 205, 169]]])
  np.testing.assert_array_equal(op(P, 'Contrast', 8, contrast_mode='mean'),
                                [[[6, 148, 206], [57, 86, 255]],
                                 [[223, 255, 55], [176, 255, 162]]])
  # Contrast 'tf': d = min(H*W/256, 255) = 2 on a 16x32 image (P tiled).
  q = np.tile(P, (8, 16, 1))
  np.testing.assert_array_equal(op(q, 'Contrast', 2)[:2, :2],
                                [[[30, 73, 90], [46, 54, 118]], [[95, 116, 45], [81, 112, 77]]])
  np.testing.assert_array_equal(op(q, 'Contrast', 8)[:2, :2],
                                [[[99, 240, 255], [149, 179, 255]],
                                 [[255, 255, 148], [255, 255, 254]]])
  # On a 2x2 image the 'tf' grey level is trunc(4/256) = 0: same as Brightness.
  np.testing.assert_array_equal(op(P, 'Contrast', 2), op(P, 'Brightness', 2))


def test_sharpness_reference():
  s = np.zeros((3, 3, 3), np.uint8)
  s[..., 0], s[..., 1], s[..., 2] = 10, 200, 30
  s[1, 1] = [141, 100, 31]
  # Centre smoothed: (8*border + 5*centre)/13 -> [60, 161, 30]; then blended.
  for m, centre in ((2, [97, 132, 30]), (8, [184, 67, 31])):
    out = op(s, 'Sharpness', m)
    np.testing.assert_array_equal(out[1, 1], centre)
    border = np.ones((3, 3), bool)
    border[1, 1] = False
    np.testing.assert_array_equal(out[border], s[border])      # border untouched


def test_equalize_reference_and_ramp():
  # 512 pixels: 256 at 10 and 256 at 20 (channel 0) -> 0 and 255.
  img = np.zeros((16, 32, 3), np.uint8)
  img[:, :16, 0], img[:, 16:, 0] = 10, 20
  img[..., 1] = 7                                          # constant channel: unchanged
  img[..., 2] = np.arange(32, dtype=np.uint8)[None, :] * 8  # already flat histogram
  out = op(img, 'Equalize', 5)
  assert set(np.unique(out[:, :16, 0])) == {0} and set(np.unique(out[:, 16:, 0])) == {255}
  np.testing.assert_array_equal(out[..., 1], 7)
  # A ramp squeezed into 100..115 (16 levels x 17 pixels) is spread evenly over
  # 0..255: step = (16*17 - 17) // 255 = 1 and level i -> 17 i.
  ramp = np.tile((100 + np.arange(16, dtype=np.uint8))[None, :, None], (17, 1, 3))
  eq = op(ramp, 'Equalize', 5)
  np.testing.assert_array_equal(eq[0, :, 0], 17 * np.arange(16))
  counts = np.histogram(eq[..., 0], bins=16, range=(0, 256))[0]
  assert counts.min() == counts.max() == 17                  # flat
  assert (np.histogram(ramp[..., 0], bins=16, range=(0, 256))[0] > 0).sum() == 2  # before


def test_geometric_ops_reference():
  def ch0(x):
    return x[..., 0]
  # ShearX M=10 (level 0.3): out(x, y) = in(x + round(0.3 y), y) -> rows 2..4 move left.
  np.testing.assert_array_equal(ch0(op(G, 'ShearX', 10, sign=1.0)),
                                [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [12, 13, 14, 15, FILL],
                                 [17, 18, 19, 20, FILL], [22, 23, 24, 25, FILL]])
  np.testing.assert_array_equal(ch0(op(G, 'ShearY', 10, sign=1.0)),
                                [[1, 2, 8, 9, 10], [6, 7, 13, 14, 15], [11, 12, 18, 19, 20],
                                 [16, 17, 23, 24, 25], [21, 22, FILL, FILL, FILL]])
  # Rotate M=30 -> 90 degrees counter-clockwise; M=60 -> 180 degrees.
  np.testing.assert_array_equal(op(G, 'Rotate', 30, sign=1.0), np.rot90(G, 1))
  np.testing.assert_array_equal(op(G, 'Rotate', 30, sign=-1.0), np.rot90(G, -1))
  np.testing.assert_array_equal(op(G, 'Rotate', 60, sign=1.0), np.rot90(G, 2))
  # TranslateX M=0.2 -> 2 px to the right (sign +), fill 128 enters on the left.
  expected = np.full_like(G, FILL)
  expected[:, 2:] = G[:, :3]
  np.testing.assert_array_equal(op(G, 'TranslateX', 0.2, sign=1.0), expected)
  expected = np.full_like(G, FILL)
  expected[:3] = G[2:]
  np.testing.assert_array_equal(op(G, 'TranslateY', 0.2, sign=-1.0), expected)
  # Cutout M=0.5 -> half size int(40 * 0.05) = 2 at centre (1, 3): rows 0..2, cols 1..4.
  expected = G.copy()
  expected[0:3, 1:5] = FILL
  np.testing.assert_array_equal(op(G, 'Cutout', 0.5, centre=(1, 3)), expected)
  # Custom fill value.
  assert (op(G, 'TranslateX', 0.2, sign=1.0, fill=0)[:, :2] == 0).all()


# ----------------------------------------------------------- direction with M

def _strength(name, image, m, **kw):
  out = op(image, name, m, sign=1.0, **kw) if name in ra.SIGNED_OPS else \
      op(image, name, m, centre=(16, 16), **kw) if name == 'Cutout' else op(image, name, m, **kw)
  x, y = image.astype(float), out.astype(float)
  if name == 'Brightness':
    return y.mean()
  if name == 'Color':
    return np.abs(y - y.mean(-1, keepdims=True)).mean()          # saturation
  if name == 'Contrast':
    return y.std()
  if name == 'Sharpness':
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return np.abs(lap).mean()
  if name in ra.SIGNED_OPS or name == 'Cutout':
    return (out == FILL).all(-1).mean()                         # area filled with 128
  return np.abs(y - x).mean()                                   # distance from input


@pytest.mark.parametrize('name', [n for n in ra.OP_NAMES
                                  if n not in ('AutoContrast', 'Equalize', 'Invert')])
def test_direction_with_magnitude(name):
  img = natural_image(256 if name in ra.SIGNED_OPS else 32)
  img[img == FILL] = FILL - 1
  ms = [1, 3, 5, 7, 9]
  s = [_strength(name, img, m) for m in ms]
  if name in ('Posterize', 'Solarize'):        # weaker as M grows (TF convention)
    assert all(a >= b for a, b in zip(s, s[1:])) and s[0] > s[-1], s
  else:
    assert all(a <= b for a, b in zip(s, s[1:])) and s[0] < s[-1], s
  if name == 'Solarize':
    assert _strength(name, img, 10, solarize_mode='saturate') == 0.0
  if name == 'Posterize':                      # remove_bits: stronger as M grows
    r = [_strength(name, img, m, posterize_mode='remove_bits') for m in ms]
    assert all(a <= b for a, b in zip(r, r[1:])) and r[0] < r[-1], r


# --------------------------------------------------------------- full policy

def test_randaugment_uint8_range_and_determinism():
  img = natural_image(24)
  for m in (0.0, 5.0, 15.0, 30.0):
    for contrast_mode in ra.CONTRAST_MODES:
      for posterize_mode in ra.POSTERIZE_MODES:
        out = ra.randaugment(img, np.array([3, int(m)], np.int32), num_layers=4, magnitude=m,
                             contrast_mode=contrast_mode, posterize_mode=posterize_mode)
        assert out.dtype.name == 'uint8' and out.shape == img.shape
  a = ra.randaugment(img, np.array([1, 2], np.int32), num_layers=3, magnitude=9.0).numpy()
  b = ra.randaugment(img, np.array([1, 2], np.int32), num_layers=3, magnitude=9.0).numpy()
  np.testing.assert_array_equal(a, b)
  # Saturation rather than wrap-around at extreme magnitudes.
  bright = op(img, 'Brightness', 30)
  assert (bright >= img).all() and bright.max() == 255
  with pytest.raises(TypeError):
    ra.randaugment(img.astype(np.float32), np.array([1, 2], np.int32))


def test_randaugment_draws_all_ops():
  """Over many seeds, one layer changes the image in many different ways."""
  img = natural_image(16)
  outs = {ra.randaugment(img, np.array([s, 0], np.int32), num_layers=1,
                         magnitude=7.0).numpy().tobytes() for s in range(60)}
  assert len(outs) >= 12


# ------------------------------------------------- Solarize as the paper's runs

def deepmind_solarize_graph(image: np.ndarray, magnitude: float) -> np.ndarray:
  """The reference: DeepMind's expression `tf.where(image < threshold, image,
  255 - image)` with the Python-int threshold int((M / 10) * 256), traced by
  tf.function and run on a uint8 tensor (where TF converts the int to uint8)."""
  import tensorflow as tf
  threshold = int((magnitude / 10.0) * 256)

  @tf.function
  def solarize(image):
    return tf.where(image < threshold, image, 255 - image)
  return solarize(tf.constant(image)).numpy()


def test_solarize_wraps_like_tf_graph_mode():
  every_level = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  for m in (0, 1, 5, 9.9, 10, 11.7, 15, 20, 25):
    ref = deepmind_solarize_graph(every_level, m)
    np.testing.assert_array_equal(op(every_level, 'Solarize', m), ref, err_msg=str(m))
    # Same through the policy (one layer, op forced to Solarize).
    params = dict(ops=np.array([ra.OP_NAMES.index('Solarize')], np.int32),
                  signs=np.ones([1], np.float32), centres=np.zeros([1, 2], np.int32))
    np.testing.assert_array_equal(
        ra.randaugment_with_params(every_level, params, magnitude=float(m)).numpy(), ref)
  # Spelled out: M=10 (F1, F2) inverts every pixel, M=15 (F3+) solarizes at 128.
  np.testing.assert_array_equal(op(every_level, 'Solarize', 10), 255 - every_level)
  at_128 = np.where(every_level < 128, every_level, 255 - every_level)
  np.testing.assert_array_equal(op(every_level, 'Solarize', 15), at_128)
  # 'saturate': an int32 comparison, identity from M=10.
  np.testing.assert_array_equal(op(every_level, 'Solarize', 10, solarize_mode='saturate'),
                                every_level)
  np.testing.assert_array_equal(op(every_level, 'Solarize', 15, solarize_mode='saturate'),
                                every_level)
  np.testing.assert_array_equal(op(every_level, 'Solarize', 5, solarize_mode='saturate'),
                                at_128)
  with pytest.raises(ValueError, match='solarize'):
    op(every_level, 'Solarize', 5, solarize_mode='clip')


def test_randaugment_params_reproduce_the_policy():
  """randaugment(seed) == randaugment_with_params(randaugment_params(seed)), and the
  draws are uniform over the 16 ops with both signs."""
  img = natural_image(24)
  for s in range(6):
    seed = np.array([s, 11], np.int32)
    params = ra.randaugment_params(seed, 4, 24, 24)
    np.testing.assert_array_equal(
        ra.randaugment(img, seed, num_layers=4, magnitude=15.0).numpy(),
        ra.randaugment_with_params(img, params, magnitude=15.0).numpy())
  draws = [ra.randaugment_params(np.array([s, 1], np.int32), 4, 24, 24) for s in range(100)]
  ops = np.concatenate([d['ops'].numpy() for d in draws])
  assert set(ops) == set(range(16))
  signs = np.concatenate([d['signs'].numpy() for d in draws])
  assert set(signs) == {-1.0, 1.0} and 0.35 < (signs > 0).mean() < 0.65
  centres = np.concatenate([d['centres'].numpy() for d in draws])
  assert centres.min() >= 0 and centres.max() < 24
