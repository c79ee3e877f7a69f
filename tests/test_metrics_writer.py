"""nfnet_jax/metrics_writer.py: metrics.jsonl and TensorBoard event files, written
through etils.epath so that a gs:// workdir lands in the bucket (not in a local
'./gs:' folder). The bucket is simulated by etils' own mock backend, which maps
gs://bucket/... onto a temporary directory. A full disk is a real, small tmpfs.
Event files are read back with TensorBoard's own reader (`EventAccumulator`)."""
import json
import os

from etils import epath
from etils.epath import gpath, testing as epath_testing
import pytest
from tensorboard.backend.event_processing import event_accumulator

from nfnet_jax import errors
from nfnet_jax.metrics_writer import MetricsWriter, WriteError
from test_checkpoints import small_filesystem  # pylint: disable=unused-import


def read_scalars(path) -> dict[tuple[int, str], float]:
  """{(step, tag): value} of the scalars TensorBoard reads from the event file (or
  the directory of event files) `path`; fails unless it is a TensorBoard event
  file (brain.Event:2)."""
  acc = event_accumulator.EventAccumulator(os.fspath(path), size_guidance={
      event_accumulator.SCALARS: 0})  # 0: keep every scalar, not a sample.
  acc.Reload()
  assert acc.file_version == 2.0, acc.file_version
  return {(s.step, tag): s.value
          for tag in acc.Tags()['scalars'] for s in acc.Scalars(tag)}


def check_dir(path):
  lines = [json.loads(l) for l in open(os.path.join(path, 'metrics.jsonl'))]
  assert lines == [{'step': 3, 'train/loss': 1.5, 'train/top1': 0.25},
                   {'step': 7, 'eval/top1': 0.75}]
  (events,) = [f for f in os.listdir(path) if f.startswith('events.out.tfevents.')]
  assert read_scalars(os.path.join(path, events)) == {(3, 'train/loss'): 1.5, (3, 'train/top1'): 0.25, (7, 'eval/top1'): 0.75}


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


# ---------------------------------------------------------------------------
# A full disk: a real, small tmpfs (the fixture of tests/test_checkpoints.py).
# ---------------------------------------------------------------------------
def fill(mnt) -> None:
  """Leaves no free block on the file system at `mnt` (checked by a failing write)."""
  st = os.statvfs(mnt)
  with open(os.path.join(mnt, 'filler'), 'wb') as f:
    f.write(bytes(st.f_bavail * st.f_frsize))
  with pytest.raises(OSError, match='No space left'):
    with open(os.path.join(mnt, 'filler'), 'ab') as f:
      f.write(bytes(4096))


def test_full_disk_mid_record_leaves_whole_records_and_one_line(small_filesystem):
  """The disk fills up; the next record is bigger than the room left in the last
  block of metrics.jsonl, so part of it is written before the write fails: that part
  is cut off again, and the writer raises one line naming the file and the step."""
  logdir = small_filesystem / 'run'
  w = MetricsWriter(str(logdir))
  w.write(1, {'loss': 1.5, 'top1': 0.25}, prefix='train')
  jsonl = logdir / 'metrics.jsonl'
  (events,) = logdir.glob('events.out.tfevents.*')
  before = jsonl.read_bytes(), events.read_bytes()
  assert len(before[0]) % 4096 and len(before[1]) % 4096  # room left in the last block
  fill(small_filesystem)
  big = {f'scalar_{i}': i / 7 for i in range(400)}  # a record of about 12 KiB
  with pytest.raises(errors.RunError) as e:
    w.write(2, big, prefix='train')
  assert isinstance(e.value, WriteError) and e.value.step == 2
  assert str(e.value) == (
      f'Cannot write metrics to {jsonl}: OSError: No space left on device; the record '
      'of step 2 is not in it (the earlier ones are, whole)')
  assert (jsonl.read_bytes(), events.read_bytes()) == before
  w.write(3, {'loss': 1.0})  # The writer writes nothing more, and closes quietly.
  w.close()
  assert (jsonl.read_bytes(), events.read_bytes()) == before
  assert set(read_scalars(events)) == {(1, 'train/loss'), (1, 'train/top1')}


def test_full_disk_in_the_event_file_keeps_both_files_whole(small_filesystem,
                                                            tmp_path):
  """metrics.jsonl takes the record (room left in its last block), the event file does
  not (less room in its last block than the record needs): the event file is cut back
  to its earlier records, and the error names it."""
  logdir = small_filesystem / 'run'
  w = MetricsWriter(str(logdir))
  w.write(1, {'a': 1.0})
  jsonl = logdir / 'metrics.jsonl'
  (events,) = logdir.glob('events.out.tfevents.*')
  before = jsonl.read_bytes(), events.read_bytes()
  fill(small_filesystem)
  room = [4096 - len(b) % 4096 for b in before]

  def sizes(n: int) -> tuple[int, int]:
    """Bytes that the record {'x' * n: 1.0} at step 5 adds to metrics.jsonl and to
    the event file, measured by writing it on a disk with room."""
    scratch = tmp_path / f'sizes_{n}'
    w = MetricsWriter(str(scratch))
    start = [p.stat().st_size for p in sorted(scratch.iterdir())]
    w.write(5, {'x' * n: 1.0})
    w.close()
    grown_events, grown_jsonl = [p.stat().st_size - s for p, s in
                                 zip(sorted(scratch.iterdir()), start)]
    return grown_jsonl, grown_events

  lo, hi = 0, 4096  # The smallest n whose event record does not fit (bisection).
  while lo < hi:
    mid = (lo + hi) // 2
    if sizes(mid)[1] > room[1]:
      hi = mid
    else:
      lo = mid + 1
  n = lo
  assert sizes(n)[0] <= room[0]  # the line fits
  with pytest.raises(WriteError) as e:
    w.write(5, {'x' * n: 1.0})
  assert str(e.value) == (
      f'Cannot write metrics to {events}: OSError: No space left on device; the record '
      'of step 5 is not in it (the earlier ones are, whole)')
  w.close()
  assert events.read_bytes() == before[1]
  assert read_scalars(events) == {(1, 'a'): 1.0}
  assert [json.loads(l)['step'] for l in jsonl.read_text().splitlines()] == [1, 5]


def test_full_disk_at_the_start_writes_nothing(small_filesystem):
  fill(small_filesystem)
  logdir = small_filesystem / 'run'
  with pytest.raises(WriteError) as e:
    MetricsWriter(str(logdir), step=7)
  message = str(e.value)
  assert message.startswith(f'Cannot write metrics to {logdir}/events.out.tfevents.')
  assert message.endswith(': OSError: No space left on device; nothing was written to it')
  assert e.value.step == 7 and '\n' not in message
  assert sorted(p.name for p in logdir.iterdir()) == ['metrics.jsonl']  # (empty)
  assert (logdir / 'metrics.jsonl').stat().st_size == 0
