"""The suite's shared XLA compilation cache, and its order over pytest-xdist workers.

Most of the suite's CPU time is XLA compiling: the CLI tests start dozens of
`python -m nfnet_jax.train` processes that compile the same few programs. At import
(before any test imports jax) this file points JAX's persistent compilation cache at
one fresh directory for the whole test run, through the environment, so the xdist
workers and every subprocess they start share it; a program is compiled once per
run and read back after that. It is removed when the run ends. A
JAX_COMPILATION_CACHE_DIR set by the caller is used instead, and kept.

The same way, XLA compiles at -O0 (`--xla_backend_optimization_level=0`, added to any
XLA_FLAGS the caller set): the tests check what the code computes, never how fast, and
LLVM's optimisation is most of a CPU compile's time. A test that sets XLA_FLAGS for a
subprocess of its own says there what that subprocess needs.

pytest.ini runs `-n auto --dist loadfile --no-loadscope-reorder`: each test file goes
to one worker whole, so a module fixture that builds something expensive (trained
runs, a model's weights, a batch of CLI checks) is built once. The files are handed
out in the order of the collection, which this hook sets: the files with the most
slow tests first, so that no long file starts last while the other worker idles.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWNED_CACHE = 'NFNET_TESTS_OWN_XLA_CACHE'  # set when this suite made the directory
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='nfnet_xla_cache_')
  os.environ[_OWNED_CACHE] = os.environ['JAX_COMPILATION_CACHE_DIR']
# Every program, however small or quick to compile.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
_O0 = '--xla_backend_optimization_level=0'
if _O0 not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()


def pytest_unconfigure(config: pytest.Config) -> None:
  # The xdist controller (or a run without xdist) made it, and removes it; a worker
  # (which has `workerinput`) leaves it to the controller.
  if not hasattr(config, 'workerinput') and os.environ.get(_OWNED_CACHE):
    shutil.rmtree(os.environ.pop(_OWNED_CACHE), ignore_errors=True)


def _file(item: pytest.Item) -> str:
  return item.nodeid.split('::', 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
  del config
  slow: dict[str, int] = {}
  first: dict[str, int] = {}
  for i, item in enumerate(items):
    name = _file(item)
    first.setdefault(name, i)
    slow[name] = slow.get(name, 0) + (item.get_closest_marker('slow') is not None)
  order = {id(item): i for i, item in enumerate(items)}
  # Stable within a file: its tests keep their order (and their module fixtures'
  # lifetimes).
  items.sort(key=lambda item: (-slow[_file(item)], first[_file(item)], order[id(item)]))
