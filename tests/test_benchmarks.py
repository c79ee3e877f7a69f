"""benchmarks/: the scripts run as a user runs them (subprocesses, no GPU needed).

The naive mixed-precision baseline against the reference model (float32: the same
function; bfloat16: bf16-level noise) through `baselines.py compare`; the optimised
train step (Trainer: jit(shard_map), donated state, and with remat) against a plain
non-donated step of that baseline in float32 through `train_step.py`; XLA options
that this XLA does not know are dropped and reported; the tooling's arithmetic and
reports through the scripts' command lines.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'benchmarks')

# F0's first two stages, one block each, at 1/8 width with 16-wide groups:
# bottlenecks of 1 and 2 groups, so grouped convolutions are exercised; stochastic
# depth and dropout are on. (Compiling is most of these tests' time: two blocks, not
# four.)
TINY = ['--model', 'F0', '--width', '0.125', '--group-size', '16', '--depths', '1,1',
        '--num-classes', '10', '--batch', '4', '--image', '32']


def run(script, *args, ok=True, timeout=900):
  """`python benchmarks/<script> args...` with this checkout's package."""
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env.setdefault('JAX_PLATFORMS', 'cpu')
  # These tests check what the scripts compute and report, never how fast: XLA's
  # backend optimisation (most of a CPU compile's time) is left out.
  env.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
  r = subprocess.run([sys.executable, os.path.join(BENCH, script), *map(str, args)],
                     capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
  if ok:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))


def _cosine(arrays, keys_a, keys_b):
  va = np.concatenate([np.ravel(arrays[k]).astype(np.float64) for k in keys_a])
  vb = np.concatenate([np.ravel(arrays[k]).astype(np.float64) for k in keys_b])
  return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


@pytest.fixture(scope='module')
def comparison(tmp_path_factory):
  """Logits and grads of naive_model and models.create, float32 and bfloat16."""
  out = tmp_path_factory.mktemp('cmp') / 'cmp.npz'
  run('baselines.py', 'compare', *TINY, '--stochdepth-rate', '0.2', '--drop-rate', '0.2',
      '--dtype', 'float32,bfloat16', '--out', out)
  with np.load(out) as f:
    return dict(f)


def _grad_keys(arrays, dtype, which):
  prefix = f'{dtype}/{which}/grads/'
  return sorted(k for k in arrays if k.startswith(prefix))


@pytest.mark.slow
def test_plain_model_equals_reference_in_float32(comparison):
  a = comparison
  np.testing.assert_allclose(a['float32/naive/logits'], a['float32/reference/logits'],
                             rtol=1e-5, atol=1e-6)
  naive, ref = _grad_keys(a, 'float32', 'naive'), _grad_keys(a, 'float32', 'reference')
  assert [k.split('/', 3)[3] for k in naive] == [k.split('/', 3)[3] for k in ref]
  assert len(naive) > 20  # every parameter of the tiny F0
  for kn, kr in zip(naive, ref):
    assert _max_rel(a[kn], a[kr]) <= 1e-4, (kn, _max_rel(a[kn], a[kr]))


@pytest.mark.slow
def test_plain_model_matches_reference_to_bf16_precision(comparison):
  """In bf16 the two differ only by where weights are rounded: bf16-level noise."""
  a = comparison
  noise = float(np.max(np.abs(a['bfloat16/reference/logits']
                              - a['float32/reference/logits'])))
  diff = float(np.max(np.abs(a['bfloat16/naive/logits'] - a['bfloat16/reference/logits'])))
  assert diff <= 4 * noise + 1e-3, (diff, noise)
  naive, ref = _grad_keys(a, 'bfloat16', 'naive'), _grad_keys(a, 'bfloat16', 'reference')
  assert _cosine(a, naive, ref) > 0.99
  assert _cosine(a, ref, _grad_keys(a, 'float32', 'reference')) > 0.99
  for k in naive:
    assert a[k].dtype == np.float32 and np.all(np.isfinite(a[k])), k


def test_xla_presets_known_and_unknown_options_dropped(tmp_path):
  out = tmp_path / 'presets.json'
  run('baselines.py', 'xla-presets', '--json', out, '--opt', 'xla_gpu_autotune_level=4',
      '--opt', 'xla_certainly_not_an_option_x=true')
  res = json.loads(out.read_text())
  custom = res.pop('custom')
  assert custom['used'] == {'xla_gpu_autotune_level': 4}
  assert len(custom['log']) == 1 and 'xla_certainly_not_an_option_x' in custom['log'][0]
  np.testing.assert_allclose(custom['value'], 2 * np.tanh(1.0), rtol=1e-6)
  assert {'none', 'conv_fusion', 'autotune4'} <= set(res)
  for name, r in res.items():  # every preset's keys are known to XLA
    assert r['used'] == r['asked'] and not r['log'], name
    np.testing.assert_allclose(r['value'], 2 * np.tanh(1.0), rtol=1e-6)


@pytest.mark.slow
def test_optimised_train_step_equals_plain_step(tmp_path):
  """Trainer's donated jit(shard_map) step == a plain non-donated step, float32; and
  so does the step of remat='convs'; the plain step runs the naive baseline, which in
  float32 computes the reference function. Same data and initial state for all three,
  so equal losses over 1 warm-up + 2 timed + 2 pipelined steps mean equal updates."""
  out, md = tmp_path / 'train.json', tmp_path / 'R.md'
  r = run('train_step.py', *TINY, '--dtype', 'float32', '--steps', '2', '--warmup', '1',
          '--variant', 'optimised,plain,remat', '--xla-preset', 'conv_fusion',
          '--xla-opt', 'xla_gpu_autotune_level=2',
          '--xla-opt', 'xla_certainly_not_an_option_x=true', '--json', out,
          '--results-md', md)
  recs = {rec['variant']: rec for rec in json.loads(out.read_text())}
  assert set(recs) == {'ours optimised+conv_fusion', 'ours plain',
                       'ours optimised+remat-convs+conv_fusion'}, set(recs)
  plain = recs['ours plain']
  for rec in recs.values():
    assert rec['status'] == 'ok' and rec['all_finite']
    assert rec['model_kwargs'] == dict(width=0.125, depths=[1, 1], group_size=16)
    # throughput arithmetic: images/s and 3 x 2 x MACs x batch / step time
    assert rec['images_per_s'] == pytest.approx(4 / rec['step_s_median'])
    assert rec['tflops'] == pytest.approx(
        6 * rec['macs_per_image'] * 4 / rec['step_s_median'] / 1e12)
    assert rec['mfu'] is None  # no peak figure for a CPU
    np.testing.assert_allclose([rec['loss_first'], rec['loss_last']],
                               [plain['loss_first'], plain['loss_last']], rtol=1e-5)
  assert plain['loss_last'] != plain['loss_first']  # the steps do update the state
  assert plain['xla_options'] == {} and not plain['donation']
  opt = recs['ours optimised+conv_fusion']
  assert opt['donation'] and opt['xla_options'] == {
      'xla_gpu_experimental_enable_conv_fusion': True, 'xla_gpu_autotune_level': 2}
  assert 'xla_certainly_not_an_option_x' in opt['notes']
  assert 'xla_certainly_not_an_option_x' in r.stdout
  text = md.read_text()  # one RESULTS.md row per measured variant, one header
  assert text.count('| date |') == 1 and text.count('| train |') == 3


def test_train_step_rejects_bad_variant():
  r = run('train_step.py', '--variant', 'remat,bogus', ok=False, timeout=120)
  assert r.returncode == 2 and "unknown variant 'bogus'" in r.stderr


# ---------------------------------------------------------------------------
# Benchmark tooling (no compilation).
# ---------------------------------------------------------------------------
def _throughput(kind, dtype, batch=256, step_s=0.05, macs=6_980_000_000):
  r = run('timing.py', kind, dtype, batch, step_s, macs, timeout=120)
  return json.loads(r.stdout)


def test_peak_flops_and_throughput_arithmetic():
  assert _throughput('NVIDIA H100 80GB HBM3', 'bfloat16')['peak_tflops'] == 989.0
  assert _throughput('NVIDIA H100 PCIe', 'bfloat16')['peak_tflops'] == 756.0
  assert _throughput('CPU x86_64', 'bfloat16')['peak_tflops'] is None
  r = run('device.py', 'NVIDIA H100 NVL', 'float32', timeout=120)
  assert json.loads(r.stdout)['peak_tflops'] == 418.0
  f = _throughput('NVIDIA H200', 'bfloat16')
  assert f['peak_tflops'] == 989.0
  assert f['images_per_s'] == pytest.approx(5120)
  assert f['tflops'] == pytest.approx(3 * 2 * 6.98e9 * 256 / 0.05 / 1e12)
  assert f['mfu'] == pytest.approx(f['tflops'] / 989.0)


def test_summary_table_and_quickstart_check(tmp_path):
  recs = [dict(kind='train', variant='timm eager', model='F0', batch=256, image=192,
               dtype='bfloat16', status='ok', step_s_median=0.1, images_per_s=2560.0,
               peak_bytes=2 ** 30),
          dict(kind='train', variant='ours optimised', model='F0', batch=256, image=192,
               dtype='bfloat16', status='ok', step_s_median=0.04, images_per_s=6400.0,
               mfu=0.3, compile_s=40.0, date='d', device_kind='H', device_count=1),
          dict(kind='train', variant='ours plain', model='F0', batch=256, image=192,
               dtype='bfloat16', status='error', error='boom')]
  (tmp_path / 'a.json').write_text(json.dumps(recs))
  (tmp_path / 'bad.json').write_text('{not json')
  r = run('summarize.py', tmp_path / 'a.json', tmp_path / 'bad.json', timeout=120)
  row = next(l for l in r.stdout.splitlines() if l.startswith('train  ours optimised'))
  assert '2.50' in row and '30.0%' in row  # x timm eager, MFU
  assert 'boom' in r.stdout and 'skipping' in r.stdout

  wd = tmp_path / 'qs'
  wd.mkdir()
  (wd / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in [
      {'step': 10, 'train/loss': 2.3}, {'step': 20, 'train/loss': 1.9},
      {'step': 20, 'eval/raw_top1': 0.4}]))
  run('quickstart_check.py', wd, tmp_path / 'q.json', 12.5, timeout=120)
  rec = json.loads((tmp_path / 'q.json').read_text())[0]
  assert rec['loss_falls'] and rec['loss_last'] == 1.9 and rec['wall_s'] == 12.5
  assert rec['eval'] == {'eval/raw_top1': 0.4}
  (wd / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in [
      {'step': 10, 'train/loss': 2.3}, {'step': 20, 'train/loss': 2.4}]))
  r = run('quickstart_check.py', wd, tmp_path / 'q.json', ok=False, timeout=120)
  assert r.returncode == 1
  assert json.loads((tmp_path / 'q.json').read_text())[0]['error'] == 'loss did not fall'


def test_grad_accum_benchmark_records_and_equal_gradients(tmp_path):
  out = tmp_path / 'accum.json'
  r = run('grad_accum.py', '--width', '0.0625', '--image', '16', '--micro', '4',
          '--accum', '3', '--steps', '1', '--warmup', '0', '--json', out)
  recs = {rec['variant']: rec for rec in json.loads(out.read_text())}
  assert set(recs) == {'one', 'scan', 'unrolled'}
  assert recs['one']['images'] == 4 and recs['scan']['images'] == 12
  assert recs['one']['vs_one'] == pytest.approx(1.0)
  for rec in recs.values():
    assert rec['images_per_s'] == pytest.approx(rec['images'] / rec['step_s_median'])
    assert rec['max_abs_grad_diff_scan_vs_unrolled'] < 1e-5
  assert '| unrolled | 12 |' in r.stdout
  bad = run('grad_accum.py', '--accum', '1', ok=False, timeout=120)
  assert bad.returncode == 2 and '--accum must be >= 2' in bad.stderr
