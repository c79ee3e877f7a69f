"""The checkpoint reader bounds memory: hostile files are refused before they allocate.

Every file here is written byte by byte (pickle opcodes, zip records), as an attacker
would, not by a pickler. Each refusal is checked in a fresh process whose peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is read before and after the load: the
growth must stay under RSS_BOUND_MB, and so must the growth of its children's peak
(the pickle parser runs in a child process). `test_rss_probe_sees_an_allocation`
shows the probe registers a real allocation, and `test_hand_written_pickle_loads`
that the hand-written opcodes are a valid pickle when the sizes are honest.
benchmarks/loader_attacks.py loads the hostile files below at full size.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from nfnet_jax import pretrained
from nfnet_jax.pretrained import CheckpointTooLargeError, UnsafePickleError

RSS_BOUND_MB = 200

# ---------------------------------------------------------------------------
# Pickle opcodes (protocol 4), written by hand.
# ---------------------------------------------------------------------------
PROTO4 = b'\x80\x04'
STOP, MARK, TUPLE, TUPLE1, TUPLE3 = b'.', b'(', b't', b'\x85', b'\x87'
REDUCE, BUILD, EMPTY_DICT, SETITEM, MEMOIZE = b'R', b'b', b'}', b's', b'\x94'
NEWTRUE, NEWFALSE = b'\x88', b'\x89'


def text(s: str) -> bytes:  # SHORT_BINUNICODE
  raw = s.encode()
  return b'\x8c' + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:  # STACK_GLOBAL
  return text(module) + text(name) + b'\x93'


def integer(n: int) -> bytes:  # BININT (signed 32 bit) or LONG1
  if -2**31 <= n < 2**31:
    return b'J' + struct.pack('<i', n)
  raw = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw


def binbytes(data: bytes) -> bytes:  # BINBYTES8: 8-byte length, then the data
  return b'\x8e' + struct.pack('<Q', len(data)) + data


def get(index: int) -> bytes:  # BINGET
  return b'h' + bytes([index])


def shape_tuple(shape) -> bytes:
  return MARK + b''.join(integer(d) for d in shape) + TUPLE


def dtype(code: str) -> bytes:  # numpy.dtype(code, False, True), as numpy pickles it
  return glob('numpy', 'dtype') + text(code) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE


def reconstruct(shape=(0,), code=b'b') -> bytes:
  """numpy.core.multiarray._reconstruct(numpy.ndarray, shape, code): numpy's reduction."""
  return (glob('numpy.core.multiarray', '_reconstruct') + glob('numpy', 'ndarray')
          + shape_tuple(shape) + b'C' + bytes([len(code)]) + code + TUPLE3 + REDUCE)


def array_state(shape, code: str, data: bytes) -> bytes:
  """BUILD with numpy's state (1, shape, dtype, is_fortran, data)."""
  return (MARK + integer(1) + shape_tuple(shape) + dtype(code) + NEWFALSE + data + TUPLE
          + BUILD)


def tree(leaves) -> bytes:
  """{'NFNet/~/m<i>': {'w': value_i}} for the opcode strings in `leaves`."""
  out = EMPTY_DICT
  for i, value in enumerate(leaves):
    out += text(f'NFNet/~/m{i}') + EMPTY_DICT + text('w') + value + SETITEM + SETITEM
  return PROTO4 + out + STOP


# ---------------------------------------------------------------------------
# The crafted files.
# ---------------------------------------------------------------------------
def bytearray_bomb() -> bytes:
  """bytearray(2_000_000_000): the allowed builtins.bytearray asked for 2 GB of zeros."""
  return tree([glob('builtins', 'bytearray') + integer(2_000_000_000) + TUPLE1 + REDUCE])


def unfilled_reconstruct(references: int = 1) -> bytes:
  """_reconstruct of 2.5e8 float64 (2 GB) with no state: nothing ever fills it."""
  first = reconstruct((250_000_000,), b'f8') + MEMOIZE
  return tree([first] + [get(0)] * (references - 1))


def shared_array(references: int = 4) -> bytes:
  """One honest 4 MB float64 array (memoised), then BINGET of it under other names."""
  data = np.arange(500_000, dtype='<f8').tobytes()
  first = (reconstruct() + array_state((500_000,), '<f8', binbytes(data)) + MEMOIZE)
  return tree([first] + [get(0)] * (references - 1))


def shared_data(references: int = 4) -> bytes:
  """One 4 MB byte string (memoised) given as the data of four separate arrays."""
  data = np.arange(500_000, dtype='<f8').tobytes()
  leaves = [reconstruct() + array_state((500_000,), '<f8', binbytes(data) + MEMOIZE)]
  leaves += [reconstruct() + array_state((500_000,), '<f8', get(0))
             for _ in range(references - 1)]
  return tree(leaves)


def short_data() -> bytes:
  """State declaring 2.5e8 float64 with 16 bytes of data."""
  return tree([reconstruct() + array_state((250_000_000,), '<f8', binbytes(b'\0' * 16))])


def huge_shape() -> bytes:
  """State declaring 10^12 x 10^6 float64 (8 EB)."""
  return tree([reconstruct() + array_state((10**12, 10**6), '<f8', binbytes(b'\0' * 8))])


def huge_length_field() -> bytes:
  """BINBYTES8 declaring 2^40 bytes in a 60-byte file."""
  return tree([b'\x8e' + struct.pack('<Q', 2**40) + b'\0' * 8])


def huge_memo_index() -> bytes:
  """LONG_BINPUT 2^30: the unpickler would size its memo table (8 GB) by the index."""
  return tree([integer(1) + b'r' + struct.pack('<I', 2**30)])


def honest(n: int = 3) -> bytes:
  """The same opcodes with honest sizes: n float32 arrays of their own data."""
  return tree([reconstruct() + array_state((2, 3), '<f4',
                                           binbytes(np.full((2, 3), i, '<f4').tobytes()))
               for i in range(n)])


def dtype_rebuilt_after_check(n_bytes: int = 2**16) -> bytes:
  """A float32 array of `n_bytes` zeros whose memoised dtype is then rebuilt (BUILD)
  as the sub-array dtype ('f16', (1,)): 16-byte items over data checked as 4-byte ones.

  A reader that keeps the pickle's dtype object would copy the array out with the new
  itemsize, reading 4x past the file's bytes.
  """
  f16 = dtype('f16') + MARK + integer(3) + text('<') + b'NNN' + integer(-1) + integer(-1)
  f16 += integer(0) + TUPLE + BUILD
  subarray_state = (MARK + integer(3) + text('|') + f16 + shape_tuple((1,)) + b'\x86'
                    + b'NN' + integer(16) + integer(16) + integer(0) + TUPLE)
  n = n_bytes // 4
  array = (reconstruct() + MARK + integer(1) + shape_tuple((n,)) + get(0) + NEWFALSE
           + binbytes(bytes(4 * n)) + TUPLE + BUILD)
  return (PROTO4 + dtype('<f4') + MEMOIZE + b'0' + EMPTY_DICT + text('NFNet/~/m0')
          + EMPTY_DICT + text('w') + array + SETITEM + SETITEM
          + get(0) + subarray_state + BUILD + b'0' + STOP)


def deep_key(depth: int = 300_000, where: str = 'leaf-key') -> bytes:
  """A tuple nested `depth` deep ((((None,),),)...: one TUPLE1 per level) used as a
  dict key (module or leaf) or a frozenset item: hashing it recurses once per level."""
  deep = b'N' + b'\x85' * depth
  if where == 'module-key':
    body = EMPTY_DICT + deep + EMPTY_DICT + SETITEM
  elif where == 'leaf-key':
    body = EMPTY_DICT + text('NFNet/~/m0') + EMPTY_DICT + deep + b'N' + SETITEM + SETITEM
  elif where == 'frozenset':
    body = (EMPTY_DICT + text('NFNet/~/m0') + EMPTY_DICT + text('w') + MARK + deep
            + b'\x91' + SETITEM + SETITEM)
  else:
    raise ValueError(where)
  return PROTO4 + body + STOP


def bytearray_copies(size: int, copies: int) -> bytes:
  """One `size`-byte string (memoised), then `copies` bytearray copies of it kept in a
  list: a file of `size` bytes asking for `copies` times that."""
  one = glob('builtins', 'bytearray') + get(0) + TUPLE1 + REDUCE
  return (PROTO4 + binbytes(bytes(size)) + MEMOIZE + b'0' + EMPTY_DICT
          + text('NFNet/~/m0') + EMPTY_DICT + text('w') + b']' + MARK + one * copies
          + b'e' + SETITEM + SETITEM + STOP)


def npy_header(shape, descr='<f4') -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {'descr': descr, 'fortran_order': False, 'shape': tuple(shape)})
  return buf.getvalue()


def zip_one_member(name: str, stream: bytes, crc: int, uncompressed: int) -> bytes:
  """A zip archive with one deflated member, written record by record."""
  raw = name.encode()
  local = struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 8, 0, 0, crc, len(stream),
                      uncompressed, len(raw), 0) + raw
  central = struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 8, 0, 0, crc,
                        len(stream), uncompressed, len(raw), 0, 0, 0, 0, 0, 0) + raw
  end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 1, 1, len(central),
                    len(local) + len(stream), 0)
  return local + stream + central + end


def zip_bomb(mib: int = 2048) -> tuple[bytes, bytes]:
  """An .npz whose one member `NFNet/~/linear/w` declares float32 zeros of `mib` MiB.

  The deflate stream is the header, then one full-flushed 1 MiB block of zeros
  repeated (a full flush resets the compressor, so each repeat is the same bytes),
  then an empty final block: ~1 KB per MiB. Returns (archive, stream). The CRC field
  is that of the header only: readers check it after decompressing, too late.
  """
  header = npy_header((mib * 2**18,))
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
  z = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = z.compress(bytes(2**20)) + z.flush(zlib.Z_FULL_FLUSH)
  stream = head + block * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
  archive = zip_one_member('NFNet/~/linear/w.npy', stream, zlib.crc32(header),
                           len(header) + mib * 2**20)
  return archive, stream


def npz_huge_header() -> bytes:
  """An .npz member whose .npy header declares 10^15 float32 in a 100-byte entry."""
  header = npy_header((10**15,))
  stream = zlib.compress(header)[2:-4]  # raw deflate
  return zip_one_member('NFNet/~/linear/w.npy', stream, zlib.crc32(header), len(header))


# ---------------------------------------------------------------------------
# Loading in a fresh process, measuring peak RSS.
# ---------------------------------------------------------------------------
_CHILD = r'''
import json, resource, sys
import numpy as np
from nfnet_jax import pretrained
path, model, how = sys.argv[1], sys.argv[2] or None, sys.argv[3]
max_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else None
if model:
  pretrained.model_shapes(model)  # jax import and tracing before the baseline
peak_kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# The pickle parser's process (a child): its peak, which starts at this process's
# size when it is started (Linux carries the peak across exec), so growth above
# `before` bounds what the parse itself used.
children_kb = lambda: resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
before = peak_kb()
out = {}
try:
  if how == 'alloc':  # the probe's control: a real 300 MB allocation
    keep = np.ones(300 * 2**20, np.uint8)
    out['returned'] = {}
  elif how == 'read':
    got = pretrained.read_checkpoint(path, model=model, max_bytes=max_bytes)
    out['returned'] = {m: {k: [list(a.shape), str(a.dtype)] for k, a in l.items()}
                       for m, l in got.items()}
  else:
    got = pretrained.load(path, model=model)
    out['returned'] = {m: {k: [list(a.shape), str(a.dtype)] for k, a in l.items()}
                       for m, l in got.items()}
except BaseException as e:
  out['error'] = [c.__name__ for c in type(e).__mro__]
  out['message'] = str(e)
out['growth_mb'] = (peak_kb() - before) / 1024
out['children_growth_mb'] = max(0, children_kb() - before) / 1024
print(json.dumps(out))
'''


def load_in_child(path: Path, model: str = '', how: str = 'load',
                  max_bytes: Optional[int] = None) -> dict:
  """Runs _CHILD in a grandchild forked by a small shell.

  Linux carries a process's peak RSS across exec, so a child exec'd straight from
  pytest (hundreds of MB after other tests) would start with pytest's peak and show
  no growth below it; the shell's fork gives the grandchild a fresh, small peak.
  """
  r = subprocess.run(['/bin/sh', '-c', '"$@"; exit $?', 'sh', sys.executable, '-c',
                      _CHILD, str(path), model, how]
                     + ([str(max_bytes)] if max_bytes else []),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


def assert_refused(result: dict, path: Path, error=UnsafePickleError, match: str = ''):
  assert 'returned' not in result, f'returned {result["returned"]}'
  assert error.__name__ in result['error'], result
  assert 'MemoryError' not in result['error'][:1], result
  assert result['message'].startswith(str(path)), result['message']
  assert '\n' not in result['message']
  assert match in result['message'], result['message']
  assert result['growth_mb'] < RSS_BOUND_MB, result
  assert result['children_growth_mb'] < RSS_BOUND_MB, result


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------
def test_rss_probe_sees_an_allocation(tmp_path):
  """A 300 MiB allocation reads as well over RSS_BOUND_MB (a little under 300: the
  baseline peak already includes memory the imports freed, which it reuses)."""
  result = load_in_child(tmp_path / 'unused', how='alloc')
  assert RSS_BOUND_MB + 50 < result['growth_mb'] < 400, result


def test_hand_written_pickle_loads(tmp_path):
  """Control: the crafting helpers make valid pickles; honest sizes load exactly."""
  path = tmp_path / 'honest.pkl'
  path.write_bytes(honest(3))
  got = pretrained.read_checkpoint(path)
  assert list(got) == ['NFNet/~/m0', 'NFNet/~/m1', 'NFNet/~/m2']
  for i in range(3):
    np.testing.assert_array_equal(got[f'NFNet/~/m{i}']['w'], np.full((2, 3), i, np.float32))
    assert got[f'NFNet/~/m{i}']['w'].flags.writeable
  assert pickle.loads(shared_array()) is not None  # the crafted opcodes are well formed
  assert pickle.loads(shared_data()) is not None


def test_bytearray_of_a_huge_size_is_refused(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(bytearray_bomb())
  assert len(path.read_bytes()) < 100
  assert_refused(load_in_child(path), path, UnsafePickleError, 'bytearray(2000000000)')


def test_unfilled_reconstruct_is_never_returned(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(unfilled_reconstruct())
  assert len(path.read_bytes()) < 150
  assert_refused(load_in_child(path, how='read'), path, UnsafePickleError,
                 'never given its data')
  with pytest.raises(UnsafePickleError, match='never given its data'):
    pretrained.read_checkpoint(path)


@pytest.mark.parametrize('case', ['unfilled', 'filled'])
def test_one_array_referenced_four_times_is_refused(tmp_path, case):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(unfilled_reconstruct(4) if case == 'unfilled' else shared_array(4))
  assert pickle.loads(path.read_bytes())['NFNet/~/m3']['w'] is not None  # 4 references
  match = 'never given its data' if case == 'unfilled' else 'referenced more than once'
  assert_refused(load_in_child(path), path, UnsafePickleError, match)
  # One reference of the same honest array loads: it is the repetition that is refused.
  path.write_bytes(shared_array(1))
  got = pretrained.read_checkpoint(path)
  np.testing.assert_array_equal(got['NFNet/~/m0']['w'], np.arange(500_000, dtype='<f8'))


def test_one_byte_string_filling_four_arrays_is_refused(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(shared_data(4))
  assert_refused(load_in_child(path, how='read'), path, UnsafePickleError,
                 'already filled another array')


def test_data_shorter_than_declared_is_refused(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(short_data())
  assert_refused(load_in_child(path, how='read'), path, UnsafePickleError,
                 'needs 2,000,000,000 bytes, its data has 16')


@pytest.mark.parametrize('make,error,match', [
    (huge_shape, CheckpointTooLargeError, 'exceeds the 4.00 GiB budget'),
    (lambda: tree([reconstruct((10**12,), b'f8')]), CheckpointTooLargeError,
     'exceeds the 4.00 GiB budget'),
    (huge_length_field, pickle.UnpicklingError, 'declares 1,099,511,627,776 bytes'),
    (huge_memo_index, CheckpointTooLargeError, 'memo index 1,073,741,824'),
    (npz_huge_header, CheckpointTooLargeError, 'exceeds the 4.00 GiB budget'),
], ids=['pickle-shape', 'reconstruct-shape', 'pickle-length', 'pickle-memo', 'npz-header'])
def test_huge_declared_sizes_are_refused_not_memoryerror(tmp_path, make, error, match):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(make())
  result = load_in_child(path, how='read')
  assert_refused(result, path, error, match)
  assert 'MemoryError' not in result['error']


def test_zip_bomb_is_refused_with_and_without_a_model(tmp_path):
  archive, stream = zip_bomb(2048)  # 2 GiB of float32 zeros declared
  assert len(archive) < 3 * 2**20
  # The stream is a real deflate stream of what the header declares (checked small).
  small, small_stream = zip_bomb(3)
  d = zlib.decompressobj(-15)
  body = d.decompress(small_stream) + d.flush()
  header = npy_header((3 * 2**18,))
  assert body == header + bytes(3 * 2**20) and d.eof
  path = tmp_path / 'bomb.npz'
  path.write_bytes(archive)
  assert_refused(load_in_child(path, 'F0'), path, CheckpointTooLargeError,
                 "larger than any parameter of model 'F0'")
  assert_refused(load_in_child(path, how='read'), path, CheckpointTooLargeError,
                 'a zip bomb?')


def test_model_bounds_an_honest_but_oversized_pickle(tmp_path):
  """With model=..., an array larger than any of the model's parameters is refused
  before its copy; float64 is refused for a float32 model."""
  data = np.zeros(2**22, '<f4').tobytes()  # 16 MiB: more than nf_regnet_b0's largest
  path = tmp_path / 'big.pkl'
  path.write_bytes(tree([reconstruct() + array_state((2**22,), '<f4', binbytes(data))]))
  with pytest.raises(CheckpointTooLargeError, match="larger than any parameter of model "
                     "'nf_regnet_b0'"):
    pretrained.read_checkpoint(path, model='nf_regnet_b0')
  assert pretrained.read_checkpoint(path)['NFNet/~/m0']['w'].shape == (2**22,)
  f4, f8 = (binbytes(np.zeros((2, 3), code).tobytes()) for code in ('<f4', '<f8'))
  path.write_bytes(honest(1).replace(b'<f4', b'<f8').replace(f4, f8))
  with pytest.raises(UnsafePickleError, match='float64.*float32 parameters'):
    pretrained.read_checkpoint(path, model='nf_regnet_b0')


def test_budget_is_checked_against_what_the_file_holds(tmp_path):
  """max_bytes bounds file + copies: an honest 4 MB array passes 16 MB, not 6 MB."""
  path = tmp_path / 'one.pkl'
  path.write_bytes(shared_array(1))
  assert pretrained.read_checkpoint(path, max_bytes=16 * 2**20)
  with pytest.raises(CheckpointTooLargeError, match='over its 6.00 MiB budget'):
    pretrained.read_checkpoint(path, max_bytes=6 * 2**20)


def test_build_on_an_allowed_global_is_refused():
  """BUILD's slot state would setattr on the global (e.g. a function's __defaults__)."""
  state = MARK + b'N' + EMPTY_DICT + text('__new__') + glob('builtins', 'dict') + SETITEM
  for target in (glob('haiku._src.data_structures', 'FlatMapping'),
                 glob('_codecs', 'encode'), glob('numpy', 'ndarray')):
    data = PROTO4 + target + state + TUPLE + BUILD + STOP
    with pytest.raises(UnsafePickleError, match='BUILD on'):
      pretrained.safe_loads(data)
  with pytest.raises(UnsafePickleError, match=r'numpy\.ndarray\(\.\.\.\) called directly'):
    pretrained.safe_loads(PROTO4 + glob('numpy', 'ndarray') + shape_tuple((10**9,))
                          + TUPLE1 + REDUCE + STOP)


def test_container_copies_are_charged():
  """list(x) of one memoised list, repeated: each copy counts against the budget."""
  big = b'(' + b'N' * 100_000 + b'l' + MEMOIZE  # MARK, 100k Nones, LIST
  copies = b''.join(glob('builtins', 'list') + get(0) + TUPLE1 + REDUCE + b'0'
                    for _ in range(200))  # each copy popped (POP) once made
  data = PROTO4 + big + copies + STOP
  with pytest.raises(CheckpointTooLargeError, match='a list copy'):
    pretrained.safe_loads(data, max_bytes=64 * 2**20)
  two_copies = copies[:len(copies) // 100]
  assert pretrained.safe_loads(PROTO4 + big + two_copies + STOP) is not None


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def test_npz_damage_and_foreign_members_are_named(tmp_path):
  path = tmp_path / 'x.npz'
  w = np.arange(1000, dtype=np.float32)
  good = _npz_bytes(**{'NFNet/~/linear/w': w})
  path.write_bytes(good)
  np.testing.assert_array_equal(pretrained.read_checkpoint(path)['NFNet/~/linear']['w'], w)
  # One flipped data byte (same size): the member's CRC no longer matches.
  at = good.index(w.tobytes()) + 2000
  path.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
  with pytest.raises(ValueError, match=r"x\.npz: member 'NFNet/~/linear/w\.npy': damaged"):
    pretrained.read_checkpoint(path)
  # A header that declares fewer elements than the entry holds.
  path.write_bytes(good.replace(b"'shape': (1000,)", b"'shape': (999,) "))
  with pytest.raises(ValueError, match=r'header declares \(999,\) float32'):
    pretrained.read_checkpoint(path)
  # Pickled (object) members and members that are not .npy arrays.
  path.write_bytes(_npz_bytes(**{'NFNet/~/linear/w': np.array([{}], dtype=object)}))
  with pytest.raises(UnsafePickleError, match='object dtype'):
    pretrained.read_checkpoint(path)
  import zipfile
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('NFNet/~/linear/w.txt', 'hello')
  with pytest.raises(ValueError, match=r"member 'NFNet/~/linear/w\.txt' is not a \.npy"):
    pretrained.read_checkpoint(path)
  # The second member's local header overwritten: named, not zipfile's own exception.
  two = _npz_bytes(**{'NFNet/~/linear/w': w, 'NFNet/~/linear/b': w[:10]})
  at = two.index(b'PK\x03\x04', 4)
  path.write_bytes(two[:at] + b'PK\x00\x00' + two[at + 4:])
  with pytest.raises(ValueError, match=r"linear/b\.npy': damaged: Bad magic number"):
    pretrained.read_checkpoint(path)


# ---------------------------------------------------------------------------
# Objects a pickle changes after they were checked, nesting, copies, odd files.
# ---------------------------------------------------------------------------
def test_dtype_rebuilt_after_the_check_is_refused(tmp_path):
  """The array was checked as float32; rebuilding its memoised dtype afterwards must
  not make the copy read past the file's bytes (which are all zero)."""
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(dtype_rebuilt_after_check(2**16))
  assert 2**16 < path.stat().st_size < 2**16 + 400
  assert pickle.loads(path.read_bytes())['NFNet/~/m0']['w'].shape == (2**14,)
  result = load_in_child(path, how='read')
  assert_refused(result, path, UnsafePickleError, 'changes a container that already '
                 'sits inside another one')


def test_dtype_state_other_than_a_plain_dtype_is_refused():
  """The second wall: a dtype given a sub-array state before any array uses it (which
  the opcode scan allows) is refused by the dtype stand-in itself."""
  rebuilt = dtype_rebuilt_after_check(64)
  state_at = rebuilt.index(b'h\x00(J\x03\x00\x00\x00\x8c\x01|')  # BINGET 0, MARK, 3, '|'
  subarray_state = rebuilt[state_at + 2:rebuilt.rindex(BUILD)]
  data = (PROTO4 + dtype('<f4') + subarray_state + BUILD + MEMOIZE + b'0'
          + rebuilt[rebuilt.index(EMPTY_DICT):state_at] + STOP)
  with pytest.raises(UnsafePickleError, match=r"numpy\.dtype\('<f4'\): state \(3, '\|', "
                     r'.*refused; only the state of a plain numeric dtype'):
    pretrained.safe_loads(data)
  plain = data.replace(subarray_state, MARK + integer(3) + text('<') + b'NNN'
                       + integer(-1) + integer(-1) + integer(0) + TUPLE)
  got = pretrained.safe_loads(plain)['NFNet/~/m0']['w']  # control: numpy's own state
  assert got.dtype == np.float32 and got.shape == (16,) and not got.any()


@pytest.mark.parametrize('where', ['module-key', 'leaf-key', 'frozenset'])
def test_deeply_nested_keys_are_refused_without_crashing(tmp_path, where):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(deep_key(300_000, where))
  assert path.stat().st_size < 310_000
  assert_refused(load_in_child(path), path, UnsafePickleError,
                 'would nest containers more than 64 deep')
  path.write_bytes(deep_key(10, where))  # control: shallow, the same file loads or is
  with pytest.raises(ValueError, match='not an array|non-string key'):  # refused as
    pretrained.read_checkpoint(path)  # something other than parameters


def test_container_grown_after_it_was_nested_is_refused():
  """Depth through the memo: append to a list already inside another, level by level
  (each level a few opcodes, the stack never deep)."""
  data = PROTO4 + b']' + MEMOIZE  # memo i: the list at level i
  for i in range(200):  # GET level i, a new list (memo i + 1) in a 1-tuple, APPEND, POP
    data += get(i) + b']' + MEMOIZE + TUPLE1 + b'a' + b'0'
  data += STOP
  assert len(pickle.loads(data)) == 1  # a list in a tuple in a list ... 200 levels
  with pytest.raises(UnsafePickleError, match='changes a container that already sits '
                     'inside another one'):
    pretrained.safe_loads(data)


def test_a_file_cannot_multiply_its_own_bytes(tmp_path):
  """4 MiB copied 100 times through bytearray: refused at the copy that takes the
  copies past the file's size plus 16 MiB, not at the 512 MiB budget."""
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(bytearray_copies(4 * 2**20, 100))
  assert path.stat().st_size < 4 * 2**20 + 4000
  result = load_in_child(path, how='read', max_bytes=512 * 2**20)
  assert_refused(result, path, CheckpointTooLargeError, 'a file that multiplies its own '
                 'bytes')
  assert 'more than its size plus 16.00 MiB (20.00 MiB)' in result['message']
  assert max(result['growth_mb'], result['children_growth_mb']) < 64, result
  # Control: one copy of the file's bytes is what protocol 2 needs; it is allowed.
  path.write_bytes(bytearray_copies(4 * 2**20, 1))
  with pytest.raises(ValueError, match=r'NFNet/~/m0/w is a list, not an array'):
    pretrained.read_checkpoint(path)


@pytest.mark.parametrize('kind', ['fifo', 'directory', 'device'])
def test_non_regular_files_are_refused_in_one_line(tmp_path, kind):
  path = tmp_path / 'F0_haiku.npz'
  if kind == 'fifo':
    os.mkfifo(path)
  elif kind == 'directory':
    path.mkdir()
  else:
    path = Path('/dev/zero')
  # In a process of its own, as a user runs it: a reader that opens a FIFO would
  # block forever, so the process group is killed after 120 s.
  proc = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from nfnet_jax import pretrained; '
       'pretrained.load(sys.argv[1])', str(path)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _, stderr = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)
    proc.communicate()
    pytest.fail(f'pretrained.load({path}) still blocked after 120 s')
  assert proc.returncode == 1
  last = stderr.strip().splitlines()[-1]
  word = {'fifo': 'a FIFO', 'directory': 'a directory', 'device': 'a device'}[kind]
  assert last == (f'ValueError: {path}: is {word}, not a regular file; a checkpoint is '
                  'a file'), stderr
  with pytest.raises(ValueError, match='not a regular file'):
    pretrained.read_checkpoint(path)


_DEATHS = {
    'SIGSEGV': 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)',
    'SIGKILL': 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)',
    # A runaway parse: RLIMIT_CPU's signal.
    'SIGXCPU': 'import resource; resource.setrlimit(resource.RLIMIT_CPU, (1, 3))\n'
               'while True: pass',
}


@pytest.mark.parametrize('signal_name', sorted(_DEATHS))
def test_a_parser_crash_is_a_one_line_refusal(tmp_path, monkeypatch, signal_name):
  """Whatever kills the parser's process, the caller gets one line naming the file,
  and the temporary file it would have written leaves nothing behind."""
  from nfnet_jax import unpickle_child
  monkeypatch.setattr(unpickle_child, '_BOOT', _DEATHS[signal_name])
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(honest(1))
  with pytest.raises(UnsafePickleError) as info:
    pretrained.load(path)
  message = str(info.value)
  assert message.startswith(f'{path}: the pickle parser ')
  expected = {'SIGSEGV': 'crashed (SIGSEGV)', 'SIGKILL': 'was killed',
              'SIGXCPU': 'hit its CPU-time limit'}[signal_name]
  assert expected in message, message
  assert '\n' not in message
  assert not list(scratch.iterdir())
  monkeypatch.undo()
  got = pretrained.read_checkpoint(path)  # the same file with the real parser
  np.testing.assert_array_equal(got['NFNet/~/m0']['w'], np.zeros((2, 3), np.float32))


def test_the_parser_process_imports_neither_jax_nor_tensorflow():
  """The child starts with `python -I` and imports only what parsing needs."""
  from nfnet_jax import unpickle_child
  root = Path(unpickle_child.__file__).resolve().parents[1]
  probe = unpickle_child._BOOT.replace(
      'unpickle_child.child_main()',
      "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', "
      "'tensorflow', 'haiku', 'torch'}))")
  assert probe != unpickle_child._BOOT
  r = subprocess.run([sys.executable, '-I', '-c', probe, str(root)], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == '[]'


def test_a_parser_out_of_memory_is_a_one_line_refusal(tmp_path, monkeypatch):
  """The child's address space is capped (RLIMIT_AS); a parse that needs more than the
  cap (here made 1 MiB for an honest 4 MB array) is refused in one line."""
  from nfnet_jax import unpickle_child
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(shared_array(1))
  monkeypatch.setattr(unpickle_child, 'address_space_bound', lambda size, max_bytes: 2**20)
  with pytest.raises(CheckpointTooLargeError) as info:
    pretrained.read_checkpoint(path)
  message = str(info.value)
  assert message.startswith(f'{path}: ran out of memory while unpickling'), message
  assert '\n' not in message
  monkeypatch.undo()
  got = pretrained.read_checkpoint(path)['NFNet/~/m0']['w']  # control: the real cap
  np.testing.assert_array_equal(got, np.arange(500_000, dtype='<f8'))
