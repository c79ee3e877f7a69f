"""nfnet_jax.pretrained: released-checkpoint loader, safe unpickling, npz, timm converter.

DeepMind's released files cannot be downloaded here, so the tests write files that are
faithful to them: two-level mappings keyed by `NFNet/~/...`, pickled (as dill did in
2021) with numpy-1 global names (`numpy.core.multiarray._reconstruct`) and Haiku 2021's
`haiku._src.data_structures.FlatMapping` at both levels, at protocols 2, 3, 4 (and 5),
optionally with dill's `_create_array` wrapper. `LegacyPickler` below emits exactly those
globals whatever numpy and Haiku are installed.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nf_testing import JIT  # -O0: one forward pass per compile
from nfnet_jax import pretrained
from nfnet_jax.pretrained import UnsafePickleError

FIXTURES = Path(__file__).parent / 'fixtures'


def _load_make_fixtures():
  spec = importlib.util.spec_from_file_location('make_fixtures',
                                                FIXTURES / 'make_fixtures.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


mk = _load_make_fixtures()


# ---------------------------------------------------------------------------
# Writing pickles the way the released files were written.
# ---------------------------------------------------------------------------
def _stub(module: str, name: str):
  def stub(*args, **kwargs):
    raise AssertionError(f'{module}.{name} stand-in called while writing')
  stub.__module__, stub.__name__, stub.__qualname__ = module, name, name
  return stub


_RECONSTRUCT = _stub('numpy.core.multiarray', '_reconstruct')
_SCALAR = _stub('numpy.core.multiarray', 'scalar')
_FLATMAPPING = _stub('haiku._src.data_structures', 'FlatMapping')
_DILL_CREATE_ARRAY = _stub('dill._dill', '_create_array')
_STUBS = {id(s): s for s in (_RECONSTRUCT, _SCALAR, _FLATMAPPING, _DILL_CREATE_ARRAY)}


class FlatMapping(dict):
  """Marks a mapping that Haiku 2021 held as a FlatMapping (pickled as such)."""


class LegacyPickler(pickle._Pickler):  # the pure-Python pickler, as dill's base class
  """Pickles numpy arrays under numpy-1 names and FlatMapping as Haiku 2021 did.

  ndarray -> numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') + BUILD
  state (or dill's `_create_array(_reconstruct, args, state, None)`), numpy scalars ->
  numpy.core.multiarray.scalar(dtype, bytes), FlatMapping(d) -> REDUCE of
  haiku._src.data_structures.FlatMapping on the plain dict (its `__reduce__`).
  """

  def __init__(self, file, protocol, dill_arrays=False):
    super().__init__(file, protocol=protocol)
    self.dill_arrays = dill_arrays

  def reducer_override(self, obj):
    if id(obj) in _STUBS and _STUBS[id(obj)] is obj:
      return obj.__qualname__  # -> save_global below
    if type(obj) is np.ndarray:
      _, args, state = obj.__reduce__()
      if self.dill_arrays:
        return (_DILL_CREATE_ARRAY, (_RECONSTRUCT, args, state, None))
      return (_RECONSTRUCT, args, state)
    if isinstance(obj, np.generic):
      return (_SCALAR, (obj.dtype, obj.tobytes()))
    if type(obj) is FlatMapping:
      return (_FLATMAPPING, (dict(obj),))
    return NotImplemented

  def save_global(self, obj, name=None):
    if id(obj) not in _STUBS:
      return super().save_global(obj, name)
    module, qualname = obj.__module__, obj.__qualname__
    if self.proto >= 4:
      self.save(module)
      self.save(qualname)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f'{module}\n{qualname}\n'.encode())
    self.memoize(obj)


def write_released(params, path, protocol=4, dill_arrays=False):
  """Writes params in the released layout: FlatMapping{name: FlatMapping{leaf: arr}}."""
  tree = FlatMapping({pretrained.released_name(m): FlatMapping(
      {leaf: a if isinstance(a, np.generic) else np.asarray(a)
       for leaf, a in leaves.items()}) for m, leaves in params.items()})
  with open(path, 'wb') as f:
    LegacyPickler(f, protocol, dill_arrays).dump(tree)


def _pickle_globals_by_load(path) -> set[str]:
  """The globals a pickle asks for, recorded by an unpickler that resolves them safely."""
  seen = set()

  class Recorder(pretrained.SafeUnpickler):
    def find_class(self, module, name):
      seen.add(f'{module}.{name}')
      return super().find_class(module, name)

  with open(path, 'rb') as f:
    Recorder(f).load()
  return seen


# ---------------------------------------------------------------------------
# Shared data.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def f0_shapes():
  return pretrained.model_shapes('F0')  # jax.eval_shape of the model's init


def random_params(shapes, seed=0):
  """Random float32 params on the init tree (skip gains non-zero, unlike init's 0)."""
  rng = np.random.default_rng(seed)
  out = {}
  for module, leaves in shapes.items():
    out[module] = {}
    for leaf, shape in leaves.items():
      if leaf == 'skip_gain':
        a = rng.uniform(0.2, 1.0, shape)
      elif leaf == 'gain':
        a = rng.uniform(0.5, 1.5, shape)
      elif leaf in ('bias', 'b'):
        a = 0.1 * rng.standard_normal(shape)
      elif len(shape) == 2:  # linear (in, out)
        a = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[0])
      else:
        a = rng.standard_normal(shape, dtype=np.float32)
      out[module][leaf] = np.asarray(a, np.float32)
  return out


@pytest.fixture(scope='module')
def f0_params(f0_shapes):
  return random_params(f0_shapes, seed=0)


def assert_same_params(a, b):
  assert list(a) == list(b)
  for m in a:
    assert list(a[m]) == list(b[m]) or set(a[m]) == set(b[m]), m
    for leaf in a[m]:
      x, y = np.asarray(a[m][leaf]), np.asarray(b[m][leaf])
      assert x.dtype == y.dtype == np.float32, (m, leaf)
      assert x.shape == y.shape, (m, leaf)
      assert np.array_equal(x, y), (m, leaf)


# ---------------------------------------------------------------------------
# The released layout: names, shapes, module counts.
# ---------------------------------------------------------------------------
def test_fixture_tables_match_their_derivation():
  released = json.loads((FIXTURES / 'nfnet_f0_released_keys.json').read_text())
  timm = json.loads((FIXTURES / 'timm_dm_nfnet_f0_keys.json').read_text())
  assert released['rows'] == mk.released_table('F0')
  assert released['num_modules'] == 94
  assert timm['keys'] == mk.timm_dm_nfnet_keys('F0')
  # F0's parameter count (the paper's 71.5M) from both independent tables.
  assert sum(math.prod(r[2]) for r in released['rows']) == 71_489_284
  assert sum(math.prod(k[1]) for k in timm['keys']) == 71_489_284


def test_module_counts_from_the_architecture():
  counts = {v: mk.released_module_count(v) for v in mk.DEPTHS}
  assert counts == {'F0': 94, 'F1': 178, 'F2': 262, 'F3': 346, 'F4': 430, 'F5': 514,
                    'F6': 598}


@pytest.mark.parametrize('variant', [
    'F0', *[pytest.param(v, marks=pytest.mark.slow) for v in ('F1', 'F2', 'F3', 'F4',
                                                               'F5', 'F6')]])
def test_model_init_has_released_modules_and_shapes(variant):
  """Every released (module, leaf, shape) of F0..F6 is exactly the model's init."""
  shapes = pretrained.model_shapes(variant)
  assert len(shapes) == mk.RELEASED_MODULE_COUNTS[variant]
  expected = {}
  for module, leaf, shape in mk.released_table(variant):
    expected.setdefault(pretrained.canonical_name(module), {})[leaf] = tuple(shape)
  got = {pretrained.canonical_name(m): leaves for m, leaves in shapes.items()}
  assert got == expected


def test_f0_key_table_fixture_against_init(f0_shapes):
  rows = json.loads((FIXTURES / 'nfnet_f0_released_keys.json').read_text())['rows']
  table = {(pretrained.canonical_name(m), leaf): tuple(s) for m, leaf, s in rows}
  init = {(pretrained.canonical_name(m), leaf): s
          for m, leaves in f0_shapes.items() for leaf, s in leaves.items()}
  assert len(table) == len(rows) == 233
  assert table == init
  # released_name() rebuilds DeepMind's names from the model's.
  assert sorted({pretrained.released_name(m) for m in f0_shapes}) == sorted(
      {m for m, _, _ in rows})


def test_model_module_names_are_exactly_the_released_names(f0_shapes):
  """The model's own module tree has the released names (`~` included)."""
  rows = json.loads((FIXTURES / 'nfnet_f0_released_keys.json').read_text())['rows']
  assert set(f0_shapes) == {m for m, _, _ in rows}


def test_infer_model_from_structure():
  for v in ('F0', 'F3', 'F6'):
    tree = {}
    for module, leaf, shape in mk.released_table(v):
      tree.setdefault(module, {})[leaf] = np.broadcast_to(np.float32(0), shape)
    assert pretrained.infer_model(tree) == v
  assert pretrained.infer_model({'foo/bar': {'w': np.zeros(1)}}) is None


# ---------------------------------------------------------------------------
# Safe unpickling of released-style pickles.
# ---------------------------------------------------------------------------
def test_allowed_globals_are_exactly_the_documented_set():
  assert set(pretrained.ALLOWED_GLOBALS) == {
      'numpy.core.multiarray._reconstruct', 'numpy._core.multiarray._reconstruct',
      'numpy.core.multiarray.scalar', 'numpy._core.multiarray.scalar',
      'numpy.core.numeric._frombuffer', 'numpy._core.numeric._frombuffer',
      'numpy.ndarray', 'numpy.dtype', 'dill._dill._create_array',
      'haiku._src.data_structures.FlatMapping', 'collections.OrderedDict',
      '_codecs.encode',
      *[f'{m}.{n}' for m in ('builtins', '__builtin__')
        for n in ('dict', 'list', 'tuple', 'set', 'frozenset', 'bytearray')]}


SMALL = {
    'NFNet/stem_conv0': {'w': np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4),
                         'gain': np.ones(4, np.float32), 'bias': np.zeros(4, np.float32)},
    'NFNet/nf_block': {'skip_gain': np.float32(0.25)},  # a numpy scalar, not an array
    'NFNet/nf_block/squeeze_excite/linear_1': {
        'w': np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        'b': np.array([1.5, -2.5, 3.0], np.float32)},
    'NFNet/linear': {'w': np.asfortranarray(np.eye(3, 5, dtype=np.float32)),
                     'b': np.zeros(5, np.float32)},
}


@pytest.mark.parametrize('dill_arrays', [False, True], ids=['pickle', 'dill'])
@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_small_released_style_pickles(tmp_path, protocol, dill_arrays):
  path = tmp_path / 'F0_haiku.npz'
  write_released(SMALL, path, protocol, dill_arrays)
  raw = path.read_bytes()
  assert raw[:2] == bytes([0x80, protocol])
  used = _pickle_globals_by_load(path)
  expected = {'numpy.core.multiarray._reconstruct', 'numpy.core.multiarray.scalar',
              'numpy.ndarray', 'numpy.dtype', 'haiku._src.data_structures.FlatMapping'}
  if protocol == 2:
    expected.add('_codecs.encode')  # how protocol 2 spells bytes
  if dill_arrays:
    expected.add('dill._dill._create_array')
  assert used == expected
  assert b'numpy._core' not in raw  # numpy-1 names only, as written in 2021

  got = pretrained.read_checkpoint(path)
  assert list(got) == [pretrained.released_name(m) for m in SMALL]
  for m, leaves in SMALL.items():
    for leaf, a in leaves.items():
      b = got[pretrained.released_name(m)][leaf]
      assert isinstance(b, np.ndarray) and b.dtype == np.float32
      assert b.shape == np.shape(a) and np.array_equal(b, a), (m, leaf)


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_current_numpy_pickles_load(protocol):
  """Pickles written by today's numpy (numpy._core names; protocol 5: _frombuffer)."""
  tree = {'NFNet/~/linear': {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
                             'b': np.float32(2.5)}}
  got = pretrained.safe_loads(pickle.dumps(tree, protocol=protocol))
  np.testing.assert_array_equal(got['NFNet/~/linear']['w'], tree['NFNet/~/linear']['w'])
  assert got['NFNet/~/linear']['b'] == np.float32(2.5)


def _flatmapping_of(arg) -> bytes:
  """A pickle of haiku's FlatMapping applied to `arg` (REDUCE), as Haiku wrote it."""

  class Reduces:
    def __reduce__(self):
      return (_FLATMAPPING, (arg,))

  buf = io.BytesIO()
  LegacyPickler(buf, 4).dump(Reduces())
  return buf.getvalue()


def test_flatmapping_accepts_pairs_and_newobj():
  got = pretrained.safe_loads(_flatmapping_of({'a': 1}))
  assert got == {'a': 1} and type(got) is dict
  assert pretrained.safe_loads(_flatmapping_of([('a', 1), ('b', 2)])) == {'a': 1, 'b': 2}
  # NEWOBJ: cls.__new__(cls, *args) as a protocol-2+ pickle of a class instance does.
  data = (b'\x80\x04\x8c\x1ahaiku._src.data_structures\x8c\x0bFlatMapping\x93'
          b'}\x8c\x01k\x8c\x01vs\x85\x81.')
  assert pretrained.safe_loads(data) == {'k': 'v'}
  with pytest.raises(pickle.UnpicklingError, match='FlatMapping'):
    pretrained.safe_loads(_flatmapping_of(42))


def test_released_f0_pickle_loads_into_the_model_tree(tmp_path, f0_params, f0_shapes):
  path = tmp_path / 'F0_haiku.npz'
  write_released(f0_params, path, protocol=4, dill_arrays=True)
  assert b'NFNet/~/nf_block_3/~/conv1b' in path.read_bytes()
  loaded = pretrained.load(path, model='F0')
  assert list(loaded) == list(f0_shapes)  # the model's own names and order
  assert_same_params(loaded, f0_params)
  # model=None: inferred from the structure.
  assert_same_params(pretrained.load(path), f0_params)


@pytest.mark.parametrize('protocol', [pytest.param(2, marks=pytest.mark.slow), 3])
def test_released_f0_pickle_other_protocols(tmp_path, f0_params, protocol):
  path = tmp_path / 'F0_haiku.npz'
  write_released(f0_params, path, protocol=protocol)
  assert_same_params(pretrained.load(path, model='F0'), f0_params)


@pytest.mark.slow
def test_round_trip_identical_logits(tmp_path, f0_params):
  """Params on init's tree -> released layout -> load -> bit-identical logits.

  Random values rather than init's: init sets every skip gain to 0, which switches
  every residual branch off and would make the comparison prove little.
  """
  import jax
  import jax.numpy as jnp

  from nfnet_jax import models

  net = models.create('F0')
  init_tree = jax.eval_shape(lambda r, x: net.init(r, x, is_training=False),
                             jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert {m: {k: v.shape for k, v in l.items()} for m, l in init_tree.items()} == {
      m: {k: v.shape for k, v in l.items()} for m, l in f0_params.items()}
  path = tmp_path / 'F0_haiku.npz'
  write_released(f0_params, path, protocol=4, dill_arrays=True)
  loaded = pretrained.load(path, model='F0')
  apply = jax.jit(lambda p, x: net.apply(p, None, x, is_training=False)['logits'],
                  **JIT)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 64, 3), np.float32))
  ref = np.asarray(apply(f0_params, x))
  got = np.asarray(apply(loaded, x))
  assert np.all(np.isfinite(ref)) and np.std(ref) > 0
  np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------
# Refusals and errors.
# ---------------------------------------------------------------------------
class _Payload:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _evil_payloads(marker: Path):
  import builtins
  return {
      'os.system': _Payload(os.system, (f'touch {marker}',)),
      'builtins.eval': _Payload(builtins.eval, (f'open({str(marker)!r}, "w").close()',)),
      'subprocess.Popen': _Payload(subprocess.Popen, (['touch', str(marker)],)),
  }


@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('which', ['os.system', 'builtins.eval', 'subprocess.Popen'])
def test_pickle_with_other_globals_is_refused_and_nothing_runs(tmp_path, which, protocol):
  marker = tmp_path / 'pwned'
  payload = _evil_payloads(marker)[which]
  # Hidden where a parameter would be, inside FlatMappings, as an attacker would.
  tree = FlatMapping({'NFNet/~/linear': FlatMapping({'w': np.zeros(2, np.float32),
                                                     'b': payload})})
  buf = io.BytesIO()
  LegacyPickler(buf, protocol).dump(tree)
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(buf.getvalue())
  pattern = {'os.system': rf'{os.system.__module__}\.system',  # posix.system
             'builtins.eval': r'(builtins|__builtin__)\.eval',  # protocol 2: __builtin__
             'subprocess.Popen': r'(subprocess|commands)\.Popen'}[which]  # protocol 2: commands
  with pytest.raises(UnsafePickleError, match=pattern) as e:
    pretrained.load(path, model='F0')
  assert str(path) in str(e.value)
  assert isinstance(e.value, pickle.UnpicklingError)
  assert not marker.exists()


def test_refusal_control_plain_pickle_would_have_run(tmp_path):
  """The payloads are live: an unrestricted unpickler runs them (harmless: a file)."""
  marker = tmp_path / 'pwned'
  data = pickle.dumps(_evil_payloads(marker)['builtins.eval'], protocol=2)
  with pytest.raises(UnsafePickleError):
    pretrained.safe_loads(data)
  assert not marker.exists()
  pickle.loads(data)
  assert marker.exists()


def test_object_arrays_are_refused(tmp_path):
  data = pickle.dumps({'NFNet/~/linear': {'w': np.array([{'a': 1}], dtype=object)}},
                      protocol=4)
  with pytest.raises(UnsafePickleError, match='object'):
    pretrained.safe_loads(data)


def test_missing_file_hints_download(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'storage\.googleapis\.com/dm-nfnets/F3_haiku'):
    pretrained.load(tmp_path / 'F3_haiku.npz')
  with pytest.raises(FileNotFoundError, match='dm-nfnets'):
    pretrained.load(tmp_path / 'weights.bin')


@pytest.mark.parametrize('content,hint', [
    (b'\x00\x01garbage-bytes', r"b'\\x00\\x01garbage"),
    (b'<!DOCTYPE html><html>AccessDenied', 'HTML'),
    (b'\x1f\x8b\x08\x00', 'gzip'),
    (b'\x93NUMPY\x01\x00', 'single .npy'),
    (b'\x80\x09\x00', r"b'\\x80\\t"),  # pickle magic with an impossible protocol
])
def test_unknown_format_names_file_and_bytes(tmp_path, content, hint):
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=hint) as e:
    pretrained.load(path, model='F0')
  assert str(path) in str(e.value) and 'first bytes' in str(e.value)


def test_truncated_pickle_is_a_clear_error(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  write_released(SMALL, path, protocol=4)
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(pickle.UnpicklingError, match='corrupt or unsupported'):
    pretrained.read_checkpoint(path)


def test_mismatch_errors_name_the_keys(tmp_path, f0_params):
  path = tmp_path / 'F0_haiku.npz'
  # An F0 file asked for as F1: F1's extra blocks are missing.
  pretrained.save(f0_params, path)
  with pytest.raises(ValueError, match=r"model 'F1'.*missing: NFNet/[~/]*nf_block_12/"):
    pretrained.load(path, model='F1')
  # A changed shape and an extra module are named, with both shapes.
  bad = {m: dict(l) for m, l in f0_params.items()}
  by_canon = {pretrained.canonical_name(m): m for m in bad}
  module = by_canon['NFNet/nf_block_3/conv1b']
  bad[module]['w'] = np.zeros((3, 3, 64, 768), np.float32)
  bad['NFNet/extra_thing'] = {'w': np.zeros(3, np.float32)}
  del bad[by_canon['NFNet/nf_block_1/squeeze_excite/linear_1']]
  write_released(bad, path, protocol=4)
  with pytest.raises(ValueError) as e:
    pretrained.load(path, model='F0')
  msg = str(e.value)
  assert 'NFNet/~/nf_block_3/~/conv1b/w (3, 3, 64, 768) (model: (3, 3, 128, 768))' in msg
  assert 'unexpected: NFNet/~/extra_thing/w' in msg
  assert re.search(r'2 missing: NFNet/(~/)?nf_block_1/(~/)?squeeze_excite/(~/)?linear_1/[bw]',
                   msg), msg


def test_num_classes_reinitialises_only_the_classifier(tmp_path, f0_params, caplog):
  import jax
  path = tmp_path / 'F0_haiku.npz'
  write_released(f0_params, path, protocol=4)
  with caplog.at_level(logging.INFO, logger='nfnet_jax.pretrained'):
    tuned = pretrained.load(path, model='F0', num_classes=10, rng=jax.random.PRNGKey(3))
  assert any('re-initialised' in r.getMessage() and '10 requested' in r.getMessage()
             for r in caplog.records)
  classifier = next(m for m in tuned if pretrained.canonical_name(m) == 'NFNet/linear')
  assert tuned[classifier]['w'].shape == (3072, 10)
  assert tuned[classifier]['b'].shape == (10,) and not tuned[classifier]['b'].any()
  assert 0.008 < tuned[classifier]['w'].std() < 0.012
  assert abs(tuned[classifier]['w'].mean()) < 0.002
  assert list(tuned) == list(pretrained.model_shapes('F0', 10))
  body = {m: l for m, l in tuned.items() if m != classifier}
  assert_same_params(body, {m: l for m, l in f0_params.items() if m != classifier})
  again = pretrained.load(path, model='F0', num_classes=10, rng=3)
  np.testing.assert_array_equal(again[classifier]['w'], tuned[classifier]['w'])
  # Same class count as the file: nothing re-initialised.
  same = pretrained.load(path, model='F0', num_classes=1000)
  np.testing.assert_array_equal(same[classifier]['w'], f0_params[classifier]['w'])


# ---------------------------------------------------------------------------
# .npz files.
# ---------------------------------------------------------------------------
def test_npz_save_load_round_trip(tmp_path, f0_params, f0_shapes):
  path = tmp_path / 'ckpt.npz'
  path.write_bytes(b'old contents')  # replaced atomically
  pretrained.save(f0_params, path)
  assert path.read_bytes()[:4] == b'PK\x03\x04'
  assert sorted(os.listdir(tmp_path)) == ['ckpt.npz']  # no temporary left behind
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  assert len(names) == 233 and all(n.endswith('.npy') for n in names)
  with np.load(path, allow_pickle=False) as npz:
    assert set(npz.files) == {f'{m}/{leaf}' for m, l in f0_params.items() for leaf in l}
  assert_same_params(pretrained.load(path, model='F0'), f0_params)
  # Released names in an npz (e.g. a converted file) load into the model's names too.
  pretrained.save(pretrained.to_released_names(SMALL), tmp_path / 'small.npz')
  raw = pretrained.read_checkpoint(tmp_path / 'small.npz')
  assert set(raw) == {pretrained.released_name(m) for m in SMALL}
  assert raw['NFNet/~/nf_block']['skip_gain'].shape == ()


@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_gives_the_mode_the_umask_gives_a_new_file(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    pretrained.save(SMALL, tmp_path / 'w.npz')
    with open(tmp_path / 'plain', 'wb'):  # what any new file gets under this umask
      pass
  finally:
    os.umask(old)
  assert (tmp_path / 'w.npz').stat().st_mode & 0o777 == mode
  assert (tmp_path / 'plain').stat().st_mode & 0o777 == mode
  assert sorted(os.listdir(tmp_path)) == ['plain', 'w.npz']


def test_npz_with_bad_key_is_named(tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, noslash=np.zeros(2))
  with pytest.raises(ValueError, match="'noslash'"):
    pretrained.read_checkpoint(path)


# ---------------------------------------------------------------------------
# timm.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def timm_sd():
  """A random state_dict with exactly the keys and shapes of the timm fixture."""
  rows = json.loads((FIXTURES / 'timm_dm_nfnet_f0_keys.json').read_text())['keys']
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(s, dtype=np.float32) if s else np.float32(rng.uniform())
          for k, s in rows}


class _TensorLike:
  """Quacks like a torch tensor: .detach().cpu().numpy()."""

  def __init__(self, a):
    self.a = a

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.a


def test_from_timm_on_the_key_fixture(f0_shapes, timm_sd):
  sd = timm_sd
  sd_tensors = {k: _TensorLike(v) for k, v in sd.items()}
  params = pretrained.from_timm(sd_tensors, variant='F0')
  # Shapes are exactly the model's init, every key consumed.
  assert {m: {k: v.shape for k, v in l.items()} for m, l in params.items()} == f0_shapes
  assert sum(len(l) for l in params.values()) == len(sd) == 233
  mod = {pretrained.canonical_name(m): m for m in params}
  p = lambda name: params[mod[name]]
  # Layout transforms.
  w = sd['stages.2.1.conv2.weight']  # block index 1 + 2 + 1 = 4, grouped 3x3
  np.testing.assert_array_equal(p('NFNet/nf_block_4/conv1')['w'], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p('NFNet/nf_block_4/conv1')['gain'],
                                sd['stages.2.1.conv2.gain'][:, 0, 0, 0])
  np.testing.assert_array_equal(p('NFNet/nf_block_3/conv_shortcut')['w'][0, 0],
                                sd['stages.2.0.downsample.conv.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(p('NFNet/nf_block_11/conv1b')['bias'],
                                sd['stages.3.2.conv2b.bias'])
  np.testing.assert_array_equal(p('NFNet/nf_block/squeeze_excite/linear')['w'],
                                sd['stages.0.0.attn_last.fc1.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(p('NFNet/nf_block_2/squeeze_excite/linear_1')['b'],
                                sd['stages.1.1.attn_last.fc2.bias'])
  assert p('NFNet/nf_block_7')['skip_gain'] == sd['stages.2.4.skipinit_gain']
  np.testing.assert_array_equal(p('NFNet/stem_conv3')['w'],
                                sd['stem.conv4.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p('NFNet/final_conv')['w'][0, 0],
                                sd['final_conv.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(p('NFNet/linear')['w'], sd['head.fc.weight'].T)
  # DataParallel prefix is accepted.
  assert list(pretrained.from_timm({'module.' + k: v for k, v in sd.items()})) == list(params)


def test_from_timm_errors_name_keys(timm_sd):
  sd = timm_sd
  with pytest.raises(ValueError, match=r'not understood.*stages\.0\.0\.attn\.fc9\.weight'):
    pretrained.from_timm({**sd, 'stages.0.0.attn.fc9.weight': np.zeros(1)})
  missing = dict(sd)
  del missing['stages.1.1.conv2b.gain']
  with pytest.raises(ValueError, match=r'missing: NFNet/[~/]*nf_block_2/[~/]*conv1b/gain'):
    pretrained.from_timm(missing)
  with pytest.raises(ValueError, match='stage 0 block 1 does not exist'):
    pretrained.from_timm({**sd, 'stages.0.1.conv1.bias': np.zeros(128)})
  with pytest.raises(ValueError, match=r'\(O,1,1,1\) gain'):
    pretrained.from_timm({**sd, 'stem.conv1.gain': np.ones(16, np.float32)})


def test_timm_overrides_reproduce_timm_weight_standardisation():
  """TIMM_MODEL_OVERRIDES' WS equals timm's ScaledStdConv2dSame formula (numpy)."""
  from nfnet_jax import layers
  assert pretrained.TIMM_MODEL_OVERRIDES == dict(activation='gelu_exact', ws_eps=1e-5,
                                                 ws_eps_mode='add')
  rng = np.random.default_rng(0)
  for shape, scale in (((8, 4, 3, 3), 1.0), ((6, 5, 1, 1), 1e-3)):  # tiny var: eps matters
    w = scale * rng.standard_normal(shape)
    gain = rng.uniform(0.5, 1.5, (shape[0], 1, 1, 1))
    # timm: F.batch_norm(w.reshape(1, O, -1), weight=(gain * fan_in**-0.5).view(-1),
    # training=True, eps=1e-5) -> (w - mean) / sqrt(biased var + eps) * gain * scale.
    flat = w.reshape(shape[0], -1)
    fan_in = flat.shape[1]
    ref = ((flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
           * gain.reshape(-1, 1) * fan_in ** -0.5).reshape(shape)
    ours = layers.standardize_weight(np.float32(w.transpose(2, 3, 1, 0)),
                                     np.float32(gain.reshape(-1)), eps=1e-5, eps_mode='add')
    np.testing.assert_allclose(np.asarray(ours).transpose(3, 2, 0, 1), ref, rtol=2e-5,
                               atol=1e-6)


# Tolerance of the timm comparison, float32 on CPU for both frameworks: logits agree to
# max|diff| <= 1e-4 * max|logits| + 1e-5 (seen with timm 1.0.29 / torch 2.11 / jax 0.11:
# 1.2e-6 at max|logits| 1.65, i.e. 7e-7 relative). With TIMM_MODEL_OVERRIDES the two compute the
# same function (same WS formula and eps 1e-5, erf GELU, TF-style SAME padding, SE x2,
# skip gains); what is left is float32 rounding of convolutions summed in a different
# order through ~50 layers (~1e-6 relative each).
TIMM_RTOL = 1e-4


def test_timm_logits_match(tmp_path):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  import jax
  import jax.numpy as jnp

  from nfnet_jax import models

  torch.manual_seed(0)
  model = timm.create_model('dm_nfnet_f0', pretrained=False).eval()
  sd = model.state_dict()
  # The fixture derived from timm's source is the real state_dict, order included.
  rows = json.loads((FIXTURES / 'timm_dm_nfnet_f0_keys.json').read_text())['keys']
  real = [[k, list(v.shape)] for k, v in sd.items()]
  fixture_diff = [(a, b) for a, b in zip(real, rows) if a != b][:5]
  if len(real) != len(rows) or fixture_diff:
    print(f'timm {timm.__version__}: {len(real)} keys, fixture {len(rows)}; first '
          f'differences (real, fixture): {fixture_diff}')
  # Randomise everything timm inits to constants (gains 1, biases 0, skip gains 0).
  with torch.no_grad():
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
      if name.endswith('skipinit_gain'):
        p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=g))
      elif name.endswith('.gain'):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.endswith('.bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif name == 'head.fc.weight':
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
  params = pretrained.from_timm(model.state_dict(), variant='F0')
  x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  cpu = jax.devices('cpu')[0]
  results = {}
  for label, overrides in (('timm', pretrained.TIMM_MODEL_OVERRIDES), ('deepmind', {})):
    net = models.create('F0', **overrides)
    apply = jax.jit(lambda p, x: net.apply(p, None, x, is_training=False)['logits'])
    with jax.default_device(cpu), jax.default_matmul_precision('highest'):
      out = apply(jax.device_put(params, cpu), jax.device_put(x, cpu))
    results[label] = float(np.abs(np.asarray(out) - ref).max())
  scale = float(np.abs(ref).max())
  print(f'timm {timm.__version__}, torch {torch.__version__}, jax {jax.__version__}: '
        f'logits max|.| {scale:.4g}; max|diff| with TIMM_MODEL_OVERRIDES '
        f'{results["timm"]:.3g}, with DeepMind defaults {results["deepmind"]:.3g}')
  assert np.all(np.isfinite(ref)) and scale > 0
  assert results['timm'] <= TIMM_RTOL * scale + 1e-5
  # The overrides matter: DeepMind's tanh GELU and max(var * fan_in, 1e-4) differ from
  # timm by far more than rounding (seen: 5e-2 vs 1.2e-6 on logits of scale 1.65).
  assert results['deepmind'] > 100 * results['timm']
  assert real == rows, 'the timm key fixture differs from the real state_dict'
