"""nfnet_jax/metrics_writer.py: metrics.jsonl and TensorBoard event files, written
through etils.epath so that a gs:// workdir lands in the bucket (not in a local
'./gs:' folder). The bucket is simulated by etils' own mock backend, which maps
gs://bucket/... onto a temporary directory."""
import json
import os
import struct

from etils import epath
from etils.epath import gpath, testing as epath_testing
import pytest
from tensorboard.compat.proto import event_pb2

from nfnet_jax.metrics_writer import MetricsWriter, crc32c


def read_events(path):
  """Events of a TFRecord file, checking the framing (length + masked CRCs)."""
  data, out = open(path, 'rb').read(), []
  mask = lambda c: (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  while data:
    header = data[:8]
    (n,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[8:12])[0] == mask(crc32c(header))
    payload = data[12:12 + n]
    assert struct.unpack('<I', data[12 + n:16 + n])[0] == mask(crc32c(payload))
    out.append(event_pb2.Event.FromString(payload))
    data = data[16 + n:]
  return out


def check_dir(path):
  lines = [json.loads(l) for l in open(os.path.join(path, 'metrics.jsonl'))]
  assert lines == [{'step': 3, 'train/loss': 1.5, 'train/top1': 0.25},
                   {'step': 7, 'eval/top1': 0.75}]
  (events,) = [f for f in os.listdir(path) if f.startswith('events.out.tfevents.')]
  ev = read_events(os.path.join(path, events))
  assert ev[0].file_version == 'brain.Event:2'
  got = {(e.step, v.tag): v.simple_value for e in ev[1:] for v in e.summary.value}
  assert got == {(3, 'train/loss'): 1.5, (3, 'train/top1'): 0.25, (7, 'eval/top1'): 0.75}


def write(logdir):
  w = MetricsWriter(logdir)
  w.write(3, {'loss': 1.5, 'top1': 0.25}, prefix='train')
  w.write(7, {'top1': 0.75}, prefix='eval')
  w.close()


def test_local_path(tmp_path):
  write(str(tmp_path / 'a' / 'b'))  # missing parents are created
  check_dir(tmp_path / 'a' / 'b')


def test_bucket_path_goes_to_the_bucket(tmp_path, monkeypatch):
  bucket = tmp_path / 'bucket_root'
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def local(path):
    path = os.fspath(path)
    assert path.startswith('gs://'), path  # only bucket paths reach this backend
    return os.path.join(bucket, path[len('gs://'):])

  def fwd(name):
    return lambda fn, path, *a, **k: getattr(epath.backend.os_backend, name)(
        local(path), *a, **k)

  # epath picks its TensorFlow backend for gs:// when TF is installed; use the mock.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  def fwd2(name):  # Operations on two paths (source, target).
    return lambda fn, path, dst, *a, **k: getattr(epath.backend.os_backend, name)(
        local(path), local(dst), *a, **k)

  with epath_testing.mock_epath(**{n: fwd(n) for n in (
      'open', 'exists', 'isdir', 'makedirs', 'mkdir', 'listdir', 'glob', 'stat',
      'remove')}, replace=fwd2('replace')):
    write('gs://my-bucket/runs/f0')
    write_path = epath.Path('gs://my-bucket/runs/f1')
    write(write_path)
    evaluate_twice('gs://my-bucket/runs/f2')
  check_dir(bucket / 'my-bucket' / 'runs' / 'f0')
  check_dir(bucket / 'my-bucket' / 'runs' / 'f1')
  check_evaluated_twice(bucket / 'my-bucket' / 'runs' / 'f2')
  assert os.listdir(cwd) == []  # no local './gs:' folder


def test_disabled_writes_nothing(tmp_path):
  w = MetricsWriter(str(tmp_path / 'x'), enabled=False)
  w.write(1, {'a': 1.0})
  w.close()
  assert not (tmp_path / 'x').exists()


def evaluate_twice(logdir):
  """A training run's rows, a torn line, then --mode=eval of step 7 (its eval row
  replaced) and of a step without one (appended)."""
  write(logdir)
  with epath.Path(logdir, 'metrics.jsonl').open('a') as f:
    f.write('{"step": 8, "train/lo')  # a run killed mid-line
  w = MetricsWriter(logdir)
  w.replace(7, {'top1': 0.5}, prefix='eval')
  w.replace(3, {'top1': 0.125}, prefix='eval')
  w.close()


def check_evaluated_twice(path):
  lines = open(os.path.join(path, 'metrics.jsonl')).read().splitlines()
  assert lines == [json.dumps({'step': 3, 'train/loss': 1.5, 'train/top1': 0.25}),
                   '{"step": 8, "train/lo',  # kept, on a line of its own
                   json.dumps({'step': 7, 'eval/top1': 0.5}),
                   json.dumps({'step': 3, 'eval/top1': 0.125})]
  assert sorted(os.listdir(path))[-1] == 'metrics.jsonl'  # no temporary file left


def test_replace_keeps_one_eval_row_per_step(tmp_path):
  evaluate_twice(str(tmp_path))
  check_evaluated_twice(tmp_path)
