"""Scalar metrics to a JSONL file and TensorBoard event files, without TensorFlow.

The event file is tensorboardX's: its `RecordWriter` frames and checksums each
`Event` proto as TensorBoard reads it, and imports neither TensorFlow nor
TensorBoard. tensorboardX's `SummaryWriter` is not used: it writes on a background
thread, where a full disk would end the thread with a traceback and later writes
would block on its queue; the records here are written, and fail, in the caller.

Files are opened through `etils.epath`, so a `gs://bucket/run` workdir writes into
the bucket (local paths use plain file I/O; the cloud backends are etils' own).
tensorboardX reaches them through its public backend registry
(`record_writer.register_writer_factory`) under the scheme `_SCHEME`, not through its
own gs:// backend, which needs google-cloud-storage.

Both files grow by whole records: a local record that cannot be written completely
(a full disk, a quota) is cut off again, and the writer raises `WriteError`, a
one-line `errors.RunError`; the file then holds every earlier record whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Mapping, Optional, Union

from etils import epath
import tensorboardX
from tensorboardX import record_writer, summary
from tensorboardX.proto import event_pb2, summary_pb2

from nfnet_jax import errors

# tensorboardX picks a file backend by the text before the first ':' of a path.
_SCHEME = 'nfnet-jax-epath'


class WriteError(errors.RunError):
  """A metrics file could not be written; `step` is the step of the lost record."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class _RecordFile:
  """A file that grows by whole records: `write` collects the bytes of one record,
  `flush` appends them all or, raising OSError, none. Locally, a record that cannot
  be written completely is cut off again (`os.ftruncate` to the size before it,
  which needs no free space), so a reader never sees a partial record; other file
  systems (gs://) write through etils, which buffers and uploads whole files."""

  def __init__(self, path: epath.Path, append: bool):
    self.path = path
    self._fd, self._file = None, None
    self._pending: list[bytes] = []
    if '://' in os.fspath(path):
      self._file = path.open('ab' if append else 'wb')
      return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    self._fd = os.open(path, flags, 0o644)
    self._size = os.fstat(self._fd).st_size

  def write(self, data: bytes) -> None:
    self._pending.append(data)

  def flush(self) -> None:
    """Appends what `write` collected since the last flush, whole or not at all."""
    data, self._pending = b''.join(self._pending), []
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    done = 0
    try:
      while done < len(data):  # os.write may write part (e.g. the last free block).
        done += os.write(self._fd, data[done:])
    except OSError:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, self._size)
      raise
    self._size += done

  def close(self) -> None:
    """Closes the file, dropping a record not flushed; errors are not raised (each
    record was written, or reported, by its `flush`)."""
    self._pending = []
    with contextlib.suppress(OSError):
      if self._file is not None:
        self._file.close()
      elif self._fd is not None:
        os.close(self._fd)
    self._fd = self._file = None


class _EpathBackend:
  """tensorboardX's file backend for `_SCHEME:<path>`: a `_RecordFile` at <path>."""

  def open(self, path: str) -> _RecordFile:
    return _RecordFile(epath.Path(path[len(_SCHEME) + 1:]), append=False)

  def directory_check(self, path: str) -> None:
    del path  # MetricsWriter makes the directory (through etils) before the file.


record_writer.register_writer_factory(_SCHEME, _EpathBackend())


class MetricsWriter:
  """Writes `{step, **scalars}` lines to `metrics.jsonl` and TensorBoard scalars.

  Only process 0 writes (pass `enabled=False` on the others). A file that cannot be
  created or written (e.g. a full disk) raises `WriteError` (one line, naming the
  file and the step), with every earlier record whole and none of the failed one;
  the writer then writes nothing more.
  """

  def __init__(self, logdir: Union[str, os.PathLike], enabled: bool = True,
               step: int = 0):
    self.enabled = enabled
    # What close() closes: metrics.jsonl's _RecordFile, the event file's RecordWriter.
    self._files: list[Union[_RecordFile, tensorboardX.RecordWriter]] = []
    if not enabled:
      return
    logdir = epath.Path(logdir)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    path = self._jsonl_path = logdir / 'metrics.jsonl'
    try:
      logdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = _RecordFile(path, append=True)
      self._files.append(self._jsonl)
      path = logdir / name
      self._events_path = path
      self._events = tensorboardX.RecordWriter(f'{_SCHEME}:{os.fspath(path)}')
      self._files.append(self._events)
      self._append(self._events, event_pb2.Event(
          wall_time=time.time(), file_version='brain.Event:2').SerializeToString())
    except OSError as e:
      if path.name == name:  # An empty event file is no use to anyone.
        self.close()
        with contextlib.suppress(OSError):
          path.unlink()
      self._fail(path, e, step, 'nothing was written to it')

  def _fail(self, path: epath.Path, e: OSError, step: int, what: str) -> None:
    """Closes the files and raises WriteError about `path`."""
    self.close()
    self.enabled = False
    reason = f'{type(e).__name__}: {e.strerror or e}'
    raise WriteError(f'Cannot write metrics to {path}: {reason}; {what}', step)

  def write(self, step: int, scalars: Mapping[str, float], prefix: Optional[str] = None):
    """Appends one record `{step, prefix/name: value}` to each file; raises WriteError
    (after which nothing more is written) when a file cannot take it whole."""
    if not self.enabled:
      return
    scalars = {(f'{prefix}/{k}' if prefix else k): float(v) for k, v in scalars.items()}
    line = (json.dumps({'step': int(step), **scalars}) + '\n').encode()
    values = [v for k, x in scalars.items() for v in summary.scalar(k, x).value]
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    for file, path, data in ((self._jsonl, self._jsonl_path, line),
                             (self._events, self._events_path,
                              event.SerializeToString())):
      try:
        self._append(file, data)
      except OSError as e:
        self._fail(path, e, step, f'the record of step {step} is not in it (the '
                   'earlier ones are, whole)')

  @staticmethod
  def _append(file: Union[_RecordFile, tensorboardX.RecordWriter], data: bytes) -> None:
    """One record (a JSON line, or a serialized Event that tensorboardX frames), whole
    or, raising OSError, not at all."""
    file.write(data)
    file.flush()

  def replace(self, step: int, scalars: Mapping[str, float], prefix: str) -> None:
    """`write`, after dropping the metrics.jsonl rows of the same step that hold only
    `prefix/` keys: evaluating a step again (--mode=eval, a finished run re-run)
    leaves one eval row per step, the newest. The file is rewritten under another
    name and renamed over the old one only when there is such a row, so a failure
    leaves it whole."""
    if not self.enabled:
      return
    tag = f'{prefix}/'

    def same(line: str) -> bool:
      try:
        rec = json.loads(line)
      except ValueError:  # A torn line of a killed run: kept as it is.
        return False
      if not isinstance(rec, dict) or rec.get('step') != int(step):
        return False
      keys = [k for k in rec if k != 'step']
      return bool(keys) and all(k.startswith(tag) for k in keys)

    lines = self._jsonl_path.read_text(encoding='utf-8').splitlines(keepends=True)
    kept = [l for l in lines if not same(l)]
    if len(kept) < len(lines):
      self._jsonl.close()
      tmp = self._jsonl_path.parent / (self._jsonl_path.name + '.tmp')
      try:
        # A torn last line gets its newline back, so the new row stands alone.
        tmp.write_text(''.join(l if l.endswith('\n') else l + '\n' for l in kept),
                       encoding='utf-8')
        tmp.replace(self._jsonl_path)
      except BaseException:
        if tmp.exists():
          tmp.unlink()
        raise
      finally:
        self._files.remove(self._jsonl)
        self._jsonl = _RecordFile(self._jsonl_path, append=True)
        self._files.append(self._jsonl)
    self.write(step, scalars, prefix=prefix)

  def close(self) -> None:
    for file in self._files:
      file.close()
    self._files = []

