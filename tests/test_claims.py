"""`python -m nfnet_jax.claims`: every run of every claim is a valid training config,
the summaries compute what they say, bad arguments get one-line errors, and a reduced
sweep runs end to end through the real command lines (JSON + plot, then a re-run that
skips the finished runs)."""
import importlib.util
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from nfnet_jax import claims

REPO = Path(__file__).resolve().parents[1]


def _experiment_config(arg: str):
  spec = importlib.util.spec_from_file_location('claims_exp', REPO / 'experiments' /
                                                'claims.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('scale', claims.SCALES)
def test_every_run_of_every_claim_is_a_valid_config(scale):
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  if scale != 'imagenet':  # chance level of the plots and of diverged runs
    assert claims._num_classes(scale) == _experiment_config(scale).data.offline.num_classes
  for name, claim in claims.CLAIMS.items():
    specs = claim.runs(scale, [0, 1])
    assert len({s.name for s in specs}) == len(specs), name  # one workdir per run
    for spec in specs:
      config = _experiment_config(f'{scale},{spec.variant}' if spec.variant else scale)
      with config.unlocked():
        config.update_from_flattened_dict(spec.overrides)
      configs.validate_config(config, num_devices=1, num_processes=1)
      # What the claim compares is what the run gets.
      if 'x' in spec.labels and name == 'nf_vs_bn':
        assert config.model.endswith(f'resnet{spec.labels["x"]}')
      if name == 'batch_size_agc':
        assert config.batch_size == spec.labels['x']
        micro = config.batch_size // config.grad_accum_steps
        assert micro <= claims._max_micro_batch(scale)
        # lr = base_lr * B / 256: linear in B, as the paper scales it.
        assert config.optimizer.scale_lr_by_batch
        assert (config.optimizer.agc_clipping > 0) == (spec.labels['arm'] == 'nf_agc')


def test_both_arms_share_the_recipe():
  """nf_vs_bn runs differ in the model (and seed) only."""
  specs = claims.CLAIMS['nf_vs_bn'].runs('cpu', [0])
  assert {tuple(sorted(s.overrides)) for s in specs} == {('model', 'seed')}
  assert {s.overrides['model'] for s in specs} == {
      'nf_resnet26', 'bn_resnet26', 'nf_resnet50', 'bn_resnet50'}
  # The control arm: post-activation BN-ResNet, branches starting at zero.
  v1 = [s for s in specs if s.labels['arm'] == 'bn_v1']
  assert [s.variant for s in v1] == ['v1']
  config = _experiment_config('cpu,v1')
  assert config.model_kwargs.preactivation is False
  assert {s.variant for s in specs if s.labels['arm'] != 'bn_v1'} == {''}


def test_summaries():
  rows = [dict(arm='nf', x=26, seed=0, status='ok', top1=0.5),
          dict(arm='nf', x=26, seed=1, status='ok', top1=0.7),
          dict(arm='bn', x=26, seed=0, status='ok', top1=0.4),
          dict(arm='bn', x=26, seed=1, status='failed', top1=None)]
  s = claims._summarize_nf_vs_bn(rows)
  assert s['top1']['nf']['26']['mean'] == pytest.approx(0.6)
  assert s['top1']['nf']['26']['std'] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert s['top1']['bn']['26']['n'] == 1  # the failed run is left out
  assert s['nf_minus_bn']['26'] == pytest.approx(0.2)
  assert s['nf_minus_bn_v1'] == {}  # no bn_v1 rows
  rows = [dict(arm='batch 64', x=c, seed=0, status='ok', top1=t)
          for c, t in ((0.01, 0.3), (0.04, 0.6), (0.16, 0.5))]
  rows.append(dict(arm='batch 1024', x=0.01, seed=0, status='diverged', top1=0.05))
  best = claims._summarize_clip(rows)['best_clipping']
  assert best['batch 64'] == dict(clipping=0.04, top1=0.6)
  assert best['batch 1024']['top1'] == 0.05  # diverged counts (as chance)
  cost = claims._summarize_cost([dict(arm='F0', images_per_sec=500.0, batch_size=128)])
  assert cost['throughput']['F0']['step_ms'] == pytest.approx(256.0)
  assert 'PyTorch' in cost['throughput']['efficientnet']['note']


def test_read_metrics_takes_the_final_eval_and_skips_cut_lines(tmp_path):
  lines = [dict(step=8, **{'train/loss': 2.0, 'train/images_per_sec': float('nan')}),
           dict(step=16, **{'train/loss': 1.5, 'train/images_per_sec': 900.0}),
           dict(step=16, **{'eval/raw_top1': 0.25, 'eval/ema_top1': 0.2,
                            'eval/raw_loss': 2.1})]
  text = '\n'.join(json.dumps(l) for l in lines) + '\n{"step": 17, "train/lo'
  (tmp_path / 'metrics.jsonl').write_text(text)
  m = claims.read_metrics(tmp_path)
  assert m == dict(train_loss=1.5, train_step=16, images_per_sec=900.0, top1=0.25,
                   ema_top1=0.2, eval_loss=2.1, eval_step=16)


def _cli(*args, env=None, timeout=60, cwd=REPO):
  env = dict(os.environ if env is None else env)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  return subprocess.run([sys.executable, '-m', 'nfnet_jax.claims', *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (['--claim', 'nf_vs_nb', '--out', 'x'], "invalid choice: 'nf_vs_nb'"),
    (['--claim', 'cost', '--out', 'x', '--seeds', '0,a'], 'expected integers'),
    (['--claim', 'cost', '--out', 'x', '--scale', 'tpu'], "invalid choice: 'tpu'"),
    (['--claim', 'cost', '--seeds', '1,1'], 'expected distinct integers'),
])
def test_bad_arguments_are_one_line_errors(args, message):
  r = _cli(*args)
  assert r.returncode == 2
  assert message in r.stderr and 'Traceback' not in r.stderr


def _documented_commands() -> list[tuple[str, list[str]]]:
  """(file, argv) of each `python -m nfnet_jax.claims ...` in README.md and docs/*.md
  (in code blocks or inline, comments dropped); a synopsis (<...>) is not a command."""
  import re  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  out = []
  for path in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]:
    for m in re.finditer(r'python -m nfnet_jax\.claims\b[^`\n]*', path.read_text()):
      if '<' not in m.group(0):
        out.append((path.name, shlex.split(m.group(0), comments=True)[3:]))
  return out


def test_documented_commands_work_as_written(tmp_path):
  """README's bare `python -m nfnet_jax.claims` lists every claim and runs nothing;
  each documented --claim command parses as written (checked with --dry_run, which
  runs nothing)."""
  commands = _documented_commands()
  assert ('README.md', []) in commands
  for name, argv in commands:
    if '--claim' in argv and '--dry_run' not in argv:
      argv = argv + ['--dry_run']
    r = _cli(*argv, cwd=tmp_path)
    assert r.returncode == 0, (name, argv, r.stderr)
    assert 'Traceback' not in r.stderr
    if '--claim' not in argv:
      words = ' '.join(r.stdout.split())  # the listing wraps its lines
      for claim in claims.CLAIMS.values():
        assert f'  {claim.name} ' in r.stdout and claim.paper in words, r.stdout
    else:
      assert r.stdout and all(' -m nfnet_jax.train ' in l
                              for l in r.stdout.strip().splitlines()), r.stdout
  # Defaults: --out is runs/claims under the working directory.
  r = _cli('--claim', 'nf_vs_bn', '--dry_run', cwd=tmp_path)
  assert '--workdir=runs/claims/nf_vs_bn/' in r.stdout, r.stdout
  assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_dry_run_prints_the_train_commands(tmp_path):
  r = _cli('--claim', 'batch_size_agc', '--out', str(tmp_path), '--dry_run')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 9  # 3 batch sizes x 3 arms
  assert all(' -m nfnet_jax.train --config=experiments/claims.py:cpu ' in l
             for l in lines)
  assert any('--config.batch_size=2048 --config.grad_accum_steps=8' in l for l in lines)
  assert not list(tmp_path.iterdir())  # nothing run, nothing written
  # The recipe file is an argument: the runs start from the one given.
  recipe = str(REPO / 'experiments' / 'claims.py')
  r = _cli('--claim', 'cost', '--config', recipe, '--dry_run', cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert all(f' --config={recipe}:cpu' in l for l in r.stdout.strip().splitlines())


def test_a_missing_recipe_file_is_one_line(tmp_path):
  # Outside the repository the default experiments/claims.py is not there.
  r = _cli('--claim', 'cost', '--out', str(tmp_path), cwd=tmp_path)
  assert r.returncode == 2
  assert '--config=experiments/claims.py: no such file' in r.stderr
  assert 'Traceback' not in r.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_reduced_sweep_end_to_end(tmp_path):
  """nf_vs_bn at the 'tiny' scale through the real CLIs: two training runs, their
  metrics in the JSON, a PNG; a second invocation reruns nothing."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  r = _cli('--claim', 'nf_vs_bn', '--scale', 'tiny', '--out', str(tmp_path), env=env,
           timeout=1800)
  assert r.returncode == 0, r.stdout + r.stderr
  report = json.loads((tmp_path / 'nf_vs_bn.json').read_text())
  assert report['claim'] == 'nf_vs_bn' and report['scale'] == 'tiny'
  assert report['complete'] and report['runs_done'] == report['runs_planned'] == 2
  runs = {row['name']: row for row in report['runs']}
  assert set(runs) == {'nf_resnet26_s0', 'bn_resnet26_s0'}
  for name, row in runs.items():
    assert row['status'] == 'ok', row
    assert row['model'] == name[:-3]
    assert 0.0 <= row['top1'] <= 1.0 and np.isfinite(row['train_loss'])
    # The numbers are the run's own: its metrics.jsonl's final eval.
    last = [json.loads(l) for l in (tmp_path / 'nf_vs_bn' / name / 'metrics.jsonl')
            .read_text().splitlines() if 'eval/raw_top1' in l][-1]
    assert row['top1'] == last['eval/raw_top1'] and row['eval_step'] == 2
  assert set(report['summary']['top1']) == {'nf', 'bn'}
  assert report['summary']['nf_minus_bn']['26'] == pytest.approx(
      runs['nf_resnet26_s0']['top1'] - runs['bn_resnet26_s0']['top1'])
  png = (tmp_path / 'nf_vs_bn.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert matplotlib.image.imread(tmp_path / 'nf_vs_bn.png').shape[:2] == (400, 600)
  # Re-running: finished runs are read back, not trained again.
  logs = {n: (tmp_path / 'nf_vs_bn' / n / 'train.log').read_text() for n in runs}
  again = _cli('--claim', 'nf_vs_bn', '--scale', 'tiny', '--out', str(tmp_path),
               env=env, timeout=120)
  assert again.returncode == 0, again.stderr
  assert json.loads((tmp_path / 'nf_vs_bn.json').read_text())['runs'] == report['runs']
  for n, text in logs.items():
    assert (tmp_path / 'nf_vs_bn' / n / 'train.log').read_text() == text


FAKE_TRAIN = '''
import json, sys
workdir, mode = sys.argv[1], sys.argv[2]
with open(workdir + '/metrics.jsonl', 'a') as f:
  f.write(json.dumps({'step': 4, 'train/loss': 1.0, 'train/images_per_sec': 10.0}) + '\\n')
  if mode == 'ok':
    f.write(json.dumps({'step': 4, 'eval/raw_top1': 0.75, 'eval/ema_top1': 0.5,
                        'eval/raw_loss': 0.9}) + '\\n')
if mode == 'diverged':
  print('nfnet_jax.train.NonFiniteError: 10 consecutive non-finite losses')
  sys.exit(1)
sys.exit(0 if mode == 'ok' else 3)
'''


def test_run_one_records_status_and_skips_finished_runs(tmp_path, monkeypatch):
  """With the train command replaced by a script: a finished run's row holds its
  metrics and is read back without running again; a diverged run scores chance; a
  failed run leaves no result (so the next invocation retries it)."""
  calls = []

  def fake_command(spec, scale, workdir, config):
    calls.append(spec.name)
    return [sys.executable, '-c', FAKE_TRAIN, str(workdir), spec.name]

  monkeypatch.setattr(claims, 'command', fake_command)
  env = dict(os.environ)
  for mode in ('ok', 'diverged', 'failed'):
    spec = claims.RunSpec(mode, {'model': 'nf_resnet26', 'seed': 3},
                          dict(arm='nf', x=26, seed=3))
    row = claims.run_one(spec, 'tiny', tmp_path, env, chance=0.2)
    assert row['status'] == mode and row['seed'] == 3 and row['model'] == 'nf_resnet26'
    result = tmp_path / mode / claims.RESULT_FILE
    if mode == 'ok':
      assert row['top1'] == 0.75 and row['ema_top1'] == 0.5 and row['train_loss'] == 1.0
      assert json.loads(result.read_text()) == row
      assert claims.run_one(spec, 'tiny', tmp_path, env, chance=0.2) == row
    elif mode == 'diverged':
      assert row['top1'] == row['ema_top1'] == 0.2 and result.exists()
    else:
      assert row['rc'] == 3 and not result.exists()
  assert calls == ['ok', 'diverged', 'failed']  # the finished 'ok' ran once


def test_a_run_finished_by_another_claim_is_reused(tmp_path, monkeypatch):
  """batch_size_agc's no-clip NF arm at the scale's batch trains exactly nf_vs_bn's
  nf_resnet26 (the defaults spelled out): its row is reused, nothing is trained. A run
  that differs in any setting (clipping, variant, seed) is trained."""
  trained = []

  class Done:
    returncode = 0

  def fake_run(cmd, **kwargs):
    trained.append(cmd)
    return Done()

  monkeypatch.setattr(claims.subprocess, 'run', fake_run)
  env = dict(os.environ)
  first = claims.RunSpec('nf_resnet26_s0', {'model': 'nf_resnet26', 'seed': 0},
                         dict(arm='nf', x=26, seed=0))
  claims.run_one(first, 'cpu', tmp_path / 'nf_vs_bn', env, chance=0.1)
  assert len(trained) == 1
  done = tmp_path / 'nf_vs_bn' / 'nf_resnet26_s0' / claims.RESULT_FILE
  row = json.loads(done.read_text())
  row.update(top1=0.7, ema_top1=0.69)
  done.write_text(json.dumps(row))

  twin = claims.RunSpec('nf_no_clip_b128_s0', {
      'model': 'nf_resnet26', 'seed': 0, 'optimizer.agc_clipping': 0.0,
      'batch_size': 128, 'grad_accum_steps': 1}, dict(arm='nf_no_clip', x=128, seed=0))
  reused = claims.run_one(twin, 'cpu', tmp_path / 'batch_size_agc', env, chance=0.1)
  assert len(trained) == 1
  assert reused['top1'] == 0.7 and reused['arm'] == 'nf_no_clip' and reused['x'] == 128
  assert reused['reused_from'] == os.path.join('nf_vs_bn', 'nf_resnet26_s0')
  assert json.loads((tmp_path / 'batch_size_agc' / 'nf_no_clip_b128_s0' /
                     claims.RESULT_FILE).read_text()) == reused

  others = [claims.RunSpec('agc', dict(twin.overrides, **{'optimizer.agc_clipping': 0.04}),
                           {}),
            claims.RunSpec('seed1', dict(twin.overrides, seed=1), {}),
            claims.RunSpec('v1', {'model': 'nf_resnet26', 'seed': 0}, {}, variant='v1')]
  for spec in others:
    claims.run_one(spec, 'cpu', tmp_path / 'other', env, chance=0.1)
  assert len(trained) == 4
  # Equal keys only for equal settings.
  key = lambda spec: claims.run_key(claims.command(spec, 'cpu', tmp_path)[1:])
  assert key(first) == key(twin)
  assert len({key(s) for s in [first, *others]}) == 4
  cost = claims.CLAIMS['cost'].runs('cpu', [0])[1]
  assert key(cost) is None  # a 24-step timing run is never anyone's twin
