"""Unpickling in a child process with hard limits: the second wall around `safe_pickle`.

`safe_pickle` refuses every hostile construct it knows of; this module makes a crash
or a blow-up in what it does not know of harmless. `read_params_in_child` starts one
Python process (numpy and `nfnet_jax.safe_pickle` only: no jax, no TensorFlow) that

* reads the pickle from a descriptor the parent opened (the only one it inherits
  besides its pipes and the output file's),
* runs under `RLIMIT_AS` (its address space after imports plus the load's memory
  bound), `RLIMIT_CPU`, `RLIMIT_FSIZE` and no core dumps, with a wall-clock timeout in
  the parent,
* parses with `safe_pickle.read_params` and writes the arrays as an uncompressed
  `.npz` (members `a0.npy`, `a1.npy`, ... in the file's order) to an unlinked
  temporary file, and their (module, leaf) names as one JSON line on stdout.

The parent (`nfnet_jax.pretrained`) reads that `.npz` back with its bounded reader
(`allow_pickle` never involved). A refusal in the child comes back as the same
exception type and one-line message; a crash, a kill or a limit hit becomes one
`UnsafePickleError` line naming the file. The temporary file has no name on disk, so
nothing is left behind whatever happens to either process.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Optional, Sequence

from nfnet_jax.safe_pickle import (COPY_SLACK_BYTES, CheckpointTooLargeError,
                                   UnsafePickleError)

__all__ = ['read_params_in_child', 'ChildReport', 'address_space_bound']

# Interpreter objects the opcodes build (about 100 B each, at most 1M opcodes) and
# allocator slack on top of the load's byte bound, for RLIMIT_AS.
_AS_SLACK = 384 * 2**20
# CPU seconds: a fixed allowance plus one second per 32 MiB of file (F6, 1.75 GB, takes
# a few seconds to parse; the limit only has to stop a runaway parse).
_CPU_BASE_S = 30
_CPU_BYTES_PER_S = 32 * 2**20

_ERRORS = {cls.__name__: cls for cls in (UnsafePickleError, CheckpointTooLargeError,
                                        pickle.UnpicklingError, ValueError)}

_BOOT = ('import sys; sys.path.insert(0, sys.argv[1]); '
         'from nfnet_jax import unpickle_child; unpickle_child.child_main()')


class ChildReport(dict):
  """What the child reports beside the arrays: `names` [(module, leaf), ...],
  `peak_rss_kb`, `base_rss_kb` (after its imports), `seconds`."""


def address_space_bound(size: int, max_bytes: int) -> int:
  """Bytes the parse may hold for a `size`-byte pickle (see safe_pickle's docstring):
  the file, one copy of it plus COPY_SLACK_BYTES, and arrays no larger than those, all
  within `max_bytes`."""
  return min(int(max_bytes), 3 * int(size) + 2 * COPY_SLACK_BYTES) + _AS_SLACK


def read_params_in_child(fd: int, path: str, size: int, max_bytes: int,
                         model: Optional[str] = None,
                         model_leaves: Sequence[tuple[Sequence[int], str]] = ()
                         ) -> tuple[IO[bytes], ChildReport]:
  """Parses the pickle open on `fd` in a child process.

  Returns (an unlinked temporary file holding the `.npz`, positioned at 0, the child's
  report). The caller reads and closes the file. Raises the child's refusal (same
  type, one line naming `path`) or `UnsafePickleError` for a crash, a signal, a limit
  or a timeout.
  """
  cpu_s = _CPU_BASE_S + size // _CPU_BYTES_PER_S
  spec = {'path': path, 'size': size, 'max_bytes': int(max_bytes), 'model': model,
          'model_leaves': [[list(s), str(d)] for s, d in model_leaves], 'in_fd': fd,
          'cpu_s': cpu_s, 'as_bytes': address_space_bound(size, max_bytes)}
  out = tempfile.TemporaryFile(prefix='nfnet_unpickle_', suffix='.npz')
  try:
    spec['out_fd'] = out.fileno()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    # -I: no PYTHON* variables, no user site, no current directory on sys.path.
    proc = subprocess.Popen([sys.executable, '-I', '-c', _BOOT, root],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(fd, out.fileno()),
                            close_fds=True, env=env, cwd='/', start_new_session=True)
    try:
      stdout, stderr = proc.communicate(json.dumps(spec).encode(),
                                        timeout=3 * cpu_s + 30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.communicate()
      raise UnsafePickleError(f'{path}: the pickle parser did not finish within '
                              f'{3 * cpu_s + 30} s; refused') from None
    except BaseException:  # e.g. KeyboardInterrupt: the child does not outlive the load
      proc.kill()
      proc.wait()
      raise
    report = _report(proc.returncode, stdout, stderr, path)
    out.seek(0)
    return out, report
  except BaseException:
    out.close()
    raise


def _report(rc: int, stdout: bytes, stderr: bytes, path: str) -> ChildReport:
  lines = stdout.decode('utf-8', 'replace').strip().splitlines()
  result = None
  if lines:
    try:
      result = json.loads(lines[-1])
    except ValueError:
      result = None
  if rc == 0 and isinstance(result, dict):
    if 'error' in result:
      cls = _ERRORS.get(result['error'], UnsafePickleError)
      raise cls(' '.join(str(result['message']).split('\n')))
    if isinstance(result.get('names'), list):
      return ChildReport(result)
  if rc < 0:
    try:
      name = signal.Signals(-rc).name
    except ValueError:
      name = f'signal {-rc}'
    why = {'SIGXCPU': 'hit its CPU-time limit', 'SIGXFSZ': 'hit its output-size limit',
           'SIGKILL': 'was killed (out of memory?)'}.get(name, f'crashed ({name})')
  else:
    last = stderr.decode('utf-8', 'replace').strip().splitlines()[-1:]
    why = f'exited with status {rc}' + (f' ({last[0][:200]})' if last else '')
  raise UnsafePickleError(f'{path}: the pickle parser {why}; refused, nothing was loaded')


# ---------------------------------------------------------------------------
# The child.
# ---------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
  """A `kB` field of /proc/self/status (VmSize, VmHWM), None where there is none."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def child_main() -> None:
  """Entry point of the child: reads its spec on stdin, prints one JSON line."""
  import resource  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from nfnet_jax import safe_pickle  # pylint: disable=g-import-not-at-top

  start = time.monotonic()
  spec = json.loads(sys.stdin.read())
  base_kb = _status_kb('VmHWM') or 0
  vm_kb = _status_kb('VmSize') or 0
  limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, spec['cpu_s']),
            (resource.RLIMIT_FSIZE, spec['as_bytes'] + spec['max_bytes'])]
  if vm_kb:
    limits.append((resource.RLIMIT_AS, vm_kb * 1024 + spec['as_bytes']))
  for which, value in limits:
    resource.setrlimit(which, (value, value))
  path = spec['path']
  budget = safe_pickle.Budget(path, spec['max_bytes'], spec['model'],
                              [(tuple(s), d) for s, d in spec['model_leaves']])
  result: dict[str, Any]
  out_of_memory = False
  try:
    with os.fdopen(spec['in_fd'], 'rb') as f:
      params = safe_pickle.read_params(f, spec['size'], path, budget)
    names, arrays = [], {}
    for module, leaves in params.items():
      for leaf, array in leaves.items():
        arrays[f'a{len(names)}'] = array
        names.append([module, leaf])
    del params
    with os.fdopen(spec['out_fd'], 'wb') as out:
      np.savez(out, **arrays)
    result = {'names': names}
  except MemoryError:
    out_of_memory = True
  except tuple(_ERRORS.values()) as e:
    result = {'error': type(e).__name__, 'message': str(e)}
  if out_of_memory:  # reported outside the handler, once its frames are freed
    result = {'error': 'CheckpointTooLargeError',
              'message': f'{path}: ran out of memory while unpickling (the parser\'s '
                         f'limit is {safe_pickle.format_bytes(spec["as_bytes"])} above '
                         'its start-up size)'}
  result.update(peak_rss_kb=_status_kb('VmHWM'), base_rss_kb=base_kb,
                seconds=round(time.monotonic() - start, 3))
  print(json.dumps(result), flush=True)
