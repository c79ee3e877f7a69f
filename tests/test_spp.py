"""Signal-propagation plots: the CLI writes a PNG and the numbers behind it, and those
numbers show what Normalizer-Free blocks do at initialisation (N(0, 1) inputs).

Reference numbers (F0, 64 px, batch 8, seed 0; skip gains at their init value 0):
avg_var  0.914 0.911 | 0.218 0.218 | 0.044 x6 | 0.0065 x3   (| = a strided stage)
avg_sq_mean <= 0.0025 everywhere; res_var of blocks 0, 1: 0.81, 0.72.
Skip gains 1, plain convs instead of Scaled WS: avg_sq_mean 0.54 -> 1.03 -> ... -> 7.10.
"""
import json
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import layers, models, spp

ALPHA = 0.2
TINY = dict(width=0.125, group_size=None, depths=(1, 2, 2, 2))
TINY_ARGS = ['--override', 'width=0.125', '--override', 'group_size=null',
             '--override', 'depths=[1,2,2,2]', '--image-size', '32', '--batch', '4']


def _run_cli(tmp_path, name, argv):
  out = tmp_path / f'{name}.png'
  spp.main(argv + ['--out', str(out)])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  data = json.loads((tmp_path / f'{name}.json').read_text())
  return {label: {k: np.asarray(v) for k, v in c.items()}
          for label, c in data['curves'].items()}, data['config']


def _identity_blocks(stage):
  """Indices k of blocks that are not the first of their stage (identity shortcut)."""
  return [k for k in range(1, len(stage)) if stage[k] == stage[k - 1]]


def _check_skip_gain_zero(c, num_blocks):
  """Skip gains 0: identity blocks pass the stream through unchanged."""
  assert len(c['avg_var']) == num_blocks + 1 and len(c['res_var']) == num_blocks
  for k in _identity_blocks(c['stage']):
    # Output of block k is index k + 1, its input index k.
    np.testing.assert_allclose(c['avg_var'][k + 1], c['avg_var'][k], rtol=1e-5)
    np.testing.assert_allclose(c['avg_sq_mean'][k + 1], c['avg_sq_mean'][k], rtol=1e-4,
                               atol=1e-9)


def _check_residual_bookkeeping(c):
  """Skip gains 1: inside a stage, Var(x + alpha f(x)) = Var(x) + alpha^2 Var(f(x))
  (the branch is nearly uncorrelated with its input at init), the growth the model's
  beta = 1 / expected_std accounts for. Summed over each stage's identity blocks: in
  F0's last stage (2x2 maps, 32 values per channel) single blocks are off by up to 47%
  from the sampling noise of the covariance term; stages sum to within 17%."""
  stage = c['stage']
  for s in sorted(set(stage.tolist())):
    ks = [k for k in _identity_blocks(stage) if stage[k] == s]
    if not ks:
      continue
    grew = sum(c['avg_var'][k + 1] - c['avg_var'][k] for k in ks)
    np.testing.assert_allclose(grew, ALPHA ** 2 * sum(c['res_var'][k] for k in ks),
                               rtol=0.3, err_msg=f'stage {s}')


def test_init_params_same_tree_and_distributions():
  fast = spp.init_params('F0', 10, 32, seed=0, **TINY)
  model = models.create('F0', 10, **TINY)
  ref = jax.eval_shape(lambda k, x: model.init(k, x, is_training=False),
                       jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.structure(fast) == jax.tree.structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fast),
                          jax.tree.leaves(ref)):
    assert a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(path)
  assert all(float(v['skip_gain']) == 0 for v in fast.values() if 'skip_gain' in v)
  assert all(np.all(v['gain'] == 1) and np.all(v['bias'] == 0)
             for v in fast.values() if 'gain' in v)
  w = fast['NFNet/~/stem_conv2']['w']                    # N(0, 1/fan_in), fan_in 288
  assert abs(w.std() * math.sqrt(3 * 3 * 32) - 1) < 0.03 and abs(w.mean()) < 0.01
  head = fast['NFNet/~/linear']['w']                     # N(0, 0.01^2)
  assert abs(head.std() / 0.01 - 1) < 0.1
  se = fast['NFNet/~/nf_block_3/~/squeeze_excite/~/linear']['w']   # trunc. N, 2 std
  assert np.abs(se).max() <= 2 / math.sqrt(se.shape[0]) + 1e-6
  again = spp.init_params('F0', 10, 32, seed=0, **TINY)
  np.testing.assert_array_equal(again['NFNet/~/stem_conv2']['w'], w)
  other = spp.init_params('F0', 10, 32, seed=1, **TINY)
  assert not np.array_equal(other['NFNet/~/stem_conv2']['w'], w)


def test_plain_conv_interceptor_skips_standardisation():
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 6)).astype(np.float32)

  def run(intercept):
    def f(x):
      conv = layers.WSConv2D(4, 3, stride=2, feature_group_count=2, name='c')
      if intercept:
        with hk.intercept_methods(spp.plain_conv_interceptor):
          return conv(x)
      return conv(x)
    return hk.transform(f)

  params = run(False).init(jax.random.PRNGKey(0), x)
  params['c']['gain'] = np.linspace(0.5, 2, 4).astype(np.float32)
  params['c']['bias'] = np.arange(4, dtype=np.float32)
  w = params['c']['w']
  plain = jax.lax.conv_general_dilated(
      x, w * params['c']['gain'], (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=2) + params['c']['bias']
  np.testing.assert_allclose(run(True).apply(params, None, x), plain, rtol=1e-5, atol=1e-5)
  standardised = run(False).apply(params, None, x)
  assert not np.allclose(standardised, plain, atol=1e-2)


def test_cli_tiny_model(tmp_path):
  """The CLI end to end on a reduced NFNet (fast): files, shapes, identity blocks."""
  curves, config = _run_cli(tmp_path, 'tiny', ['--model', 'F0'] + TINY_ARGS)
  assert list(curves) == ['F0'] and config['overrides']['depths'] == [1, 2, 2, 2]
  c = curves['F0']
  assert list(c['stage']) == [0, 1, 1, 2, 2, 3, 3]
  _check_skip_gain_zero(c, 7)
  assert np.all(c['avg_sq_mean'] < 0.05)
  assert np.all(np.isfinite(c['res_var'])) and np.all(c['res_var'] > 0)
  # Same seed, same numbers; the comparison run puts both models in one JSON.
  curves2, _ = _run_cli(tmp_path, 'tiny2', ['--model', 'F0', '--compare', 'F0+'] + TINY_ARGS)
  assert list(curves2) == ['F0', 'F0+']
  np.testing.assert_allclose(curves2['F0']['avg_var'], c['avg_var'], rtol=1e-6)


def test_cli_keeps_existing_files_unless_overwrite(tmp_path):
  """An existing PNG (or its JSON) at --out: one line, exit status 1, nothing computed
  and the files unchanged; with --overwrite both are replaced."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out, js = tmp_path / 'spp_f0.png', tmp_path / 'spp_f0.json'
  out.write_bytes(b'committed plot')
  r = subprocess.run([sys.executable, '-m', 'nfnet_jax.spp', '--model', 'F0', '--out',
                      str(out), *TINY_ARGS], capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and not r.stdout, r.stderr
  assert r.stderr.strip() == (f'python -m nfnet_jax.spp: error: {out} already exists; '
                              'pass --overwrite to replace, or another --out')
  assert out.read_bytes() == b'committed plot' and not js.exists()
  js.write_text('{}')  # The JSON alone is guarded too.
  out.unlink()
  with pytest.raises(SystemExit) as e:
    spp.main(['--out', str(out)] + TINY_ARGS)
  assert e.value.code == 1 and js.read_text() == '{}' and not out.exists()
  out.write_bytes(b'committed plot')
  spp.main(['--out', str(out), '--overwrite'] + TINY_ARGS)
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads(js.read_text())['config']['model'] == 'F0'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['spp_f0.json', 'spp_f0.png']


def test_cli_rejects_both_comparisons(tmp_path):
  with pytest.raises(SystemExit):
    spp.main(['--compare', 'F1', '--compare-ws', '--out', str(tmp_path / 'x.png')])


@pytest.mark.slow
def test_cli_f0_signal_propagation(tmp_path):
  """NFNet-F0 at init, from the JSON the CLI writes next to its PNG."""
  curves, config = _run_cli(tmp_path, 'f0', ['--model', 'F0'])
  assert config['image_size'] == 64 and config['batch'] == 8
  c = curves['F0']
  assert list(c['stage']) == [0] + [1] * 2 + [2] * 6 + [3] * 3
  _check_skip_gain_zero(c, 12)
  # Unit variance where the input matches what the model expects: the stem (four WS
  # convs, three gamma-scaled GELUs) maps N(0, 1) images to ~unit variance, and the
  # residual branches of the first blocks (input variance ~0.9, expected 1) give ~1.
  assert 0.7 < c['avg_var'][0] < 1.3, c['avg_var'][0]
  assert np.all((0.5 < c['res_var'][:2]) & (c['res_var'][:2] < 1.5)), c['res_var'][:2]
  # No mean shift anywhere (Scaled WS kernels are zero-mean).
  assert np.all(c['avg_sq_mean'] < 0.01), c['avg_sq_mean']
  # The known effect of white inputs: the strided shortcut's 2x2 average pool divides
  # the variance of a spatially independent signal by ~4 (stage 0 -> stage 1).
  assert 0.15 < c['avg_var'][2] / c['avg_var'][1] < 0.35, c['avg_var'][1:3]

  # With and without Scaled WS, skip gains 1 (default for --compare-ws).
  curves, config = _run_cli(tmp_path, 'ws', ['--model', 'F0', '--compare-ws'])
  assert config['skip_gain'] == 1.0
  ws, plain = curves['F0 (Scaled WS)'], curves['F0 (plain convs, no WS)']
  _check_residual_bookkeeping(ws)
  assert np.all(ws['avg_sq_mean'] < 0.01), ws['avg_sq_mean']
  # The residual branches now reach the stream: the variance grows inside a stage.
  assert all(ws['avg_var'][k + 1] > ws['avg_var'][k] for k in _identity_blocks(ws['stage']))
  # Plain convs pass the positive mean of the activations on: the mean shift builds up
  # with depth and dwarfs the WS model's.
  sq = plain['avg_sq_mean']
  assert sq[-1] > 1 and sq[-1] > 5 * sq[1] and sq[-1] > 100 * ws['avg_sq_mean'][-1], sq
  assert np.mean(np.diff(sq) > 0) >= 0.9, sq
  assert np.all(plain['res_var'] > 1), plain['res_var']


def test_cli_without_matplotlib_stops_first_with_install_advice(tmp_path):
  """matplotlib blocked (a None entry in sys.modules makes `import matplotlib` fail):
  one line naming the demo extra, exit status 1, no model built and no file written."""
  import subprocess
  import sys
  import time
  code = ('import sys; sys.modules["matplotlib"] = None\n'
          'from nfnet_jax import spp\n'
          'def forbidden(*a, **k): raise AssertionError("computed before the check")\n'
          'spp.signal_stats = forbidden\n'
          'spp.main(sys.argv[1:])\n')
  out = tmp_path / 'x.png'
  start = time.monotonic()
  r = subprocess.run([sys.executable, '-c', code, '--model', 'F0', '--out', str(out)],
                     capture_output=True, text=True, timeout=120)
  elapsed = time.monotonic() - start
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert 'matplotlib' in lines[0] and 'pip install -e .[demo]' in lines[0]
  assert 'Traceback' not in r.stderr and not r.stdout
  assert not out.exists() and not out.with_suffix('.json').exists()
  assert elapsed < 60  # import time only (F0 itself takes minutes on CPU)
