"""Unpickling in a child process with hard limits: the second wall around `safe_pickle`.

`safe_pickle` refuses every hostile construct it knows of; this module makes a crash
or a blow-up in what it does not know of harmless. `read_params_in_child` starts one
Python process (numpy and `nfnet_jax.safe_pickle` only: no jax, no TensorFlow) that

* reads the pickle from a descriptor the parent opened (the only one it inherits
  besides its pipes and the output file's),
* runs under `RLIMIT_AS` (its address space after imports plus the load's memory
  bound), `RLIMIT_CPU`, `RLIMIT_FSIZE` and no core dumps, with a wall-clock timeout in
  the parent,
* parses with `safe_pickle.read_params` and writes the arrays' raw bytes (C order,
  native byte order, each at a 64-byte aligned offset) to a file with no name (a
  memfd, else an unlinked temporary file), and their (module, leaf, dtype, shape,
  offset) as one JSON line on stdout.

The parent treats that output as untrusted too: each entry's dtype and shape go
through the same `Budget.check_array` (fresh dtypes, plain numeric only, the model's
bounds), the regions must be aligned, in order and inside the file, and the arrays
are copy-on-write views of one private mapping of it (nothing is unpickled, no
`allow_pickle`, no second copy). Raw bytes rather than an `.npz`: zip CRCs and
`np.savez`'s chunked copies made a released F0 file's load several seconds slower. A refusal in the child comes back as the same
exception type and one-line message; a crash, a kill or a limit hit becomes one
`UnsafePickleError` line naming the file. The temporary file has no name on disk, so
nothing is left behind whatever happens to either process.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Optional

import numpy as np

from nfnet_jax.safe_pickle import (COPY_SLACK_BYTES, Budget, CheckpointTooLargeError,
                                   Params, UnsafePickleError)

__all__ = ['read_params_in_child', 'address_space_bound']

# Interpreter objects the opcodes build (about 100 B each, at most 1M opcodes) and
# allocator slack on top of the load's byte bound, for RLIMIT_AS.
_AS_SLACK = 384 * 2**20
# CPU seconds: a fixed allowance plus one second per 32 MiB of file (F6, 1.75 GB, takes
# a few seconds to parse; the limit only has to stop a runaway parse).
_CPU_BASE_S = 30
_CPU_BYTES_PER_S = 32 * 2**20

log = logging.getLogger('nfnet_jax.pretrained')

_ERRORS = {cls.__name__: cls for cls in (UnsafePickleError, CheckpointTooLargeError,
                                        pickle.UnpicklingError, ValueError)}

# Each array starts at a multiple of this offset in the child's output (aligned views).
_ALIGN = 64

_BOOT = ('import sys; sys.path.insert(0, sys.argv[1]); '
         'from nfnet_jax import unpickle_child; unpickle_child.child_main()')


def address_space_bound(size: int, max_bytes: int) -> int:
  """Bytes the parse may hold for a `size`-byte pickle (see safe_pickle's docstring):
  the file, one copy of it plus COPY_SLACK_BYTES, and arrays no larger than those, all
  within `max_bytes`."""
  return min(int(max_bytes), 3 * int(size) + 2 * COPY_SLACK_BYTES) + _AS_SLACK


def read_params_in_child(fd: int, path: str, size: int, budget: Budget,
                         model_leaves: list[tuple] = ()) -> Params:
  """Parses the pickle open on `fd` (`size` bytes) in a child process.

  `budget` (with `model_leaves`, the (shape, dtype) of its model's parameters) bounds
  the child's parse and, again, the arrays read back here. Returns {module: {leaf:
  array}}. Raises the child's refusal (same type, one line naming `path`) or
  `UnsafePickleError` for a crash, a signal, a limit or a timeout.
  """
  cpu_s = _CPU_BASE_S + size // _CPU_BYTES_PER_S
  spec = {'path': path, 'size': size, 'max_bytes': budget.max_bytes,
          'model': budget.model, 'model_leaves': [[list(s), str(d)] for s, d in model_leaves],
          'in_fd': fd, 'cpu_s': cpu_s, 'as_bytes': address_space_bound(size, budget.max_bytes)}
  with _anonymous_file() as out:
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
    params = _map_arrays(out.fileno(), report['arrays'], path, budget)
  log.debug('%s: parsed in a child process in %.2f s (its peak RSS %.1f MiB, %.1f MiB '
            'after start-up)', path, report.get('seconds') or 0,
            (report.get('peak_rss_kb') or 0) / 1024, (report.get('base_rss_kb') or 0) / 1024)
  return params


def _anonymous_file() -> IO[bytes]:
  """A file with no name on disk: memfd (memory only) where Linux has it, else an
  unlinked temporary file."""
  if hasattr(os, 'memfd_create'):
    try:
      return os.fdopen(os.memfd_create('nfnet_unpickle', os.MFD_CLOEXEC), 'w+b')
    except OSError:
      pass
  return tempfile.TemporaryFile(prefix='nfnet_unpickle_')


def _map_arrays(fd: int, entries: Any, path: str, budget: Budget) -> Params:
  """The arrays the child wrote to `fd`, as copy-on-write views of one private mapping
  of it (no copy here; writing to an array copies only the pages written). Each entry
  is checked like a declared array; the regions must be aligned, in order, disjoint
  and inside the file."""
  size = os.fstat(fd).st_size
  mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else b''
  if not isinstance(entries, list):
    raise UnsafePickleError(f'{path}: the pickle parser returned no array list; refused')
  params: Params = {}
  end = 0
  for entry in entries:
    ok = (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
          and isinstance(entry[1], str) and isinstance(entry[2], str)
          and len(entry[2]) <= 8 and isinstance(entry[3], list)
          and type(entry[4]) is int)
    if not ok:
      raise UnsafePickleError(f'{path}: the pickle parser returned a malformed entry; '
                              'refused')
    module, leaf, code, shape, offset = entry
    what = f'{path}: {module}/{leaf}'
    try:
      dtype = np.dtype(code)
    except TypeError:
      raise UnsafePickleError(f'{what}: the pickle parser returned dtype {code!r}; '
                              'refused') from None
    shape, dtype, nbytes = budget.check_array(shape, dtype, what)
    if offset % _ALIGN or offset < end or offset + nbytes > size:
      raise UnsafePickleError(f'{what}: the pickle parser returned bytes {offset:,}-'
                              f'{offset + nbytes:,} of {size:,} after {end:,}; refused')
    budget.charge(nbytes, what)
    if nbytes:
      array = np.frombuffer(mapped, dtype, math.prod(shape), offset).reshape(shape)
    else:
      array = np.zeros(shape, dtype)
    params.setdefault(module, {})[leaf] = array
    end = offset + nbytes
  return params


def _report(rc: int, stdout: bytes, stderr: bytes, path: str) -> dict:
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
    if isinstance(result.get('arrays'), list):
      return result
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

  from nfnet_jax import safe_pickle  # pylint: disable=g-import-not-at-top

  start = time.monotonic()
  spec = json.loads(sys.stdin.read())
  base_kb = _status_kb('VmHWM') or 0
  vm_kb = _status_kb('VmSize') or 0
  # (soft, hard); the CPU's hard limit is a little higher, so that the kernel sends
  # SIGXCPU (named in the refusal) before SIGKILL.
  limits = [(resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_CPU, spec['cpu_s'], spec['cpu_s'] + 5),
            (resource.RLIMIT_FSIZE, *(2 * [spec['as_bytes'] + spec['max_bytes']]))]
  if vm_kb:
    limits.append((resource.RLIMIT_AS, *(2 * [vm_kb * 1024 + spec['as_bytes']])))
  for which, soft, hard in limits:
    resource.setrlimit(which, (soft, hard))
  path = spec['path']
  budget = safe_pickle.Budget(path, spec['max_bytes'], spec['model'],
                              [(tuple(s), d) for s, d in spec['model_leaves']])
  budget.copy_arrays = False  # written out as they are: no copy of the file's bytes
  result: dict[str, Any]
  out_of_memory = False
  try:
    with os.fdopen(spec['in_fd'], 'rb') as f:
      params = safe_pickle.read_params(f, spec['size'], path, budget)
    entries = []
    with os.fdopen(spec['out_fd'], 'wb') as out:
      for module, leaves in params.items():
        for leaf, array in leaves.items():
          array = np.asarray(array, order='C')  # materialised arrays already are
          offset = -(-out.tell() // _ALIGN) * _ALIGN
          out.write(bytes(offset - out.tell()))
          entries.append([module, leaf, array.dtype.str, list(array.shape), offset])
          out.write(memoryview(array.reshape(-1).view(np.uint8)))
    result = {'arrays': entries}
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
