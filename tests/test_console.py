"""nfnet_jax/console.py: the wait for XLA's compile is shown while it lasts and stated
when it ends (the terminal path, with a progress bar, runs through the real command
line in tests/test_cli.py::test_terminal_output_is_readable)."""
from __future__ import annotations

import logging
import time

import pytest

from nfnet_jax import console


def _messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records]


def test_without_a_terminal_the_wait_is_logged_then_its_length(caplog):
  """No bar (a log file): 'Still compiling ...' lines while the body runs (here every
  50 ms; every minute by default), then one 'Compiled ... in N s' line."""
  with caplog.at_level(logging.INFO):
    with console.compiling('the train step', None, log_every_s=0.05):
      deadline = time.monotonic() + 60
      # Returns once the ticker has spoken: no assumption on how fast threads run.
      while not any(m.startswith('Still compiling the train step: ')
                    for m in _messages(caplog)):
        assert time.monotonic() < deadline, _messages(caplog)
        time.sleep(0.01)
    messages = _messages(caplog)
  compiled = [m for m in messages if m.startswith('Compiled the train step in ')]
  assert len(compiled) == 1 and compiled[0].endswith(
      ' s; step rates and ETAs leave it out'), messages
  assert messages.index(compiled[0]) == len(messages) - 1  # the ticker stopped first


def test_a_failed_compile_is_not_reported_as_compiled(caplog):
  with caplog.at_level(logging.INFO), pytest.raises(ValueError, match='no fit'):
    with console.compiling('the train step', None):
      raise ValueError('no fit')
  assert not any(m.startswith('Compiled') for m in _messages(caplog))
