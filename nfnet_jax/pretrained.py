"""Pretrained weights: DeepMind's released NFNet checkpoints, `.npz` files, timm ports.

Four ways in, one params layout out (`{module_path: {leaf: float32 array}}`, exactly
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
  file does not fill completely, or one referenced twice, is refused. The pickle is
  parsed in a child process with hard resource limits (`nfnet_jax.unpickle_child`),
  which passes back plain arrays, so a crash there is a refusal, not a dead caller.
  Only regular files are read (a FIFO would block forever).
* `load(path)` also reads safetensors files, timm's `model.safetensors` on the
  Hugging Face Hub among them, without torch (`nfnet_jax.safetensors_file`: the whole
  header checked, against the same budget, before anything is allocated); timm's
  names are converted by `timm_convert.from_timm`. `load('hf-hub:timm/<model>.<tag>')`
  fetches that file through huggingface_hub, if installed (`nfnet_jax.hub`).
* `save(params, path)` writes a real `.npz` (flattened keys, see below), atomically.
* `from_timm(arrays, timm_name)` converts timm's NF-family weights (numpy or torch).

Checkpoint key convention (`.npz`): one array per parameter, keyed
`<module path>/<leaf>`, e.g. `NFNet/~/stem_conv0/w` or `NFNet/stem_conv0/w`: the LAST
'/' splits the module path from the leaf name (module paths contain '/', leaf names
never do).

Module names. DeepMind's files name modules the way Haiku names modules built in a
parent's constructor: `NFNet/~/nf_block_3/~/conv1b`. Module paths are matched on their
"canonical" form, the path with every `~` component dropped (`NFNet/nf_block_3/conv1b`),
and renamed to whatever the model's own init produces, so a released file, a `save`d
file or a timm conversion all come out in the model's naming.

The restricted unpickler and its budget live in `nfnet_jax.safe_pickle`, the timm
converter in `nfnet_jax.timm_convert`, the module names and shapes a tree is matched
against in `nfnet_jax.param_match`; their public names are importable from here.
docs/pretrained.md describes the released files, the allowed globals and the budget.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import pickle
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from typing import Any, Mapping, Optional, Union

import numpy as np

from nfnet_jax import hub, timm_convert
from nfnet_jax.models import nfnet
from nfnet_jax.param_match import (canonical_name, classifier_module, format_list,
                                   match_to_model, model_leaves, model_shapes,
                                   released_name, to_released_names)
from nfnet_jax.safe_pickle import (ALLOWED_GLOBALS, MAX_CHECKPOINT_BYTES, Budget,
                                   CheckpointTooLargeError, Params, SafeUnpickler,
                                   UnsafePickleError, format_bytes, safe_loads,
                                   split_key)
from nfnet_jax.safetensors_file import is_safetensors, read_safetensors
from nfnet_jax.timm_convert import TIMM_MODEL_OVERRIDES, TIMM_STD_CONV_EPS, from_timm
from nfnet_jax.unpickle_child import read_params_in_child

__all__ = [
    'load', 'save', 'read_checkpoint', 'from_timm', 'infer_model', 'model_shapes',
    'canonical_name', 'released_name', 'to_released_names', 'SafeUnpickler',
    'UnsafePickleError', 'CheckpointTooLargeError', 'MAX_CHECKPOINT_BYTES',
    'MAX_NPZ_EXPANSION', 'safe_loads', 'ALLOWED_GLOBALS', 'TIMM_MODEL_OVERRIDES',
    'TIMM_STD_CONV_EPS', 'RELEASED_URL', 'RELEASED_VARIANTS',
]

log = logging.getLogger(__name__)

RELEASED_URL = 'https://storage.googleapis.com/dm-nfnets/{variant}_haiku.npz'
RELEASED_VARIANTS = ('F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6')

_PICKLE_MAGIC = b'\x80'
_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'
# torch.save's legacy (pre-1.6) format: a protocol-2 pickle of this magic number first.
_TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')

# An .npz whose arrays expand to more than this many times the archive's size on disk
# is refused as a zip bomb once they exceed _NPZ_EXPANSION_FLOOR: trained parameters
# barely compress (np.savez stores them uncompressed; savez_compressed saves a few %).
MAX_NPZ_EXPANSION = 20
_NPZ_EXPANSION_FLOOR = 64 * 2**20
_MAX_NPZ_MEMBERS = 100_000


# ---------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------
def _download_hint(path: str) -> str:
  m = re.search(r'(F[0-6])_haiku\.npz$', os.path.basename(path))
  variants = [m.group(1)] if m else list(RELEASED_VARIANTS)
  urls = ' '.join(RELEASED_URL.format(variant=v) for v in variants[:1])
  return (f'Download DeepMind\'s released weights ({", ".join(RELEASED_VARIANTS)}), e.g. '
          f'`wget {urls}` (the other variants: replace the F-number).')


def _torch_file(path: str) -> ValueError:
  return ValueError(
      f'{path}: a PyTorch checkpoint (torch.save); reading it needs torch: '
      f'`pretrained.from_timm(torch.load({path!r}, map_location="cpu"), ...)`, then '
      '`pretrained.save`; or load the model\'s model.safetensors (e.g. '
      f'"{hub.PREFIX}timm/<model>.<tag>"), which needs no torch')


def _describe_head(path: str, head: bytes) -> str:
  text = (f'{path}: unrecognised checkpoint format; first bytes {head[:16]!r}. '
          'Expected a pickle (first byte 0x80, protocol 2-5: DeepMind\'s released '
          '*_haiku.npz files), a zip .npz archive (b"PK\\x03\\x04") or a safetensors '
          'file (an 8-byte header length, then "{").')
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


def _read_npz(f, file_size: int, path: str, budget: Budget) -> Params:
  """Reads the .npz open in `f`: every member's .npy header first (sizes checked,
  nothing allocated), then the arrays, each filled completely from its member or
  refused."""
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
      if name == 'data.pkl' or name.endswith('/data.pkl'):
        raise _torch_file(path)  # torch.save's zip format (torch >= 1.6)
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
      module, leaf = split_key(key, path)
      try:
        with zf.open(info) as member:
          shape, fortran, dtype, header = _read_npy_header(member, what)
      except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise ValueError(f'{what}: damaged: {e}') from None
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
          f'{path}: its arrays expand to {format_bytes(declared)}, '
          f'{declared / max(file_size, 1):.0f}x the {format_bytes(file_size)} file (at '
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


def _model_leaves(model: Optional[str], num_classes: Optional[int]) -> list[tuple]:
  """(shape, dtype name) of every parameter of `model` ([] for None). The
  classifier's size is the file's until read: it is counted at max(1000, num_classes)
  classes (a file with more needs num_classes=its count)."""
  if model is None:
    return []
  classes = max(1000, int(num_classes or 0))
  return [(shape, dtype) for _, ls in model_leaves(model, classes)
          for _, shape, dtype in ls]


def _open_regular(path: str) -> tuple[int, int]:
  """Opens `path` for reading if it is a regular file: (descriptor, size).

  A FIFO, a device or a directory is refused before it is opened for reading (opening
  a FIFO blocks until a writer appears; reading a device may never end); the open
  itself does not block, and the descriptor is checked again in case the path changed.
  """
  def refuse(mode: int) -> ValueError:
    kind = ('a FIFO' if stat.S_ISFIFO(mode) else 'a directory' if stat.S_ISDIR(mode)
            else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else 'a socket' if stat.S_ISSOCK(mode) else 'not a regular file')
    return ValueError(f'{path}: is {kind}, not a regular file; a checkpoint is a file')

  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    raise refuse(mode)
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_NOCTTY', 0)
               | getattr(os, 'O_CLOEXEC', 0))
  st = os.fstat(fd)
  if not stat.S_ISREG(st.st_mode):
    os.close(fd)
    raise refuse(st.st_mode)
  os.set_blocking(fd, True)
  return fd, st.st_size


def read_checkpoint(path: Union[str, os.PathLike], *, model: Optional[str] = None,
                    num_classes: Optional[int] = None,
                    max_bytes: Optional[int] = None) -> Params:
  """Reads a checkpoint as stored: {module path: {leaf: ndarray}}, names untouched.

  `path` is a file, or a Hub name `hf-hub:<owner>/<repository>` (its
  `model.safetensors`, fetched through `nfnet_jax.hub`). The format is detected from
  the first bytes: 0x80 -> pickle (read with `SafeUnpickler`), `PK\\x03\\x04` -> `.npz`
  (headers first, no pickled members), an 8-byte length then '{' -> safetensors
  (`nfnet_jax.safetensors_file`: the whole header checked first). A safetensors file
  with timm's names ('stem.conv1.weight') comes back split at the last '.'
  ({'stem.conv1': {'weight': ...}}); `load` converts those names. torch.save files
  (zip with data.pkl, or the legacy pickle) are refused: they need torch.

  Memory is bounded before it is allocated: every declared size (pickle lengths,
  array shapes, .npy headers) is checked against `max_bytes` (default
  `MAX_CHECKPOINT_BYTES`) and, with `model`, against that model's parameters (dtype,
  largest parameter, total; the classifier at max(1000, `num_classes`) classes).
  Names and exact shapes are checked afterwards by `load`.

  Raises FileNotFoundError (with a download hint) for a missing file, ValueError for
  something other than a regular file, any other format or a damaged .npz,
  `UnsafePickleError` for a pickle with a disallowed global, arrays the file does not
  fill or a parser process that crashed or hit its limits, `CheckpointTooLargeError`
  (a subclass) for declared sizes over the budget; each is one line naming the file.
  """
  path = os.fspath(path)
  if hub.is_hub_name(path):
    path = hub.fetch(path)
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, f'No such checkpoint: {path!r}. '
                            + _download_hint(path), path)
  leaves = _model_leaves(model, num_classes)
  budget = Budget(path, max_bytes, model, leaves)
  fd, size = _open_regular(path)
  with os.fdopen(fd, 'rb') as f:
    head = f.read(16)
    if is_safetensors(head, size):
      return _two_level(read_safetensors(f, size, path, budget))
    if head.startswith(_TORCH_LEGACY_MAGIC):
      raise _torch_file(path)
    if head.startswith(_PICKLE_MAGIC):
      if len(head) < 2 or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(_describe_head(path, head))
      return read_params_in_child(f.fileno(), path, size, budget, leaves)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
      f.seek(0)
      try:
        return _read_npz(f, size, path, budget)
      except UnsafePickleError as e:
        if str(e).startswith(path):
          raise
        raise type(e)(f'{path}: {e}') from None
  raise ValueError(_describe_head(path, head))


def _two_level(tensors: Mapping[str, np.ndarray]) -> Params:
  """{name: array} -> {module: {leaf: array}}: split at the last '/' when every name
  has one (this package's `<module path>/<leaf>`), else at the last '.' (timm's
  `stages.0.0.conv1.weight`)."""
  sep = '/' if tensors and all('/' in k for k in tensors) else '.'
  params: Params = {}
  for key, array in tensors.items():
    module, _, leaf = key.rpartition(sep)
    params.setdefault(module, {})[leaf] = array
  return params


def _is_timm_naming(params: Mapping[str, Any]) -> bool:
  """timm's dotted names ('stages.0.0.conv1'): no module name has a '/' and some have
  a '.' (ours are 'NFNet/~/...'; Haiku names never hold a '.')."""
  return (bool(params) and not any('/' in m for m in params)
          and any('.' in m for m in params))


def _from_timm_names(raw: Params, model: Optional[str], path: str) -> Params:
  """Converts a tree read from a timm-named file to the model's names (through
  `timm_convert.from_timm`, the one place that knows timm's names)."""
  if model is None:
    raise ValueError(f'{path}: holds timm\'s parameter names ({format_list(list(raw), 2)}); '
                     'pass model=... (the timm model it belongs to)')
  flat = {f'{m}.{leaf}' if m else leaf: a for m, ls in raw.items() for leaf, a in ls.items()}
  try:
    return timm_convert.from_timm(flat, model)
  except ValueError as e:
    raise ValueError(str(e) if str(e).startswith(path) else f'{path}: {e}') from None


_BLOCK_RE = re.compile(r'^nf_block(?:_(\d+))?$')


def infer_model(params: Mapping[str, Any]) -> Optional[str]:
  """The NFNet variant ('F0'..'F7', 'F0+'..) a params tree belongs to, or None.

  Read from the structure alone: the number of blocks, the stage boundaries (the
  blocks that carry `conv_shortcut`) and the stem width.
  """
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
    path: a DeepMind release (`F0_haiku.npz`: a dill pickle, read safely), a real
      `.npz` written by `save`, or a safetensors file (timm's / the Hugging Face
      Hub's `model.safetensors`: timm's names are converted by
      `timm_convert.from_timm`; or this package's `<module>/<leaf>` names). The format
      is detected from the first bytes. Or a Hub name,
      `hf-hub:timm/eca_nfnet_l0.ra2_in1k`: its `model.safetensors`, downloaded and
      cached by huggingface_hub (`nfnet_jax.hub`), for the model its repository names.
    model: a registered model name ('F0'...). None: a Hub name's model; else inferred
      from the file's structure for NFNets (block count, stage boundaries, stem width);
      if that fails the file is returned as stored, unvalidated and unrenamed (a
      timm-named file needs `model`).
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
    FileNotFoundError (with a download hint), ValueError (unknown format, a torch.save
    file, a malformed safetensors header; names or shapes that do not match the model,
    naming the first differing keys), hub.HubError (a RuntimeError: a Hub name that
    can be neither downloaded nor found in the cache, naming the URL),
    UnsafePickleError (a pickle that references any non-allowed global, an array the
    file does not fill, one array referenced twice), CheckpointTooLargeError (declared
    sizes over the budget or the model's; refused before allocating).
  """
  path = os.fspath(path)
  if hub.is_hub_name(path):
    model = model or hub.model_name(path)
    try:
      model_leaves(model, 1000)  # an unknown model fails before a download
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None
    path = hub.fetch(path)
  raw = read_checkpoint(path, model=model, num_classes=num_classes, max_bytes=max_bytes)
  if not raw:
    raise ValueError(f'{path}: the checkpoint holds no parameters')
  if _is_timm_naming(raw):
    raw = _from_timm_names(raw, model, path)
    # timm's nf_resnet50 is `timm/nf_resnet50` here (DeepMind's model has the name).
    model = timm_convert.registry_name(model)
  if model is None:
    model = infer_model(raw)
    if model is None:
      log.warning('%s: could not infer the model from the checkpoint; returning it as '
                  'stored (pass model=... to validate and rename)', path)
      return _to_float32(raw, path)
    log.info('%s: inferred model %s', path, model)

  file_cls_module = classifier_module(raw)
  file_classes = None
  if file_cls_module is not None and 'w' in raw[file_cls_module]:
    file_classes = int(np.shape(raw[file_cls_module]['w'])[-1])
  target_classes = num_classes if num_classes is not None else (file_classes or 1000)
  expected = model_shapes(model, target_classes)
  reinit = num_classes is not None and num_classes != file_classes
  classifier = classifier_module(expected)
  if reinit and classifier is None:
    raise ValueError(f'model {model!r} has no top-level `linear` classifier to resize')
  if reinit and file_cls_module is not None:
    # The classifier's input width must still match the body.
    w = raw[file_cls_module].get('w')
    want_in = expected[classifier]['w'][0]
    if w is not None and np.shape(w)[0] != want_in:
      raise ValueError(f'{path} does not match model {model!r}: {file_cls_module}/w has '
                       f'{np.shape(w)[0]} inputs, the model\'s classifier {want_in}')
  params = match_to_model(raw, expected, path, model, skip_classifier=reinit)
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
  place with os.replace, so a reader never sees a half-written file; its mode is what
  the umask gives a new file (0644 under the usual 022). Floating arrays
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
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  """The process's umask, read without changing it where Linux shows it."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
  os.umask(mask)
  return mask
