"""augment_on='host' and 'device' build the same training batch for the same (seed,
step), through the TF and the TF-free (numpy) pipelines; 8 devices give the batch
of 1; the numpy path runs with TensorFlow blocked."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nfnet_jax import data
from nfnet_jax.data import augment


def offline_cfg(augment_on, use_tf=True, **mix):
  cfg = data.default_config()
  cfg.source = 'offline'
  cfg.use_tf = use_tf
  cfg.offline.num_train, cfg.offline.num_eval = 64, 8
  cfg.image_size = cfg.eval_size = 32
  cfg.prefetch = 1
  cfg.randaugment.num_layers, cfg.randaugment.magnitude = 3, 15.0
  cfg.augment_on = augment_on
  for k, v in mix.items():
    cfg.mix[k] = v
  return cfg


def host_and_device(seed=3, step=2, batch=8, use_tf=True, **mix):
  """(host batch, raw device-path batch, the device path's batch after `augment`)."""
  it = lambda on: data.build_train_iter(offline_cfg(on, use_tf, **mix), batch, seed,  # noqa: E731
                                        start_step=step, process_index=0, process_count=1)
  host, raw = next(it('host')), next(it('device'))
  recipe = augment.Recipe.from_config(offline_cfg('device', use_tf, **mix))
  device = jax.jit(lambda b: augment.augment(b, recipe, seed))(raw)
  return host, raw, jax.tree.map(np.asarray, device)


MIXES = {'mixup+cutmix': {}, 'mixup': dict(cutmix=False), 'cutmix': dict(mixup_alpha=0.0),
         'none': dict(enabled=False)}
_SLOW = pytest.mark.slow


@pytest.mark.parametrize('use_tf', [True, pytest.param(False, marks=_SLOW)])
@pytest.mark.parametrize('pairing', ['paper', 'within_batch'])
@pytest.mark.parametrize('mix', ['mixup+cutmix'] + [pytest.param(m, marks=_SLOW)
                                                   for m in MIXES if m != 'mixup+cutmix'])
def test_device_batch_equals_host_batch(mix, pairing, use_tf):
  host, raw, device = host_and_device(use_tf=use_tf, pairing=pairing, **MIXES[mix])
  assert raw['images'].dtype == np.uint8
  m = 2 if mix != 'none' and pairing == 'paper' else 1
  assert raw['images'].shape == (8, m, 32, 32, 3)
  assert sorted(raw) == ['aug_row', 'aug_step', 'images', 'labels', 'mask', 'mix_mode']
  for key in ('images', 'labels', 'mask'):
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)
  assert host['images'].dtype == np.float32 and host['images'].shape == (8, 32, 32, 3)
  np.testing.assert_allclose(host['labels'].sum(1), 1.0, rtol=1e-6)


def test_within_batch_pairs_rows_2i_and_2i_plus_1():
  host, _, _ = host_and_device(pairing='within_batch', enabled=True)
  support = host['labels'] > 0
  for i in range(0, 8, 2):
    np.testing.assert_array_equal(support[i] | support[i + 1], support[i])


def test_bad_config_values_fail_with_one_line():
  for key, value, match in (('augment_on', 'gpu', 'data.augment_on'),
                            ('mix.pairing', 'random', 'data.mix.pairing'),
                            ('randaugment.solarize', 'clip', 'data.randaugment.solarize')):
    for use_tf in (True, False):
      cfg = offline_cfg('device', use_tf)
      node, _, leaf = key.rpartition('.')
      (cfg[node] if node else cfg)[leaf] = value
      with pytest.raises(ValueError, match=match):
        next(data.build_train_iter(cfg, 8, 0, process_index=0, process_count=1))
  for use_tf in (True, False):
    with pytest.raises(ValueError, match='even'):
      next(data.build_train_iter(offline_cfg('host', use_tf, pairing='within_batch'), 6, 0,
                                 process_index=0, process_count=2))


_SHARDED = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from nfnet_jax.data import augment
    assert jax.device_count() == 8, jax.devices()
    recipe = augment.Recipe(num_layers=3, magnitude=10.0, mix=True, normalize=False)
    batch = dict(np.load(sys.argv[1]))
    one = jax.jit(lambda b: augment.augment(b, recipe, 0))(batch)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    # As the train step shards (check_vma=False).
    f = jax.shard_map(lambda b: augment.augment(b, recipe, 0), mesh=mesh,
                      in_specs=P('data'), out_specs=P('data'), check_vma=False)
    eight = jax.jit(f)(batch)
    for k in ('images', 'labels', 'mask'):
      np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(eight[k]))
    print('SAME', np.asarray(one['images']).shape)
''')


@pytest.mark.parametrize('pairing', ['paper', pytest.param('within_batch', marks=_SLOW)])
def test_eight_devices_give_the_batch_of_one(tmp_path, pairing):
  cfg = offline_cfg('device', use_tf=False, pairing=pairing)
  raw = next(data.build_train_iter(cfg, 16, 0, process_index=0, process_count=1))
  np.savez(tmp_path / 'batch.npz', **raw)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SHARDED, str(tmp_path / 'batch.npz')],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SAME (16, 32, 32, 3)' in out.stdout


_NUMPY_PATH = textwrap.dedent('''
    import sys
    sys.modules['tensorflow'] = None          # any TF import fails
    import numpy as np
    from nfnet_jax import data
    cfg = data.default_config()
    cfg.source, cfg.use_tf, cfg.prefetch = 'offline', False, 0
    cfg.offline.num_train = 64
    cfg.image_size = cfg.eval_size = 32
    cfg.randaugment.num_layers, cfg.randaugment.magnitude = 2, 10.0
    whole = next(data.build_train_iter(cfg, 8, seed=4, start_step=3, process_index=0,
                                       process_count=1))['images']
    halves = [next(data.build_train_iter(cfg, 8, seed=4, start_step=3, process_index=p,
                                         process_count=2))['images'] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    print('OK', whole.shape, whole.dtype)
''')


@_SLOW
def test_numpy_path_augments_without_tensorflow():
  """use_tf=False with mixing and RandAugment: runs with TensorFlow blocked, and the
  batch does not depend on the process count."""
  out = subprocess.run([sys.executable, '-c', _NUMPY_PATH], env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK (8, 32, 32, 3) float32' in out.stdout
