"""benchmarks/: the baselines and the benchmark tooling (no GPU needed).

The naive mixed-precision baseline against the reference model (float32: the same
function; bfloat16: bf16-level noise); the optimised train step (Trainer:
jit(shard_map), donated state, and with remat) against a plain non-donated step of
that baseline in float32;
`compile_step`'s handling of XLA options; the tooling's arithmetic and reports.
"""
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))

# F0 blocks at 1/8 width with 16-wide groups: bottlenecks of 1, 2, 6 and 6 groups,
# so grouped convolutions are exercised; stochastic depth and dropout are on.
KW = dict(width=0.125, group_size=16, depths=(1, 1, 1, 1), stochdepth_rate=0.2,
          drop_rate=0.2)
NUM_CLASSES = 10


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3), jnp.float32)
  ct = jax.random.normal(jax.random.PRNGKey(3), (4, NUM_CLASSES), jnp.float32)
  return x, ct


@functools.lru_cache(maxsize=None)
def _params():
  x, _ = _inputs()
  return models.create('F0', NUM_CLASSES, **KW).init(jax.random.PRNGKey(0), x, True)


def _logits_and_grads(net, dtype):
  """Training-mode logits and d(sum(logits * ct))/dparams, same RNG for every net."""
  x, ct = _inputs()

  @jax.jit
  def f(params):
    def loss(p):
      logits = net.apply(p, jax.random.PRNGKey(2), x.astype(dtype), True)['logits']
      return jnp.sum(logits * ct), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads

  return f(_params())


@functools.lru_cache(maxsize=None)
def _reference(dtype_name):
  return _logits_and_grads(models.create('F0', NUM_CLASSES, **KW), jnp.dtype(dtype_name))


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))


def _assert_trees_close(a, b, rtol):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for path, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], leaves_a, leaves_b):
    assert _max_rel(x, y) <= rtol, (path[0], _max_rel(x, y))


def _cosine(a, b):
  va = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  vb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


@pytest.mark.slow
def test_plain_model_equals_reference_in_float32():
  import baselines  # benchmarks/baselines.py
  logits, grads = _logits_and_grads(baselines.naive_model('F0', NUM_CLASSES, jnp.float32, **KW),
                                    jnp.float32)
  ref_logits, ref_grads = _reference('float32')
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  _assert_trees_close(grads, ref_grads, rtol=1e-4)


@pytest.mark.slow
def test_plain_model_matches_reference_to_bf16_precision():
  """In bf16 the two differ only by where weights are rounded: bf16-level noise."""
  import baselines  # benchmarks/baselines.py
  logits, grads = _logits_and_grads(
      baselines.naive_model('F0', NUM_CLASSES, jnp.bfloat16, **KW), jnp.bfloat16)
  ref_logits, ref_grads = _reference('bfloat16')
  f32_logits, f32_grads = _reference('float32')
  noise = float(np.max(np.abs(np.asarray(ref_logits) - np.asarray(f32_logits))))
  diff = float(np.max(np.abs(np.asarray(logits) - np.asarray(ref_logits))))
  assert diff <= 4 * noise + 1e-3, (diff, noise)
  assert _cosine(grads, ref_grads) > 0.99
  assert _cosine(ref_grads, f32_grads) > 0.99
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))


def test_compile_step_drops_unknown_xla_options():
  import baselines  # benchmarks/baselines.py
  jitted = jax.jit(lambda x: jnp.tanh(x) * 2)
  logs = []
  compiled, used = baselines.compile_step(
      jitted, (jnp.ones(3),), {'xla_gpu_autotune_level': 4,
                               'xla_certainly_not_an_option_x': True}, log=logs.append)
  assert used == {'xla_gpu_autotune_level': 4}
  assert logs and 'xla_certainly_not_an_option_x' in logs[0]
  np.testing.assert_allclose(compiled(jnp.ones(3)), 2 * np.tanh(1.0), rtol=1e-6)
  for preset in baselines.XLA_PRESETS.values():  # every preset's keys are known to XLA
    _, used = baselines.compile_step(jitted, (jnp.ones(3),), preset, log=lambda m: None)
    assert used == preset


@pytest.mark.slow
def test_optimised_train_step_equals_plain_step():
  """Trainer's donated jit(shard_map) step == a plain non-donated step, float32; and
  so does the step of a config with remat='convs' (train.create_model ->
  models.create(remat=...)); the plain step runs benchmarks' naive baseline, which in
  float32 computes the reference function."""
  import baselines  # benchmarks/baselines.py
  import train_step  # benchmarks/train_step.py: wires steps as nfnet_jax.train does
  from nfnet_jax import configs, optim, train
  c = configs.base_config()
  c.model, c.batch_size, c.compute_dtype = 'F0', 4, 'float32'
  c.model_kwargs = dict(KW)
  net = train.create_model(c, NUM_CLASSES)
  tx, sched = optim.build_optimizer(c.optimizer, 100, 0, c.batch_size)
  opt = train_step.build_train_steps(c, net, tx, sched, 32)
  plain = train_step.build_train_steps(
      c, net, tx, sched, 32, plain_model=baselines.naive_model('F0', NUM_CLASSES, jnp.float32,
                                                          **KW))
  x, _ = _inputs()
  labels = jax.nn.one_hot(jnp.arange(4) % NUM_CLASSES, NUM_CLASSES)
  batch = opt['trainer'].global_batch(dict(images=np.asarray(x), labels=np.asarray(labels),
                                           mask=np.ones(4, np.float32)))
  c_remat = c.copy_and_resolve_references()
  c_remat.remat = 'convs'
  rematted = train.create_model(c_remat, NUM_CLASSES)
  assert rematted is not net
  remat = train_step.build_train_steps(c_remat, net, tx, sched, 32, model=rematted)
  state = opt['init']()
  out_plain = jax.device_get(plain['step'](state, batch, *plain['extra']))
  out_remat = jax.device_get(remat['step'](opt['init'](), batch, *remat['extra']))
  out_opt = jax.device_get(opt['step'](state, batch, *opt['extra']))  # donates `state`
  (s_plain, m_plain) = out_plain[:2]
  for s_opt, m_opt in (out_opt[:2], out_remat[:2]):
    for k in ('loss', 'top1', 'grad_norm'):
      np.testing.assert_allclose(m_opt[k], m_plain[k], rtol=1e-5)
    _assert_trees_close(s_opt['params'], s_plain['params'], rtol=1e-5)
    _assert_trees_close(s_opt['opt_state'], s_plain['opt_state'], rtol=1e-4)


# ---------------------------------------------------------------------------
# Benchmark tooling (no compilation).
# ---------------------------------------------------------------------------
def test_benchmark_tooling(tmp_path):
  import common  # benchmarks/common.py
  import train_step
  assert common.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert common.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
  assert common.peak_tflops('NVIDIA H200', 'bfloat16') == 989.0
  assert common.peak_tflops('CPU x86_64', 'bfloat16') is None
  f = common.throughput_fields(256, 0.05, 6_980_000_000, 'NVIDIA H200', 'bfloat16')
  assert f['images_per_s'] == pytest.approx(5120)
  assert f['tflops'] == pytest.approx(3 * 2 * 6.98e9 * 256 / 0.05 / 1e12)
  assert f['mfu'] == pytest.approx(f['tflops'] / 989.0)
  assert train_step.parse_args(['--variant', 'remat,split']).variants == ['remat', 'split']
  args = train_step.parse_args(['--variant', 'both', '--depths', '1,1,2,1', '--width',
                                '0.125', '--xla-preset', 'conv_fusion', '--xla-opt',
                                'xla_gpu_autotune_level=2'])
  assert args.variants == ['optimised', 'plain']
  assert train_step.model_overrides(args) == dict(width=0.125, depths=(1, 1, 2, 1))
  assert train_step.parse_xla_opts(args) == {
      'xla_gpu_experimental_enable_conv_fusion': True, 'xla_gpu_autotune_level': 2}
  recs = [dict(kind='train', variant='timm eager', model='F0', batch=256, image=192,
               dtype='bfloat16', status='ok', step_s_median=0.1, images_per_s=2560.0,
               peak_bytes=2 ** 30),
          dict(kind='train', variant='ours optimised', model='F0', batch=256, image=192,
               dtype='bfloat16', status='ok', step_s_median=0.04, images_per_s=6400.0,
               mfu=0.3, compile_s=40.0, date='d', device_kind='H', device_count=1),
          dict(kind='train', variant='ours plain', model='F0', batch=256, image=192,
               dtype='bfloat16', status='error', error='boom')]
  table = common.summary_table(recs)
  assert '2.50' in table and 'boom' in table
  md = tmp_path / 'R.md'
  common.append_results_md(str(md), recs)
  common.append_results_md(str(md), recs[1:2])
  text = md.read_text()
  assert text.count('| date |') == 1 and text.count('ours optimised') == 2
  wd = tmp_path / 'qs'
  wd.mkdir()
  (wd / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in [
      {'step': 10, 'train/loss': 2.3}, {'step': 20, 'train/loss': 1.9},
      {'step': 20, 'eval/raw_top1': 0.4}]))
  assert common.quickstart_check(str(wd), str(tmp_path / 'q.json')) == 0
  rec = json.loads((tmp_path / 'q.json').read_text())[0]
  assert rec['loss_falls'] and rec['loss_last'] == 1.9
