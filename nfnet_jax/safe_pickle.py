"""Restricted, memory-bounded unpickling of parameter pickles.

`SafeUnpickler` resolves only the globals in `ALLOWED_GLOBALS` (numpy arrays, dtypes
and scalars, dill's array wrapper, Haiku 2021's FlatMapping, copies of plain
containers and byte strings), each to a restricted stand-in, so a hostile pickle
cannot run code. Before unpickling, `scan_pickle` walks the opcodes without building
anything: length fields, memo indices, the opcode count, and the nesting depth of
everything the pickle would build (keys and set items included: hashing a deeply
nested tuple recurses in C and can crash the interpreter), at most `MAX_NESTING`.

Arrays are built only from their own bytes in the file: one declared but never
filled, one with data shorter than declared, or one reached twice is refused. The
dtype, shape and byte count of an array are frozen when checked: a pickle gets a
stand-in for `numpy.dtype` (`_DtypeSpec`), never a numpy dtype it could rebuild with
BUILD later, and the checked values are copies it cannot reach.

Memory bound. Every size an allowed constructor is asked for is checked against a
`Budget` before it is allocated. For a pickle of S bytes whose arrays total A bytes
the parser holds at most about

    S (the file's byte strings) + S + 16 MiB (copies: bytearray, latin-1, containers)
      + A (each array's own buffer) + ~100 B per opcode (at most MAX_PICKLE_OPCODES)

and never more than the budget (`MAX_CHECKPOINT_BYTES` or `max_bytes`). A file that
copies its own bytes over and over is refused at its second copy, not at the budget.

`nfnet_jax.pretrained` runs this parser in a child process with hard resource limits
(`nfnet_jax.unpickle_child`); docs/pretrained.md describes the allowed globals and the
budget.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import sys
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    'SafeUnpickler', 'safe_loads', 'scan_pickle', 'Budget', 'UnsafePickleError',
    'CheckpointTooLargeError', 'ALLOWED_GLOBALS', 'MAX_CHECKPOINT_BYTES',
    'MAX_PICKLE_OPCODES', 'MAX_NESTING', 'COPY_SLACK_BYTES', 'as_two_level',
    'read_params', 'split_key',
]

# ---------------------------------------------------------------------------
# Memory budget.
# ---------------------------------------------------------------------------
# Most bytes one load may hold at once for what it reads (see `Budget`): the bound on
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
# Deepest nesting of containers a pickle may build. Released files nest about 8 deep
# (as `scan_pickle` counts: dict -> FlatMapping args -> dict -> array state -> shape);
# CPython hashes and compares nested tuples recursively in C, without a depth guard
# for hashing, so a 300,000-deep tuple used as a key overflows the C stack.
MAX_NESTING = 64
# Copies a pickle's allowed constructors may make (bytearray, latin-1 bytes, container
# copies) beyond one copy of the file's own bytes: protocol 2 stores every array's data
# as latin-1 text copied once to bytes, so an honest file needs about its own size.
COPY_SLACK_BYTES = 16 * 2**20


class UnsafePickleError(pickle.UnpicklingError):
  """A checkpoint was refused before anything it asked for ran or was allocated: a
  global outside the allow-list, an array never filled from the file, one array
  referenced twice, an .npz member that is not a plain numeric array..."""


class CheckpointTooLargeError(UnsafePickleError):
  """A checkpoint declared more bytes than the budget or the requested model allows.

  Raised from the declared sizes (pickle length fields, array shapes, .npy headers,
  zip sizes), before the memory is allocated.
  """


def format_bytes(n: int) -> str:
  """1536 -> '1.50 KiB'."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'


def _check_param_dtype(dtype: Any, what: str) -> np.dtype:
  """A fresh plain numeric dtype (bool, int, float, complex; no fields or subarrays).

  `dtype` is a `_DtypeSpec` (what a pickle gets for `numpy.dtype`) or a numpy dtype
  (an .npy header's). The result is a new object built from the type code and byte
  order alone, so nothing the pickle holds can change it after the check.
  """
  if isinstance(dtype, _DtypeSpec):
    dtype = dtype.resolve(what)
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f'{what}: dtype {dtype!r} is not a numpy dtype')
  if dtype.hasobject:
    raise UnsafePickleError(f'{what}: object dtype {dtype!r} refused (object arrays can '
                            'carry arbitrary pickled objects; parameters are numeric)')
  if (dtype.kind not in 'biufc' or dtype.fields is not None or dtype.subdtype is not None
      or not 0 < dtype.itemsize <= 16):
    raise UnsafePickleError(f'{what}: dtype {dtype!r} refused; parameters have a plain '
                            'numeric dtype')
  fresh = np.dtype(dtype.str)  # e.g. '<f4': a builtin descriptor, not the caller's
  if fresh.itemsize != dtype.itemsize or fresh.kind != dtype.kind:
    raise UnsafePickleError(f'{what}: dtype {dtype!r} is inconsistent; refused')
  return fresh


class _DtypeSpec:
  """What a pickle gets for `numpy.dtype(code, align, copy)`: a type code and a byte
  order, never a numpy dtype (numpy's dtypes accept BUILD, so a pickle could turn one
  into a 16-byte sub-array dtype after an array was checked against it).

  BUILD accepts only the state numpy writes for a plain numeric dtype,
  `(3, byteorder, None, None, None, -1, -1, 0)` (version 4 adds metadata, None), once.
  """
  __slots__ = ('code', 'byteorder', 'built')

  def __init__(self, code: str):
    self.code, self.byteorder, self.built = code, '=', False

  def __setstate__(self, state):
    if self.built:
      raise UnsafePickleError(f'numpy.dtype({self.code!r}): state given twice; refused')
    plain = (None, None, None, -1, -1, 0)
    ok = (type(state) is tuple and len(state) in (8, 9)
          and state[0] == (3 if len(state) == 8 else 4)
          and state[1] in ('<', '>', '|', '=') and state[2:8] == plain
          and (len(state) == 8 or state[8] is None))
    if not ok:
      shown = repr(state) if len(repr(state)) < 200 else f'{repr(state)[:200]}...'
      raise UnsafePickleError(f'numpy.dtype({self.code!r}): state {shown} refused; only '
                              'the state of a plain numeric dtype is accepted')
    self.byteorder, self.built = state[1], True

  def resolve(self, what: str) -> np.dtype:
    dtype = np.dtype(self.code)
    if self.byteorder in '<>' and dtype.itemsize > 1:
      dtype = dtype.newbyteorder(self.byteorder)
    return dtype

  def __repr__(self):
    return f'numpy.dtype({self.code!r}, byteorder {self.byteorder!r})'


def _check_shape(shape: Any, what: str) -> tuple[int, ...]:
  if not isinstance(shape, (tuple, list)) or len(shape) > 32:
    raise UnsafePickleError(f'{what}: shape {shape!r} is not a tuple of at most 32 sizes')
  if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
             for d in shape):
    raise UnsafePickleError(f'{what}: shape {shape!r} has a size that is not a '
                            'non-negative integer')
  return tuple(int(d) for d in shape)


class Budget:
  """What one load may allocate, checked from declared sizes before allocating.

  `held` counts the bytes the load holds at once: for a pickle the whole file (its
  byte strings stay in the unpickler's memo until it returns) plus every copy an
  allowed constructor makes (bytearray, latin-1 bytes, containers, each array's own
  buffer, released again when the file bytes it was copied from are freed); for an
  .npz the arrays its .npy headers declare. `held` never exceeds `max_bytes`. With a
  model, each array must also have the model's dtype, be no larger than its largest
  parameter, and all of them together no larger than its parameters.
  """

  def __init__(self, path: str = '<pickle>', max_bytes: Optional[int] = None,
               model: Optional[str] = None,
               model_leaves: Sequence[tuple[tuple[int, ...], Any]] = ()):
    """`model_leaves`: (shape, dtype) of every parameter of `model` (None: no model)."""
    self.path = path
    self.max_bytes = int(MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes)
    self.held = 0
    self.array_bytes = 0
    self.copies = 0
    self.copy_allowance: Optional[int] = None
    # False: arrays already in native C order come out as read-only views of the
    # file's bytes (the child process, which only writes them out, sets this).
    self.copy_arrays = True
    self._data_ids: set[int] = set()
    self.model = model
    if model is not None:
      leaves = [(tuple(shape), np.dtype(dtype)) for shape, dtype in model_leaves]
      sizes = [math.prod(s) * d.itemsize for s, d in leaves]
      self.model_dtypes = {d for _, d in leaves}
      self.model_total, self.model_largest = sum(sizes), max(sizes, default=0)

  def charge(self, nbytes: int, what: str) -> None:
    if self.held + nbytes > self.max_bytes:
      raise CheckpointTooLargeError(
          f'{what} ({format_bytes(nbytes)}) would take this load to '
          f'{format_bytes(self.held + nbytes)}, over its {format_bytes(self.max_bytes)} '
          'budget (MAX_CHECKPOINT_BYTES; pass max_bytes= to allow more); '
          'refused before allocating')
    self.held += nbytes

  def release(self, nbytes: int) -> None:
    self.held -= nbytes

  def allow_copies(self, file_size: int) -> None:
    """Bounds copies to one of the file's bytes plus COPY_SLACK_BYTES (see the module
    docstring): a file cannot multiply its own data."""
    self.copy_allowance = int(file_size) + COPY_SLACK_BYTES

  def charge_copy(self, nbytes: int, what: str) -> None:
    """Charges a copy an allowed constructor makes, to the budget and the allowance."""
    if self.copy_allowance is not None and self.copies + nbytes > self.copy_allowance:
      raise CheckpointTooLargeError(
          f'{what} ({format_bytes(nbytes)}) would take the copies this pickle makes to '
          f'{format_bytes(self.copies + nbytes)}, more than its size plus '
          f'{format_bytes(COPY_SLACK_BYTES)} ({format_bytes(self.copy_allowance)}): a file '
          'that multiplies its own bytes; refused before allocating')
    self.charge(nbytes, what)
    self.copies += nbytes

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
    desc = f'{what} of shape {shape} {dtype.name} ({format_bytes(nbytes)})'
    if nbytes > self.max_bytes:
      raise CheckpointTooLargeError(f'{desc} exceeds the {format_bytes(self.max_bytes)} '
                                    'budget; refused before allocating')
    if self.model is not None:
      if dtype.newbyteorder('=') not in self.model_dtypes:
        wanted = '/'.join(sorted(d.name for d in self.model_dtypes))
        raise UnsafePickleError(f'{desc}: model {self.model!r} has {wanted} parameters; '
                                'refused before reading the data')
      if nbytes > self.model_largest:
        raise CheckpointTooLargeError(
            f'{desc} is larger than any parameter of model {self.model!r} (largest '
            f'{format_bytes(self.model_largest)}); refused before allocating')
      if self.array_bytes + nbytes > self.model_total:
        raise CheckpointTooLargeError(
            f'{desc}: the arrays so far total more than model {self.model!r}\'s '
            f'parameters ({format_bytes(self.model_total)}); a file for a larger model? '
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


class _Node:
  """What `scan_pickle` knows of one object the pickle would build: how deeply it
  nests, and whether it already sits inside another container."""
  __slots__ = ('depth', 'inside')

  def __init__(self, depth: int = 0):
    self.depth, self.inside = depth, False


_LEAF_OPS = frozenset((
    'INT', 'BININT', 'BININT1', 'BININT2', 'LONG', 'LONG1', 'LONG4', 'STRING',
    'BINSTRING', 'SHORT_BINSTRING', 'BINBYTES', 'SHORT_BINBYTES', 'BINBYTES8',
    'BYTEARRAY8', 'NONE', 'NEWTRUE', 'NEWFALSE', 'UNICODE', 'SHORT_BINUNICODE',
    'BINUNICODE', 'BINUNICODE8', 'FLOAT', 'BINFLOAT', 'GLOBAL', 'EXT1', 'EXT2', 'EXT4'))
_EMPTY_OPS = frozenset(('EMPTY_LIST', 'EMPTY_DICT', 'EMPTY_SET', 'EMPTY_TUPLE'))
_FROM_MARK_OPS = frozenset(('TUPLE', 'LIST', 'DICT', 'FROZENSET', 'OBJ', 'INST'))
_ADD_FROM_MARK_OPS = frozenset(('APPENDS', 'SETITEMS', 'ADDITEMS'))
_TUPLE_N = {'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3}
_POPS_FOR_CALL = {'REDUCE': 2, 'NEWOBJ': 2, 'NEWOBJ_EX': 3, 'STACK_GLOBAL': 2}
_NO_STACK_OPS = frozenset(('PROTO', 'FRAME'))


class _StackModel:
  """The unpickler's stack, marks and memo, holding `_Node`s instead of objects.

  A container's depth is one more than its deepest item; an object a call returns is
  counted as deep as its arguments. A container may gain items (APPEND, SETITEM, BUILD)
  only while it is not inside another one: no pickler writes that, and it would make
  an outer container deeper after its depth was counted.
  """

  def __init__(self):
    self.stack: list[_Node] = []
    self.marks: list[int] = []
    self.memo: dict[int, _Node] = {}

  def _fence(self) -> int:
    return self.marks[-1] if self.marks else 0

  def pop(self, name: str, pos: int) -> _Node:
    if len(self.stack) <= self._fence():
      raise pickle.UnpicklingError(f'{name} at byte {pos}: unpickling stack underflow')
    return self.stack.pop()

  def top(self, name: str, pos: int) -> _Node:
    if len(self.stack) <= self._fence():
      raise pickle.UnpicklingError(f'{name} at byte {pos}: unpickling stack underflow')
    return self.stack[-1]

  def pop_mark(self, name: str, pos: int) -> list[_Node]:
    if not self.marks:
      raise pickle.UnpicklingError(f'{name} at byte {pos}: no MARK before it')
    k = self.marks.pop()
    items = self.stack[k:]
    del self.stack[k:]
    return items

  @staticmethod
  def _deepest(items: Sequence[_Node], name: str, pos: int) -> int:
    depth = 1 + max((item.depth for item in items), default=0)
    if depth > MAX_NESTING:
      raise UnsafePickleError(f'{name} at byte {pos} would nest containers more than '
                              f'{MAX_NESTING} deep; refused before building them')
    return depth

  def new(self, items: Sequence[_Node], name: str, pos: int) -> _Node:
    node = _Node(self._deepest(items, name, pos))
    for item in items:
      item.inside = True
    return node

  def add(self, target: _Node, items: Sequence[_Node], name: str, pos: int) -> None:
    if target.inside and items:
      raise UnsafePickleError(f'{name} at byte {pos} changes a container that already '
                              'sits inside another one; refused')
    target.depth = max(target.depth, self._deepest(items, name, pos))
    for item in items:
      item.inside = True

  def step(self, name: str, pos: int, index: Optional[int]) -> None:
    """Applies one opcode (its argument already read) to the model."""
    if name in _LEAF_OPS:
      self.stack.append(_Node())
    elif name in _EMPTY_OPS:
      self.stack.append(_Node(1))
    elif name == 'MARK':
      self.marks.append(len(self.stack))
    elif name in _FROM_MARK_OPS:
      self.stack.append(self.new(self.pop_mark(name, pos), name, pos))
    elif name in _TUPLE_N:
      items = [self.pop(name, pos) for _ in range(_TUPLE_N[name])]
      self.stack.append(self.new(items, name, pos))
    elif name == 'APPEND':
      item = self.pop(name, pos)
      self.add(self.top(name, pos), [item], name, pos)
    elif name == 'SETITEM':
      value, key = self.pop(name, pos), self.pop(name, pos)
      self.add(self.top(name, pos), [key, value], name, pos)
    elif name in _ADD_FROM_MARK_OPS:
      items = self.pop_mark(name, pos)
      self.add(self.top(name, pos), items, name, pos)
    elif name == 'BUILD':
      state = self.pop(name, pos)
      self.add(self.top(name, pos), [state], name, pos)
    elif name in _POPS_FOR_CALL:
      items = [self.pop(name, pos) for _ in range(_POPS_FOR_CALL[name])]
      node = self.new(items, name, pos)
      node.depth -= 1  # a call's result is as deep as its arguments
      self.stack.append(node)
    elif name == 'POP':
      if len(self.stack) > self._fence():
        self.stack.pop()
      elif self.marks:
        self.marks.pop()
      else:
        raise pickle.UnpicklingError(f'POP at byte {pos}: unpickling stack underflow')
    elif name == 'POP_MARK':
      self.pop_mark(name, pos)
    elif name == 'DUP':
      self.stack.append(self.top(name, pos))
    elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
      self.memo[index] = self.top(name, pos)
    elif name == 'MEMOIZE':
      self.memo[len(self.memo)] = self.top(name, pos)
    elif name in ('GET', 'BINGET', 'LONG_BINGET'):
      if index not in self.memo:
        raise pickle.UnpicklingError(f'{name} at byte {pos}: memo index {index} was '
                                     'never stored')
      self.stack.append(self.memo[index])
    elif name == 'STOP':
      self.pop(name, pos)
    elif name not in _NO_STACK_OPS:  # pragma: no cover (every opcode is listed above)
      raise UnsafePickleError(f'{name} at byte {pos}: opcode not understood; refused')


_MEMO_INDEX_OPS = frozenset(('BINPUT', 'LONG_BINPUT', 'BINGET', 'LONG_BINGET'))
_PUT_OPS = frozenset(('PUT', 'BINPUT', 'LONG_BINPUT'))


def scan_pickle(f, size: int) -> int:
  """Walks the opcodes of the pickle in `f` without building anything; returns their
  count.

  Every length field must fit in the rest of the file (the unpickler allocates a
  declared length before reading it), memo indices (the unpickler sizes its memo
  table by the largest index) and the opcode count stay under MAX_PICKLE_OPCODES,
  out-of-band buffers are refused, and a model of the unpickler's stack and memo
  (`_StackModel`) bounds the nesting of what would be built by MAX_NESTING. Data is
  skipped with seek, not read.
  """
  f.seek(0)
  count = 0
  model = _StackModel()
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
      if op.name in _MEMO_INDEX_OPS:
        index = int.from_bytes(raw, 'little')
      elif op.name == 'FRAME' and int.from_bytes(raw, 'little') > size - f.tell():
        raise pickle.UnpicklingError(
            f'FRAME at byte {pos} declares {int.from_bytes(raw, "little"):,} bytes, the '
            f'file has {size - f.tell():,} left (truncated or forged)')
    elif arg.n == pickletools.UP_TO_NEWLINE:
      for _ in range(2 if op.name in ('GLOBAL', 'INST') else 1):
        line = _skip_line(f, op.name, pos)
      if op.name in ('PUT', 'GET'):
        try:
          index = int(line)
        except ValueError:
          raise pickle.UnpicklingError(f'{op.name} at byte {pos}: bad memo '
                                       'index') from None
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
    if op.name in _PUT_OPS and not 0 <= index < MAX_PICKLE_OPCODES:
      raise CheckpointTooLargeError(f'{op.name} at byte {pos}: memo index {index:,} '
                                    f'(the unpickler would size its memo table by it); '
                                    f'at most {MAX_PICKLE_OPCODES:,}')
    model.step(op.name, pos, index)
    if op.name == 'STOP':
      return count


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


class _PendingArray:
  """An ndarray the pickle declared; it exists only once its own data fills it.

  `_reconstruct` (and `_frombuffer`) give one of these instead of allocating. BUILD
  hands it numpy's array state `(version, shape, dtype, is_fortran, data)`: the shape
  and dtype are checked against the budget and the data must be a byte string of
  exactly the declared size that no other array used. `materialise` copies it into an
  array of its own after unpickling; one never filled is refused there.
  """
  __slots__ = ('_budget', '_what', 'shape', 'dtype', 'fortran', 'data', 'nbytes',
               'filled')

  def __init__(self, budget: 'Budget', what: str):
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
      self._budget.charge_copy(len(data), f'{what}\'s latin-1 data')
      data = data.encode('latin1')
    if type(data) in (bytes, bytearray):
      size = len(data)
    else:
      raise UnsafePickleError(f'{what}: array data of type {type(data).__name__} refused; '
                              'expected the raw bytes')
    if size != nbytes:
      raise UnsafePickleError(f'{what}: shape {shape} {dtype.name} needs {nbytes:,} bytes, '
                              f'its data has {size:,}; refused (an array is never '
                              'returned with bytes the file did not give)')
    self._budget.claim_data(data, what)
    # `shape` and `dtype` are fresh objects the pickle cannot reach. A bytearray can
    # still grow (APPENDS calls its extend), so its length is checked again when read.
    self.shape, self.dtype, self.fortran, self.data = shape, dtype, fortran, data
    self.nbytes = nbytes
    self.filled = True

  def materialise(self) -> np.ndarray:
    """The array, in native byte order and its own memory (see `Budget.copy_arrays`);
    frees the file's bytes."""
    if not self.filled:
      raise UnsafePickleError(f'{self._what}: declared but never given its data '
                              '(it would be uninitialised memory); refused')
    nbytes = self.nbytes
    if len(self.data) != nbytes:
      raise UnsafePickleError(f'{self._what}: its data changed size after it was checked '
                              f'({nbytes:,} -> {len(self.data):,} bytes); refused')
    # Charged either way: the child process's view is written out (a copy there).
    self._budget.charge(nbytes, f'a copy of {self._what}')
    flat = np.frombuffer(self.data, dtype=self.dtype, count=math.prod(self.shape))
    if not self._budget.copy_arrays and self.dtype.isnative and (
        not self.fortran or len(self.shape) < 2):
      return flat.reshape(self.shape)  # a read-only view of the file's own bytes
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
  _budget: Optional[Budget] = None

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
      cls._budget.charge_copy(_container_bytes(data), 'a FlatMapping copy')
    return dict(data)

  @staticmethod
  def __setstate__(state):
    raise UnsafePickleError('BUILD on haiku FlatMapping refused')


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _container_bytes(data) -> int:
  return 64 + 72 * len(data)  # an upper bound of CPython's per-entry cost, dicts included


def _allowed_globals(budget: Optional[Budget] = None) -> dict[tuple[str, str], Any]:
  """(module, name) -> what the pickle gets; with `budget`, every copy is charged."""
  budget = budget or Budget('<pickle>')

  def reconstruct(subtype, shape, dtype_code):
    """`numpy.core.multiarray._reconstruct`: allocates nothing (`_PendingArray`)."""
    if subtype is not _NdarrayMarker and subtype is not np.ndarray:
      raise UnsafePickleError(f'_reconstruct of {subtype!r} refused; only numpy.ndarray')
    shape = _check_shape(shape, '_reconstruct')
    if math.prod(shape) > budget.max_bytes:  # numpy's own pickles say (0,)
      raise CheckpointTooLargeError(
          f'_reconstruct of shape {shape} exceeds the {format_bytes(budget.max_bytes)} '
          'budget; refused before allocating')
    return _PendingArray(budget, 'an array')

  def frombuffer(buf, dtype, shape, order='C'):
    """`numpy.core.numeric._frombuffer` (numpy's protocol-5 array reduction)."""
    pending = _PendingArray(budget, 'an array')
    pending.fill(shape, dtype, order == 'F', buf)
    return pending

  def dtype(obj, align=False, copy=True):
    """`numpy.dtype(code, align, copy)`: a `_DtypeSpec` (BUILD then sets its order)."""
    if type(obj) is not str or len(obj) > 16:
      raise UnsafePickleError(f'numpy.dtype({obj!r}) refused; only a type code string')
    try:
      _check_param_dtype(np.dtype(obj), 'numpy.dtype')
    except TypeError:
      raise UnsafePickleError(f'numpy.dtype({obj!r}): not a type code') from None
    return _DtypeSpec(obj)

  def scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar(dtype, bytes)`: how np.float32(...) etc. pickle."""
    dtype = _check_param_dtype(dtype, 'numpy scalar')
    if isinstance(data, str):  # written by Python 2 / protocol < 3
      data = data.encode('latin1') if len(data) == dtype.itemsize else None
    if type(data) not in (bytes, bytearray) or len(data) != dtype.itemsize:
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
    budget.charge_copy(len(text), 'latin-1 bytes')
    return text.encode('latin1', errors)

  def byte_array(*args):
    """`bytearray(bytes)` or `bytearray(str, 'latin-1')`: a copy of data from the file."""
    if not args:
      return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
      budget.charge_copy(len(args[0]), 'a bytearray copy')
      return bytearray(args[0])
    if (len(args) == 2 and isinstance(args[0], str)
        and args[1] in ('latin1', 'latin-1', 'latin_1', 'iso-8859-1')):
      budget.charge_copy(len(args[0]), 'a bytearray copy')
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
        budget.charge_copy(_container_bytes(args[0]), f'a {kind.__name__} copy')
        return kind(args[0])
      types = ', '.join(type(a).__name__ for a in args)
      raise UnsafePickleError(f'{kind.__name__}({types}) refused: only a copy of a '
                              'list/tuple/dict/set')
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

  def __init__(self, file, budget: Optional[Budget] = None):
    super().__init__(file)
    self.budget = budget or Budget('<pickle>')
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
    scan_pickle(f, size)
    f.seek(0)
    budget = Budget('<pickle>', max_bytes)
    budget.charge(size, 'the pickle')
    budget.allow_copies(size)
    return SafeUnpickler(f, budget).load()


Params = dict[str, dict[str, np.ndarray]]


def split_key(key: str, path: str) -> tuple[str, str]:
  """'NFNet/~/linear/w' -> ('NFNet/~/linear', 'w'): the last '/' splits the module
  path from the leaf name. ValueError naming `path` for a key without one."""
  module, sep, leaf = key.rpartition('/')
  if not sep or not module or not leaf:
    raise ValueError(f'{path}: key {key!r} is not "<module path>/<leaf>" (the last "/" '
                     'separates the module path from the parameter name)')
  return module, leaf


def as_two_level(obj: Any, path: str) -> Params:
  """Normalises an unpickled object into {module: {leaf: ndarray}}.

  Accepts {module: {leaf: array}} and flat {'module/leaf': array}; numpy scalars
  become 0-d arrays. Raises ValueError naming `path` for anything else.
  """
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
      mod, leaf = split_key(module, path)
      params.setdefault(mod, {})[leaf] = value
  for module, leaves in params.items():
    for leaf, array in leaves.items():
      if isinstance(array, np.generic):
        leaves[leaf] = array = np.asarray(array)
      if not isinstance(array, np.ndarray):
        raise ValueError(f'{path}: {module}/{leaf} is a {type(array).__name__}, not an array')
  return params


def read_params(f, size: int, path: str, budget: Budget) -> Params:
  """Reads the parameter pickle in `f` (`size` bytes): scan, unpickle, normalise.

  Every failure is one line naming `path`: `UnsafePickleError` (or its subclass
  `CheckpointTooLargeError`) for a refusal, `pickle.UnpicklingError` for a corrupt
  pickle, ValueError for a pickle that holds something other than parameters.
  """
  try:
    scan_pickle(f, size)
    f.seek(0)
    budget.charge(size, 'the file')
    budget.allow_copies(size)
    unpickler = SafeUnpickler(f, budget)
    obj = unpickler.load()
    del unpickler
  except UnsafePickleError as e:
    raise type(e)(f'{path}: {_one_line(e)}') from None
  except MemoryError:
    raise CheckpointTooLargeError(f'{path}: ran out of memory while unpickling') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
          AttributeError, IndexError, RecursionError, OverflowError) as e:
    raise pickle.UnpicklingError(f'{path}: corrupt or unsupported pickle: '
                                 f'{type(e).__name__}: {_one_line(e)}') from None
  return as_two_level(obj, path)


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split('\n'))
