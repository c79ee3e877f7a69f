"""Reading safetensors files (Hugging Face Hub's `model.safetensors`) without torch.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON,
then the data section:

  {"<tensor name>": {"dtype": "F32", "shape": [64, 3, 3, 3], "data_offsets": [b, e]},
   ..., "__metadata__": {"<str>": "<str>"}}     (the metadata is optional)

where [b, e) is the tensor's bytes, little-endian, C order, relative to the data
section's start. `read_safetensors` checks the whole header before it allocates any
tensor: N within the file and under MAX_HEADER_BYTES, valid UTF-8 JSON, every dtype
known, shapes of non-negative integers, e - b == prod(shape) * itemsize, offsets
inside the data section, tensors neither overlapping nor leaving gaps, and every
tensor through the caller's `Budget` (the memory budget and, with a model, its dtype,
largest parameter and total). Only then is each tensor read into a buffer of exactly
its declared size, with plain reads at its offset: memory is bounded by what the
header declares and the budget allows, and BF16 needs only ml_dtypes (a jax
dependency), not the safetensors package.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from nfnet_jax.safe_pickle import Budget, CheckpointTooLargeError, format_bytes

__all__ = ['DTYPES', 'MAX_HEADER_BYTES', 'MAX_TENSORS', 'is_safetensors',
           'read_safetensors']

# safetensors dtype code -> numpy dtype (the stored bytes are little-endian).
DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_FLOAT_CODES = frozenset(('F64', 'F32', 'F16', 'BF16'))
_F32 = np.dtype('<f4')

# The header is read whole and parsed by `json`, whose Python objects take several
# times the text: this bounds both. An NF checkpoint's header is about 100 bytes per
# tensor (dm_nfnet_f6, the largest, has under 2,000 tensors: under 200 KB).
MAX_HEADER_BYTES = 8 * 2**20
MAX_TENSORS = 100_000
_KEYS = frozenset(('dtype', 'shape', 'data_offsets'))


def is_safetensors(head: bytes, file_size: int) -> bool:
  """Whether a file starting with `head` (at least 9 bytes) is laid out as safetensors.

  The JSON header starts with '{' at byte 8. A pickle (0x80, protocol byte) is only
  taken for safetensors if its first 8 bytes also give a header length that fits the
  file: no pickler writes that (they would have to be a length, mostly zero bytes).
  """
  if len(head) < 9 or head[8:9] != b'{':
    return False
  if head[:1] == b'\x80' and 2 <= head[1] <= 5:
    return struct.unpack('<Q', head[:8])[0] <= file_size - 8
  return True


def _pairs_without_duplicates(what: str):
  def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for k, v in pairs:
      if k in out:
        raise ValueError(f'{what}: the header names {k!r} twice')
      out[k] = v
    return out
  return hook


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(f: BinaryIO, file_size: int, path: str,
                  budget: Budget) -> tuple[int, list[tuple[str, str, tuple, int, int]]]:
  """(data section start, [(name, dtype code, shape, begin, end)] by offset). Reads
  the header only; every check that needs no tensor data is done here."""
  what = f'{path}: safetensors'
  f.seek(0)
  raw_len = f.read(8)
  if len(raw_len) != 8:
    raise ValueError(f'{what}: the file ends inside the 8-byte header length')
  n = struct.unpack('<Q', raw_len)[0]
  if n > file_size - 8:
    raise ValueError(f'{what}: the header length field declares {n:,} bytes, the file '
                     f'has {file_size - 8:,} after it (truncated, or not safetensors)')
  if n > MAX_HEADER_BYTES:
    raise CheckpointTooLargeError(
        f'{what}: a header of {format_bytes(n)}; at most {format_bytes(MAX_HEADER_BYTES)}'
        ' (an NF checkpoint\'s is under 1 MiB); refused before reading it')
  budget.charge(n, f'{what} header')
  text = f.read(n)
  if len(text) != n:
    raise ValueError(f'{what}: the file ends inside the {n:,}-byte header')
  try:
    header = json.loads(text.decode('utf-8'),
                        object_pairs_hook=_pairs_without_duplicates(what))
  except UnicodeDecodeError as e:
    raise ValueError(f'{what}: the header is not UTF-8 ({e.reason} at byte '
                     f'{8 + e.start})') from None
  except RecursionError:
    raise ValueError(f'{what}: the header nests too deeply to be a tensor table') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{what}: the header is not valid JSON ({e.msg} at byte '
                     f'{8 + e.pos})') from None
  del text
  budget.release(n)
  if not isinstance(header, dict):
    raise ValueError(f'{what}: the header is a JSON {type(header).__name__}, not an '
                     'object of tensors')
  meta = header.pop('__metadata__', {})
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise ValueError(f'{what}: __metadata__ is not an object of strings')
  if len(header) > MAX_TENSORS:
    raise CheckpointTooLargeError(f'{what}: the header declares {len(header):,} tensors; '
                                  f'at most {MAX_TENSORS:,}')
  data_start, data_len = 8 + n, file_size - 8 - n
  entries = []
  for name, spec in header.items():
    where = f'{what} tensor {name!r}'
    if not isinstance(spec, dict) or set(spec) != _KEYS:
      keys = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
      raise ValueError(f'{where}: expected the keys dtype, shape, data_offsets; got {keys}')
    code, shape, offsets = spec['dtype'], spec['shape'], spec['data_offsets']
    if code not in DTYPES:
      raise ValueError(f'{where}: unknown dtype {code!r} (known: {", ".join(DTYPES)})')
    if (not isinstance(shape, list) or len(shape) > 32
        or not all(_is_int(d) and d >= 0 for d in shape)):
      raise ValueError(f'{where}: shape {shape!r} is not a list of at most 32 '
                       'non-negative integers')
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)):
      raise ValueError(f'{where}: data_offsets {offsets!r} is not [begin, end] of '
                       'non-negative integers')
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[code].itemsize  # Python ints: no overflow
    if end - begin != nbytes:
      raise ValueError(f'{where}: shape {shape} {code} is {nbytes:,} bytes, its '
                       f'data_offsets [{begin:,}, {end:,}] span {end - begin:,}')
    if end > data_len:
      raise ValueError(f'{where}: its data [{begin:,}, {end:,}) lies outside the '
                       f'{data_len:,}-byte data section (a truncated file?)')
    entries.append((name, code, tuple(shape), begin, end))
  entries.sort(key=lambda e: (e[3], e[4]))
  pos = 0
  for name, _, _, begin, end in entries:
    if begin != pos:
      kind = 'overlaps the tensor before it' if begin < pos else 'leaves a gap before it'
      raise ValueError(f'{what} tensor {name!r}: its data [{begin:,}, {end:,}) {kind} '
                       f'(which ends at {pos:,}); tensors must tile the data section')
    pos = end
  if pos != data_len:
    raise ValueError(f'{what}: the tensors cover {pos:,} of the data section\'s '
                     f'{data_len:,} bytes')
  # The budget, in the order of the file: floating tensors are checked at the float32
  # size they are loaded as (a float32 model takes F16/BF16/F64), the others as stored
  # (so a model refuses an integer or boolean tensor). Each is charged as stored.
  for name, code, shape, begin, end in entries:
    where = f'{what} tensor {name!r}'
    budget.check_array(shape, _F32 if code in _FLOAT_CODES else DTYPES[code], where)
    budget.charge(end - begin, where)
  return data_start, entries


def _read_exactly(f: BinaryIO, offset: int, nbytes: int, what: str) -> np.ndarray:
  buf = np.empty(nbytes, np.uint8)
  f.seek(offset)
  view, pos = memoryview(buf), 0
  while pos < nbytes:
    got = f.readinto(view[pos:pos + (1 << 24)])
    if not got:
      raise ValueError(f'{what}: the file ends after {pos:,} of its {nbytes:,} bytes '
                       '(did it change while being read?)')
    pos += got
  return buf


def read_safetensors(f: BinaryIO, file_size: int, path: str,
                     budget: Budget) -> dict[str, np.ndarray]:
  """{tensor name: array} of the safetensors file open in `f`, in the file's order.

  Arrays have the stored shape and dtype (native byte order; BF16 as
  ml_dtypes.bfloat16), each in its own buffer. Raises ValueError for a malformed
  header or a file that ends early, and the budget's CheckpointTooLargeError /
  UnsafePickleError for sizes or dtypes it refuses, all before any tensor is allocated;
  each is one line starting with `path`.
  """
  data_start, entries = _parse_header(f, file_size, path, budget)
  out = {}
  for name, code, shape, begin, end in sorted(entries, key=lambda e: e[3]):
    buf = _read_exactly(f, data_start + begin, end - begin,
                        f'{path}: safetensors tensor {name!r}')
    dtype = DTYPES[code]
    if sys.byteorder == 'big' and dtype.itemsize > 1:  # the file is little-endian
      size = dtype.itemsize
      buf = buf.view(f'<u{size}').astype(f'=u{size}')
    out[name] = buf.view(dtype).reshape(shape)
  return out
