"""Bad images never stop a run: a folder with truncated, empty, mislabelled and
oddly named files, and a TFDS-like source with undecodable records, both read
through the train and eval iterators to the end."""
import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip('tensorflow')
from PIL import Image  # noqa: E402

from nfnet_jax import data  # noqa: E402
from nfnet_jax.data import sources  # noqa: E402
from nfnet_jax.data.config import MAX_CONSECUTIVE_BAD_RECORDS, MAX_IMAGE_PIXELS  # noqa: E402


def _encode(array, fmt, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **kw)
  return buf.getvalue()


def _png16(array) -> bytes:
  """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
  h, w, _ = array.shape
  rows = b''.join(b'\x00' + array[i].astype('>u2').tobytes() for i in range(h))

  def chunk(tag, body):
    return (struct.pack('>I', len(body)) + tag + body
            + struct.pack('>I', zlib.crc32(tag + body) & 0xFFFFFFFF))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def _write(path, payload: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(payload)


GOOD_TRAIN = 2 * 8       # per class: 3 plain + CMYK, 16-bit, grey, RGBA, 1x1 (+ a non-UTF-8 name in a)
GOOD_EVAL = 2 * 2


@pytest.fixture()
def bad_folder(tmp_path):
  """train/{dark,light}/ and val/{dark,light}/: good images of every odd kind,
  plus a truncated JPEG, a zero-byte file, a TIFF named .png and a text file."""
  root = str(tmp_path / 'images')
  rng = np.random.default_rng(0)
  for k, (name, lo) in enumerate((('dark', 0), ('light', 160))):
    img = lambda h, w: rng.integers(lo, lo + 96, (h, w, 3), dtype=np.uint8)
    d = f'{root}/train/{name}'
    for i in range(3):
      _write(f'{d}/{i}.jpg', _encode(img(40 + 5 * i, 56), 'JPEG'))
    buf = io.BytesIO()
    Image.fromarray(img(36, 48)).convert('CMYK').save(buf, 'JPEG')
    _write(f'{d}/cmyk.jpg', buf.getvalue())
    _write(f'{d}/deep.png', _png16((img(30, 20).astype(np.uint16) * 257)))
    _write(f'{d}/grey.jpg', _encode(img(33, 41)[..., 0], 'JPEG'))
    rgba = np.concatenate([img(28, 28), np.full((28, 28, 1), 128, np.uint8)], -1)
    _write(f'{d}/alpha.png', _encode(rgba, 'PNG'))
    _write(f'{d}/pixel.png', _encode(img(1, 1), 'PNG'))
    if k == 0:  # Not valid UTF-8: created through a bytes path.
      _write(os.fsencode(d) + b'/caf\xe9.png', _encode(img(40, 40), 'PNG'))
    good = _encode(img(48, 64), 'JPEG')
    _write(f'{d}/truncated.jpg', good[:len(good) // 2])
    _write(f'{d}/empty.jpg', b'')
    _write(f'{d}/tiff.png', _encode(img(20, 20), 'TIFF'))
    _write(f'{d}/notes.txt', b'not an image')
    for i in range(2):
      _write(f'{root}/val/{name}/{i}.png', _encode(img(44, 30), 'PNG'))
    cut = _encode(img(50, 50), 'JPEG')
    _write(f'{root}/val/{name}/cut.jpg', cut[:len(cut) // 3])
  return root


def folder_cfg(root, cache, **overrides):
  cfg = data.default_config()
  cfg.source, cfg.folder, cfg.folder_cache_dir = 'folder', root, str(cache)
  cfg.image_size, cfg.eval_size = 24, 20
  cfg.randaugment.num_layers = 1
  cfg.prefetch = 1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize('crop', ['inception', 'resize'])
def test_folder_with_bad_files_trains_and_evaluates_to_the_end(bad_folder, tmp_path, caplog,
                                                                crop):
  sources.scan_folder.cache_clear()
  cfg = folder_cfg(bad_folder, tmp_path / 'cache', crop=crop)
  with caplog.at_level(logging.INFO):
    info = data.dataset_info(cfg)
  # One class each; +1: the non-UTF-8-named PNG is a good image and is read.
  assert info['num_classes'] == 2
  assert info['num_train'] == GOOD_TRAIN + 1 and info['num_eval'] == GOOD_EVAL
  lines = [r.getMessage() for r in caplog.records if 'Folder dataset' in r.getMessage()]
  assert len(lines) == 1, lines                                   # one line ...
  assert 'skipped 10 file(s)' in lines[0]                          # ... that counts them
  skipped = sources.scan_folder(bad_folder, 0.0, 'decode', cache_dir=str(tmp_path / 'cache')
                                ).skipped
  reasons = {os.path.relpath(p, bad_folder): r for p, r in skipped.items()}
  for name in ('dark', 'light'):
    assert reasons[f'train/{name}/truncated.jpg'] == 'cannot be decoded'
    assert reasons[f'train/{name}/empty.jpg'] == 'empty file'
    assert reasons[f'train/{name}/tiff.png'] == 'cannot be decoded'
    assert reasons[f'train/{name}/notes.txt'].startswith('not an image')
    assert reasons[f'val/{name}/cut.jpg'] == 'cannot be decoded'
  train = data.build_train_iter(cfg, 8, seed=0, process_index=0, process_count=1)
  for _ in range(6):                                                # 3 epochs, mixing on
    batch = next(train)
    assert batch['images'].shape == (8, 24, 24, 3)
    assert np.isfinite(batch['images']).all()
  evals = list(data.build_eval_iter(cfg, 3, process_index=0, process_count=1))
  assert len(evals) == 2 and sum(e['mask'].sum() for e in evals) == GOOD_EVAL
  assert all(e['images'].shape == (3, 20, 20, 3) for e in evals)


def test_verified_list_is_cached_and_only_changed_files_are_checked_again(
    bad_folder, tmp_path, caplog, monkeypatch):
  cache = tmp_path / 'cache'
  sources.scan_folder.cache_clear()
  first = sources.scan_folder(bad_folder, cache_dir=str(cache))
  assert len(os.listdir(cache)) == 1
  checked = []
  real = sources._decode_check
  monkeypatch.setattr(sources, '_decode_check',
                      lambda paths, *rest: checked.append(list(paths)) or real(paths, *rest))
  sources.scan_folder.cache_clear()
  again = sources.scan_folder(bad_folder, cache_dir=str(cache))
  assert checked == [[]] and again.train == first.train and again.skipped == first.skipped
  # Repair the truncated file: same name, new content -> checked again and used.
  fixed = os.path.join(bad_folder, 'train', 'dark', 'truncated.jpg')
  _write(fixed, _encode(np.zeros((30, 30, 3), np.uint8), 'JPEG'))
  sources.scan_folder.cache_clear()
  with caplog.at_level(logging.INFO):
    repaired = sources.scan_folder(bad_folder, cache_dir=str(cache))
  assert checked[-1] == [fixed]
  assert (fixed, 0) in repaired.train and len(repaired.train) == len(first.train) + 1
  assert '1 file(s) verified now' in caplog.text


def test_damaged_cache_is_ignored(bad_folder, tmp_path):
  cache = tmp_path / 'cache'
  sources.scan_folder.cache_clear()
  first = sources.scan_folder(bad_folder, cache_dir=str(cache))
  (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
  for damaged in ('{"files": [1, 2', '{"files": {"train/dark/0.jpg": 5, "x": [1]}}', '[]'):
    with open(path, 'w') as f:
      f.write(damaged)
    sources.scan_folder.cache_clear()
    again = sources.scan_folder(bad_folder, cache_dir=str(cache))
    assert again.train == first.train and again.skipped == first.skipped


def test_empty_class_folder_is_refused_by_name(bad_folder, tmp_path):
  os.makedirs(os.path.join(bad_folder, 'train', 'nothing'))
  sources.scan_folder.cache_clear()
  with pytest.raises(ValueError, match=r"Class folder .*train/nothing has no usable image"):
    data.dataset_info(folder_cfg(bad_folder, tmp_path / 'cache'))
  # A class whose every file is bad is empty too.
  os.rmdir(os.path.join(bad_folder, 'train', 'nothing'))
  _write(os.path.join(bad_folder, 'train', 'broken', 'x.jpg'), b'\xff\xd8\xff\xe0 junk')
  sources.scan_folder.cache_clear()
  with pytest.raises(ValueError, match=r'train/broken has no usable image'):
    data.dataset_info(folder_cfg(bad_folder, tmp_path / 'cache'))


def _fake_tfds_source(payloads, labels):
  def read(idx):
    images = np.empty([len(idx)], object)
    images[:] = [payloads[i] for i in idx]
    return images, np.asarray(labels, np.int32)[idx]
  return sources.Source(len(payloads), 3, read=read)


def test_undecodable_tfds_records_are_dropped_and_counted(monkeypatch, caplog):
  """A record-backed source (as TFDS gives) where 3 of 12 train and 2 of 7 eval
  records are not decodable: training runs on, evaluation sees every good record
  once and pads to the planned number of batches."""
  rng = np.random.default_rng(0)
  good = lambda: _encode(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), 'JPEG')
  train = [good() for _ in range(12)]
  for i in (2, 5, 9):
    train[i] = train[i][:100]
  evals = [good() for _ in range(7)]
  evals[1], evals[6] = b'\xff\xd8\xff garbage', b''
  fake = {'train': _fake_tfds_source(train, np.arange(12) % 3),
          'eval': _fake_tfds_source(evals, np.arange(7) % 3)}
  monkeypatch.setattr(sources, 'get_source', lambda cfg, split: fake[split])
  cfg = data.default_config()
  cfg.image_size, cfg.eval_size = 16, 16
  cfg.randaugment.enabled = False
  cfg.prefetch = 1
  with caplog.at_level(logging.WARNING):
    it = data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(6)]                    # 48 decodes: 4 epochs
    assert all(b['images'].shape == (4, 16, 16, 3) for b in batches)
    assert 'training record(s) so far: ' in caplog.text
    assert ' failed to decode, 0 declared more than data.max_image_pixels' in caplog.text
    out = [list(data.build_eval_iter(cfg, 2, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(o) for o in out] == [4, 4]                      # ceil(7 / 2) on each process
  assert all(b['images'].shape == (1, 16, 16, 3) for o in out for b in o)
  assert sum(b['mask'].sum() for o in out for b in o) == 5
  seen = sorted(int(l.argmax()) for o in out for b in o
                for l, m in zip(b['labels'], b['mask']) if m)
  assert seen == sorted(i % 3 for i in (0, 2, 3, 4, 5))
  assert 'skipped 1 of 4 record(s)' in caplog.text and 'skipped 1 of 3' in caplog.text



def test_eval_where_nothing_decodes_still_gives_the_planned_batches(monkeypatch, caplog):
  fake = _fake_tfds_source([b'', b'\x89PNG broken', b'x'], [0, 1, 2])
  monkeypatch.setattr(sources, 'get_source', lambda cfg, split: fake)
  cfg = data.default_config()
  cfg.image_size, cfg.eval_size = 16, 12
  with caplog.at_level(logging.WARNING):
    out = list(data.build_eval_iter(cfg, 2, process_index=0, process_count=1))
  assert len(out) == 2 and all(b['images'].shape == (2, 12, 12, 3) for b in out)
  assert all(b['labels'].shape == (2, 3) and b['mask'].sum() == 0 for b in out)
  assert 'skipped 3 of 3 record(s)' in caplog.text

TINY = '''
from nfnet_jax import configs


def get_config(arg=''):
  c = configs.base_config()
  c.model = 'F0'
  c.model_kwargs = dict(width=0.125, group_size=None, depths=(1, 1), stochdepth_rate=0.0,
                        drop_rate=0.0)
  c.data.source = 'folder'
  c.data.image_size = c.data.eval_size = 16
  c.data.randaugment.num_layers = 1
  c.data.num_parallel_calls = 2
  c.data.prefetch = 1
  c.batch_size = 8
  c.total_steps = 3
  c.warmup_epochs = 0.0
  c.compute_dtype = 'float32'
  c.eval_batch_size = 4
  c.log_every = 1
  c.checkpoint_every_steps = 0
  c.checkpoint_every_minutes = 0.0
  return c
'''


@pytest.mark.slow
def test_train_command_on_a_folder_with_bad_files(bad_folder, tmp_path):
  """`python -m nfnet_jax.train ... --config.data.folder=DIR` (the path set on the
  command line) trains and evaluates to the end over the bad folder."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / 'tiny.py').write_text(TINY)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0',  # compile time dominates
             PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run(
      [sys.executable, '-m', 'nfnet_jax.train', f'--config={tmp_path / "tiny.py"}',
       f'--workdir={tmp_path / "work"}', '--mode=train_and_eval',
       f'--config.data.folder={bad_folder}',
       f'--config.data.folder_cache_dir={tmp_path / "cache"}'],
      cwd=root, env=env, capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-4000:]
  assert 'skipped 10 file(s)' in log
  assert f'on {GOOD_EVAL} examples' in log


def _broken_folder(root):
  """train/{a,b}/: only files that look like images and do not decode (truncated
  JPEGs, a JPEG with a junk header, a PNG cut after its signature)."""
  rng = np.random.default_rng(1)
  for name in ('a', 'b'):
    for i in range(3):
      good = _encode(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), 'JPEG')
      _write(f'{root}/train/{name}/{i}.jpg', good[:len(good) // 2])
    _write(f'{root}/train/{name}/junk.jpg', b'\xff\xd8\xff\xe0 junk')
    _write(f'{root}/train/{name}/cut.png', b'\x89PNG\r\n\x1a\n\x00\x00')
  return root


def _train_command(tmp_path, *flags, timeout=600):
  """`python -m nfnet_jax.train` with the TINY config; (returncode, stdout, stderr)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / 'tiny.py').write_text(TINY)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0',
             PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run(
      [sys.executable, '-m', 'nfnet_jax.train', f'--config={tmp_path / "tiny.py"}',
       f'--workdir={tmp_path / "work"}', *flags],
      cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout, out.stderr


@pytest.mark.slow
def test_training_where_no_record_decodes_stops_with_one_line(tmp_path):
  """Every training file is broken and nothing checks them before training
  (folder_verify=none): the run stops after max_consecutive_bad_records failures
  with one line that counts them, instead of searching forever, and libjpeg
  prints nothing per file."""
  folder = _broken_folder(str(tmp_path / 'broken'))
  code, _, err = _train_command(
      tmp_path, '--mode=train', f'--config.data.folder={folder}',
      '--config.data.folder_verify=none', '--config.data.holdout_fraction=0.25',
      timeout=300)
  assert code == 1, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      f'Error: Training stopped: {MAX_CONSECUTIVE_BAD_RECORDS} consecutive training '
      f'records could not be used (data.max_consecutive_bad_records='
      f'{MAX_CONSECUTIVE_BAD_RECORDS}; skipped so far: {MAX_CONSECUTIVE_BAD_RECORDS} '
      f'undecodable, 0 over data.max_image_pixels={MAX_IMAGE_PIXELS}). Check the data, '
      'e.g. with data.folder_verify=decode for a folder.')
  for libjpeg in ('JPEG', 'jpeg'):   # "Premature end of JPEG data", "Improper call to JPEG library"
    assert libjpeg not in err, [l for l in err.splitlines() if libjpeg in l][:3]


def test_train_iter_where_nothing_decodes_raises_one_line(tmp_path):
  """The same through the public API, without a training run: the first batch
  raises errors.RunError (on a worker thread, so that an endless search fails
  the test instead of hanging it)."""
  import threading
  from nfnet_jax import errors
  folder = _broken_folder(str(tmp_path / 'broken'))
  sources.scan_folder.cache_clear()
  cfg = folder_cfg(folder, tmp_path / 'cache', folder_verify='none')
  outcome = []
  it = data.build_train_iter(cfg, 4, seed=0, process_index=0, process_count=1)
  worker = threading.Thread(target=lambda: outcome.append(_first_or_error(it)), daemon=True)
  worker.start()
  worker.join(timeout=300)
  assert outcome, 'the train iterator neither yielded nor stopped'
  assert isinstance(outcome[0], errors.RunError), outcome
  assert str(outcome[0]).startswith(
      f'Training stopped: {MAX_CONSECUTIVE_BAD_RECORDS} consecutive training records '
      f'could not be used (data.max_consecutive_bad_records={MAX_CONSECUTIVE_BAD_RECORDS}; '
      f'skipped so far: {MAX_CONSECUTIVE_BAD_RECORDS} undecodable, 0 over')


def _first_or_error(it):
  try:
    return next(it)
  except Exception as e:  # pylint: disable=broad-except
    return e


def test_a_short_run_of_bad_records_is_counted_and_training_goes_on(tmp_path, caplog):
  """max_consecutive_bad_records bounds a run of failures, not their total: with
  a limit of 3 and 2 bad files of 6, training goes on and logs the count."""
  root = str(tmp_path / 'mixed')
  rng = np.random.default_rng(2)
  for name in ('a', 'b'):
    for i in range(2):
      _write(f'{root}/{name}/{i}.png', _encode(rng.integers(0, 255, (20, 20, 3),
                                                          dtype=np.uint8), 'PNG'))
    _write(f'{root}/{name}/bad.jpg', b'\xff\xd8\xff\xe0 junk')
  sources.scan_folder.cache_clear()
  cfg = folder_cfg(root, tmp_path / 'cache', folder_verify='none', holdout_fraction=0.0,
                   max_consecutive_bad_records=3, shuffle=False)
  cfg.mix.enabled = False
  with caplog.at_level(logging.WARNING):
    it = data.build_train_iter(cfg, 2, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]      # 8 good records: 2 epochs of 4
  assert all(b['images'].shape == (2, 24, 24, 3) for b in batches)
  assert 'Skipped 1 training record(s) so far: 1 failed to decode, 0 declared' in caplog.text


def _png_bomb(side: int) -> bytes:
  """A valid all-black grayscale PNG of side x side pixels, small on disk."""
  def chunk(tag, body):
    return (struct.pack('>I', len(body)) + tag + body
            + struct.pack('>I', zlib.crc32(tag + body) & 0xFFFFFFFF))
  z = zlib.compressobj(1)
  rows = bytes(side + 1) * 500                     # filter byte + side zero pixels, x500
  idat = b''.join(z.compress(rows) for _ in range(side // 500)) + z.flush()
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0))
          + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


BOMB_SCRIPT = r'''
import logging, sys
from nfnet_jax import data
from nfnet_jax.data import sources

def rss(key):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))

root, cache = sys.argv[1], sys.argv[2]
cfg = data.default_config()
cfg.source, cfg.folder, cfg.folder_cache_dir = 'folder', root, cache
cfg.image_size = cfg.eval_size = 16
cfg.randaugment.enabled = False
cfg.num_parallel_calls, cfg.prefetch = 2, 1
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')
data.build_eval_iter(cfg, 2, process_index=0, process_count=1)  # imports, warm-up
before = rss('VmRSS')
index = sources.scan_folder(root, 0.0, 'decode', cache_dir=cache)   # default check
print('REASON', index.skipped[root + '/train/a/bomb.png'])
cfg.folder_verify = 'none'                                          # training's own check
sources.scan_folder.cache_clear()
it = data.build_train_iter(cfg, 2, seed=0, process_index=0, process_count=1)
for _ in range(3):
  next(it)
evals = list(data.build_eval_iter(cfg, 2, process_index=0, process_count=1))
print('EVAL', sum(e['mask'].sum() for e in evals))
print('GROWTH', rss('VmHWM') - before)
'''


@pytest.mark.slow
def test_decompression_bomb_is_skipped_before_decoding(tmp_path):
  """A 1.7 MB PNG declaring 20000 x 20000 pixels (1.2 GB decoded as RGB) is
  refused by the folder verification and, unverified, by the training and
  evaluation pipelines, from its header: the process's peak RSS does not grow
  by the size of the decoded image."""
  import subprocess
  import sys
  root = str(tmp_path / 'bomb')
  rng = np.random.default_rng(3)
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      for i in range(2):
        _write(f'{root}/{split}/{name}/{i}.png',
               _encode(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), 'PNG'))
  bomb = _png_bomb(20000)
  _write(f'{root}/train/a/bomb.png', bomb)
  _write(f'{root}/val/a/bomb.png', bomb)
  out = subprocess.run([sys.executable, '-c', BOMB_SCRIPT, root, str(tmp_path / 'cache')],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert (f'REASON too large (20000x20000 pixels, over data.max_image_pixels='
          f'{MAX_IMAGE_PIXELS})') in lines
  assert any(l.startswith('Skipped 1 training record(s) so far: 0 failed to decode, 1 '
                          'declared more than data.max_image_pixels') for l in lines), lines
  assert 'EVAL 4.0' in lines
  assert any(l.startswith('Evaluation skipped 1 of 5 record(s)') for l in lines), lines
  growth = int(next(l.split()[1] for l in lines if l.startswith('GROWTH')))
  assert growth < 20000 * 20000 * 3 // 2, growth    # well under the decoded image


def test_disk_full_while_writing_the_verification_cache_ends_with_one_line(
    bad_folder, tmp_path):
  """The cache is written to a temp file renamed into place: when the disk is full
  (the temp file is a link to /dev/full, which answers every write with ENOSPC)
  the scan stops with one RunError line and no cache file, whole or partial,
  is left."""
  from nfnet_jax import errors
  cache = tmp_path / 'cache'
  sources.scan_folder.cache_clear()
  sources.scan_folder(bad_folder, cache_dir=str(cache))
  (name,) = os.listdir(cache)                     # the cache file of this folder
  os.remove(cache / name)
  os.symlink('/dev/full', cache / f'{name}.{os.getpid()}.tmp')
  sources.scan_folder.cache_clear()
  with pytest.raises(errors.RunError) as caught:
    sources.scan_folder(bad_folder, cache_dir=str(cache))
  message = str(caught.value)
  assert '\n' not in message
  assert message.startswith(f'Disk full while writing the folder verification cache '
                            f'{cache / name} (No space left on device)')
  assert os.listdir(cache) == []
