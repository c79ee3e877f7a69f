"""Mutations of valid parameter pickles, for the loader's fuzzing test.

`seed_pickles()` writes small parameter trees the ways the tests already do (the
released layout through `test_pretrained.LegacyPickler` at protocols 2-5, with and
without dill's array wrapper; the hand-written opcodes of `test_pretrained_limits`).
`mutate()` applies one to three edits: byte flips, truncation, opcode splices (an
opcode span copied from another seed, a random opcode inserted, a span deleted),
length edits (a length field set to 0, n +- 1, 2n or its maximum) and memo edits (an
index moved, a MEMOIZE turned into a GET).

Run as a script (`python tests/pickle_mutations.py CASES SEED`), it feeds CASES
mutations through the in-process parser (`safe_pickle.read_params`) and prints one
JSON line: counts, failures (an exception other than the loader's refusals, a
refusal message that is not one line naming the file, an array whose bytes are not
in the file, a case running past 10 s) and the growth of the process's peak RSS.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_pretrained as released  # pylint: disable=g-import-not-at-top
import test_pretrained_limits as crafted  # pylint: disable=g-import-not-at-top

from nfnet_jax import safe_pickle  # pylint: disable=g-import-not-at-top

REFUSALS = (safe_pickle.UnsafePickleError, pickle.UnpicklingError, ValueError)
FUZZ_BUDGET = 64 * 2**20  # max_bytes of each in-process case

_OPCODES = [op for op in pickletools.opcodes]
_LENGTH_WIDTHS = {'SHORT_BINBYTES': 1, 'SHORT_BINSTRING': 1, 'SHORT_BINUNICODE': 1,
                  'LONG1': 1, 'BINBYTES': 4, 'BINSTRING': 4, 'BINUNICODE': 4, 'LONG4': 4,
                  'BINBYTES8': 8, 'BINUNICODE8': 8, 'BYTEARRAY8': 8, 'FRAME': 8}
_MEMO_WIDTHS = {'BINPUT': 1, 'BINGET': 1, 'LONG_BINPUT': 4, 'LONG_BINGET': 4}


def seed_pickles() -> list[bytes]:
  """Valid parameter pickles of a few KB: float32/float64/big-endian/Fortran-order
  arrays and a numpy scalar, in every layout the loader reads."""
  rng = np.random.default_rng(0)
  params = {
      'NFNet/stem_conv0': {'w': rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
                           'b': np.arange(4, dtype=np.float32)},
      'NFNet/nf_block/conv0': {'w': np.asfortranarray(rng.standard_normal((4, 6))),
                               'gain': np.arange(6, dtype='>f4')},
      'NFNet/linear': {'w': rng.standard_normal((6, 5)).astype(np.float32),
                       'b': np.float32(0.5)},
  }
  seeds = []
  for protocol in (2, 3, 4, 5):
    for dill_arrays in (False, True):
      buf = io.BytesIO()
      tree = released.FlatMapping({released.pretrained.released_name(m):
                                   released.FlatMapping(dict(leaves))
                                   for m, leaves in params.items()})
      released.LegacyPickler(buf, protocol, dill_arrays).dump(tree)
      seeds.append(buf.getvalue())
  seeds.append(crafted.honest(3))
  seeds.append(pickle.dumps({k: dict(v) for k, v in params.items()}, protocol=5))
  return seeds


def _ops(data: bytes) -> list[tuple[str, int, int]]:
  """(opcode name, start, end) of the opcodes that parse, up to the first bad one."""
  out = []
  try:
    prev = None
    for op, _, pos in pickletools.genops(data):
      if prev is not None:
        out.append((prev[0], prev[1], pos))
      prev = (op.name, pos)
    if prev is not None:
      out.append((prev[0], prev[1], len(data)))  # STOP's end is approximate
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _edit_length(rng: random.Random, data: bytes, ops) -> bytes:
  fields = [(n, s) for n, s, _ in ops if n in _LENGTH_WIDTHS]
  if not fields:
    return _flip(rng, data)
  name, start = rng.choice(fields)
  width = _LENGTH_WIDTHS[name]
  raw = data[start + 1:start + 1 + width]
  n = int.from_bytes(raw, 'little')
  top = 2**(8 * width) - 1
  new = min(top, rng.choice([0, max(n - 1, 0), n + 1, 2 * n, top,
                             rng.randrange(2**(8 * width))]))
  return data[:start + 1] + new.to_bytes(width, 'little') + data[start + 1 + width:]


def _edit_memo(rng: random.Random, data: bytes, ops) -> bytes:
  memo = [(n, s) for n, s, _ in ops if n in _MEMO_WIDTHS or n == 'MEMOIZE']
  if not memo:
    return _flip(rng, data)
  name, start = rng.choice(memo)
  if name == 'MEMOIZE':  # becomes a GET of some earlier index
    return data[:start] + b'h' + bytes([rng.randrange(8)]) + data[start + 1:]
  width = _MEMO_WIDTHS[name]
  index = rng.choice([0, 1, rng.randrange(256), 2**(8 * width) - 1])
  return data[:start + 1] + index.to_bytes(width, 'little') + data[start + 1 + width:]


def _splice(rng: random.Random, data: bytes, ops, others) -> bytes:
  if not ops:
    return _flip(rng, data)
  at = rng.choice(ops)[1]
  how = rng.randrange(3)
  if how == 0:  # a span of opcodes from another seed
    other = _ops(rng.choice(others))
    if not other:
      return data
    i = rng.randrange(len(other))
    j = min(len(other), i + rng.randint(1, 6))
    donor = rng.choice(others)
    piece = donor[other[i][1]:other[j - 1][2]]
  elif how == 1:  # one random opcode with a few random argument bytes
    op = rng.choice(_OPCODES)
    piece = op.code.encode('latin1') + bytes(rng.randrange(256)
                                             for _ in range(rng.choice([0, 1, 2, 4, 8])))
  else:  # delete a span of opcodes
    i = ops.index(next(o for o in ops if o[1] == at))
    j = min(len(ops), i + rng.randint(1, 4))
    return data[:at] + data[ops[j - 1][2]:]
  return data[:at] + piece + data[at:]


def _flip(rng: random.Random, data: bytes) -> bytes:
  out = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    i = rng.randrange(len(out))
    out[i] = rng.randrange(256) if rng.random() < 0.5 else out[i] ^ (1 << rng.randrange(8))
  return bytes(out)


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
  """One to three edits of `data` (see the module docstring)."""
  for _ in range(rng.randint(1, 3)):
    ops = _ops(data)
    kind = rng.randrange(6)
    if kind == 0:
      data = _flip(rng, data)
    elif kind == 1:
      data = _edit_length(rng, data, ops)
    elif kind == 2:
      data = _edit_memo(rng, data, ops)
    elif kind in (3, 4):
      data = _splice(rng, data, ops, others)
    else:
      data = data[:rng.randrange(1, len(data))]
    if not data:
      data = b'\x80'
  return data


def bytes_from_file(array: np.ndarray, data: bytes) -> bool:
  """Whether `array`'s bytes appear in `data` in some order the loader may have read
  them in: C or Fortran order, either byte order, raw or as protocol 2's UTF-8 text of
  latin-1 characters."""
  if array.nbytes == 0:
    return True
  for a in (array, array.byteswap()):
    for order in 'CF':
      raw = a.tobytes(order)
      if raw in data or raw.decode('latin1').encode('utf-8') in data:
        return True
  return False


def check_case(data: bytes, path: str, read) -> tuple[str, str]:
  """Runs `read()` on one case: ('loaded' | 'refused', '') or ('failure', why)."""
  try:
    params = read()
  except REFUSALS as e:
    message = str(e)
    if not message.startswith(f'{path}: ') or '\n' in message:
      return 'failure', f'refusal not one line naming the file: {type(e).__name__}: {e!r}'
    return 'refused', ''
  for module, leaves in params.items():
    for leaf, array in leaves.items():
      if not isinstance(array, np.ndarray) or not bytes_from_file(array, data):
        return 'failure', f'{module}/{leaf}: bytes not from the file'
  return 'loaded', ''


def _peak_kb() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))


class _Hang(Exception):
  pass


def _alarm(signum, frame):
  raise _Hang()


def run(cases: int, seed: int) -> dict:
  """`cases` mutations through the in-process parser; a summary (see the docstring)."""
  seeds = seed_pickles()
  rng = random.Random(seed)
  counts = {'loaded': 0, 'refused': 0, 'failure': 0}
  failures = []
  signal.signal(signal.SIGALRM, _alarm)
  start_kb, start = _peak_kb(), time.monotonic()
  for i in range(cases):
    data = mutate(rng, rng.choice(seeds), seeds)
    budget = safe_pickle.Budget('<fuzz>', FUZZ_BUDGET)
    read = lambda: safe_pickle.read_params(io.BytesIO(data), len(data), '<fuzz>', budget)
    signal.alarm(10)
    try:
      outcome, why = check_case(data, '<fuzz>', read)
    except _Hang:
      outcome, why = 'failure', 'still running after 10 s'
    except BaseException as e:  # pylint: disable=broad-except
      outcome, why = 'failure', f'{type(e).__name__}: {e}'[:300]
    finally:
      signal.alarm(0)
    counts[outcome] += 1
    if why and len(failures) < 10:
      failures.append({'case': i, 'why': why, 'data': data[:200].hex()})
  return {'cases': cases, **counts, 'failures': failures,
          'seconds': round(time.monotonic() - start, 2),
          'peak_growth_mb': round((_peak_kb() - start_kb) / 1024, 1)}


if __name__ == '__main__':
  print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
