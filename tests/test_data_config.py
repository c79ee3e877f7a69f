"""The data config from the command line: every field overridable through the real
flag parser, image sizes from the model's variant table, per-family eval crops,
the missing-dataset message, `prepare --help`."""
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from nfnet_jax import configs, data
from nfnet_jax.data import config as data_config
from nfnet_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> ml_collections.ConfigDict:
  """Parses argv with ml_collections' config_flags, as `python -m nfnet_jax.train`."""
  values = flags.FlagValues()
  argv = ['prog', *argv]
  holder = config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


def _leaves(cfg, prefix=''):
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_no_data_field_is_none():
  """ml_collections refuses to override a None field from the command line."""
  assert [k for k, v in _leaves(data.default_config()) if v is None] == []
  assert [k for k, v in _leaves(configs.base_config().data) if v is None] == []


def test_paths_and_every_scalar_data_field_parse_from_flags(tmp_path):
  config = os.path.join(ROOT, 'experiments', 'finetune_folder.py')
  cfg = parse(f'--config={config}', '--config.data.folder=/some/dir',
              '--config.data.data_dir=/data/tfds', '--config.data.manual_dir=/data/tars',
              '--config.data.folder_cache_dir=/tmp/cache', '--config.data.eval_crop=center_crop',
              '--config.data.image_size=128', '--config.data.folder_verify=open',
              '--config.data.offline.num_train=99')
  assert cfg.data.folder == '/some/dir' and cfg.data.data_dir == '/data/tfds'
  assert cfg.data.manual_dir == '/data/tars' and cfg.data.folder_cache_dir == '/tmp/cache'
  assert cfg.data.eval_crop == 'center_crop' and cfg.data.folder_verify == 'open'
  assert cfg.data.image_size == 128 and cfg.data.offline.num_train == 99
  # Every scalar leaf takes a value of its own type from the command line.
  samples = {str: 'x', bool: 'false', int: '7', float: '0.5'}
  args = [f'--config.data.{k}={samples[type(v)]}' for k, v in _leaves(cfg.data)
          if type(v) in samples and k != 'model']
  parsed = parse(f'--config={config}', *args)
  for k, v in _leaves(parsed.data):
    if type(v) in samples and k != 'model':
      assert str(v).lower() == samples[type(v)] or float(v) == float(samples[type(v)]), k


def test_image_sizes_follow_the_model_unless_set():
  base = os.path.join(ROOT, 'experiments', 'nfnet.py')
  for model in ('F0', 'F3', 'nf_regnet_b2', 'nf_resnet50'):
    info = registry.info(model)
    cfg = parse(f'--config={base}', f'--config.model={model}')
    assert data_config.image_sizes(cfg.data) == (info['train_imsize'], info['test_imsize'])
  assert data_config.image_sizes(parse(f'--config={base}:F3').data) == (320, 416)
  cfg = parse(f'--config={base}', '--config.model=F1', '--config.data.image_size=100')
  assert data_config.image_sizes(cfg.data) == (100, 320)
  alone = data.default_config()                   # standalone: the F0 recipe
  assert data_config.image_sizes(alone) == (192, 256)
  alone.model = ''
  with pytest.raises(ValueError, match='set data.image_size'):
    data_config.image_sizes(alone)


def test_experiments_use_their_family_eval_crop():
  exp = lambda name, arg='': parse(f'--config={os.path.join(ROOT, "experiments", name)}{arg}')
  assert exp('nfnet.py', ':F1').data.eval_crop == 'squash'
  assert exp('nf_regnet.py', ':B3').data.eval_crop == 'center_crop'
  resnet = exp('nf_resnet50.py')
  assert resnet.data.eval_crop == 'center_crop'
  assert data_config.image_sizes(resnet.data) == (224, 224)
  nf_regnet = exp('nf_regnet.py', ':B3')
  assert data_config.image_sizes(nf_regnet.data) == (288, 320)
  quick = exp('quickstart.py')
  assert data_config.image_sizes(quick.data) == (32, 32)


def test_offline_shapes_render_at_the_configured_sizes():
  cfg = data.default_config()
  cfg.source, cfg.use_tf = 'offline', False
  cfg.randaugment.enabled = False
  cfg.image_size, cfg.eval_size = 20, 28
  cfg.offline.num_train, cfg.offline.num_eval = 16, 8
  assert data.dataset_info(cfg)['train_size'] == 20
  assert next(data.build_train_iter(cfg, 8, 0, process_index=0, process_count=1)
              )['images'].shape == (8, 20, 20, 3)
  assert next(data.build_eval_iter(cfg, 8, process_index=0, process_count=1)
              )['images'].shape == (8, 28, 28, 3)


def test_missing_tfds_dataset_is_one_clear_error(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'from_env'))
  cfg = data.default_config()
  for data_dir, expected in (('', tmp_path / 'from_env'), (str(tmp_path / 'set'),
                                                           tmp_path / 'set')):
    cfg.data_dir = data_dir
    with pytest.raises(FileNotFoundError) as err:
      data.dataset_info(cfg)
    text = str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # not chained
    assert f'not prepared in {expected}' in text
    assert (f'python -m nfnet_jax.data.prepare --name=imagenet2012 --data_dir={expected} '
            '--manual_dir=DIR') in text
    assert 'ILSVRC2012_img_train.tar' in text  # what manual_dir must hold
    assert (f'tfds convert_format --dataset_dir={expected}/imagenet2012/<version> '
            '--out_file_format=array_record') in text
    assert 'delete' not in text and 'NotImplementedError' not in text


def test_prepare_help_lists_flags_with_descriptions_and_defaults():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run([sys.executable, '-m', 'nfnet_jax.data.prepare', '--help'], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  text = ' '.join(out.stdout.split())
  for flag, default in (('--name', 'default: imagenet2012'),
                        ('--data_dir', 'default: $TFDS_DATA_DIR, else ~/tensorflow_datasets'),
                        ('--manual_dir', 'default: none'),
                        ('--file_format', 'default: array_record')):
    assert flag in text and default in text, (flag, text)
  assert 'ILSVRC2012_img_train.tar' in text


@pytest.mark.parametrize('field,value,message', [
    ('eval_crop', 'crop_resize', r"data.eval_crop: Unknown eval crop 'crop_resize'.* "
     r"Valid: squash, center_crop"),
    ('crop', 'random', r"data.crop: Unknown train crop 'random'"),
    ('folder_verify', 'full', r"data.folder_verify: Unknown verification 'full'.* "
     r"Valid: decode, open, none"),
    ('image_size', -1, r'must be positive'),
])
def test_bad_values_are_refused_before_reading_data(field, value, message):
  cfg = data.default_config()
  cfg.source, cfg.folder = 'folder', '/does/not/exist'   # would fail differently if read
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    data.dataset_info(cfg)
