"""Offline shapes dataset (`data.shapes`) and the numpy (TensorFlow-free) input path
(`data.numpy_pipeline`)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nfnet_jax import data
from nfnet_jax.data import indexing, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**overrides):
  cfg = data.default_config()
  cfg.source = 'offline'
  cfg.use_tf = False
  cfg.randaugment.enabled = False
  cfg.image_size = cfg.eval_size = 32
  cfg.offline.num_train = 64
  cfg.offline.num_eval = 50
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def test_generation_is_deterministic_and_prefix_stable():
  x1, y1 = shapes.generate('train', 700)
  x2, y2 = shapes.generate('train', 100)
  np.testing.assert_array_equal(x1[:100], x2)
  np.testing.assert_array_equal(y1[:100], y2)
  assert x1.dtype == np.uint8 and x1.shape == (700, 32, 32, 3)
  assert set(np.unique(y1)) == set(range(10))
  xe, _ = shapes.generate('eval', 100)
  assert not np.array_equal(xe, x2)                      # splits differ
  assert len({x.tobytes() for x in x1}) == 700           # no duplicate images
  assert shapes.class_names(10)[0] == 'disc/solid' and len(shapes.class_names(20)) == 20


def test_linear_classifier_on_raw_pixels_stays_below_50_percent():
  """Softmax regression (full-batch Adam, numpy) on raw pixels: near chance on
  held-out data although it fits part of the training set."""
  xtr, ytr = shapes.generate('train', 2000)
  xte, yte = shapes.generate('eval', 1000)
  f = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  xtr, xte = f(xtr), f(xte)
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  w = np.zeros([xtr.shape[1], 10], np.float32)
  b = np.zeros([10], np.float32)
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  onehot = np.eye(10, dtype=np.float32)[ytr]
  for t in range(1, 121):
    logits = xtr @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(xtr)
    grads = [xtr.T @ g + 1e-4 * w, g.sum(0)]
    for i, (param, grad) in enumerate(zip((w, b), grads)):
      m[i] = 0.9 * m[i] + 0.1 * grad
      v[i] = 0.999 * v[i] + 0.001 * grad ** 2
      param -= 3e-3 * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
  train_acc = ((xtr @ w + b).argmax(1) == ytr).mean()
  test_acc = ((xte @ w + b).argmax(1) == yte).mean()
  assert train_acc > 0.3            # the optimiser works ...
  assert test_acc < 0.5, test_acc   # ... but raw pixels do not generalise linearly


def test_numpy_train_iter_format_determinism_resume_and_process_independence():
  cfg = small_cfg()
  one = take(data.build_train_iter(cfg, 8, seed=3, process_index=0, process_count=1), 4)
  b = one[0]
  assert b['images'].shape == (8, 32, 32, 3) and b['images'].dtype == np.float32
  assert b['labels'].shape == (8, 10) and b['mask'].shape == (8,)
  np.testing.assert_allclose(b['labels'].sum(1), 1.0, rtol=1e-6)
  again = take(data.build_train_iter(cfg, 8, seed=3, process_index=0, process_count=1), 4)
  resumed = take(data.build_train_iter(cfg, 8, seed=3, start_step=2, process_index=0,
                                       process_count=1), 2)
  parts = [take(data.build_train_iter(cfg, 8, seed=3, process_index=p, process_count=2), 4)
           for p in range(2)]
  other = next(data.build_train_iter(cfg, 8, seed=4, process_index=0, process_count=1))
  for s in range(4):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(one[s][key], again[s][key])
      np.testing.assert_array_equal(
          one[s][key], np.concatenate([parts[0][s][key], parts[1][s][key]]))
  for s in range(2):
    np.testing.assert_array_equal(resumed[s]['images'], one[s + 2]['images'])
  assert not np.array_equal(other['images'], one[0]['images'])


def _example_ids(images, table):
  return [table[np.asarray(x, np.uint8).tobytes()] for x in images]


def test_numpy_shards_disjoint_and_cover_epoch():
  cfg = small_cfg(crop='none', flip=False, normalize=False)
  cfg.mix.enabled = False
  raw, _ = shapes.load(cfg, 'train')
  table = {x.tobytes(): i for i, x in enumerate(raw)}
  seen = []
  for p in range(4):
    batches = take(data.build_train_iter(cfg, 16, seed=0, process_index=p, process_count=4), 4)
    seen.append([i for b in batches for i in _example_ids(b['images'], table)])
  for p in range(4):
    for q in range(p + 1, 4):
      assert not set(seen[p]) & set(seen[q])
  assert sorted(sum(seen, [])) == list(range(64))      # one epoch = 64/16 steps


def test_numpy_eval_padding_counts_each_example_once():
  cfg = small_cfg(normalize=False)
  raw, labels = shapes.load(cfg, 'eval')
  table = {x.tobytes(): i for i, x in enumerate(raw)}
  counts = np.zeros(50, int)
  for p in range(2):
    batches = list(data.build_eval_iter(cfg, 16, process_index=p, process_count=2))
    assert len(batches) == 4                             # ceil(50 / 16)
    for b in batches:
      assert b['images'].shape == (8, 32, 32, 3)
      ids = _example_ids(b['images'], table)
      for i, m, lab in zip(ids, b['mask'], b['labels']):
        if m:
          counts[i] += 1
          assert lab.argmax() == labels[i]
        else:
          assert lab.sum() == 0
  np.testing.assert_array_equal(counts, 1)


def test_batch_errors_and_info():
  cfg = small_cfg()
  with pytest.raises(ValueError, match='divide'):
    data.build_train_iter(cfg, 10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='divide'):
    data.build_eval_iter(cfg, 6, process_index=0, process_count=4)
  cfg2 = small_cfg()
  cfg2.source = 'tfds'
  with pytest.raises(ValueError, match='offline'):
    data.build_train_iter(cfg2, 8, seed=0, process_index=0, process_count=1)
  info = data.dataset_info(cfg)
  assert info == dict(num_classes=10, num_train=64, num_eval=50, train_size=32, eval_size=32)
  assert indexing.local_batch_size(12, 3) == 4


def test_imagenet_class_names_ship_with_package():
  names, wnids = data.imagenet_class_names(), data.imagenet_wnids()
  assert len(names) == len(wnids) == 1000
  assert names[0].startswith('tench') and names[1].startswith('goldfish')
  assert names[207].startswith('golden retriever') and names[999].startswith('toilet tissue')
  assert wnids[0] == 'n01440764' and wnids == sorted(wnids)


_NO_TF = textwrap.dedent('''
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
          raise ImportError('tensorflow is blocked in this test')
    sys.meta_path.insert(0, Block())
    from nfnet_jax import data
    cfg = data.default_config()
    cfg.source, cfg.use_tf = 'offline', False
    cfg.randaugment.enabled = False
    cfg.image_size = cfg.eval_size = 32
    cfg.offline.num_train, cfg.offline.num_eval = 64, 20
    info = data.dataset_info(cfg)
    it = data.build_train_iter(cfg, 8, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b['images'].shape == (8, 32, 32, 3), b['images'].shape
    n = sum(int(e['mask'].sum()) for e in data.build_eval_iter(cfg, 8, 0, 1))
    assert n == 20, n
    assert len(data.imagenet_class_names()) == 1000
    assert not any(m.startswith('tensorflow') for m in sys.modules)
    print('OK', info)
''')


def test_numpy_path_runs_without_tensorflow():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run([sys.executable, '-c', _NO_TF], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK' in out.stdout


def test_package_import_does_not_import_tensorflow():
  code = ('import sys; import nfnet_jax.data as d; d.default_config(); '
          'import nfnet_jax.data.augment, nfnet_jax.data.shapes, nfnet_jax.data.indexing; '
          'import nfnet_jax.data.numpy_pipeline, nfnet_jax.data.normalize, nfnet_jax.configs; '
          'import experiments.quickstart as q; q.get_config("numpy"); '
          'print(any(m.startswith("tensorflow") for m in sys.modules))')
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == 'False'
