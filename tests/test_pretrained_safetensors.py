"""safetensors files and `hf-hub:` names: read without torch, hostile headers refused.

Valid files are written by the safetensors package (`safetensors.numpy.save_file`);
hostile ones byte by byte (`raw_file`), as an attacker would. Each hostile file is
loaded in a fresh process whose peak RSS growth is measured (the probe and its control
are `test_pretrained_limits`'s). Hub names are tested offline against a cache laid out
as huggingface_hub lays it out; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from nfnet_jax import hub, pretrained, safetensors_file
from nfnet_jax.pretrained import CheckpointTooLargeError, UnsafePickleError
from test_pretrained_limits import RSS_BOUND_MB, assert_refused, load_in_child

FIXTURES = Path(__file__).parent / 'fixtures'
MODEL = 'nf_regnet_b0'  # the smallest registered NF model (8.6M parameters)
GB = 10**9


@pytest.fixture(scope='module')
def b0_params() -> dict:
  rng = np.random.default_rng(0)
  return {m: {k: rng.standard_normal(s, dtype=np.float32) for k, s in leaves.items()}
          for m, leaves in pretrained.model_shapes(MODEL).items()}


def flat(params: dict) -> dict[str, np.ndarray]:
  return {f'{m}/{k}': a for m, leaves in params.items() for k, a in leaves.items()}


def raw_file(path: Path, header, data: bytes = b'', header_len: int | None = None,
             data_size: int | None = None) -> Path:
  """Writes a safetensors file by hand: the 8-byte length (`header_len`, default the
  header's), the header (a dict as JSON, or raw bytes), the data; `data_size` extends
  the data section sparsely (no disk used) to that many bytes."""
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text) if header_len is None else header_len))
    f.write(text)
    f.write(data)
    if data_size is not None:
      f.truncate(8 + len(text) + data_size)
  return path


def tensor(dtype: str, shape: list, begin: int, end: int) -> dict:
  return {'dtype': dtype, 'shape': shape, 'data_offsets': [begin, end]}


# ---------------------------------------------------------------------------
# Valid files.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['weights.safetensors', 'weights.npz', 'weights'])
def test_safetensors_round_trip_whatever_the_extension(tmp_path, b0_params, name):
  path = tmp_path / name
  save_file(flat(b0_params), str(path))
  got = pretrained.load(path, model=MODEL)
  assert list(got) == list(b0_params)
  for m, leaves in b0_params.items():
    assert list(got[m]) == list(leaves)
    for k, a in leaves.items():
      assert got[m][k].dtype == np.float32
      np.testing.assert_array_equal(got[m][k], a)
  stored = pretrained.read_checkpoint(path)
  assert {m: set(ls) for m, ls in stored.items()} == {m: set(ls) for m, ls in b0_params.items()}


def test_half_precision_files_load_as_float32(tmp_path):
  """BF16 (via ml_dtypes) and F16 tensors load upcast; a float32 model takes them."""
  a = np.array([[1.5, -2.25, 3.0]], np.float32)
  b = np.array([0.1, 7.0], np.float32)
  a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(np.float16)
  data = a16.tobytes() + b16.tobytes()
  path = raw_file(tmp_path / 'half.safetensors', {
      '__metadata__': {'format': 'pt'},
      'M/~/x/w': tensor('BF16', [1, 3], 0, 6), 'M/~/x/b': tensor('F16', [2], 6, 10)}, data)
  got = pretrained.read_checkpoint(path)
  assert got['M/~/x']['w'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got['M/~/x']['w'].astype(np.float32), a)
  np.testing.assert_array_equal(got['M/~/x']['b'], b16)
  loaded = pretrained.load(path)  # unknown model: returned as stored, in float32
  assert loaded['M/~/x']['w'].dtype == np.float32
  np.testing.assert_array_equal(loaded['M/~/x']['w'], a)


def test_half_precision_model_file_passes_the_budget(tmp_path, b0_params):
  """A float32 model takes an F16 file: the dtype check counts it at float32 size."""
  path = tmp_path / 'b0_f16.safetensors'
  save_file({k: a.astype(np.float16) for k, a in flat(b0_params).items()}, str(path))
  got = pretrained.load(path, model=MODEL)
  for m, leaves in b0_params.items():
    for k, a in leaves.items():
      np.testing.assert_array_equal(got[m][k], a.astype(np.float16).astype(np.float32))


@pytest.fixture(scope='module')
def timm_f0_file(tmp_path_factory) -> tuple[Path, dict]:
  """timm's dm_nfnet_f0 names and shapes (the committed key table), random weights,
  as timm's model.safetensors holds them."""
  rows = json.loads((FIXTURES / 'timm_dm_nfnet_f0_keys.json').read_text())['keys']
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s, dtype=np.float32) for k, s in rows}
  path = tmp_path_factory.mktemp('timm') / 'model.safetensors'
  save_file(sd, str(path))
  return path, sd


def test_timm_named_file_converts_like_from_timm(timm_f0_file):
  path, sd = timm_f0_file
  got = pretrained.load(path, model='F0')
  want = pretrained.from_timm(sd, 'F0')
  assert list(got) == list(want)
  for m, leaves in want.items():
    for k, a in leaves.items():
      np.testing.assert_array_equal(got[m][k], a)


@pytest.mark.slow
def test_timm_named_file_with_other_classes_gets_a_new_classifier(timm_f0_file):
  """The fine-tuning path (`--config.init_from` calls load with num_classes)."""
  path, sd = timm_f0_file
  got = pretrained.load(path, model='F0', num_classes=10, rng=0)
  assert got['NFNet/~/linear']['w'].shape == (3072, 10)
  np.testing.assert_array_equal(got['NFNet/~/linear']['b'], np.zeros(10, np.float32))
  np.testing.assert_array_equal(got['NFNet/~/stem_conv0']['w'],
                                sd['stem.conv1.weight'].transpose(2, 3, 1, 0))


def test_top_level_module_names_are_not_taken_for_timm_names(tmp_path):
  """'linear/w' splits into module 'linear' (no '/'): still this package's naming."""
  path = tmp_path / 'm.safetensors'
  save_file({'linear/w': np.ones((2, 3), np.float32), 'final_conv/b': np.zeros(3, np.float32)},
            str(path))
  got = pretrained.load(path)  # no model: returned as stored
  assert {m: list(ls) for m, ls in got.items()} == {'linear': ['w'], 'final_conv': ['b']}


def test_timm_named_file_needs_the_model(tmp_path):
  path = tmp_path / 'm.safetensors'
  save_file({'stem.conv1.weight': np.zeros((2, 3, 3, 3), np.float32)}, str(path))
  with pytest.raises(ValueError, match=r"holds timm's parameter names .*stem\.conv1.*"
                     r"pass model=") as e:
    pretrained.load(path)
  assert str(e.value).startswith(str(path)) and '\n' not in str(e.value)


def test_init_from_reads_safetensors(tmp_path):
  """`--config.init_from=` goes through the same load: a 1000-class safetensors file
  is read, and --mode=eval on 10-class data refuses it for its classifier."""
  from nfnet_jax import errors, train  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  weights = tmp_path / 'b0_1000.safetensors'
  save_file({f'{m}/{k}': np.zeros(s, np.float32)
             for m, leaves in pretrained.model_shapes(MODEL, 1000).items()
             for k, s in leaves.items()}, str(weights))
  config = tiny_config()
  config.model, config.model_kwargs, config.init_from = MODEL, {}, str(weights)
  config.data.image_size = config.data.eval_size = 32  # the model's total stride
  with pytest.raises(errors.RunError, match=r"b0_1000\.safetensors does not fit this "
                     r"data's 10 classes \(\['.*linear'\]\['b'\]: \(1000,\) in the file"):
    train.train_and_evaluate(config, str(tmp_path / 'w'), mode='eval')


def test_init_from_refusal_is_one_line(tmp_path):
  """A file load refuses stops the run with one line (the CLI prints RunError alone)."""
  from nfnet_jax import errors, train  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  weights = raw_file(tmp_path / 'hostile.safetensors', {'a/w': tensor('F32', [4], 0, 99)})
  config = tiny_config()
  config.model, config.model_kwargs, config.init_from = MODEL, {}, str(weights)
  config.data.image_size = config.data.eval_size = 32  # the model's total stride
  with pytest.raises(errors.RunError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'w'), mode='train')
  assert str(e.value) == (f"config.init_from: {weights}: safetensors tensor 'a/w': shape "
                          '[4] F32 is 16 bytes, its data_offsets [0, 99] span 99')


# ---------------------------------------------------------------------------
# torch.save files: one line.
# ---------------------------------------------------------------------------
def _torch_zip(path: Path) -> Path:
  with zipfile.ZipFile(path, 'w') as z:  # torch >= 1.6's layout
    z.writestr('archive/data.pkl', pickle.dumps({}, protocol=2))
    z.writestr('archive/version', '3\n')
  return path


def _torch_legacy(path: Path) -> Path:
  path.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)
                   + pickle.dumps(1001, protocol=2))
  return path


@pytest.mark.parametrize('write', [_torch_zip, _torch_legacy], ids=['zip', 'legacy'])
def test_torch_files_say_they_need_torch(tmp_path, write):
  path = write(tmp_path / 'model.pth')
  with pytest.raises(ValueError) as e:
    pretrained.load(path, model=MODEL)
  message = str(e.value)
  assert message.startswith(f'{path}: a PyTorch checkpoint (torch.save); reading it '
                            'needs torch'), message
  assert 'pretrained.from_timm' in message and '\n' not in message


# ---------------------------------------------------------------------------
# Hostile files: refused in one line, before allocating.
# ---------------------------------------------------------------------------
_F32_4 = tensor('F32', [4], 0, 16)
HOSTILE = {
    # name: (header, data, header_len, sparse data size, model, error, message part)
    '100gb_tensor': ({'a/w': tensor('F32', [25 * GB], 0, 100 * GB)}, b'', None, None,
                     MODEL, ValueError, 'lies outside the 0-byte data section'),
    '100gb_tensor_in_a_100gb_file': (
        {'a/w': tensor('F32', [25 * GB], 0, 100 * GB)}, b'', None, 100 * GB, '',
        CheckpointTooLargeError, 'exceeds the 4.00 GiB budget; refused before allocating'),
    '1gb_tensor_in_a_1gb_file_for_a_model': (
        {'a/w': tensor('F32', [GB // 4], 0, GB)}, b'', None, GB, MODEL,
        CheckpointTooLargeError, 'is larger than any parameter of model'),
    'offsets_outside_the_file': ({'a/w': tensor('F32', [4], 1000, 1016)}, bytes(16), None,
                                 None, '', ValueError, 'lies outside the 16-byte data'),
    'overlapping_tensors': ({'a/w': _F32_4, 'a/b': tensor('F32', [4], 8, 24)}, bytes(24),
                            None, None, '', ValueError, 'overlaps the tensor before it'),
    'header_longer_than_the_file': ({'a/w': _F32_4}, bytes(16), 10**12, None, '',
                                    ValueError, 'header length field declares'),
    'header_over_the_cap': ({'a/w': _F32_4}, bytes(16), 64 * 2**20, 64 * 2**20, '',
                            CheckpointTooLargeError, 'a header of 64.00 MiB; at most'),
    'non_utf8_json': (b'{"a/w": {"dtype": "F32", "\xff\xfe": 1}}', b'', None, None, '',
                      ValueError, 'the header is not UTF-8'),
    'not_json': (b'{"a/w": [1, 2', b'', None, None, '', ValueError,
                 'the header is not valid JSON'),
    'dtype_the_model_cannot_use': ({'a/w': tensor('I64', [4], 0, 32)}, bytes(32), None,
                                   None, MODEL, UnsafePickleError,
                                   "model 'nf_regnet_b0' has float32 parameters"),
    'unknown_dtype': ({'a/w': tensor('F8_E4M3', [4], 0, 4)}, bytes(4), None, None, '',
                      ValueError, "unknown dtype 'F8_E4M3'"),
    'negative_shape': ({'a/w': tensor('F32', [-4], 0, 0)}, b'', None, None, '',
                       ValueError, 'is not a list of at most 32 non-negative integers'),
    'size_not_the_span': ({'a/w': tensor('F32', [4], 0, 8)}, bytes(8), None, None, '',
                          ValueError, 'is 16 bytes, its data_offsets [0, 8] span 8'),
    'name_twice': (b'{"a/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                   b'"a/w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
                   bytes(8), None, None, '', ValueError, "the header names 'a/w' twice"),
}


@pytest.mark.parametrize('case', list(HOSTILE))
def test_hostile_safetensors_refused_before_allocating(tmp_path, case):
  header, data, header_len, data_size, model, error, part = HOSTILE[case]
  path = raw_file(tmp_path / f'{case}.safetensors', header, data, header_len, data_size)
  result = load_in_child(path, model)
  assert_refused(result, path, error, part)
  assert 'safetensors' in result['message'], result['message']


@pytest.mark.slow
def test_largest_header_allowed_stays_under_the_bound(tmp_path):
  """100,000 empty tensors (6.5 MiB of JSON, under MAX_HEADER_BYTES): the parsed
  header is the biggest thing a file can make the reader hold without data."""
  header = {f'm{i}/w': tensor('F32', [0], 0, 0) for i in range(safetensors_file.MAX_TENSORS)}
  path = raw_file(tmp_path / 'many.safetensors', header)
  assert path.stat().st_size <= safetensors_file.MAX_HEADER_BYTES
  result = load_in_child(path, '', 'read')
  assert len(result['returned']) == safetensors_file.MAX_TENSORS
  assert result['growth_mb'] < RSS_BOUND_MB, result
  header['one/more'] = tensor('F32', [0], 0, 0)
  path = raw_file(tmp_path / 'more.safetensors', header)
  with pytest.raises(CheckpointTooLargeError, match='declares 100,001 tensors; at most'):
    pretrained.read_checkpoint(path)


def test_hostile_cases_are_honest_when_fixed(tmp_path):
  """Control: the hand-written layout loads when the sizes are honest."""
  data = np.arange(4, dtype='<f4').tobytes() + np.ones(2, '<f4').tobytes()
  path = raw_file(tmp_path / 'ok.safetensors',
                  {'a/w': _F32_4, 'a/b': tensor('F32', [2], 16, 24)}, data)
  got = pretrained.read_checkpoint(path)
  np.testing.assert_array_equal(got['a']['w'], np.arange(4, dtype=np.float32))
  np.testing.assert_array_equal(got['a']['b'], np.ones(2, np.float32))
  assert safetensors_file.MAX_HEADER_BYTES < 64 * 2**20  # the cap case is over it
  assert RSS_BOUND_MB == 200


# ---------------------------------------------------------------------------
# hf-hub: names, offline.
# ---------------------------------------------------------------------------
def test_hub_names_give_timm_model_and_url():
  assert hub.model_name('hf-hub:timm/eca_nfnet_l0.ra2_in1k') == 'eca_nfnet_l0'
  assert hub.model_name('hf-hub:timm/dm_nfnet_f0.dm_in1k') == 'dm_nfnet_f0'
  # timm's NF-ResNet-50 is not DeepMind's: it is registered under timm/.
  assert hub.model_name('hf-hub:timm/nf_resnet50.ra2_in1k') == 'timm/nf_resnet50'
  assert hub.parse('hf-hub:timm/nfnet_l0.ra2_in1k@v2') == ('timm/nfnet_l0.ra2_in1k', 'v2')
  assert hub.url('hf-hub:timm/eca_nfnet_l0.ra2_in1k') == (
      'https://huggingface.co/timm/eca_nfnet_l0.ra2_in1k/resolve/main/model.safetensors')
  with pytest.raises(ValueError, match='is not a Hub name'):
    hub.parse('hf-hub:no_owner')


_HUB_CHILD = r'''
import json, sys
import numpy as np
if sys.argv[2] == 'no_hub':
  sys.modules['huggingface_hub'] = None  # as if it were not installed
from nfnet_jax import pretrained
try:
  got = pretrained.load(sys.argv[1])
  print(json.dumps({'sums': {f'{m}/{k}': float(np.sum(a, dtype=np.float64))
                             for m, l in got.items() for k, a in l.items()}}))
except Exception as e:
  print(json.dumps({'error': type(e).__name__, 'message': str(e)}))
'''
REPO_ID = f'timm/{MODEL}.test_tag'
NAME = f'hf-hub:{REPO_ID}'


def _hub_load(cache: Path, how: str = '', **env) -> dict:
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY='1', **env)
  r = subprocess.run([sys.executable, '-c', _HUB_CHILD, NAME, how], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def _populate(cache: Path, params: dict) -> None:
  """The layout huggingface_hub's cache has after a download of main."""
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = cache / f'models--{REPO_ID.replace("/", "--")}'
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  (repo / 'snapshots' / commit).mkdir(parents=True)
  save_file(flat(params), str(repo / 'snapshots' / commit / 'model.safetensors'))


@pytest.mark.parametrize('env', [{'HF_HUB_OFFLINE': '1'},
                                 {'HF_ENDPOINT': 'http://127.0.0.1:9'}],
                         ids=['offline', 'unreachable'])
def test_hub_name_loads_from_the_cache(tmp_path, b0_params, env):
  _populate(tmp_path / 'cache', b0_params)
  result = _hub_load(tmp_path / 'cache', **env)
  assert 'error' not in result, result
  want = {f'{m}/{k}': float(np.sum(a, dtype=np.float64))
          for m, l in b0_params.items() for k, a in l.items()}
  assert result['sums'] == want


def test_hub_name_not_cached_offline_names_the_file(tmp_path):
  result = _hub_load(tmp_path / 'empty', HF_HUB_OFFLINE='1')
  assert result['error'] == 'HubError', result
  message = result['message']
  assert message.startswith(f'{NAME}: could not download or find in the cache '
                            f'{REPO_ID}/model.safetensors'), message
  assert message.endswith(f'fetch {hub.url(NAME)} by hand and load it by path '
                          f"(pretrained.load(path, model='{MODEL}'))"), message
  assert '\n' not in message


def test_hub_name_without_huggingface_hub_says_how(tmp_path):
  result = _hub_load(tmp_path / 'empty', how='no_hub')
  assert result == {'error': 'HubError', 'message': (
      f"{NAME}: loading Hub weights needs huggingface_hub: pip install 'nfnet_jax[hub]', "
      f'or fetch {hub.url(NAME)} by hand and load it by path '
      f"(pretrained.load(path, model='{MODEL}'))")}


# ---------------------------------------------------------------------------
# Packaging and the fine-tuning config.
# ---------------------------------------------------------------------------
def test_hub_is_an_optional_extra_and_the_reader_needs_only_core():
  from test_extras import REPO, _imported_modules, _requirement_names  # pylint: disable=g-import-not-at-top
  core = _requirement_names('requirements.txt')
  assert 'huggingface-hub' in _requirement_names('requirements-hub.txt')
  assert 'huggingface-hub' not in core and 'safetensors' not in core
  assert {'huggingface-hub', 'safetensors'} <= _requirement_names('requirements-test.txt')
  assert "'hub': _reqs('requirements-hub.txt')" in (REPO / 'setup.py').read_text()
  reader = _imported_modules((REPO / 'nfnet_jax' / 'safetensors_file.py').read_text())
  third_party = {m.replace('_', '-') for m in reader
                 if m not in sys.stdlib_module_names and m != 'nfnet_jax'}
  assert third_party == {'ml-dtypes', 'numpy'} and third_party <= core


def test_finetune_folder_config_takes_any_registered_model():
  """Not only the NFNet F-variants (their RandAugment setting is unused: it is off)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  path = Path(__file__).parent.parent / 'experiments' / 'finetune_folder.py'
  spec = importlib.util.spec_from_file_location('finetune_folder', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(MODEL)
  assert config.model == MODEL and not config.data.randaugment.enabled
  configs.validate_config(config, num_devices=8, num_processes=1)
  with pytest.raises(ValueError, match="Unknown variant 'not_a_model'.*Valid: .*eca_nfnet_l0"):
    module.get_config('not_a_model')


def test_hub_name_of_an_unknown_model_fails_before_downloading(monkeypatch):
  def no_fetch(name):
    raise AssertionError(f'fetched {name}')
  monkeypatch.setattr(hub, 'fetch', no_fetch)
  with pytest.raises(ValueError, match=r"^hf-hub:timm/not_a_model\.tag: Unknown model "
                     r"'not_a_model'\."):
    pretrained.load('hf-hub:timm/not_a_model.tag')
