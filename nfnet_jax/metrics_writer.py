"""Scalar metrics to a JSONL file and TensorBoard event files, without TensorFlow.

TensorBoard's own writer imports TensorFlow when it is installed; the training loop
must not (TF belongs to the input pipeline only), so the event file is written here
directly: TFRecord framing (length, masked CRC32C) around `Event` protos from the
`tensorboard` package.

Files are opened through `etils.epath`, so a `gs://bucket/run` workdir writes into
the bucket (local paths use plain file I/O; the cloud backends are etils' own).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Mapping, Optional, Union

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2


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


class MetricsWriter:
  """Writes `{step, **scalars}` lines to `metrics.jsonl` and TensorBoard scalars.

  Only process 0 writes (pass `enabled=False` on the others).
  """

  def __init__(self, logdir: Union[str, os.PathLike], enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self._jsonl_path = logdir / 'metrics.jsonl'
    self._jsonl = self._jsonl_path.open('a', encoding='utf-8')
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._events = (logdir / name).open('wb')
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write_event(self, event: event_pb2.Event) -> None:
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    self._events.write(header + struct.pack('<I', _masked_crc(header)) + data +
                       struct.pack('<I', _masked_crc(data)))

  def write(self, step: int, scalars: Mapping[str, float], prefix: Optional[str] = None):
    if not self.enabled:
      return
    scalars = {(f'{prefix}/{k}' if prefix else k): float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=values)))
    self._events.flush()

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
        self._jsonl = self._jsonl_path.open('a', encoding='utf-8')
    self.write(step, scalars, prefix=prefix)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
