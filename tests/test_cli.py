"""The training command line as a user meets it (`python -m nfnet_jax.train`, real
subprocesses): one-line errors for bad values, values without meaning, misspelled
data values and experiment arguments, unusable workdirs, missing data and weights
(nothing created), model keywords from flags, the --check_config path, what a
terminal shows (progress bar and log lines, the compile notice, the resolutions),
and float32 evaluation. (A run on a folder of images: tests/test_digits_folder.py.)"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ')  # absl's log line


def env(**extra) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='', TF_CPP_MIN_LOG_LEVEL='2',
              PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
              **extra)


def cli(*args: str, timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'nfnet_jax.train', *args], cwd=REPO,
                        env=env(**extra_env), capture_output=True, text=True,
                        timeout=timeout)


# ---------------------------------------------------------------------------
# Bad values: one line on stderr, non-zero exit, no traceback.
# ---------------------------------------------------------------------------
BAD_VALUES = [
    ('--config.batch_size=-3', ['config.batch_size=-3', 'positive multiple']),
    ('--config.model=F9', ['config.model', "'F9'", 'F0', 'nf_regnet_b0']),
    ('--config.remat=conv', ['config.remat', "'conv'", 'Did you mean convs']),
    ('--config.bach_size=8', ['config.bach_size', 'Did you mean batch_size']),
]


def test_bad_values_are_one_line(tmp_path):
  """Each command (run in parallel) exits non-zero with one FATAL line naming the key,
  the value and the choices; no traceback, no workdir created."""
  procs = [subprocess.Popen([sys.executable, '-m', 'nfnet_jax.train',
                             '--config=experiments/nfnet.py:F0',
                             f'--workdir={tmp_path / str(i)}', flag],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i, (flag, _) in enumerate(BAD_VALUES)]
  for i, ((flag, words), proc) in enumerate(zip(BAD_VALUES, procs)):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, (flag, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) < 5, stderr
    assert 'Traceback' not in stderr
    fatal = [l for l in lines if l.startswith('FATAL')]
    assert len(fatal) == 1, stderr
    for w in words:
      assert w in fatal[0], (w, fatal[0])
    assert not (tmp_path / str(i)).exists()  # nothing created for a refused command


# ---------------------------------------------------------------------------
# Values checked for meaning, and what a run needs on disk, before anything is
# created; --check_config runs the same checks.
# ---------------------------------------------------------------------------
QUICKSTART = '--config=experiments/quickstart.py'


def refused_in_one_line(out: subprocess.CompletedProcess, *words: str) -> str:
  """Exit status 1 and one error line (FATAL or Error), no traceback: every other
  line of stderr is a log line. Returns the error line."""
  assert out.returncode == 1, out.stdout + out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith(('FATAL', 'Error'))]
  assert len(errors) == 1, out.stderr[-3000:]
  assert all(l in errors or LOG_LINE.match(l) for l in lines), out.stderr[-3000:]
  for w in words:
    assert w in errors[0], (w, errors[0])
  return errors[0]


def _experiment(file: str):
  """experiments/<file>, loaded as `--config=experiments/<file>` loads it."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(Path(file).stem, REPO / 'experiments' / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _refusal(**values) -> str:
  """The one-line refusal of the quickstart config with `values` set (dotted keys as
  `a__b`), from the checks the command line runs (configs.validate_config)."""
  from nfnet_jax import configs  # pylint: disable=import-outside-toplevel
  config = _experiment('quickstart.py').get_config('')
  for key, value in values.items():
    *parents, leaf = key.split('__')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(ValueError) as e:
    configs.validate_config(config, num_devices=1, num_processes=1)
  assert '\n' not in str(e.value), str(e.value)
  return str(e.value)


# The checks behind each refusal, in this process; the command line's one-line
# refusal (exit status 1, nothing created) is shown for two of them below.
@pytest.mark.parametrize('key, value, words', [
    ('model_kwargs__width', 0.0, ['config.model_kwargs.width=0', 'positive']),
    ('model_kwargs__width', 0.001, ['without channels', 'raise the width']),
    ('model_kwargs__depths', (0, 1), ['config.model_kwargs.depths', '>= 1']),
    ('model_kwargs__stochdepth_rate', 1.5, ['stochdepth_rate=1.5', '[0, 1)']),
    ('seed', -1, ['config.seed=-1', '[0, 2**32)']),
    ('seed', 4294967296, ['config.seed=4294967296', '[0, 2**32)']),
    ('optimizer__base_lr', float('nan'), ['config.optimizer.base_lr=nan', 'finite']),
    ('optimizer__base_lr', -0.4, ['config.optimizer.base_lr=-0.4', 'positive']),
    ('optimizer__base_lr', 0.0, ['config.optimizer.base_lr=0', 'positive']),
    ('ema_decay', float('nan'), ['config.ema_decay=nan', 'finite']),
    ('data__image_size', 1, ['config.data.image_size', '1 px', 'stride', 'at least 32 px']),
    ('data__eval_size', 16, ['config.data.eval_size', '16 px', 'at least 32 px']),
    ('data__holdout_fraction', 1.0, ['config.data.holdout_fraction=1.0']),
])
def test_bad_numbers_are_refused(key, value, words):
  """Values that used to pass the checks, then crashed (width 0, seed -1) or trained
  nonsense (a negative or NaN learning rate, 1 px images): one line naming the key
  and the range."""
  line = _refusal(**{key: value})
  for w in words:
    assert w in line, (w, line)


@pytest.mark.parametrize('flag, words', [
    ('--config.optimizer.base_lr=nan', ['config.optimizer.base_lr=nan', 'finite']),
    ('--config.data.source=folde', ['config.data.source', "'folde'",
                                    'Did you mean folder?']),
])
def test_a_bad_value_on_the_command_line_is_one_line(tmp_path, flag, words):
  out = cli(QUICKSTART, f'--workdir={tmp_path / "w"}', flag, '--check_config')
  refused_in_one_line(out, *words)
  assert not (tmp_path / 'w').exists()


def test_smallest_image_size_is_the_total_stride():
  """The quickstart model has 4 stages (stride 32); with 2 stages (stride 8) 16 px
  images are accepted."""
  out = cli(QUICKSTART, '--check_config', '--config.data.image_size=16',
            '--config.data.eval_size=16', '--config.model_kwargs.depths=(1,1)')
  assert out.returncode == 0, out.stderr
  refused_in_one_line(cli(QUICKSTART, '--check_config', '--config.data.image_size=4',
                          '--config.data.eval_size=16',
                          '--config.model_kwargs.depths=(1,1)'),
                      'config.data.image_size: 4 px', 'at least 8 px')


@pytest.mark.parametrize('key, value, words', [
    ('source', 'folde', ['config.data.source', "'folde'", 'Did you mean folder?']),
    ('source', 'TFDS', ['config.data.source', "'TFDS'", 'Did you mean tfds?']),
    ('crop', 'incepton', ['config.data.crop', 'Did you mean inception?']),
    ('eval_crop', 'centre_crop', ['config.data.eval_crop', 'Did you mean center_crop?']),
    ('folder_verify', 'decod', ['config.data.folder_verify', 'Did you mean decode?']),
])
def test_misspelled_data_values_are_refused(key, value, words):
  line = _refusal(**{f'data__{key}': value})
  for w in words:
    assert w in line, (w, line)


@pytest.mark.parametrize('arg, words', [
    ('nfnet.py:F0,sma', ["'sma'", 'Did you mean sam?']),
    ('nfnet.py:f0', ["'f0'", 'Did you mean F0?']),
    ('nfnet.py:F9', ["'F9'", 'Valid: F0, F0+']),
    ('nf_regnet.py:b0', ["'b0'", 'Did you mean B0?']),
    ('quickstart.py:nump', ["'nump'", 'Did you mean numpy?']),
    ('nf_resnet50.py:F0', ["'F0'", 'Valid: (none)']),
    ('finetune_folder.py:F0,sam', ["'sam'"]),
    ('claims.py:cpux', ["'cpux'", 'Did you mean cpu?']),
])
def test_config_arguments_are_checked(arg, words):
  """Every word of `--config=FILE:ARG` is checked as written (a case slip is refused
  with the right spelling), in one line naming the experiment file: the file's
  get_config(ARG) here; the command line's one-line refusal of it below."""
  file, arg = arg.split(':')
  with pytest.raises(ValueError) as e:
    _experiment(file).get_config(arg)
  line = str(e.value)
  assert '\n' not in line and f'experiments/{file}' in line, line
  for w in words:
    assert w in line, (w, line)


def test_a_bad_config_argument_on_the_command_line_is_one_line():
  out = cli('--config=experiments/nfnet.py:F0,sma', '--check_config')
  refused_in_one_line(out, 'experiments/nfnet.py', "'sma'", 'Did you mean sam?')


def test_config_argument_is_named_in_the_summary():
  out = cli('--config=experiments/nfnet.py:F0,sam', '--check_config', '--nocheck_paths')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('Config OK: experiments/nfnet.py:F0,sam: F0('), out.stdout
  assert 'SAM (rho 0.05, ascent on 20% of the batch)' in out.stdout


def test_a_folder_needs_its_source(tmp_path):
  """--config.data.folder without source=folder used to train on the built-in shapes."""
  out = cli(QUICKSTART, f'--config.data.folder={tmp_path}', '--check_config')
  refused_in_one_line(out, f'config.data.folder={tmp_path}', '--config.data.source=folder')


@pytest.mark.parametrize('kind', ['file', 'below_a_file', 'read_only'])
def test_workdir_must_be_a_writable_directory(tmp_path, kind):
  """A file, a path below a file, a directory nobody can write in (/sys: a read-only
  file system, even for root, whom permission bits do not stop): refused in one line
  by the checks, where the run used to fail with a traceback."""
  (tmp_path / 'f').write_text('keep')
  workdir = {'file': tmp_path / 'f', 'below_a_file': tmp_path / 'f' / 'w',
             'read_only': Path('/sys/nfnet_jax_workdir')}[kind]
  out = cli(QUICKSTART, f'--workdir={workdir}', '--check_config')
  refused_in_one_line(out, f'--workdir={workdir}')
  assert (tmp_path / 'f').read_text() == 'keep'
  assert not workdir.exists() or kind == 'file'


# `python -m nfnet_jax.train ARGS`, then whether it imported TensorFlow (on stdout).
TF_WATCH = ("import runpy, sys\n"
            "try: runpy.run_module('nfnet_jax.train', run_name='__main__', alter_sys=True)\n"
            "finally: print('tensorflow imported:', 'tensorflow' in sys.modules)")


def test_missing_tfds_data_is_one_line(tmp_path):
  """The README's ImageNet command on a machine without ImageNet: one line saying how
  to prepare it, before anything is created (it was ~30 lines of traceback), without
  TFDS's warning about the version folder that does not exist ('Variant folder
  .../imagenet2012/5.1.0 has no dataset_info.json'), and without TensorFlow (the
  answer comes before it would be imported); a misspelt dataset name is named."""
  args = ['--config=experiments/nfnet.py:F0', f'--workdir={tmp_path / "w"}',
          f'--config.data.data_dir={tmp_path / "tfds"}']
  run = lambda *extra: subprocess.run(  # noqa: E731
      [sys.executable, '-c', TF_WATCH, *args, *extra], cwd=REPO, env=env(),
      capture_output=True, text=True, timeout=300)
  out = run()
  refused_in_one_line(out, "'imagenet2012' is not prepared",
                      f'not prepared in {tmp_path / "tfds"}',
                      'python -m nfnet_jax.data.prepare')
  assert 'Variant folder' not in out.stdout + out.stderr, out.stderr[-3000:]
  assert 'tensorflow imported: False' in out.stdout, out.stdout
  out = run('--config.data.name=imagenet2021')
  refused_in_one_line(out, "Unknown TFDS dataset data.name='imagenet2021'")
  assert 'tensorflow imported: False' in out.stdout, out.stdout
  assert not (tmp_path / 'w').exists()


def test_missing_image_folder_is_one_line(tmp_path):
  out = cli('--config=experiments/finetune_folder.py:F0', f'--workdir={tmp_path / "w"}',
            f'--config.data.folder={tmp_path / "nowhere"}')
  refused_in_one_line(out, str(tmp_path / 'nowhere'), 'not found')
  assert not (tmp_path / 'w').exists()


def test_empty_class_folder_is_one_line(tmp_path):
  """A class folder without images, and one whose only image does not decode (only
  the run's verification sees that): one line naming the folder, nothing created."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for name in ('a', 'b', 'c'):
    (tmp_path / 'images' / name).mkdir(parents=True)
  for name in ('a', 'b'):
    for i in range(4):
      Image.fromarray(np.zeros([32, 32, 3], np.uint8)).save(
          tmp_path / 'images' / name / f'{i}.png')
  (tmp_path / 'images' / 'b' / 'broken.png').write_bytes(b'\x89PNG not really')
  args = [QUICKSTART, '--config.data.source=folder',
          f'--config.data.folder={tmp_path / "images"}', '--config.data.holdout_fraction=0.25',
          f'--config.data.folder_cache_dir={tmp_path / "cache"}']
  out = cli(*args, f'--workdir={tmp_path / "w"}')
  refused_in_one_line(out, 'images/c has no usable image')
  for p in (tmp_path / 'images' / 'b').glob('?.png'):
    p.unlink()  # b holds only the undecodable file now
  (tmp_path / 'images' / 'c').rmdir()
  out = cli(*args, f'--workdir={tmp_path / "w"}')
  refused_in_one_line(out, 'images/b has no usable image')
  assert not (tmp_path / 'w').exists()


@pytest.fixture(scope='module')
def b1_weights(tmp_path_factory) -> Path:
  """NF-RegNet-B1's parameters (zeros, 40 MB) as pretrained.save writes them: the
  smallest registered model whose file is bigger than another's (B0)."""
  from nfnet_jax import pretrained  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp('weights') / 'B1.npz'
  pretrained.save({m: {leaf: np.zeros(shape, np.float32) for leaf, shape in leaves.items()}
                   for m, leaves in pretrained.model_shapes('nf_regnet_b1').items()}, path)
  return path


def test_init_from_must_exist_and_fit(tmp_path, b1_weights):
  """A missing file, the weights of a bigger model (F1 into F0, here B1 into B0): one
  line, and no checkpoints/ left behind; weights that fit pass --check_config, but
  not for --mode=eval on data with other classes."""
  regnet = ['--config=experiments/nf_regnet.py:B0', '--config.data.source=offline']
  out = cli(*regnet, f'--workdir={tmp_path / "w"}',
            f'--config.init_from={tmp_path / "F0_haiku.npz"}')
  refused_in_one_line(out, 'config.init_from', 'No such checkpoint', 'wget')
  out = cli(*regnet, f'--workdir={tmp_path / "w"}', f'--config.init_from={b1_weights}')
  refused_in_one_line(out, 'config.init_from', 'B1.npz', "'nf_regnet_b0'")
  assert not (tmp_path / 'w').exists()
  b1 = ['--config=experiments/nf_regnet.py:B1', '--config.data.source=offline',
        f'--config.init_from={b1_weights}', '--check_config']
  out = cli(*b1)
  assert out.returncode == 0 and out.stdout.startswith('Config OK'), out.stderr
  refused_in_one_line(cli(*b1, '--mode=eval'), "does not fit this data's 10 classes")


def test_eval_without_anything_to_evaluate_fails_the_check(tmp_path):
  """--mode=eval on an empty workdir: the check (the run's own, which
  tests/test_eval_transform.py runs without --check_config) names what is missing."""
  workdir = tmp_path / 'w'
  out = cli(QUICKSTART, f'--workdir={workdir}', '--mode=eval', '--check_config')
  line = refused_in_one_line(out, '--mode=eval', 'nothing to evaluate')
  assert line == (
      f'FATAL Config error: --mode=eval: no checkpoint in {workdir}/checkpoints and no '
      'config.init_from, so nothing to evaluate (nothing was created). Train in this '
      'workdir first, or pass --config.init_from=<weights file>.')
  assert out.stderr.strip().splitlines()[-1] == line
  assert not workdir.exists()


def test_nocheck_paths_leaves_the_file_system_to_the_machine_that_runs(tmp_path):
  """A launcher checks a pod's command where the data is not: --nocheck_paths with
  --check_config runs every value check and none of the file system's."""
  args = ['--config=experiments/nfnet.py:F0', f'--workdir={tmp_path / "w"}',
          f'--config.data.data_dir={tmp_path / "tfds"}', '--check_config']
  refused_in_one_line(cli(*args), "'imagenet2012' is not prepared")
  out = cli(*args, '--nocheck_paths')
  assert out.returncode == 0 and out.stdout.startswith('Config OK'), out.stderr
  refused_in_one_line(cli(*args, '--nocheck_paths', '--config.seed=-1'), 'config.seed')


# ---------------------------------------------------------------------------
# Model keywords from the command line.
# ---------------------------------------------------------------------------
def test_model_kwargs_absent_from_the_config_can_be_set():
  """experiments/nfnet.py's model_kwargs has only stochdepth_rate; any keyword of the
  NFNet constructor can still be set, with its Python type (float, None, tuple, str)."""
  out = cli('--config=experiments/nfnet.py:F0', '--check_config', '--nocheck_paths',
            '--config.model_kwargs.width=0.125', '--config.model_kwargs.group_size=None',
            '--config.model_kwargs.depths=(1,1,2,1)',
            '--config.model_kwargs.activation', 'relu')
  assert out.returncode == 0, out.stderr
  assert ("F0(activation='relu', depths=(1, 1, 2, 1), group_size=None, "
          "stochdepth_rate=0.25, width=0.125)") in out.stdout


def test_model_kwargs_reach_the_model():
  """The parsed keyword is the one the model is built with (parameter count)."""
  from nfnet_jax import configs, models, train  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  c = configs.nfnet_config('F0')
  c.lock()
  configs.set_model_kwargs(c, configs.split_model_kwargs(
      ['prog', '--config.model_kwargs.width=0.125', '--config.model_kwargs.group_size=None',
       '--config.model_kwargs.depths=(1,1,1,1)'])[1])
  model = train.create_model(c, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros([1, 32, 32, 3], np.float32), True))
  want = models.create('F0', 10, width=0.125, group_size=None, depths=(1, 1, 1, 1))
  want_shapes = jax.eval_shape(lambda: want.init(jax.random.key(0),
                                                 np.zeros([1, 32, 32, 3], np.float32), True))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda s: s.shape,
                                                                  want_shapes)
  full = models.create('F0', 10, group_size=None, depths=(1, 1, 1, 1))
  full_shapes = jax.eval_shape(lambda: full.init(jax.random.key(0),
                                                 np.zeros([1, 32, 32, 3], np.float32), True))
  count = lambda t: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(t))
  assert count(shapes) < count(full_shapes) / 20  # width 1/8: ~1/64 of the weights


def test_unknown_model_kwarg_is_refused_with_the_closest():
  out = cli('--config=experiments/nfnet.py:F0', '--check_config',
            '--config.model_kwargs.widht=0.125')
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert 'config.model_kwargs.widht' in lines[0] and 'Did you mean width' in lines[0]
  assert 'group_size' in lines[0] and 'stochdepth_rate' in lines[0]  # the valid keys


def test_model_kwargs_follow_the_final_model():
  """Checked against config.model as set on the same command line: NF-RegNets have
  no 'final_conv_mult' keyword, NFNets do."""
  out = cli('--config=experiments/nfnet.py:F0', '--check_config',
            '--config.model=nf_regnet_b0', '--config.model_kwargs.final_conv_mult=1.5')
  assert out.returncode == 1 and "model 'nf_regnet_b0'" in out.stderr
  assert 'expansion' in out.stderr  # an NF-RegNet keyword among the valid ones
  out = cli('--config=experiments/nfnet.py:F0', '--check_config', '--nocheck_paths',
            '--config.model_kwargs.final_conv_mult=1.5')
  assert out.returncode == 0, out.stderr


def test_model_kwarg_of_the_wrong_type():
  out = cli('--config=experiments/nfnet.py:F0', '--check_config',
            '--config.model_kwargs.stochdepth_rate=high')
  assert out.returncode == 1
  assert out.stderr.strip().count('\n') == 0
  assert "'high' is not a float" in out.stderr


# ---------------------------------------------------------------------------
# Evaluation precision.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('exp', ['nfnet.py:F0', 'nfnet.py:F6,sam', 'nf_resnet50.py',
                                 'nf_regnet.py:B0', 'quickstart.py', 'finetune_folder.py:F0'])
def test_experiments_evaluate_in_float32(exp):
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = exp.partition(':')
  spec = importlib.util.spec_from_file_location('exp', REPO / 'experiments' / path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg) if arg else mod.get_config()
  assert c.eval_dtype == 'float32'
  if path == 'nfnet.py':
    assert c.compute_dtype == 'bfloat16'  # training stays bfloat16


def _identity_logits(images, is_training):
  """A 'model' whose logits are its (flattened) input, in the input's dtype."""
  del is_training
  return {'logits': images.reshape(images.shape[0], -1)}


@pytest.mark.parametrize('eval_dtype, top1', [('float32', 1.0), ('bfloat16', 0.0)])
def test_eval_step_computes_in_eval_dtype(eval_dtype, top1):
  """Logits 1.001 (the label) and 1.0: float32 ranks the label first (top-1 1); in
  bfloat16 both round to 1.0, a tie, which counts against the label (top-1 0). The
  train precision (bfloat16) must not leak into evaluation."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from nfnet_jax import steps  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(compute_dtype='bfloat16', eval_dtype=eval_dtype))
  import haiku as hk  # pylint: disable=import-outside-toplevel
  step = steps.make_eval_step(config, hk.transform(_identity_logits))
  batch = dict(images=np.array([[[[1.001, 1.0, 0.0]]]], np.float32),  # [1, 1, 1, 3]
               labels=np.array([[1.0, 0.0, 0.0]], np.float32),
               mask=np.ones([1], np.float32))
  add_axis = lambda t: jax.tree.map(lambda x: x[None], t)
  sums = jax.vmap(step, in_axes=(None, None, 0), axis_name=steps.AXIS)(
      {}, {}, add_axis(batch))
  assert float(sums['raw']['top1'][0]) == top1
  assert float(sums['ema']['top1'][0]) == top1


# ---------------------------------------------------------------------------
# A terminal: progress bar and log lines, compile notice, resolutions.
# ---------------------------------------------------------------------------
TINY = textwrap.dedent('''
    from nfnet_jax import configs


    def get_config(arg=''):
      c = configs.base_config()
      c.model = 'F0'
      c.model_kwargs = dict(width=0.125, group_size=None, depths=(1, 1))
      c.data.source = 'offline'
      c.data.use_tf = False
      c.data.offline.num_train = 64
      c.data.offline.num_eval = 32
      c.data.image_size = c.data.eval_size = 16
      c.data.randaugment.enabled = False
      c.data.mix.enabled = False
      c.batch_size = 8
      c.total_steps = 6
      c.warmup_epochs = 0.0
      c.compute_dtype = 'float32'
      c.eval_batch_size = 32
      c.log_every = 1
      c.checkpoint_every_steps = 0
      c.checkpoint_every_minutes = 0.0
      return c
''')


# The training command line with an hour added to the clocks (time.time, which the
# bar uses, and time.monotonic) when the first train step's call returns: a stand-in
# for a long compile that costs nothing.
HOUR_LONG_COMPILE = textwrap.dedent('''
    import runpy
    import time
    import tqdm.std
    from nfnet_jax import steps
    shift = [0.0]
    real_time, real_monotonic = time.time, time.monotonic
    time.time = lambda: real_time() + shift[0]
    time.monotonic = lambda: real_monotonic() + shift[0]
    tqdm.std.time = time.time
    init = steps.Trainer.__init__

    def patched_init(self, *args, **kwargs):
      init(self, *args, **kwargs)
      train_step = self.train_step

      def first_call_takes_an_hour(*a, **k):
        out = train_step(*a, **k)
        shift[0] = 3600.0
        return out
      self.train_step = first_call_takes_an_hour

    steps.Trainer.__init__ = patched_init
    runpy.run_module('nfnet_jax.train', run_name='__main__', alter_sys=True)  # -m
''')


def run_in_terminal(args: list[str], timeout: float, cols: int = 120) -> str:
  """Runs the command with stdout/stderr on a pseudo-terminal; returns the raw bytes
  the terminal received, decoded."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, cols, 0, 0))
  proc = subprocess.Popen(args, cwd=REPO, env=env(XLA_FLAGS='--xla_backend_optimization_level=0'),
                          stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
  os.close(slave)
  chunks, deadline = [], time.time() + timeout
  try:
    while time.time() < deadline:
      ready, _, _ = select.select([master], [], [], 1.0)
      if ready:
        try:
          data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal.
          break
        if not data:
          break
        chunks.append(data)
      elif proc.poll() is not None:
        break
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    os.close(master)
  out = b''.join(chunks).decode('utf-8', 'replace')
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.mark.slow
def test_terminal_output_is_readable(tmp_path):
  """Under a pseudo-terminal (bar shown): every log line starts on a line of its own,
  after the bar was cleared, never glued behind bar text; the bar is drawn; no
  backend-probe line; the compile notice comes before the first step and the summary
  states the resolutions. The first step's call is made to take an hour (clocks moved
  on, see HOUR_LONG_COMPILE): the bar says it is compiling, a line gives the hour, and
  the bar's elapsed time and step rate leave it out."""
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(TINY)
  out = run_in_terminal([sys.executable, '-c', HOUR_LONG_COMPILE, f'--config={cfg}',
                         f'--workdir={tmp_path / "w"}'], timeout=600)
  assert 'Unable to initialize backend' not in out
  assert re.search(r'\d+/6 \[', out), out[-3000:]  # the bar was drawn
  log_segments = 0
  for line in out.replace('\r\n', '\n').split('\n'):
    # What the terminal finally shows on this row: the text after the last \r.
    shown = line.split('\r')[-1]
    m = LOG_LINE.search(shown)
    if m:
      log_segments += 1
      assert shown[:m.start()].strip() == '', f'log line overwritten by the bar: {line!r}'
    # A log line never follows bar text on the same row ("...step/s]I1203 ...").
    for seg in line.split('\r'):
      m = LOG_LINE.search(seg)
      assert not m or seg[:m.start()].strip() == '', f'bar and log glued: {line!r}'
  assert log_segments >= 6
  summary = re.search(r'train 16 px / eval 16 px', out)
  notice = out.find('Compiling F0')
  first_step = out.find('step 1/6')
  assert summary and 0 <= notice < first_step, out[-3000:]
  assert 'first step' in out[notice:notice + 300]
  assert 'Final top-1' in out
  # The compile: ticking on the bar, then one line with its length, before step 1.
  assert 'compiling the train step: 0 s' in out[notice:first_step], out[-3000:]
  compiled = re.search(r'Compiled the train step in (\d+)\.\d s; step rates and ETAs '
                       r'leave it out', out)
  assert compiled and notice < compiled.start() < first_step, out[-3000:]
  assert int(compiled.group(1)) >= 3600, compiled.group(0)
  # The bar's last rendering, 6/6 [elapsed<remaining, rate]: neither holds the hour.
  bars = re.findall(r'6/6 \[(?:(\d+):)?(\d\d):(\d\d)<[^,]*,\s*([\d.]+)(s/step|step/s)\]',
                    out)
  assert bars, out[-3000:]
  h, m, s, rate, unit = bars[-1]
  assert int(h or 0) * 3600 + int(m) * 60 + int(s) < 1800, bars[-1]
  assert unit == 'step/s' or float(rate) < 36, bars[-1]
