"""nfnet_jax/console.py: the wait for XLA's compile is shown while it lasts and stated
when it ends (the terminal path, with a progress bar, runs through the real command
line in tests/test_cli.py::test_terminal_output_is_readable)."""
from __future__ import annotations

import logging
import os
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


@pytest.mark.parametrize('level', ['0', '2'])
def test_tf_cpp_log_level_holds_for_early_native_lines(level, capfd, monkeypatch):
  """What C++ code writes to stderr (file descriptor 2) inside the block, as
  TensorFlow 2.21's import does: absl's banner and zero-dated lines below
  TF_CPP_MIN_LOG_LEVEL are dropped; every other line comes back, in order (a Python
  absl line with a real date, an early line at the level, plain text); level 0 drops
  nothing."""
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', level)
  lines = [b'WARNING: All log messages before absl::InitializeLog() is called are '
           b'written to STDERR\n',
           b'I0000 00:00:1796652881.275108   16404 port.cc:153] oneDNN custom ops\n',
           b'I1207 14:06:52.520477 139648042863488 train.py:383] a Python log line\n',
           b'W0000 00:00:1796652881.300000   16404 x.cc:1] an early warning\n',
           b'E0000 00:00:1796652881.400000   16404 x.cc:2] an early error\n',
           b'plain text without a newline']
  with console.tf_cpp_log_level_applied():
    for line in lines:
      os.write(2, line)
  err = capfd.readouterr().err
  kept = lines if level == '0' else lines[2:3] + lines[4:]
  assert err == b''.join(kept).decode()
