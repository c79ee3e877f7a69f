"""What a person watching the terminal sees: a progress bar that log lines do not
overwrite, a ticking line while XLA compiles the first step, and no backend-probe,
TFDS variant-folder or TensorFlow start-up noise.

While the bar is shown (stderr is a terminal), every write to stderr, absl's log
lines included, goes through `tqdm.write`, which clears the bar, prints the whole
line and redraws the bar below it. Without a terminal there is no bar and nothing is
rerouted.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Optional, TextIO

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


class _NoMissingVariantFolder(std_logging.Filter):
  """Drops TFDS's warning 'Variant folder DIR has no dataset_info.json' when DIR does
  not exist. TFDS looks for the folder of the version it would read whenever a
  builder is made or asked whether it is prepared, and warns each time; for a
  dataset not prepared yet that says nothing the one-line error (with the command
  that prepares it) does not. A folder that exists but lacks the file (a copy half
  written or damaged) still warns."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not (str(record.msg).startswith('Variant folder ') and record.args):
      return True
    try:
      from etils import epath  # pylint: disable=g-import-not-at-top
      return epath.Path(record.args[0]).exists()
    except Exception:  # pylint: disable=broad-except
      return True  # Unsure: the warning stays.


def quiet_missing_tfds_variants() -> None:
  """Installs the filter on absl's logger, which TFDS logs through (idempotent)."""
  logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _NoMissingVariantFolder) for f in logger.filters):
    logger.addFilter(_NoMissingVariantFolder())


# A line that absl's C++ logging writes before absl::InitializeLog: the severity, then
# a zero date and the time in seconds since the epoch ("I0000 00:00:1796652881.27 ...").
# Python's absl lines carry a real date, so they never match.
_NATIVE_EARLY_LINE = re.compile(rb'([IWEF])0000 00:00:\d+\.\d+ ')
_NATIVE_EARLY_BANNER = b'WARNING: All log messages before absl::InitializeLog() is called'


def _tf_cpp_min_log_level() -> int:
  try:
    return int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0'))
  except ValueError:
    return 0


def _native_line_dropped(line: bytes, level: int) -> bool:
  if line.startswith(_NATIVE_EARLY_BANNER):
    return True
  m = _NATIVE_EARLY_LINE.match(line)
  return m is not None and 'IWEF'.index(m.group(1).decode()) < level


@contextlib.contextmanager
def tf_cpp_log_level_applied() -> Iterator[None]:
  """Makes TF_CPP_MIN_LOG_LEVEL hold while TensorFlow is imported inside this block.

  TensorFlow 2.21 logs from C++ through absl before absl::InitializeLog has run, and
  absl then writes every line to stderr whatever TF_CPP_MIN_LOG_LEVEL says, with a
  banner saying so (oneDNN's "custom operations are on", twice, on every import).
  TensorFlow offers no call or variable that stops it, so file descriptor 2 goes to a
  temporary file for the block and is then written back to stderr whole, less the
  banner and the early C++ lines below the level. Nothing else is held back or lost;
  at level 0 nothing is redirected.
  """
  level = _tf_cpp_min_log_level()
  if level <= 0:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      kept = [line for line in held.read().splitlines(keepends=True)
              if not _native_line_dropped(line, level)]
      if kept:
        os.write(2, b''.join(kept))


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


@contextlib.contextmanager
def compiling(what: str, bar: Optional[Any] = None,
              log_every_s: float = 60.0) -> Iterator[None]:
  """Wraps the first call of a jitted step, which returns once XLA has compiled it.

  While the body runs, the time so far is shown: with a progress bar (a terminal),
  as its description ('compiling the train step: 42 s'), updated every second; without
  one (a log file), as a log line every `log_every_s` seconds. When the body returns,
  one log line says how long it took ('Compiled the train step in 57.3 s') and the
  bar's clock restarts, so that its step rate and ETA leave the compile out. If the
  body raises, nothing is logged and the exception goes on.
  """
  start = time.monotonic()
  done = threading.Event()
  if bar is not None:  # At once: a compile shorter than a tick is still announced.
    bar.set_description_str(f'compiling {what}: 0 s')

  def tick() -> None:
    while not done.wait(1.0 if bar is not None else log_every_s):
      elapsed = time.monotonic() - start
      if bar is not None:
        bar.set_description_str(f'compiling {what}: {elapsed:.0f} s')
      else:
        logging.info('Still compiling %s: %.0f s so far', what, elapsed)

  ticker = threading.Thread(target=tick, name='compile-ticker', daemon=True)
  ticker.start()
  try:
    yield
  finally:
    done.set()
    ticker.join()
  elapsed = time.monotonic() - start
  if bar is not None:
    bar.set_description_str('', refresh=False)
    # Moves the bar's start and last-update times to now: its elapsed time, rate
    # and ETA leave out everything since the last step (the compile).
    bar.unpause()
  logging.info('Compiled %s in %.1f s; step rates and ETAs leave it out', what, elapsed)

