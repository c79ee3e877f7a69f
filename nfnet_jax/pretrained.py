"""Pretrained weights: DeepMind's released NFNet checkpoints, `.npz` files, timm ports.

Three ways in, one params layout out (`{module_path: {leaf: float32 array}}`, exactly
the tree `nfnet_jax.models.create(name).init` gives, so `apply` takes it unchanged):

* `load(path)` reads DeepMind's released files (`F0_haiku.npz` ... `F6_haiku.npz` from
  `https://storage.googleapis.com/dm-nfnets/`), which despite the name are dill
  pickles, and real `.npz` files written by `save`. The format is detected from the
  file's first bytes, never from its extension. Pickles are read by a restricted
  unpickler (`SafeUnpickler`) that rebuilds numpy arrays and Haiku 2021's `FlatMapping`
  and refuses every other global, so a hostile file cannot run code.
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
"""
from __future__ import annotations

import collections
import errno
import functools
import io
import logging
import os
import pickle
import re
import tempfile
from typing import Any, Mapping, Optional, Union

import numpy as np

__all__ = [
    'load', 'save', 'read_checkpoint', 'from_timm', 'infer_model', 'model_shapes',
    'canonical_name', 'released_name', 'to_released_names', 'SafeUnpickler',
    'UnsafePickleError', 'safe_loads', 'ALLOWED_GLOBALS', 'TIMM_MODEL_OVERRIDES',
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
# Restricted unpickling.
# ---------------------------------------------------------------------------
class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global (or a value) outside the allow-list; nothing ran."""


def _numpy_reconstruct():
  try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 (and 1.26's alias)
  except ImportError:  # pragma: no cover - numpy 1.x without numpy._core
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


def _check_dtype(dtype: np.dtype, what: str) -> np.dtype:
  if dtype.hasobject:
    raise UnsafePickleError(f'{what}: object dtype {dtype!r} refused (object arrays can '
                            'carry arbitrary pickled objects; parameters are numeric)')
  return dtype


def _safe_reconstruct(subtype, shape, dtype_code):
  """`numpy.core.multiarray._reconstruct` for plain ndarrays of non-object dtype."""
  if subtype is not np.ndarray:
    raise UnsafePickleError(f'_reconstruct of {subtype!r} refused; only numpy.ndarray')
  _check_dtype(np.dtype(dtype_code), '_reconstruct')
  return _numpy_reconstruct()(np.ndarray, shape, dtype_code)


def _safe_dtype(*args, **kwargs):
  """`numpy.dtype(...)`, refusing object dtypes."""
  return _check_dtype(np.dtype(*args, **kwargs), 'numpy.dtype')


def _safe_scalar(dtype, data=None):
  """`numpy.core.multiarray.scalar(dtype, bytes)`: how np.float32(...) etc. pickle."""
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f'numpy scalar with dtype {dtype!r} refused')
  _check_dtype(dtype, 'numpy scalar')
  if isinstance(data, str):  # written by Python 2 / protocol < 3
    data = data.encode('latin1')
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError(f'numpy scalar payload of type {type(data).__name__} refused')
  return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _safe_frombuffer(buf, dtype, shape, order='C'):
  """`numpy.core.numeric._frombuffer` (numpy's protocol-5 array reduction)."""
  _check_dtype(np.dtype(dtype), '_frombuffer')
  if isinstance(buf, pickle.PickleBuffer):
    buf = buf.raw()
  return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _safe_codecs_encode(text, encoding='utf-8', errors='strict'):
  """`_codecs.encode(str, 'latin1')`: how protocol 2 stores `bytes` (numpy's raw data)."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'latin_1',
                                                    'iso-8859-1'):
    raise UnsafePickleError(f'_codecs.encode({type(text).__name__}, {encoding!r}) refused; '
                            'only latin1 text -> bytes')
  return text.encode('latin1', errors)


def _safe_dill_create_array(f, args, state, npdict=None):
  """`dill._dill._create_array`: dill's wrapper around an ndarray's own reduction."""
  if f is not _safe_reconstruct:
    raise UnsafePickleError('dill _create_array with a constructor other than '
                            'numpy _reconstruct refused')
  array = f(*args)
  array.__setstate__(state)
  _check_dtype(array.dtype, 'dill _create_array')
  if npdict:
    raise UnsafePickleError('dill _create_array with instance attributes refused')
  return array


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

  def __new__(cls, *args, **kwargs):
    if kwargs or len(args) != 1:
      raise pickle.UnpicklingError(
          f'haiku FlatMapping with {len(args)} positional and {len(kwargs)} keyword '
          'arguments; expected exactly one mapping')
    data = args[0]
    if isinstance(data, Mapping):
      return dict(data)
    if isinstance(data, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in data):
      return dict(data)
    raise pickle.UnpicklingError(
        f'haiku FlatMapping argument of type {type(data).__name__} not understood; '
        'expected a mapping or (key, value) pairs')


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed = {
      # numpy arrays / dtypes / scalars, numpy-1 and numpy-2 module names.
      ('numpy.core.multiarray', '_reconstruct'): _safe_reconstruct,
      ('numpy._core.multiarray', '_reconstruct'): _safe_reconstruct,
      ('numpy.core.multiarray', 'scalar'): _safe_scalar,
      ('numpy._core.multiarray', 'scalar'): _safe_scalar,
      ('numpy.core.numeric', '_frombuffer'): _safe_frombuffer,
      ('numpy._core.numeric', '_frombuffer'): _safe_frombuffer,
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): _safe_dtype,
      # dill (the released files are dill pickles) may wrap each array's reduction.
      ('dill._dill', '_create_array'): _safe_dill_create_array,
      # Haiku 2021's immutable params mapping.
      ('haiku._src.data_structures', 'FlatMapping'): _FlatMappingAsDict,
      # Plain containers; protocol 2 spells `bytes` as _codecs.encode(str, 'latin1').
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('_codecs', 'encode'): _safe_codecs_encode,
  }
  for name, obj in (('dict', dict), ('list', list), ('tuple', tuple), ('set', set),
                    ('frozenset', frozenset), ('bytearray', bytearray)):
    allowed[('builtins', name)] = obj
    allowed[('__builtin__', name)] = obj  # Python-2 spelling
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()
ALLOWED_GLOBALS = tuple(sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS))


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals in `ALLOWED_GLOBALS`.

  Each allowed global maps to a harmless equivalent defined here (numpy arrays, dtypes
  and scalars of non-object dtype, Haiku's FlatMapping as a plain dict, plain
  containers); any other global raises `UnsafePickleError` naming `module.name`
  before anything is called. Persistent ids and out-of-band buffers are refused too.
  """

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'refusing to load global {module}.{name}: not an array, dtype, '
          'FlatMapping or plain container (nothing was executed)') from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f'refusing persistent id {pid!r}')


def safe_loads(data: Union[bytes, bytearray, memoryview]) -> Any:
  """Unpickles `data` with `SafeUnpickler`."""
  return SafeUnpickler(io.BytesIO(data)).load()


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


def _read_npz(path: str) -> Params:
  params: Params = {}
  with np.load(path, allow_pickle=False) as npz:
    for key in npz.files:
      module, leaf = _split_key(key, path)
      params.setdefault(module, {})[leaf] = npz[key]
  return params


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


def read_checkpoint(path: Union[str, os.PathLike]) -> Params:
  """Reads a checkpoint as stored: {module path: {leaf: ndarray}}, names untouched.

  The format is detected from the first bytes: 0x80 -> pickle (read with
  `SafeUnpickler`), `PK\\x03\\x04` -> `.npz` (read with allow_pickle=False). Raises
  FileNotFoundError (with a download hint) for a missing file, ValueError for any
  other format, `UnsafePickleError` for a pickle with a disallowed global.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, f'No such checkpoint: {path!r}. '
                            + _download_hint(path), path)
  with open(path, 'rb') as f:
    head = f.read(16)
    if head.startswith(_PICKLE_MAGIC):
      if len(head) < 2 or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(_describe_head(path, head))
      f.seek(0)
      try:
        obj = SafeUnpickler(f).load()
      except UnsafePickleError as e:
        raise UnsafePickleError(f'{path}: {e}') from None
      except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
              AttributeError, IndexError) as e:
        raise pickle.UnpicklingError(f'{path}: corrupt or unsupported pickle: '
                                     f'{type(e).__name__}: {e}') from e
      return _as_two_level(obj, path)
  if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
    return _read_npz(path)
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
  out: Params = {}
  for module, leaves in params.items():
    for leaf, array in leaves.items():
      array = np.asarray(array)
      if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'):
        raise ValueError(f'{source}: {module}/{leaf} has dtype {array.dtype}, expected '
                         'floating point')
      out.setdefault(module, {})[leaf] = np.asarray(array, dtype=np.float32, order='C')
  return out


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
         num_classes: Optional[int] = None, rng: Any = None) -> Params:
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

  Returns:
    {module: {leaf: float32 numpy array}} with exactly the model's module names,
    leaves and shapes: `create(model, num_classes).apply(params, ...)` takes it as is.

  Raises:
    FileNotFoundError (with a download hint), ValueError (unknown format; names or
    shapes that do not match the model, naming the first differing keys),
    UnsafePickleError (a pickle that references any non-allowed global).
  """
  path = os.fspath(path)
  raw = read_checkpoint(path)
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
