"""device_augment: each JAX op equals the TF op bit for bit, the whole device-augmented
batch equals the host-augmented one, and 8 devices give the batch of 1."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.data import device_augment as da
from nfnet_jax.data.policy import OP_NAMES, SIGNED_OPS

tf = pytest.importorskip('tensorflow')
from nfnet_jax import data  # noqa: E402
from nfnet_jax.data import mixing, randaugment as ra  # noqa: E402


def natural_image(h, w, seed):
  """Smooth colours plus noise: every op changes it, and blends cross many levels."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([120 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


IMAGES = [natural_image(48, 40, 0), natural_image(48, 40, 1),
          np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8)]
CONVENTIONS = {'Contrast': [dict(contrast_mode='tf'), dict(contrast_mode='mean')],
               'Posterize': [dict(posterize_mode='keep_bits'),
                             dict(posterize_mode='remove_bits')],
               'Solarize': [dict(solarize_mode='wrap'), dict(solarize_mode='saturate')]}


@pytest.mark.parametrize('magnitude', [5.0, 10.0, 15.0])
def test_every_op_equals_tf_bit_for_bit(magnitude):
  """All 16 ops, each convention, both signs, on three 48x40 images (one pure
  noise): identical uint8 output."""
  batch = np.stack(IMAGES)
  for name in OP_NAMES:
    for kw in CONVENTIONS.get(name, [{}]):
      for sign in ((1.0, -1.0) if name in SIGNED_OPS else (1.0,)):
        centre = (7, 31)
        fn = jax.jit(jax.vmap(lambda x, s: da.apply_op(x, name, magnitude, s,
                                                       (jnp.int32(7), jnp.int32(31)), **kw),
                              in_axes=(0, None)))
        device = np.asarray(fn(batch, np.float32(sign)))
        for i, image in enumerate(IMAGES):
          host = ra.apply_op(image, name, magnitude, sign=sign, centre=centre, **kw).numpy()
          np.testing.assert_array_equal(device[i], host, err_msg=f'{name} M={magnitude} '
                                        f'sign={sign} {kw} image {i}')


@pytest.mark.slow
def test_blend_geometric_ops_equal_tf_at_train_sizes():
  """Rounding-sensitive ops at 192/224/256 px and several magnitudes."""
  rng = np.random.default_rng(3)
  for size in (192, 256):
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for m in (7.0, 20.0):
      for name, kw in (('Rotate', {}), ('ShearX', {}), ('ShearY', {}), ('TranslateY', {}),
                       ('Color', {}), ('Contrast', dict(contrast_mode='mean')),
                       ('Sharpness', {}), ('AutoContrast', {})):
        fn = jax.jit(lambda x, s: da.apply_op(x, name, m, s, (0, 0), **kw))
        for sign in (1.0, -1.0):
          host = ra.apply_op(image, name, m, sign=sign, centre=(0, 0), **kw).numpy()
          device = fn(image, np.float32(sign))
          np.testing.assert_array_equal(np.asarray(device), host, err_msg=f'{name} {m} {size}')


def test_mul_int_is_the_float32_product():
  rng = np.random.default_rng(0)
  r = np.concatenate([rng.random(400), rng.random(50) * 255, 10.0 ** rng.uniform(-37, 0, 100),
                      [0.0, 1.0, 0.5, 1 - 2 ** -24, 255.0]]).astype(np.float32)
  k = np.arange(-255, 256, dtype=np.int32)
  np.testing.assert_array_equal(np.asarray(jax.jit(da.mul_int)(r[:, None], k[None, :])),
                                r[:, None] * k[None, :].astype(np.float32))
  # What it guards against: XLA fuses d + f * x into an FMA on this backend.
  f = np.float32(1.36)
  x = np.arange(-255, 256).astype(np.float32)
  naive = np.asarray(jax.jit(lambda x: 41.0 + f * x)(x))
  exact = np.asarray(jax.jit(lambda k: 41.0 + da.mul_int(f, k))(x.astype(np.int32)))
  np.testing.assert_array_equal(exact, np.float32(41) + f * x)
  if jax.default_backend() == 'cpu':
    assert (naive != exact).any()


def test_solarize_on_device_as_tf_graph_mode():
  """Reference: DeepMind's `tf.where(image < threshold, image, 255 - image)` with
  the Python int threshold int((M / 10) * 256), traced by tf.function on uint8."""
  levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  for m in (5.0, 10.0, 15.0, 20.0):
    threshold = int((m / 10.0) * 256)
    ref = tf.function(lambda x: tf.where(x < threshold, x, 255 - x))(tf.constant(levels))
    dev = jax.jit(lambda x: da.apply_op(x, 'Solarize', m))(levels)
    np.testing.assert_array_equal(np.asarray(dev), ref.numpy(), err_msg=str(m))
  inverted = jax.jit(lambda x: da.apply_op(x, 'Solarize', 10.0))(levels)
  np.testing.assert_array_equal(np.asarray(inverted), 255 - levels)
  at_128 = jax.jit(lambda x: da.apply_op(x, 'Solarize', 15.0))(levels)
  np.testing.assert_array_equal(np.asarray(at_128), np.where(levels < 128, levels, 255 - levels))
  saturated = jax.jit(lambda x: da.apply_op(x, 'Solarize', 15.0, solarize_mode='saturate'))
  np.testing.assert_array_equal(np.asarray(saturated(levels)), levels)


@pytest.mark.slow
def test_policy_and_mixing_equal_tf():
  """Four layers with drawn parameters, and MixUp/CutMix with drawn ratios/boxes."""
  image = IMAGES[0]
  for m in (5.0, 10.0, 15.0):
    params = [ra.randaugment_params(np.array([s, int(m)], np.int32), 4, 48, 40)
              for s in range(6)]
    stacked = {k: np.stack([p[k].numpy() for p in params]) for k in params[0]}
    device = jax.jit(jax.vmap(lambda o, g, c: da.randaugment(image, o, g, c, m)))(
        stacked['ops'], stacked['signs'], stacked['centres'])
    for i, p in enumerate(params):
      host = ra.randaugment_with_params(image, p, magnitude=m).numpy()
      np.testing.assert_array_equal(np.asarray(device[i]), host, err_msg=f'M={m} seed {i}')
  a, b = IMAGES[1], IMAGES[2]
  la, lb = np.eye(5, dtype=np.float32)[[1, 3]]
  for s in range(20):
    mode = s % 2
    ratio, box = mixing.mix_params(tf.constant(mode), tf.constant([s, 9]), 0.2, 48, 40)
    host_image, host_label = mixing.mix_with_params(
        tf.cast(a, tf.float32), tf.cast(b, tf.float32), la, lb, mode, ratio, box)
    image, label = jax.jit(da.mix)(a, b, la, lb, mode, ratio.numpy(), box.numpy())
    np.testing.assert_array_equal(np.asarray(image), host_image.numpy())
    np.testing.assert_array_equal(np.asarray(label), host_label.numpy())


# ------------------------------------------------------------ whole batches

def offline_cfg(augment_on, **mix):
  cfg = data.default_config()
  cfg.source = 'offline'
  cfg.offline.num_train, cfg.offline.num_eval = 64, 8
  cfg.image_size = cfg.eval_size = 32
  cfg.prefetch = 1
  cfg.normalize = False                  # compare on the 0-255 scale
  cfg.randaugment.num_layers, cfg.randaugment.magnitude = 3, 15.0
  cfg.augment_on = augment_on
  cfg.mix.quantize_inputs = True        # what the device path always does
  for k, v in mix.items():
    cfg.mix[k] = v
  return cfg


def host_and_device(seed=3, step=2, batch=8, **mix):
  host = next(data.build_train_iter(offline_cfg('host', **mix), batch, seed, start_step=step,
                                    process_index=0, process_count=1))
  raw = next(data.build_train_iter(offline_cfg('device', **mix), batch, seed, start_step=step,
                                   process_index=0, process_count=1))
  device = jax.jit(lambda b: da.apply_device_augment(b, offline_cfg('device', **mix)))(raw)
  return host, raw, jax.tree.map(np.asarray, device)


MIXES = {'mixup+cutmix': {}, 'mixup': dict(cutmix=False), 'cutmix': dict(mixup_alpha=0.0),
         'none': dict(enabled=False)}
_SLOW = pytest.mark.slow


@pytest.mark.parametrize('pairing', ['paper', pytest.param('within_batch', marks=_SLOW)])
@pytest.mark.parametrize('mix', ['mixup+cutmix'] + [pytest.param(m, marks=_SLOW)
                                                   for m in MIXES if m != 'mixup+cutmix'])
def test_device_batch_equals_host_batch(mix, pairing):
  host, raw, device = host_and_device(pairing=pairing, **MIXES[mix])
  assert raw['images'].dtype == np.uint8
  m = 2 if mix != 'none' and pairing == 'paper' else 1
  assert raw['images'].shape == (8, m, 32, 32, 3)
  assert raw['ra_ops'].shape == (8, 3) and raw['mix_box'].shape == (8, 4)
  np.testing.assert_array_equal(device['images'], host['images'])
  np.testing.assert_array_equal(device['labels'], host['labels'])
  np.testing.assert_array_equal(device['mask'], host['mask'])
  assert (host['images'] == np.round(host['images'])).all()      # uint8 levels


@pytest.mark.slow
def test_device_batch_normalised_and_without_randaugment():
  """Normalised: bit for bit with RandAugment on (uint8 -> table). Off, MixUp rows
  are not integers and are divided on the device: XLA:CPU's float division is a
  reciprocal multiply, one ulp off at most."""
  for ra_on in (True, False):
    cfgs = [offline_cfg(on) for on in ('host', 'device')]
    for c in cfgs:
      c.normalize, c.randaugment.enabled = True, ra_on
    host = next(data.build_train_iter(cfgs[0], 8, 1, process_index=0, process_count=1))
    raw = next(data.build_train_iter(cfgs[1], 8, 1, process_index=0, process_count=1))
    device = jax.jit(lambda b: da.apply_device_augment(b, cfgs[1]))(raw)
    if ra_on:
      np.testing.assert_array_equal(np.asarray(device['images']), host['images'])
    else:
      np.testing.assert_allclose(np.asarray(device['images']), host['images'],
                                 rtol=1.2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(device['labels']), host['labels'])
  # Host batches pass through untouched (a train step may call it unconditionally).
  assert da.apply_device_augment(host, cfgs[0]) is host


def test_within_batch_pairs_rows_2i_and_2i_plus_1():
  host, _, _ = host_and_device(pairing='within_batch', enabled=True)
  support = host['labels'] > 0
  for i in range(0, 8, 2):
    np.testing.assert_array_equal(support[i] | support[i + 1], support[i])
  np.testing.assert_allclose(host['labels'].sum(1), 1.0, rtol=1e-6)


def test_bad_config_values_fail_with_one_line():
  for key, value, match in (('augment_on', 'gpu', 'data.augment_on'),
                            ('mix.pairing', 'random', 'data.mix.pairing'),
                            ('randaugment.solarize', 'clip', 'data.randaugment.solarize')):
    cfg = offline_cfg('device')
    node, _, leaf = key.rpartition('.')
    (cfg[node] if node else cfg)[leaf] = value
    with pytest.raises(ValueError, match=match):
      next(data.build_train_iter(cfg, 8, 0, process_index=0, process_count=1))
  with pytest.raises(ValueError, match='even'):
    next(data.build_train_iter(offline_cfg('host', pairing='within_batch'), 6, 0,
                               process_index=0, process_count=2))


_SHARDED = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from nfnet_jax import data
    from nfnet_jax.data import device_augment as da
    assert jax.device_count() == 8, jax.devices()
    cfg = data.default_config()
    cfg.normalize = False
    cfg.randaugment.magnitude = 10.0
    cfg.augment_on = 'device'
    cfg.mix.pairing = sys.argv[2]
    batch = dict(np.load(sys.argv[1]))
    one = jax.jit(lambda b: da.apply_device_augment(b, cfg))(batch)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    # As the train step shards (check_vma=False).
    f = jax.shard_map(lambda b: da.apply_device_augment(b, cfg), mesh=mesh,
                      in_specs=P('data'), out_specs=P('data'), check_vma=False)
    eight = jax.jit(f)(batch)
    for k in ('images', 'labels', 'mask'):
      np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(eight[k]))
    print('SAME', np.asarray(one['images']).shape)
''')


@pytest.mark.slow
@pytest.mark.parametrize('pairing', ['paper', 'within_batch'])
def test_eight_devices_give_the_batch_of_one(tmp_path, pairing):
  cfg = offline_cfg('device', pairing=pairing)
  cfg.randaugment.magnitude = 10.0
  raw = next(data.build_train_iter(cfg, 16, 0, process_index=0, process_count=1))
  np.savez(tmp_path / 'batch.npz', **raw)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SHARDED, str(tmp_path / 'batch.npz'), pairing],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SAME (16, 32, 32, 3)' in out.stdout


_NUMPY_PATH = textwrap.dedent('''
    import sys
    sys.modules['tensorflow'] = None          # any TF import fails
    import numpy as np
    from nfnet_jax import data
    out = {}
    for ra_on in (False, True):
      cfg = data.default_config()
      cfg.source, cfg.use_tf, cfg.normalize, cfg.prefetch = 'offline', False, False, 0
      cfg.offline.num_train = 64
      cfg.image_size = cfg.eval_size = 32
      cfg.randaugment.enabled = ra_on
      cfg.randaugment.num_layers, cfg.randaugment.magnitude = 2, 10.0
      it = data.build_train_iter(cfg, 8, seed=4, start_step=3, process_index=0,
                                 process_count=1)
      out['on' if ra_on else 'off'] = next(it)['images']
      halves = [next(data.build_train_iter(cfg, 8, seed=4, start_step=3, process_index=p,
                                           process_count=2))['images'] for p in range(2)]
      out['halves_' + ('on' if ra_on else 'off')] = np.concatenate(halves)
    np.savez(sys.argv[1], **out)
    print('OK')
''')


@pytest.mark.slow
def test_numpy_path_gains_randaugment_without_tensorflow(tmp_path):
  """use_tf=False with RandAugment on: runs with TensorFlow blocked, each row is the
  TF policy applied to the RandAugment-off row (parameters from the path's own numpy
  stream), and the batch does not depend on the process count."""
  path = str(tmp_path / 'numpy_path.npz')
  out = subprocess.run([sys.executable, '-c', _NUMPY_PATH, path], env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  got = np.load(path)
  np.testing.assert_array_equal(got['halves_on'], got['on'])
  assert not np.array_equal(got['on'], got['off'])
  params = da.draw_randaugment_params(np.random.default_rng([4, 3, 0xA06]), 8, 2, 32, 32)
  for i in range(8):
    ref = ra.randaugment_with_params(
        ra.tf.cast(ra.tf.clip_by_value(got['off'][i], 0, 255), ra.tf.uint8),
        {k: v[i] for k, v in params.items()}, magnitude=10.0).numpy()
    np.testing.assert_array_equal(got['on'][i], ref, err_msg=f'row {i}')
