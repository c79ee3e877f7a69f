"""Scalar metrics to a JSONL file and TensorBoard event files, without TensorFlow.

TensorBoard's own writer imports TensorFlow when it is installed; the training loop
must not (TF belongs to the input pipeline only), so the event file is written here
directly: TFRecord framing (length, masked CRC32C) around `Event` protos from the
`tensorboard` package.

Files are opened through `etils.epath`, so a `gs://bucket/run` workdir writes into
the bucket (local paths use plain file I/O; the cloud backends are etils' own).

Both files grow by whole records: a local record that cannot be written completely
(a full disk, a quota) is cut off again, and the writer raises `WriteError`, a
one-line `errors.RunError`; the file then holds every earlier record whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from typing import Mapping, Optional, Union

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2

from nfnet_jax import errors


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class WriteError(errors.RunError):
  """A metrics file could not be written; `step` is the step of the lost record."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class _RecordFile:
  """A file that grows by whole records (bytes). Locally, a record that cannot be
  written completely is cut off again (`os.ftruncate` to the size before it, which
  needs no free space), so a reader never sees a partial record; other file systems
  (gs://) write through etils, which buffers and uploads whole files."""

  def __init__(self, path: epath.Path, append: bool):
    self.path = path
    self._fd, self._file = None, None
    if '://' in os.fspath(path):
      self._file = path.open('ab' if append else 'wb')
      return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    self._fd = os.open(path, flags, 0o644)
    self._size = os.fstat(self._fd).st_size

  def append(self, data: bytes) -> None:
    """Writes all of `data` or, raising OSError, none of it."""
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
    """Closes the file; errors are not raised (each record was written, or reported,
    by its `append`)."""
    with contextlib.suppress(OSError):
      if self._file is not None:
        self._file.close()
      elif self._fd is not None:
        os.close(self._fd)
    self._fd = self._file = None


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
    self._files: list[_RecordFile] = []
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
      self._events = _RecordFile(path, append=False)
      self._files.append(self._events)
      self._events.append(_record(event_pb2.Event(wall_time=time.time(),
                                                  file_version='brain.Event:2')))
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
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    event = _record(event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary_pb2.Summary(value=values)))
    for file, data in ((self._jsonl, line), (self._events, event)):
      try:
        file.append(data)
      except OSError as e:
        self._fail(file.path, e, step, f'the record of step {step} is not in it (the '
                   'earlier ones are, whole)')

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


def _record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its masked CRC, the serialized event, its masked CRC."""
  data = event.SerializeToString()
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', _masked_crc(header)) + data +
          struct.pack('<I', _masked_crc(data)))
