"""tf.data pipeline: sources (offline, folder, TFDS mock, real imagenet2012 builder
on miniature tars), sharding, eval padding, determinism, resumption, errors."""
import io
import logging
import os
import tarfile

import numpy as np
import pytest

pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
from PIL import Image  # noqa: E402

from nfnet_jax import data  # noqa: E402
from nfnet_jax.data import shapes, sources  # noqa: E402


def offline_cfg(**overrides):
  cfg = data.default_config()
  cfg.source = 'offline'
  cfg.image_size = cfg.eval_size = 32
  cfg.offline.num_train = 64
  cfg.offline.num_eval = 50
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def test_tf_never_sees_accelerators():
  from nfnet_jax.data._tf import tf
  assert tf.config.get_visible_devices('GPU') == []
  assert all(d.device_type == 'CPU' for d in tf.config.get_visible_devices())


# ------------------------------------------------ determinism on the full recipe

@pytest.mark.slow
def test_full_train_transform_determinism_resume_and_process_independence():
  """Offline source through the full train transform (pad-crop, flip, MixUp+CutMix,
  RandAugment N=2 M=9, normalisation)."""
  cfg = offline_cfg(prefetch=1)
  cfg.randaugment.num_layers, cfg.randaugment.magnitude = 2, 9.0

  def run(seed=5, start=0, p=0, n=1, steps=2):
    return take(data.build_train_iter(cfg, 8, seed=seed, start_step=start,
                                      process_index=p, process_count=n), steps)
  ref = run()
  b = ref[0]
  assert b['images'].shape == (8, 32, 32, 3) and b['images'].dtype == np.float32
  assert b['labels'].shape == (8, 10)
  np.testing.assert_allclose(b['labels'].sum(1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(b['mask'], 1.0)
  assert abs(float(b['images'].mean())) < 1.5                 # normalised
  again, resumed = run(), run(start=1, steps=1)
  halves = [run(p=p, n=2) for p in range(2)]
  for s in range(2):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(ref[s][key], again[s][key])
      np.testing.assert_array_equal(
          ref[s][key], np.concatenate([halves[0][s][key], halves[1][s][key]]))
  np.testing.assert_array_equal(resumed[0]['images'], ref[1]['images'])
  np.testing.assert_array_equal(resumed[0]['labels'], ref[1]['labels'])
  assert not np.array_equal(ref[0]['images'], ref[1]['images'])
  # (A different seed giving different batches is checked on the numpy path.)


def test_bfloat16_output():
  cfg = offline_cfg(bfloat16=True)
  cfg.randaugment.enabled = False
  b = next(data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1))
  assert b['images'].dtype.name == 'bfloat16' and b['labels'].dtype == np.float32


# ------------------------------------------------------ sharding and eval padding

def test_shards_disjoint_and_cover_the_split():
  cfg = offline_cfg(crop='none', flip=False, normalize=False)
  cfg.mix.enabled = False
  cfg.randaugment.enabled = False
  raw, _ = shapes.load(cfg, 'train')
  table = {x.tobytes(): i for i, x in enumerate(raw)}
  seen = []
  for p in range(2):
    batches = take(data.build_train_iter(cfg, 16, seed=1, process_index=p, process_count=2), 4)
    seen.append([table[b.astype(np.uint8).tobytes()] for batch in batches
                 for b in batch['images']])
  assert len(seen[0]) == len(seen[1]) == 32                  # even shards
  assert not set(seen[0]) & set(seen[1])                      # disjoint
  assert sorted(seen[0] + seen[1]) == list(range(64))          # cover: one epoch


def test_eval_padding_counts_each_example_once():
  cfg = offline_cfg(normalize=False)
  raw, labels = shapes.load(cfg, 'eval')
  table = {x.tobytes(): i for i, x in enumerate(raw)}
  counts = np.zeros(50, int)
  for p in range(2):
    batches = list(data.build_eval_iter(cfg, 16, process_index=p, process_count=2))
    assert len(batches) == 4
    for b in batches:
      for img, m, lab in zip(b['images'], b['mask'], b['labels']):
        if m:
          i = table[img.astype(np.uint8).tobytes()]
          counts[i] += 1
          assert lab.argmax() == labels[i]
        else:
          assert lab.sum() == 0
  np.testing.assert_array_equal(counts, 1)


# ----------------------------------------------------------------- folder source

def _save(path, array, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, fmt)


@pytest.fixture(scope='module')
def bw_folder(tmp_path_factory):
  """train/{black,white} (JPEG and PNG, various sizes) + val/, plus bad files."""
  root = str(tmp_path_factory.mktemp('folder'))
  for split, n in (('train', 6), ('val', 3)):
    for i in range(n):
      shape = (40 + 3 * i, 56 - 2 * i, 3)
      _save(f'{root}/{split}/black/{i}.jpg', np.zeros(shape, np.uint8), 'JPEG')
      _save(f'{root}/{split}/white/{i}.png', np.full(shape, 255, np.uint8), 'PNG')
  with open(f'{root}/train/white/corrupt.jpg', 'wb') as f:       # JPEG magic, no image
    f.write(b'\xff\xd8\xff\xe0' + b'garbage' * 10)
  with open(f'{root}/train/black/notes.txt', 'w') as f:
    f.write('not an image')
  with open(f'{root}/train/black/fake.png', 'w') as f:
    f.write('not a png either')
  return root


def folder_cfg(root, **overrides):
  cfg = data.default_config()
  cfg.source, cfg.folder = 'folder', root
  cfg.folder_cache_dir = os.path.join(os.path.dirname(root), 'verify_cache')
  cfg.image_size, cfg.eval_size = 24, 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_folder_source_skips_bad_files(bw_folder, caplog):
  sources.scan_folder.cache_clear()
  with caplog.at_level(logging.WARNING):
    info = data.dataset_info(folder_cfg(bw_folder))
  assert info['num_classes'] == 2 and info['num_train'] == 12 and info['num_eval'] == 6
  assert 'skipped 3 file(s)' in caplog.text and 'corrupt.jpg' in caplog.text
  cfg = folder_cfg(bw_folder)
  batches = take(data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1), 7)
  assert batches[-1]['images'].shape == (4, 24, 24, 3)       # > 2 epochs, no crash
  evals = list(data.build_eval_iter(cfg, 4, process_index=0, process_count=1))
  assert sum(e['mask'].sum() for e in evals) == 6
  assert evals[0]['images'].shape == (4, 16, 16, 3)
  held = data.dataset_info(folder_cfg(os.path.join(bw_folder, 'train'), holdout_fraction=0.5))
  assert held['num_train'] == 6 and held['num_eval'] == 6


def test_pipeline_label_mass_equals_pixel_share(bw_folder):
  """Black (class 0) and white (class 1) images through Inception crop, flip,
  bicubic resize and MixUp/CutMix: the white share of the pixels equals the
  label weight of class 1, in both halves of the batch."""
  cfg = folder_cfg(bw_folder, normalize=False)
  cfg.randaugment.enabled = False
  for batch in take(data.build_train_iter(cfg, 16, seed=2, process_index=0,
                                          process_count=1), 3):
    share = batch['images'].mean(axis=(1, 2, 3)) / 255.0
    np.testing.assert_allclose(batch['labels'].sum(1), 1.0, atol=1e-5)
    # The resized inputs are truncated to uint8 before mixing, so a white pixel that
    # the bicubic resize leaves at 254.99 counts as 254 (up to 1/255 of its weight).
    np.testing.assert_allclose(batch['labels'][:, 1], share, atol=4e-3)
  cut = batch['images'][8:] / 255.0                            # CutMix half: pasted
  assert np.mean((cut < 0.01) | (cut > 0.99)) > 0.99


def test_missing_folder_is_named(tmp_path):
  """(A missing TFDS dataset: tests/test_data_config.py.)"""
  with pytest.raises(FileNotFoundError, match='Folder dataset'):
    data.dataset_info(folder_cfg(str(tmp_path / 'nope')))


def test_a_version_folder_without_its_info_file_still_warns(tmp_path, caplog):
  """A version folder that exists but lacks dataset_info.json (a copy half written or
  damaged) is worth the warning (without one, the run says nothing about it:
  tests/test_cli.py, test_missing_tfds_data_is_one_line)."""
  (tmp_path / 'imagenet2012' / '5.1.0').mkdir(parents=True)
  cfg = data.default_config()
  cfg.data_dir = str(tmp_path)
  with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError):
    data.dataset_info(cfg)
  assert any(str(tmp_path / 'imagenet2012' / '5.1.0') in r.getMessage() and
             'has no dataset_info.json' in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- TFDS

def test_tfds_mock_data_end_to_end():
  cfg = data.default_config()
  cfg.image_size, cfg.eval_size = 32, 32
  cfg.randaugment.num_layers = 1
  cfg.prefetch = 1
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info(cfg)
    assert info['num_classes'] == 1000 and info['num_train'] == 10
    train = take(data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1), 2)
    evals = list(data.build_eval_iter(cfg, 4, process_index=0, process_count=1))
  assert train[1]['images'].shape == (4, 32, 32, 3)
  assert train[1]['labels'].shape == (4, 1000)
  np.testing.assert_allclose(train[1]['labels'].sum(1), 1.0, rtol=1e-5)
  assert len(evals) == 3 and sum(e['mask'].sum() for e in evals) == 10


def _jpeg(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, 'JPEG')
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_mini_imagenet(manual_dir, synsets, per_class=4, num_val=4):
  """ILSVRC2012_img_train.tar (one tar of JPEGs per synset) and
  ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG; TFDS ships their labels)."""
  rng = np.random.default_rng(0)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for wnid in synsets:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as sub:
        for i in range(per_class):
          _add(sub, f'{wnid}_{i}.JPEG', _jpeg(rng, 40 + i, 50))
      _add(train, f'{wnid}.tar', buf.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(num_val):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, 45, 60))


@pytest.mark.slow
def test_real_imagenet2012_builder_on_miniature_tars(tmp_path):
  # The first validation images of ILSVRC2012 belong to these synsets (TFDS's
  # validation_labels.txt), so train and val share classes.
  val_wnids = ['n01751748', 'n09193705', 'n02105855', 'n04263257']
  make_mini_imagenet(str(tmp_path / 'manual'), val_wnids[:3])
  cfg = data.default_config()
  cfg.data_dir, cfg.manual_dir = str(tmp_path / 'tfds'), str(tmp_path / 'manual')
  cfg.image_size, cfg.eval_size = 32, 32
  cfg.randaugment.num_layers = 1
  info = data.dataset_info(cfg)                  # prepares through manual_dir
  assert info == dict(num_classes=1000, num_train=12, num_eval=4, train_size=32, eval_size=32)
  batch = next(data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1))
  assert batch['images'].shape == (4, 32, 32, 3)
  wnids = data.imagenet_wnids()
  train_classes = {wnids.index(w) for w in val_wnids[:3]}
  assert set(np.nonzero(batch['labels'].sum(0))[0]) <= train_classes
  evals = list(data.build_eval_iter(cfg, 3, process_index=0, process_count=1))
  labels = [int(l.argmax()) for e in evals for l, m in zip(e['labels'], e['mask']) if m]
  assert sorted(labels) == sorted(wnids.index(w) for w in val_wnids)
  # The prepared copy is ArrayRecord; a second config without manual_dir reads it.
  cfg.manual_dir = ''
  assert data.dataset_info(cfg)['num_train'] == 12
