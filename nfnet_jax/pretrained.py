"""Pretrained weights: DeepMind's released NFNet checkpoints, `.npz` files, timm ports.

Three ways in, one params layout out (`{module_path: {leaf: float32 array}}`, exactly
the tree `nfnet_jax.models.create(name).init` gives, so `apply` takes it unchanged):

* `load(path)` reads DeepMind's released files (`F0_haiku.npz` ... `F6_haiku.npz` from
  `https://storage.googleapis.com/dm-nfnets/`), which despite the name are dill
  pickles, and real `.npz` files written by `save`. The format is detected from the
  file's first bytes, never from its extension. Pickles are read by a restricted
  unpickler (`SafeUnpickler`) that rebuilds numpy arrays and Haiku 2021's `FlatMapping`
  and refuses every other global, so a hostile file cannot run code. Memory is bounded
  too: every size a file declares (pickle length fields, array shapes, `.npy` headers,
  zip sizes) is checked before anything is allocated, against `MAX_CHECKPOINT_BYTES`
  and, when `load` is given the model, against that model's parameters; an array the
  file does not fill completely, or one referenced twice, is refused.
* `save(params, path)` writes a real `.npz` (flattened keys, see below), atomically.
* `from_timm(state_dict, variant)` converts a timm `dm_nfnet_f*` PyTorch state_dict.

Checkpoint key convention (`.npz`): one array per parameter, keyed
`<module path>/<leaf>`, e.g. `NFNet/~/stem_conv0/w` or `NFNet/stem_conv0/w`: the LAST
'/' splits the module path from the leaf name (module paths contain '/', leaf names
never do).

Module names. DeepMind's files name modules the way Haiku names modules built in a
parent's constructor: `NFNet/~/nf_block_3/~/conv1b`. Module paths are matched on their
"canonical" form, the path with every `~` component dropped (`NFNet/nf_block_3/conv1b`),
and renamed to whatever the model's own init produces, so a released file, a `save`d
file or a timm conversion all come out in the model's naming.

docs/pretrained.md describes the released files, the allowed globals and the budget.
"""
from __future__ import annotations

import collections
import errno
import functools
import io
import logging
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from typing import Any, Mapping, Optional, Union

import numpy as np

__all__ = [
    'load', 'save', 'read_checkpoint', 'from_timm', 'infer_model', 'model_shapes',
    'canonical_name', 'released_name', 'to_released_names', 'SafeUnpickler',
    'UnsafePickleError', 'CheckpointTooLargeError', 'MAX_CHECKPOINT_BYTES', 'safe_loads', 'ALLOWED_GLOBALS', 'TIMM_MODEL_OVERRIDES',
    'TIMM_STD_CONV_EPS', 'RELEASED_URL', 'RELEASED_VARIANTS',
]

log = logging.getLogger(__name__)

Params = dict[str, dict[str, np.ndarray]]

RELEASED_URL = 'https://storage.googleapis.com/dm-nfnets/{variant}_haiku.npz'
RELEASED_VARIANTS = ('F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6')

# timm's ScaledStdConv2dSame for the dm_nfnet_* models: NfCfg.std_conv_eps = 1e-5 (the
# dm cfg does not override it), applied as rsqrt(var + eps) inside F.batch_norm, then
# times gain * fan_in**-0.5 (gamma_in_act=True, so no activation gamma in the conv).
TIMM_STD_CONV_EPS = 1e-5
# Model options that make converted timm weights compute what timm computes:
# `nfnet_jax.models.create('F0', **TIMM_MODEL_OVERRIDES)`.
TIMM_MODEL_OVERRIDES = dict(activation='gelu_exact', ws_eps=TIMM_STD_CONV_EPS,
                            ws_eps_mode='add')

_PICKLE_MAGIC = b'\x80'
_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'


# ---------------------------------------------------------------------------
# Memory budget.
# ---------------------------------------------------------------------------
# Most bytes one load may hold at once for what it reads (see `_Budget`): the bound on
# what a hostile or damaged file can make a load allocate, whatever it declares. The
# largest released file, F6 (438M float32 parameters, 1.75 GB), counts about 1.8 GB
# against it (the file's bytes plus one array being copied out), leaving room for a
# float64 file of that size, and it is small enough for any machine that can use such
# a model.
MAX_CHECKPOINT_BYTES = 4 * 2**30
# Pickle opcodes in one file. Each builds at most one small object (a container, a
# name, a number), so this bounds the interpreter objects a pickle can create on top of
# the budget (<= ~100 MB); an F6 file in the released format has about 50,000.
MAX_PICKLE_OPCODES = 1_000_000
# An .npz whose arrays expand to more than this many times the archive's size on disk
# is refused as a zip bomb once they exceed _NPZ_EXPANSION_FLOOR: trained parameters
# barely compress (np.savez stores them uncompressed; savez_compressed saves a few %).
MAX_NPZ_EXPANSION = 20
_NPZ_EXPANSION_FLOOR = 64 * 2**20
_MAX_NPZ_MEMBERS = 100_000


class UnsafePickleError(pickle.UnpicklingError):
  """A checkpoint was refused before anything it asked for ran or was allocated: a
  global outside the allow-list, an array never filled from the file, one array
  referenced twice, an .npz member that is not a plain numeric array..."""


class CheckpointTooLargeError(UnsafePickleError):
  """A checkpoint declared more bytes than the budget or the requested model allows.

  Raised from the declared sizes (pickle length fields, array shapes, .npy headers,
  zip sizes), before the memory is allocated.
  """


def _fmt_bytes(n: int) -> str:
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'


def _check_param_dtype(dtype: Any, what: str) -> np.dtype:
  """A plain numeric dtype (bool, int, float, complex; no fields or subarrays)."""
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f'{what}: dtype {dtype!r} is not a numpy dtype')
  if dtype.hasobject:
    raise UnsafePickleError(f'{what}: object dtype {dtype!r} refused (object arrays can '
                            'carry arbitrary pickled objects; parameters are numeric)')
  if (dtype.kind not in 'biufc' or dtype.fields is not None or dtype.subdtype is not None
      or not 0 < dtype.itemsize <= 16):
    raise UnsafePickleError(f'{what}: dtype {dtype!r} refused; parameters have a plain '
                            'numeric dtype')
  return dtype


def _check_shape(shape: Any, what: str) -> tuple[int, ...]:
  if not isinstance(shape, (tuple, list)) or len(shape) > 32:
    raise UnsafePickleError(f'{what}: shape {shape!r} is not a tuple of at most 32 sizes')
  if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
             for d in shape):
    raise UnsafePickleError(f'{what}: shape {shape!r} has a size that is not a '
                            'non-negative integer')
  return tuple(int(d) for d in shape)


class _Budget:
  """What one load may allocate, checked from declared sizes before allocating.

  `held` counts the bytes the load holds at once: for a pickle the whole file (its
  byte strings stay in the unpickler's memo until it returns) plus every copy an
  allowed constructor makes (bytearray, latin-1 bytes, containers, each array's own
  buffer, released again when the file bytes it was copied from are freed); for an
  .npz the arrays its .npy headers declare. `held` never exceeds `max_bytes`. With a
  model, each array must also have the model's dtype, be no larger than its largest
  parameter, and all of them together no larger than its parameters.
  """

  def __init__(self, path: str, max_bytes: Optional[int] = None,
               model: Optional[str] = None, num_classes: Optional[int] = None):
    self.path = path
    self.max_bytes = int(MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes)
    self.held = 0
    self.array_bytes = 0
    self._data_ids: set[int] = set()
    self.model = model
    if model is not None:
      # The classifier's size is the file's until read: allow the model's at
      # max(1000, num_classes) classes (a file with more needs num_classes=its count).
      classes = max(1000, int(num_classes or 0))
      leaves = [(shape, np.dtype(dtype)) for _, ls in _model_shapes_cached(model, classes)
                for _, shape, dtype in ls]
      sizes = [math.prod(s) * d.itemsize for s, d in leaves]
      self.model_dtypes = {d for _, d in leaves}
      self.model_total, self.model_largest = sum(sizes), max(sizes)

  def charge(self, nbytes: int, what: str) -> None:
    if self.held + nbytes > self.max_bytes:
      raise CheckpointTooLargeError(
          f'{what} ({_fmt_bytes(nbytes)}) would take this load to '
          f'{_fmt_bytes(self.held + nbytes)}, over its {_fmt_bytes(self.max_bytes)} budget '
          '(pretrained.MAX_CHECKPOINT_BYTES; pass max_bytes= to allow more); refused '
          'before allocating')
    self.held += nbytes

  def release(self, nbytes: int) -> None:
    self.held -= nbytes

  def claim_data(self, data: Any, what: str) -> None:
    """Each byte string may fill one array (else one read could be copied many times)."""
    if id(data) in self._data_ids:
      raise UnsafePickleError(f'{what}: its data already filled another array (pickle '
                              'memo reuse); refused')
    self._data_ids.add(id(data))

  def check_array(self, shape: Any, dtype: Any, what: str) -> tuple[tuple[int, ...],
                                                                     np.dtype, int]:
    """Validates a declared array; returns (shape, dtype, nbytes). Allocates nothing."""
    dtype = _check_param_dtype(dtype, what)
    shape = _check_shape(shape, what)
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    desc = f'{what} of shape {shape} {dtype.name} ({_fmt_bytes(nbytes)})'
    if nbytes > self.max_bytes:
      raise CheckpointTooLargeError(f'{desc} exceeds the {_fmt_bytes(self.max_bytes)} '
                                    'budget; refused before allocating')
    if self.model is not None:
      if dtype.newbyteorder('=') not in self.model_dtypes:
        raise UnsafePickleError(
            f'{desc}: model {self.model!r} has {"/".join(sorted(d.name for d in self.model_dtypes))} '
            'parameters; refused before reading the data')
      if nbytes > self.model_largest:
        raise CheckpointTooLargeError(
            f'{desc} is larger than any parameter of model {self.model!r} (largest '
            f'{_fmt_bytes(self.model_largest)}); refused before allocating')
      if self.array_bytes + nbytes > self.model_total:
        raise CheckpointTooLargeError(
            f'{desc}: the arrays so far total more than model {self.model!r}\'s '
            f'parameters ({_fmt_bytes(self.model_total)}); a file for a larger model? '
            '(model=None infers it); refused before allocating')
    self.array_bytes += nbytes
    return shape, dtype, nbytes


# ---------------------------------------------------------------------------
# Restricted unpickling.
# ---------------------------------------------------------------------------
_OPCODES = {op.code.encode('latin1'): op for op in pickletools.opcodes}
_COUNT_FIELDS = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
                 pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                 pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
                 pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


def _scan_pickle(f, size: int) -> None:
  """Walks the opcodes of the pickle in `f` without building anything.

  Every length field must fit in the rest of the file (the unpickler allocates a
  declared length before reading it), memo indices (the unpickler sizes its memo
  table by the largest index) and the opcode count stay under MAX_PICKLE_OPCODES, and
  out-of-band buffers are refused. Data is skipped with seek, not read.
  """
  f.seek(0)
  count = 0
  while True:
    pos = f.tell()
    code = f.read(1)
    if not code:
      raise pickle.UnpicklingError(f'the file ends at byte {pos} before the pickle\'s '
                                   'STOP opcode (truncated?)')
    op = _OPCODES.get(code)
    if op is None:
      raise pickle.UnpicklingError(f'unknown opcode {code!r} at byte {pos}')
    count += 1
    if count > MAX_PICKLE_OPCODES:
      raise CheckpointTooLargeError(f'more than {MAX_PICKLE_OPCODES:,} pickle opcodes; '
                                    'refused before building them')
    if op.name in ('NEXT_BUFFER', 'READONLY_BUFFER', 'PERSID', 'BINPERSID'):
      raise UnsafePickleError(f'{op.name} at byte {pos}: out-of-band buffers and '
                              'persistent ids are refused')
    arg = op.arg
    index = None
    if arg is None:
      pass
    elif arg.n >= 0:
      raw = f.read(arg.n)
      if len(raw) < arg.n:
        raise pickle.UnpicklingError(f'{op.name} at byte {pos}: file ends inside its '
                                     'argument (truncated?)')
      if op.name in ('BINPUT', 'LONG_BINPUT'):
        index = int.from_bytes(raw, 'little')
      elif op.name == 'FRAME' and int.from_bytes(raw, 'little') > size - f.tell():
        raise pickle.UnpicklingError(
            f'FRAME at byte {pos} declares {int.from_bytes(raw, "little"):,} bytes, the '
            f'file has {size - f.tell():,} left (truncated or forged)')
    elif arg.n == pickletools.UP_TO_NEWLINE:
      for _ in range(2 if op.name in ('GLOBAL', 'INST') else 1):
        line = _skip_line(f, op.name, pos)
      if op.name == 'PUT':
        try:
          index = int(line)
        except ValueError:
          raise pickle.UnpicklingError(f'PUT at byte {pos}: bad memo index') from None
    else:
      width, signed = _COUNT_FIELDS[arg.n]
      raw = f.read(width)
      if len(raw) < width:
        raise pickle.UnpicklingError(f'{op.name} at byte {pos}: file ends inside its '
                                     'length field (truncated?)')
      n = int.from_bytes(raw, 'little', signed=signed)
      left = size - f.tell()
      if n < 0 or n > left:
        raise pickle.UnpicklingError(
            f'{op.name} at byte {pos} declares {n:,} bytes of data, the file has '
            f'{left:,} left (truncated or forged)')
      f.seek(n, io.SEEK_CUR)
    if index is not None and not 0 <= index < MAX_PICKLE_OPCODES:
      raise CheckpointTooLargeError(f'{op.name} at byte {pos}: memo index {index:,} '
                                    f'(the unpickler would size its memo table by it); '
                                    f'at most {MAX_PICKLE_OPCODES:,}')
    if op.name == 'STOP':
      return


def _skip_line(f, name: str, pos: int) -> bytes:
  """Reads past the next newline in bounded pieces; returns the line's first piece."""
  first = None
  while True:
    piece = f.readline(1 << 16)
    if first is None:
      first = piece
    if not piece:
      raise pickle.UnpicklingError(f'{name} at byte {pos}: file ends inside its text '
                                   'argument (truncated?)')
    if piece.endswith(b'\n'):
      return first


def _numpy_reconstruct():
  try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 (and 1.26's alias)
  except ImportError:  # pragma: no cover - numpy 1.x without numpy._core
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


class _PendingArray:
  """An ndarray the pickle declared; it exists only once its own data fills it.

  `_reconstruct` (and `_frombuffer`) give one of these instead of allocating. BUILD
  hands it numpy's array state `(version, shape, dtype, is_fortran, data)`: the shape
  and dtype are checked against the budget and the data must be a byte string of
  exactly the declared size that no other array used. `materialise` copies it into an
  array of its own after unpickling; one never filled is refused there.
  """
  __slots__ = ('_budget', '_what', 'shape', 'dtype', 'fortran', 'data', 'filled')

  def __init__(self, budget: '_Budget', what: str):
    self._budget, self._what = budget, what
    self.filled = False

  def __setstate__(self, state):
    if self.filled:
      raise UnsafePickleError(f'{self._what}: array state given twice')
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise UnsafePickleError(f'{self._what}: array state is not numpy\'s '
                              '(version, shape, dtype, is_fortran, data)')
    if len(state) == 5:
      if state[0] != 1:
        raise UnsafePickleError(f'{self._what}: array state version {state[0]!r}')
      state = state[1:]
    shape, dtype, fortran, data = state
    self.fill(shape, dtype, bool(fortran), data)

  def fill(self, shape, dtype, fortran: bool, data) -> None:
    what = self._what
    shape, dtype, nbytes = self._budget.check_array(shape, dtype, what)
    if isinstance(data, str):  # written by Python 2: bytes as latin-1 text
      self._budget.charge(len(data), f'{what}\'s latin-1 data')
      data = data.encode('latin1')
    if isinstance(data, (bytes, bytearray)):
      size = len(data)
    else:
      raise UnsafePickleError(f'{what}: array data of type {type(data).__name__} refused; '
                              'expected the raw bytes')
    if size != nbytes:
      raise UnsafePickleError(f'{what}: shape {shape} {dtype.name} needs {nbytes:,} bytes, '
                              f'its data has {size:,}; refused (an array is never '
                              'returned with bytes the file did not give)')
    self._budget.claim_data(data, what)
    self.shape, self.dtype, self.fortran, self.data = shape, dtype, fortran, data
    self.filled = True

  def materialise(self) -> np.ndarray:
    """The array, in native byte order and its own memory; frees the file's bytes."""
    if not self.filled:
      raise UnsafePickleError(f'{self._what}: declared but never given its data '
                              '(it would be uninitialised memory); refused')
    nbytes = math.prod(self.shape) * self.dtype.itemsize
    self._budget.charge(nbytes, f'a copy of {self._what}')
    flat = np.frombuffer(self.data, dtype=self.dtype, count=math.prod(self.shape))
    array = np.array(flat.reshape(self.shape, order='F' if self.fortran else 'C'),
                     dtype=self.dtype.newbyteorder('='), order='C')
    del flat
    # The file's bytes are freed now unless something else still refers to them.
    unshared = sys.getrefcount(self.data) <= 2  # this slot + getrefcount's argument
    self.data = None
    if unshared:
      self._budget.release(nbytes)
    return array


class _Allowed:
  """An allowed global: calls `fn`; refuses BUILD, so a pickle cannot set attributes
  on it (a plain function would let BUILD's slot state rebind `__defaults__`)."""
  __slots__ = ('name', 'fn')

  def __init__(self, name: str, fn):
    self.name, self.fn = name, fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __setstate__(self, state):
    raise UnsafePickleError(f'BUILD on the global {self.name} refused')

  def __repr__(self):
    return f'<allowed {self.name}>'


class _NdarrayMarker:
  """`numpy.ndarray` as a pickle may name it: only as `_reconstruct`'s first argument.

  Calling it (REDUCE or NEWOBJ) would allocate an array the file never fills.
  """

  def __new__(cls, *args, **kwargs):
    raise UnsafePickleError('numpy.ndarray(...) called directly refused: it would '
                            'allocate an array without data from the file')

  @staticmethod
  def __setstate__(state):
    raise UnsafePickleError('BUILD on numpy.ndarray refused')


class _FlatMappingAsDict:
  """Stands in for `haiku._src.data_structures.FlatMapping`: builds a plain dict.

  Haiku's FlatMapping (2020-2021, and its `FlatMap` successor, which still pickles
  under the old name "for backwards compatibility with old pickles") reduces to
  `(FlatMapping, (self._to_mapping(),))`, i.e. the class applied to one plain dict
  (nested FlatMappings inside are pickled the same way, each becoming a dict here).
  Accepted argument forms: one mapping, or one sequence of (key, value) pairs. Works
  both as a REDUCE callable and for NEWOBJ (`cls.__new__(cls, *args)`). A pickled
  pytree-structure form would need jaxlib's PyTreeDef global, which is refused.
  """
  _budget: Optional[_Budget] = None

  def __new__(cls, *args, **kwargs):
    if kwargs or len(args) != 1:
      raise pickle.UnpicklingError(
          f'haiku FlatMapping with {len(args)} positional and {len(kwargs)} keyword '
          'arguments; expected exactly one mapping')
    data = args[0]
    ok = isinstance(data, Mapping) or (isinstance(data, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in data))
    if not ok:
      raise pickle.UnpicklingError(
          f'haiku FlatMapping argument of type {type(data).__name__} not understood; '
          'expected a mapping or (key, value) pairs')
    if cls._budget is not None:
      cls._budget.charge(_container_bytes(data), 'a FlatMapping copy')
    return dict(data)

  @staticmethod
  def __setstate__(state):
    raise UnsafePickleError('BUILD on haiku FlatMapping refused')


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _container_bytes(data) -> int:
  return 64 + 72 * len(data)  # an upper bound of CPython's per-entry cost, dicts included


def _allowed_globals(budget: Optional[_Budget] = None) -> dict[tuple[str, str], Any]:
  """(module, name) -> what the pickle gets; with `budget`, every copy is charged."""
  budget = budget or _Budget('<pickle>')

  def reconstruct(subtype, shape, dtype_code):
    """`numpy.core.multiarray._reconstruct`: allocates nothing (`_PendingArray`)."""
    if subtype is not _NdarrayMarker and subtype is not np.ndarray:
      raise UnsafePickleError(f'_reconstruct of {subtype!r} refused; only numpy.ndarray')
    shape = _check_shape(shape, '_reconstruct')
    if math.prod(shape) > budget.max_bytes:  # numpy's own pickles say (0,)
      raise CheckpointTooLargeError(
          f'_reconstruct of shape {shape} exceeds the {_fmt_bytes(budget.max_bytes)} '
          'budget; refused before allocating')
    return _PendingArray(budget, 'an array')

  def frombuffer(buf, dtype, shape, order='C'):
    """`numpy.core.numeric._frombuffer` (numpy's protocol-5 array reduction)."""
    pending = _PendingArray(budget, 'an array')
    pending.fill(shape, dtype, order == 'F', buf)
    return pending

  def dtype(obj, align=False, copy=True):
    """`numpy.dtype(code, align, copy)`, always a fresh copy (BUILD then sets it)."""
    if not isinstance(obj, str) or len(obj) > 16:
      raise UnsafePickleError(f'numpy.dtype({obj!r}) refused; only a type code string')
    return _check_param_dtype(np.dtype(obj, align=bool(align), copy=True), 'numpy.dtype')

  def scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar(dtype, bytes)`: how np.float32(...) etc. pickle."""
    _check_param_dtype(dtype, 'numpy scalar')
    if isinstance(data, str):  # written by Python 2 / protocol < 3
      data = data.encode('latin1') if len(data) == dtype.itemsize else None
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
      raise UnsafePickleError(f'numpy {dtype.name} scalar payload must be '
                              f'{dtype.itemsize} bytes')
    return np.frombuffer(data, dtype=dtype, count=1)[0].copy()

  def create_array(f, args, state, npdict=None):
    """`dill._dill._create_array`: dill's wrapper around an ndarray's own reduction."""
    if not (isinstance(f, _Allowed) and f.fn is reconstruct):
      raise UnsafePickleError('dill _create_array with a constructor other than '
                              'numpy _reconstruct refused')
    if npdict:
      raise UnsafePickleError('dill _create_array with instance attributes refused')
    array = f(*args)
    array.__setstate__(state)
    return array

  def codecs_encode(text, encoding='utf-8', errors='strict'):
    """`_codecs.encode(str, 'latin1')`: how protocol 2 stores `bytes` (numpy's data)."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'latin_1',
                                                      'iso-8859-1'):
      raise UnsafePickleError(f'_codecs.encode({type(text).__name__}, {encoding!r}) '
                              'refused; only latin1 text -> bytes')
    budget.charge(len(text), 'latin-1 bytes')
    return text.encode('latin1', errors)

  def byte_array(*args):
    """`bytearray(bytes)` or `bytearray(str, 'latin-1')`: a copy of data from the file."""
    if not args:
      return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
      budget.charge(len(args[0]), 'a bytearray copy')
      return bytearray(args[0])
    if (len(args) == 2 and isinstance(args[0], str)
        and args[1] in ('latin1', 'latin-1', 'latin_1', 'iso-8859-1')):
      budget.charge(len(args[0]), 'a bytearray copy')
      return bytearray(args[0], 'latin1')
    shown = ', '.join(repr(a) if isinstance(a, (int, str)) and len(repr(a)) < 40
                      else type(a).__name__ for a in args)
    raise UnsafePickleError(f'bytearray({shown}) refused: only a copy of bytes read from '
                            'the file (bytearray(n) allocates n bytes the file never gave)')

  def container(kind):
    def make(*args):
      if not args:
        return kind()
      if len(args) == 1 and isinstance(args[0], _CONTAINERS):
        budget.charge(_container_bytes(args[0]), f'a {kind.__name__} copy')
        return kind(args[0])
      raise UnsafePickleError(f'{kind.__name__}({", ".join(type(a).__name__ for a in args)}) '
                              'refused: only a copy of a list/tuple/dict/set')
    return make

  flat_mapping = type('FlatMapping', (_FlatMappingAsDict,), {'_budget': budget})
  allowed = {
      # numpy arrays / dtypes / scalars, numpy-1 and numpy-2 module names.
      ('numpy.core.multiarray', '_reconstruct'): reconstruct,
      ('numpy._core.multiarray', '_reconstruct'): reconstruct,
      ('numpy.core.multiarray', 'scalar'): scalar,
      ('numpy._core.multiarray', 'scalar'): scalar,
      ('numpy.core.numeric', '_frombuffer'): frombuffer,
      ('numpy._core.numeric', '_frombuffer'): frombuffer,
      ('numpy', 'dtype'): dtype,
      # dill (the released files are dill pickles) may wrap each array's reduction.
      ('dill._dill', '_create_array'): create_array,
      # Plain containers; protocol 2 spells `bytes` as _codecs.encode(str, 'latin1').
      ('collections', 'OrderedDict'): container(collections.OrderedDict),
      ('_codecs', 'encode'): codecs_encode,
  }
  for name, obj in (('dict', dict), ('list', list), ('tuple', tuple), ('set', set),
                    ('frozenset', frozenset)):
    allowed[('builtins', name)] = container(obj)
    allowed[('__builtin__', name)] = allowed[('builtins', name)]  # Python-2 spelling
  allowed[('builtins', 'bytearray')] = allowed[('__builtin__', 'bytearray')] = byte_array
  out = {key: _Allowed(f'{key[0]}.{key[1]}', fn) for key, fn in allowed.items()}
  # Classes, as NEWOBJ needs a class: Haiku 2021's immutable params mapping, and
  # numpy.ndarray, which may only be named (as _reconstruct's argument).
  out[('haiku._src.data_structures', 'FlatMapping')] = flat_mapping
  out[('numpy', 'ndarray')] = _NdarrayMarker
  return out


ALLOWED_GLOBALS = tuple(sorted(f'{m}.{n}' for m, n in _allowed_globals()))


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals in `ALLOWED_GLOBALS`, within a budget.

  Each allowed global maps to a harmless equivalent defined here (arrays declared by
  numpy's reductions, dtypes and scalars of plain numeric dtype, Haiku's FlatMapping
  as a plain dict, copies of plain containers and byte strings); any other global
  raises `UnsafePickleError` naming `module.name` before anything is called.
  Persistent ids and out-of-band buffers are refused too. Arrays come out as
  `_PendingArray`s: `load()` returns them materialised (see `safe_loads`), after the
  checks of `_finalise`. Every copy the allowed constructors make is charged to
  `budget` before it is made.
  """

  def __init__(self, file, budget: Optional[_Budget] = None):
    super().__init__(file)
    self.budget = budget or _Budget('<pickle>')
    self._globals = _allowed_globals(self.budget)

  def find_class(self, module: str, name: str):
    try:
      return self._globals[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'refusing to load global {module}.{name}: not an array, dtype, '
          'FlatMapping or plain container (nothing was executed)') from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f'refusing persistent id {pid!r}')

  def load(self):
    """The unpickled object, with every array materialised and checked."""
    obj = super().load()
    self.memo.clear()  # frees the file's byte strings as arrays are copied out
    return _finalise(obj)


def _finalise(obj: Any, _seen: Optional[set] = None, _depth: int = 0) -> Any:
  """Replaces every `_PendingArray` in dicts/lists/tuples by its array.

  Refuses an array reached twice (a memo reference would return one buffer under
  several names, and each conversion would copy it again) and one never filled.
  """
  seen = set() if _seen is None else _seen
  if _depth > 32:
    raise UnsafePickleError('containers nested more than 32 deep (or a cycle) refused')
  if isinstance(obj, _PendingArray):
    if id(obj) in seen:
      raise UnsafePickleError('one array is referenced more than once (pickle memo '
                              'reuse); each parameter must have its own data')
    seen.add(id(obj))
    return obj.materialise()
  if isinstance(obj, dict):
    for key in list(obj):
      obj[key] = _finalise(obj[key], seen, _depth + 1)
    return obj
  if isinstance(obj, list):
    for i, item in enumerate(obj):
      obj[i] = _finalise(item, seen, _depth + 1)
    return obj
  if type(obj) is tuple:
    return tuple(_finalise(item, seen, _depth + 1) for item in obj)
  if isinstance(obj, (set, frozenset)) and any(isinstance(x, _PendingArray) for x in obj):
    raise UnsafePickleError('an array inside a set refused')
  return obj


def safe_loads(data: Union[bytes, bytearray, memoryview],
               max_bytes: Optional[int] = None) -> Any:
  """Unpickles `data` with `SafeUnpickler` (same checks and budget as `load`)."""
  with io.BytesIO(data) as f:
    size = f.seek(0, io.SEEK_END)
    _scan_pickle(f, size)
    f.seek(0)
    budget = _Budget('<pickle>', max_bytes)
    budget.charge(size, 'the pickle')
    return SafeUnpickler(f, budget).load()


# ---------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------
def _download_hint(path: str) -> str:
  m = re.search(r'(F[0-6])_haiku\.npz$', os.path.basename(path))
  variants = [m.group(1)] if m else list(RELEASED_VARIANTS)
  urls = ' '.join(RELEASED_URL.format(variant=v) for v in variants[:1])
  return (f'Download DeepMind\'s released weights ({", ".join(RELEASED_VARIANTS)}), e.g. '
          f'`wget {urls}` (the other variants: replace the F-number).')


def _describe_head(path: str, head: bytes) -> str:
  text = (f'{path}: unrecognised checkpoint format; first bytes {head[:16]!r}. '
          'Expected a pickle (first byte 0x80, protocol 2-5: DeepMind\'s released '
          '*_haiku.npz files) or a zip .npz archive (b"PK\\x03\\x04").')
  lowered = head.lstrip().lower()
  if lowered.startswith((b'<!doctype', b'<html', b'<?xml')):
    text += ' It looks like an HTML/XML page: a failed or redirected download? '
    text += _download_hint(path)
  elif head.startswith(b'\x1f\x8b'):
    text += ' It is gzip-compressed: decompress it first.'
  elif head.startswith(b'\x93NUMPY'):
    text += ' It is a single .npy array, not a parameter archive.'
  elif head[:1] in (b'(', b']', b'}'):
    text += ' It may be a protocol-0/1 pickle, which is not supported.'
  return text


def _split_key(key: str, path: str) -> tuple[str, str]:
  module, sep, leaf = key.rpartition('/')
  if not sep or not module or not leaf:
    raise ValueError(f'{path}: key {key!r} is not "<module path>/<leaf>" (the last "/" '
                     'separates the module path from the parameter name)')
  return module, leaf


def _npz_member_count(f) -> Optional[int]:
  """Entries the zip's end record declares, read before zipfile parses the directory."""
  end_record = getattr(zipfile, '_EndRecData', None)  # stable since Python 2; private
  if end_record is None:  # pragma: no cover
    return None
  try:
    rec = end_record(f)
  except (OSError, ValueError, struct.error):
    return None
  return None if rec is None else int(rec[zipfile._ECD_ENTRIES_TOTAL])


def _read_npy_header(member, what: str) -> tuple[tuple, bool, np.dtype, int]:
  """(shape, fortran_order, dtype, header length) of one .npy stream, data unread."""
  fmt = np.lib.format
  try:
    version = fmt.read_magic(member)
    if version == (1, 0):
      shape, fortran, dtype = fmt.read_array_header_1_0(member)
    elif version == (2, 0):
      shape, fortran, dtype = fmt.read_array_header_2_0(member)
    else:
      raise ValueError(f'.npy format version {version} (1.0 and 2.0 are read)')
  except ValueError as e:
    raise ValueError(f'{what}: not a readable .npy header: {e}') from None
  return shape, bool(fortran), dtype, member.tell()


def _read_npz(path: str, budget: _Budget) -> Params:
  """Reads an .npz: every member's .npy header first (sizes checked, nothing
  allocated), then the arrays, each filled completely from its member or refused."""
  file_size = os.path.getsize(path)
  with open(path, 'rb') as f:
    entries = _npz_member_count(f)
    if entries is not None and entries > _MAX_NPZ_MEMBERS:
      raise CheckpointTooLargeError(f'{path}: the zip declares {entries:,} members; at '
                                    f'most {_MAX_NPZ_MEMBERS:,}')
    try:
      zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
      raise ValueError(f'{path}: not a readable .npz (zip) archive: {e}') from None
    with zf:
      plan = []
      keys = set()
      for info in zf.infolist():
        name = info.filename
        what = f'{path}: member {name!r}'
        if not name.endswith('.npy') or info.is_dir():
          raise ValueError(f'{what} is not a .npy array')
        if info.flag_bits & 0x1:
          raise ValueError(f'{what} is encrypted')
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
          raise ValueError(f'{what}: compression method {info.compress_type} (np.savez '
                           'stores, np.savez_compressed deflates)')
        key = name[:-len('.npy')]
        if key in keys:
          raise ValueError(f'{what} appears twice in the archive')
        keys.add(key)
        module, leaf = _split_key(key, path)
        with zf.open(info) as member:
          shape, fortran, dtype, header = _read_npy_header(member, what)
        shape, dtype, nbytes = budget.check_array(shape, dtype, what)
        if header + nbytes != info.file_size:
          raise ValueError(f'{what}: its header declares {shape} {dtype.name} '
                           f'({header + nbytes:,} bytes with the header), the zip entry '
                           f'holds {info.file_size:,}')
        budget.charge(nbytes, what)
        plan.append((info, module, leaf, shape, fortran, dtype, header, nbytes))
      declared = sum(p[-1] for p in plan)
      if declared > _NPZ_EXPANSION_FLOOR and declared > MAX_NPZ_EXPANSION * file_size:
        raise CheckpointTooLargeError(
            f'{path}: its arrays expand to {_fmt_bytes(declared)}, '
            f'{declared / max(file_size, 1):.0f}x the {_fmt_bytes(file_size)} file (at '
            f'most {MAX_NPZ_EXPANSION}x: parameters barely compress); a zip bomb?')
      params: Params = {}
      for info, module, leaf, shape, fortran, dtype, header, nbytes in plan:
        params.setdefault(module, {})[leaf] = _read_npz_member(
            zf, info, f'{path}: member {info.filename!r}', shape, fortran, dtype, header,
            nbytes)
  return params


def _read_npz_member(zf, info, what, shape, fortran, dtype, header, nbytes) -> np.ndarray:
  buf = np.empty(nbytes, np.uint8)
  try:
    with zf.open(info) as member:
      member.read(header)
      pos = 0
      while pos < nbytes:
        chunk = member.read(min(nbytes - pos, 1 << 22))
        if not chunk:
          raise ValueError(f'{what}: data ends after {pos:,} of {nbytes:,} bytes')
        buf[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
      member.read(1)  # at the end: makes zipfile check the CRC
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise ValueError(f'{what}: damaged: {e}') from None
  array = buf.view(dtype).reshape(shape, order='F' if fortran else 'C')
  native = dtype.newbyteorder('=')
  return array.astype(native, order='C', copy=False)  # a copy only if F-order/swapped


def _as_two_level(obj: Any, path: str) -> Params:
  """Normalises an unpickled object into {module: {leaf: ndarray}}."""
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: unpickled a {type(obj).__name__}, expected a mapping of '
                     'Haiku module paths to parameter mappings')
  params: Params = {}
  for module, value in obj.items():
    if not isinstance(module, str):
      raise ValueError(f'{path}: non-string key {module!r}')
    if isinstance(value, Mapping):
      for leaf, array in value.items():
        params.setdefault(module, {})[str(leaf)] = array
    else:  # a flat {'module/leaf': array} mapping
      mod, leaf = _split_key(module, path)
      params.setdefault(mod, {})[leaf] = value
  for module, leaves in params.items():
    for leaf, array in leaves.items():
      if isinstance(array, np.generic):
        leaves[leaf] = array = np.asarray(array)
      if not isinstance(array, np.ndarray):
        raise ValueError(f'{path}: {module}/{leaf} is a {type(array).__name__}, not an array')
  return params


def _read_pickle(path: str, f, size: int, budget: _Budget) -> Params:
  try:
    _scan_pickle(f, size)
    f.seek(0)
    budget.charge(size, 'the file')
    unpickler = SafeUnpickler(f, budget)
    obj = unpickler.load()
    del unpickler
  except UnsafePickleError as e:
    raise type(e)(f'{path}: {e}') from None
  except MemoryError:
    raise CheckpointTooLargeError(f'{path}: ran out of memory while unpickling') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
          AttributeError, IndexError, RecursionError) as e:
    raise pickle.UnpicklingError(f'{path}: corrupt or unsupported pickle: '
                                 f'{type(e).__name__}: {e}') from e
  return _as_two_level(obj, path)


def read_checkpoint(path: Union[str, os.PathLike], *, model: Optional[str] = None,
                    num_classes: Optional[int] = None,
                    max_bytes: Optional[int] = None) -> Params:
  """Reads a checkpoint as stored: {module path: {leaf: ndarray}}, names untouched.

  The format is detected from the first bytes: 0x80 -> pickle (read with
  `SafeUnpickler`), `PK\\x03\\x04` -> `.npz` (headers first, no pickled members).

  Memory is bounded before it is allocated: every declared size (pickle lengths,
  array shapes, .npy headers) is checked against `max_bytes` (default
  `MAX_CHECKPOINT_BYTES`) and, with `model`, against that model's parameters (dtype,
  largest parameter, total; the classifier at max(1000, `num_classes`) classes).
  Names and exact shapes are checked afterwards by `load`.

  Raises FileNotFoundError (with a download hint) for a missing file, ValueError for
  any other format or a damaged .npz, `UnsafePickleError` for a pickle with a
  disallowed global or arrays the file does not fill, `CheckpointTooLargeError` (a
  subclass) for declared sizes over the budget; each names the file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, f'No such checkpoint: {path!r}. '
                            + _download_hint(path), path)
  budget = _Budget(path, max_bytes, model, num_classes)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(16)
    if head.startswith(_PICKLE_MAGIC):
      if len(head) < 2 or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(_describe_head(path, head))
      return _read_pickle(path, f, size, budget)
  if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
    try:
      return _read_npz(path, budget)
    except UnsafePickleError as e:
      if str(e).startswith(path):
        raise
      raise type(e)(f'{path}: {e}') from None
  raise ValueError(_describe_head(path, head))


# ---------------------------------------------------------------------------
# Names and model shapes.
# ---------------------------------------------------------------------------
def canonical_name(module_path: str) -> str:
  """`NFNet/~/nf_block/~/conv0` -> `NFNet/nf_block/conv0` (drops `~` components)."""
  return '/'.join(p for p in module_path.split('/') if p != '~')


def released_name(module_path: str) -> str:
  """`NFNet/nf_block/conv0` -> `NFNet/~/nf_block/~/conv0`: DeepMind's checkpoint name.

  In DeepMind's NFNet every submodule is built in its parent's constructor, which
  Haiku marks with `~`, so every separator of the released names is `/~/`.
  """
  return '/~/'.join(canonical_name(module_path).split('/'))


def to_released_names(params: Mapping[str, Mapping[str, Any]]) -> dict:
  """Renames the modules of a params tree to DeepMind's released naming."""
  return {released_name(m): dict(leaves) for m, leaves in params.items()}


@functools.lru_cache(maxsize=32)
def _model_shapes_cached(model: str, num_classes: int) -> tuple:
  import jax
  import jax.numpy as jnp

  from nfnet_jax import models

  net = models.create(model, num_classes=num_classes)
  shapes = jax.eval_shape(lambda rng, x: net.init(rng, x, is_training=False),
                          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  return tuple((m, tuple((leaf, tuple(s.shape), np.dtype(s.dtype).name)
                         for leaf, s in leaves.items()))
               for m, leaves in shapes.items())


def model_shapes(model: str, num_classes: int = 1000) -> dict[str, dict[str, tuple]]:
  """{module: {leaf: shape}} of a registered model's init (via jax.eval_shape, cached)."""
  return {m: {leaf: shape for leaf, shape, _ in leaves}
          for m, leaves in _model_shapes_cached(model, int(num_classes))}


_BLOCK_RE = re.compile(r'^nf_block(?:_(\d+))?$')


def infer_model(params: Mapping[str, Any]) -> Optional[str]:
  """The NFNet variant ('F0'..'F7', 'F0+'..) a params tree belongs to, or None.

  Read from the structure alone: the number of blocks, the stage boundaries (the
  blocks that carry `conv_shortcut`) and the stem width.
  """
  from nfnet_jax.models import nfnet

  canon = {canonical_name(m): m for m in params}
  blocks = {}
  for c in canon:
    parts = c.split('/')
    if len(parts) >= 2 and parts[0] == 'NFNet':
      m = _BLOCK_RE.match(parts[1])
      if m:
        blocks.setdefault(int(m.group(1) or 0), set()).add('/'.join(parts[2:]))
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    return None
  starts = [i for i in sorted(blocks) if 'conv_shortcut' in blocks[i]]
  if not starts or starts[0] != 0:
    return None
  depths = [b - a for a, b in zip(starts, starts[1:] + [len(blocks)])]
  stem = canon.get('NFNet/stem_conv3')
  width0 = None
  if stem is not None and 'w' in params[stem]:
    width0 = 2 * int(np.shape(params[stem]['w'])[-1])
  for name, facts in nfnet.VARIANTS.items():
    if list(facts['depth']) == depths and (width0 is None or facts['width'][0] == width0):
      return name
  return None


def _classifier_module(shapes: Mapping[str, Any]) -> Optional[str]:
  """The top-level `linear` module (the classifier) of a params/shape tree."""
  for m in shapes:
    parts = canonical_name(m).split('/')
    if len(parts) == 2 and parts[1] == 'linear':
      return m
  return None


def _fmt_list(items: list[str], limit: int = 5) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit else '')


def _match_to_model(params: Params, expected: dict[str, dict[str, tuple]], source: str,
                    model: str, skip_classifier: bool = False) -> Params:
  """Renames `params` to the model's module names and checks names and shapes.

  Raises ValueError naming the first missing / unexpected / shape-differing keys.
  """
  by_canon = {canonical_name(m): m for m in expected}
  classifier = _classifier_module(expected)
  out: Params = {}
  missing, unexpected, mismatched = [], [], []
  seen = set()
  for module, leaves in params.items():
    target = by_canon.get(canonical_name(module))
    if target is None:
      unexpected.extend(f'{module}/{leaf}' for leaf in leaves)
      continue
    seen.add(target)
    for leaf, array in leaves.items():
      want = expected[target].get(leaf)
      if want is None:
        unexpected.append(f'{module}/{leaf}')
      elif tuple(array.shape) != want and not (skip_classifier and target == classifier):
        mismatched.append(f'{module}/{leaf} {tuple(array.shape)} (model: {want})')
      else:
        out.setdefault(target, {})[leaf] = array
    for leaf in expected[target]:
      if leaf not in leaves:
        missing.append(f'{target}/{leaf}')
  for target, leaves in expected.items():
    if target not in seen and not (skip_classifier and target == classifier):
      missing.extend(f'{target}/{leaf}' for leaf in leaves)
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing: {_fmt_list(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected: {_fmt_list(unexpected)}')
    if mismatched:
      parts.append(f'{len(mismatched)} with other shapes: {_fmt_list(mismatched)}')
    raise ValueError(f'{source} does not match model {model!r}: ' + '; '.join(parts))
  # Keep the model's module order.
  return {m: out[m] for m in expected if m in out}


def _to_float32(params: Params, source: str) -> Params:
  """float32 C-contiguous copies (none for arrays that already are), in place: each
  replaced array is freed as soon as it is converted."""
  for module, leaves in params.items():
    for leaf, array in leaves.items():
      array = np.asarray(array)
      if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'):
        raise ValueError(f'{source}: {module}/{leaf} has dtype {array.dtype}, expected '
                         'floating point')
      leaves[leaf] = np.asarray(array, dtype=np.float32, order='C')
  return params


def _rng_key(rng):
  import jax
  if rng is None:
    return jax.random.PRNGKey(0)
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------
def load(path: Union[str, os.PathLike], model: Optional[str] = None,
         num_classes: Optional[int] = None, rng: Any = None,
         max_bytes: Optional[int] = None) -> Params:
  """Loads a checkpoint into the params tree of `nfnet_jax.models.create(model)`.

  Args:
    path: a DeepMind release (`F0_haiku.npz`: a dill pickle, read safely), or a real
      `.npz` written by `save`. The format is detected from the first bytes.
    model: a registered model name ('F0'...). None: inferred from the file's structure
      for NFNets (block count, stage boundaries, stem width); if that fails the file is
      returned as stored, unvalidated and unrenamed.
    num_classes: wanted classifier size. None: the file's. If it differs from the
      file's, the body is kept and the classifier (`linear`: w ~ N(0, 0.01^2), b = 0)
      is re-initialised with `rng`, and a log line says so.
    rng: jax PRNG key or int seed for that re-initialisation (None: seed 0).
    max_bytes: memory budget of the read (default `MAX_CHECKPOINT_BYTES`, 4 GiB): every
      size the file declares is checked against it, and with `model` against the
      model's parameters (dtype, largest parameter, total), before allocating.

  Returns:
    {module: {leaf: float32 numpy array}} with exactly the model's module names,
    leaves and shapes: `create(model, num_classes).apply(params, ...)` takes it as is.

  Raises:
    FileNotFoundError (with a download hint), ValueError (unknown format; names or
    shapes that do not match the model, naming the first differing keys),
    UnsafePickleError (a pickle that references any non-allowed global, an array the
    file does not fill, one array referenced twice), CheckpointTooLargeError (declared
    sizes over the budget or the model's; refused before allocating).
  """
  path = os.fspath(path)
  raw = read_checkpoint(path, model=model, num_classes=num_classes, max_bytes=max_bytes)
  if not raw:
    raise ValueError(f'{path}: the checkpoint holds no parameters')
  if model is None:
    model = infer_model(raw)
    if model is None:
      log.warning('%s: could not infer the model from the checkpoint; returning it as '
                  'stored (pass model=... to validate and rename)', path)
      return _to_float32(raw, path)
    log.info('%s: inferred model %s', path, model)

  file_cls_module = _classifier_module(raw)
  file_classes = None
  if file_cls_module is not None and 'w' in raw[file_cls_module]:
    file_classes = int(np.shape(raw[file_cls_module]['w'])[-1])
  target_classes = num_classes if num_classes is not None else (file_classes or 1000)
  expected = model_shapes(model, target_classes)
  reinit = num_classes is not None and num_classes != file_classes
  classifier = _classifier_module(expected)
  if reinit and classifier is None:
    raise ValueError(f'model {model!r} has no top-level `linear` classifier to resize')
  if reinit and file_cls_module is not None:
    # The classifier's input width must still match the body.
    w = raw[file_cls_module].get('w')
    want_in = expected[classifier]['w'][0]
    if w is not None and np.shape(w)[0] != want_in:
      raise ValueError(f'{path} does not match model {model!r}: {file_cls_module}/w has '
                       f'{np.shape(w)[0]} inputs, the model\'s classifier {want_in}')
  params = _match_to_model(raw, expected, path, model, skip_classifier=reinit)
  params = _to_float32(params, path)
  if reinit:
    import jax
    key = _rng_key(rng)
    w_shape = expected[classifier]['w']
    w = 0.01 * jax.random.normal(key, w_shape, dtype=np.float32)
    params[classifier] = {'w': np.asarray(w, np.float32),
                          'b': np.zeros(expected[classifier]['b'], np.float32)}
    params = {m: params[m] for m in expected}
    log.info('%s: classifier %s has %s classes in the file, %d requested: kept the body, '
             're-initialised %s (w ~ N(0, 0.01^2), b = 0)', path, file_cls_module,
             file_classes, num_classes, classifier)
  return params


def save(params: Mapping[str, Mapping[str, Any]], path: Union[str, os.PathLike]) -> None:
  """Writes params as a real `.npz` with keys `<module path>/<leaf>`, atomically.

  The archive is written to a temporary file in the target directory and moved into
  place with os.replace, so a reader never sees a half-written file. Floating arrays
  are stored as float32 (bfloat16 etc. upcast). `load` reads it back.
  """
  path = os.fspath(path)
  flat = {}
  for module, leaves in params.items():
    for leaf, value in leaves.items():
      if '/' in leaf or not leaf:
        raise ValueError(f'leaf name {leaf!r} of {module!r} must be non-empty without "/"')
      array = np.asarray(value)
      if array.dtype.name == 'bfloat16' or np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
      flat[f'{module}/{leaf}'] = array
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------------------
# timm conversion.
# ---------------------------------------------------------------------------
_TIMM_STEM = {'conv1': 'stem_conv0', 'conv2': 'stem_conv1', 'conv3': 'stem_conv2',
              'conv4': 'stem_conv3'}
_TIMM_BLOCK_CONVS = {'conv1': 'conv0', 'conv2': 'conv1', 'conv2b': 'conv1b',
                     'conv3': 'conv2', 'downsample.conv': 'conv_shortcut'}
_TIMM_SE = {'fc1': 'squeeze_excite/~/linear', 'fc2': 'squeeze_excite/~/linear_1'}
_TIMM_KEY_RE = re.compile(
    r'^(?:stem\.(?P<stem>conv[1-4])\.(?P<stem_leaf>weight|bias|gain)'
    r'|stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?:'
    r'(?P<conv>conv1|conv2|conv2b|conv3|downsample\.conv)\.(?P<conv_leaf>weight|bias|gain)'
    r'|attn_last\.(?P<se>fc1|fc2)\.(?P<se_leaf>weight|bias)'
    r'|(?P<skip>skipinit_gain))'
    r'|final_conv\.(?P<final_leaf>weight|bias|gain)'
    r'|head\.fc\.(?P<fc_leaf>weight|bias))$')


def _to_numpy(value: Any) -> np.ndarray:
  """numpy array from a numpy array, a torch tensor (.detach().cpu().numpy()) or similar."""
  if isinstance(value, np.ndarray):
    return value
  for attr in ('detach', 'cpu'):
    if hasattr(value, attr):
      value = getattr(value, attr)()
  if hasattr(value, 'numpy') and not isinstance(value, np.generic):
    try:
      value = value.numpy()
    except TypeError:  # e.g. torch bfloat16 has no numpy dtype
      value = value.float().numpy()
  return np.asarray(value)


def _conv_leaf(leaf: str, a: np.ndarray, key: str) -> tuple[str, np.ndarray]:
  if leaf == 'weight':
    if a.ndim != 4:
      raise ValueError(f'timm {key}: expected an OIHW conv kernel, got shape {a.shape}')
    return 'w', a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == 'gain':
    if a.ndim != 4 or a.shape[1:] != (1, 1, 1):
      raise ValueError(f'timm {key}: expected a (O,1,1,1) gain, got shape {a.shape}')
    return 'gain', a.reshape(-1)
  return 'bias', a


def from_timm(state_dict: Mapping[str, Any], variant: str = 'F0') -> Params:
  """Converts a timm `dm_nfnet_f*` state_dict into this package's NFNet params.

  `state_dict` maps timm names to numpy arrays (or torch tensors / anything with
  `.numpy()`); a leading `module.` (DataParallel) is stripped. Every key must be
  consumed and every parameter of `create(variant, num_classes=<head size>)` filled,
  else ValueError names the offenders. Run the result with `TIMM_MODEL_OVERRIDES`
  (exact erf GELU, WS epsilon 1e-5 added to the variance) to compute what timm
  computes; DeepMind's defaults (tanh GELU, max(var * fan_in, 1e-4)) differ measurably
  (about 3% of the logit scale on random weights, against 1e-6 with the overrides).

  Name mapping (s = stage, b = block within the stage, i = sum(depths[:s]) + b, the
  global block index; block 0 is `nf_block`, block i > 0 `nf_block_{i}`; names below
  are DeepMind's, renamed to the model's on output):

  | timm key                             | ours, under `NFNet/~/`             | transform |
  |--------------------------------------|------------------------------------|-----------|
  | stem.conv1.{weight,bias,gain}        | stem_conv0 {w,bias,gain}           | conv      |
  | stem.conv2.*                         | stem_conv1                         | conv      |
  | stem.conv3.*                         | stem_conv2                         | conv      |
  | stem.conv4.*                         | stem_conv3                         | conv      |
  | stages.s.b.downsample.conv.*         | nf_block_i/~/conv_shortcut         | conv      |
  | stages.s.b.conv1.*                   | nf_block_i/~/conv0                 | conv      |
  | stages.s.b.conv2.*                   | nf_block_i/~/conv1                 | conv      |
  | stages.s.b.conv2b.*                  | nf_block_i/~/conv1b                | conv      |
  | stages.s.b.conv3.*                   | nf_block_i/~/conv2                 | conv      |
  | stages.s.b.attn_last.fc1.{weight,bias} | nf_block_i/~/squeeze_excite/~/linear {w,b}   | SE |
  | stages.s.b.attn_last.fc2.{weight,bias} | nf_block_i/~/squeeze_excite/~/linear_1 {w,b} | SE |
  | stages.s.b.skipinit_gain             | nf_block_i (skip_gain)             | () as is  |
  | final_conv.{weight,bias,gain}        | final_conv {w,bias,gain}           | conv      |
  | head.fc.{weight,bias}                | linear {w,b}                       | fc        |

  conv: weight (O, I/groups, kh, kw) -> w (kh, kw, I/groups, O); gain (O,1,1,1) -> (O,);
  bias (O,) as is. SE (1x1 nn.Conv2d in timm): weight (O, I, 1, 1) -> w (I, O); bias -> b.
  fc: weight (out, in) -> w (in, out); bias -> b.
  Parameter-free timm modules (activations, downsample.pool, attn_last.bn/act/gate,
  head.global_pool, drop_path) have no keys.
  """
  from nfnet_jax.models import nfnet

  if variant not in nfnet.VARIANTS:
    raise ValueError(f'Unknown NFNet variant {variant!r}; valid: {list(nfnet.VARIANTS)}')
  depths = list(nfnet.VARIANTS[variant]['depth'])
  starts = np.cumsum([0] + depths)

  def block(s: int, b: int, key: str) -> str:
    if s >= len(depths) or b >= depths[s]:
      raise ValueError(f'timm {key}: stage {s} block {b} does not exist in {variant} '
                       f'(depths {depths})')
    i = int(starts[s]) + b
    return 'NFNet/~/' + ('nf_block' if i == 0 else f'nf_block_{i}')

  params: Params = {}
  unknown = []
  for key, value in state_dict.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    m = _TIMM_KEY_RE.match(name)
    if m is None:
      unknown.append(key)
      continue
    a = _to_numpy(value).astype(np.float32, copy=False)
    g = m.groupdict()
    if g['stem']:
      module = 'NFNet/~/' + _TIMM_STEM[g['stem']]
      leaf, a = _conv_leaf(g['stem_leaf'], a, key)
    elif g['conv']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _TIMM_BLOCK_CONVS[g['conv']]
      leaf, a = _conv_leaf(g['conv_leaf'], a, key)
    elif g['se']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _TIMM_SE[g['se']]
      if g['se_leaf'] == 'weight':
        if a.ndim != 4 or a.shape[2:] != (1, 1):
          raise ValueError(f'timm {key}: expected an (O,I,1,1) 1x1 conv, got {a.shape}')
        leaf, a = 'w', a.reshape(a.shape[:2]).T
      else:
        leaf = 'b'
    elif g['skip']:
      module = block(int(g['s']), int(g['b']), key)
      if a.size != 1:
        raise ValueError(f'timm {key}: expected a scalar, got shape {a.shape}')
      leaf, a = 'skip_gain', a.reshape(())
    elif g['final_leaf']:
      module = 'NFNet/~/final_conv'
      leaf, a = _conv_leaf(g['final_leaf'], a, key)
    else:
      module = 'NFNet/~/linear'
      if g['fc_leaf'] == 'weight':
        if a.ndim != 2:
          raise ValueError(f'timm {key}: expected (out, in), got {a.shape}')
        leaf, a = 'w', a.T
      else:
        leaf = 'b'
    if leaf in params.get(module, {}):
      raise ValueError(f'timm {key}: {module}/{leaf} given twice')
    params.setdefault(module, {})[leaf] = np.asarray(a, dtype=np.float32, order='C')
  if unknown:
    raise ValueError(f'{len(unknown)} timm keys not understood for dm_nfnet_{variant.lower()}'
                     f': {_fmt_list(unknown)}')
  fc = params.get('NFNet/~/linear', {}).get('w')
  num_classes = int(fc.shape[1]) if fc is not None else 1000
  return _match_to_model(params, model_shapes(variant, num_classes), 'timm state_dict',
                         variant)
