"""What a person watching the terminal sees: a progress bar that log lines do not
overwrite, and no backend-probe noise.

While the bar is shown (stderr is a terminal), every write to stderr, absl's log
lines included, goes through `tqdm.write`, which clears the bar, prints the whole
line and redraws the bar below it. Without a terminal there is no bar and nothing is
rerouted.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import sys
from typing import Iterator, Optional, TextIO

from absl import logging


class _NoBackendProbe(std_logging.Filter):
  """Drops JAX's INFO record for a platform it tried and does not have (every run on
  a non-TPU machine starts with "Unable to initialize backend 'tpu': ... libtpu.so").
  A backend that was asked for and fails still raises, with its own message."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno <= std_logging.INFO
                and str(record.msg).startswith('Unable to initialize backend'))


def quiet_backend_probe() -> None:
  """Installs the filter on JAX's backend logger (idempotent)."""
  logger = std_logging.getLogger('jax._src.xla_bridge')
  if not any(isinstance(f, _NoBackendProbe) for f in logger.filters):
    logger.addFilter(_NoBackendProbe())


class _BarSafeStream:
  """A stderr stand-in: whole lines go out through tqdm.write (bar cleared, line
  printed, bar redrawn); a partial line waits for its newline."""

  def __init__(self, real: TextIO):
    self._real, self._pending = real, ''

  def write(self, text: str) -> int:
    import tqdm  # pylint: disable=g-import-not-at-top
    self._pending += text
    if '\n' in self._pending:
      lines, self._pending = self._pending.rsplit('\n', 1)
      tqdm.tqdm.write(lines, file=self._real)
    return len(text)

  def flush(self) -> None:
    self._real.flush()

  def drain(self) -> None:
    if self._pending:
      self._real.write(self._pending)
      self._pending = ''
    self._real.flush()

  def __getattr__(self, name):  # isatty, fileno, encoding, ...
    return getattr(self._real, name)


@contextlib.contextmanager
def progress_bar(total: int, initial: int = 0, enabled: bool = True) -> Iterator[Optional[object]]:
  """A tqdm bar on stderr when it is a terminal (else None), with stderr and absl's
  handler routed around it until the bar closes."""
  real = sys.stderr
  if not (enabled and real.isatty()):
    yield None
    return
  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total, initial=initial, unit='step', file=real, dynamic_ncols=True)
  stream = _BarSafeStream(real)
  handler = logging.get_absl_handler().python_handler
  old_handler_stream = handler.stream
  sys.stderr = stream
  if old_handler_stream is real:
    handler.stream = stream
  try:
    yield bar
  finally:
    if handler.stream is stream:
      handler.stream = old_handler_stream
    sys.stderr = real
    bar.close()
    stream.drain()
