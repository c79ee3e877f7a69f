"""What every model family shares: pinned numerics, the registry, remat policies.

`tests/fixtures/model_logits.npz` (written by tests/fixtures/make_logit_fixtures.py)
holds fixed parameters, images and logits of one small model per family; the models
must reproduce those logits and declare the same parameter tree. The file was written on
one CPU: another CPU (or XLA version) may sum in another order, which moved these logits
by up to 4.2e-4 relative on an AMD Zen 3, so they are compared within 1e-3 relative plus
1e-3 of the largest logit; a wrong padding, gamma or standardisation moves them by far more.
"""
import functools
import json
import os
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nf_testing
from nf_testing import JIT
from nfnet_jax import layers, models
from nfnet_jax.models import nf_regnet, nf_resnet, nfnet

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'model_logits.npz')


def _fixture_cases() -> dict[str, dict]:
  """case -> {spec, params {module: {leaf: array}}, images, logits_eval, logits_train}."""
  cases: dict[str, dict] = {}
  with np.load(FIXTURE) as data:
    for key in data.files:
      case, rest = key.split('/', 1)
      c = cases.setdefault(case, {'params': {}})
      if rest.startswith('params/'):
        module, leaf = rest[len('params/'):].rsplit('/', 1)
        c['params'].setdefault(module, {})[leaf] = data[key]
      elif rest == 'spec':
        c['spec'] = json.loads(str(data[key]))
      else:
        c[rest] = data[key]
  return cases


CASES = _fixture_cases()


def test_fixture_covers_every_family():
  families = {models.info(c['spec']['name'])['family'] for c in CASES.values()}
  assert families == {'NFNet', 'NFResNet', 'NFRegNet'}


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_fixture(case):
  c = CASES[case]
  spec = c['spec']
  net = models.create(spec['name'], spec['num_classes'], **spec['overrides'])
  images = jnp.asarray(c['images'])
  shapes = jax.eval_shape(lambda r, x: net.init(r, x, True), jax.random.PRNGKey(0), images)
  tree = {(m, k, tuple(v.shape)) for m, leaves in shapes.items() for k, v in leaves.items()}
  want = {(m, k, v.shape) for m, leaves in c['params'].items() for k, v in leaves.items()}
  assert tree == want
  f = jax.jit(lambda p, x, t: net.apply(p, jax.random.PRNGKey(7), x, t)['logits'],
              static_argnums=2)
  for training, want in ((False, c['logits_eval']), (True, c['logits_train'])):
    np.testing.assert_allclose(np.asarray(f(c['params'], images, training)), want,
                               rtol=1e-3, atol=1e-3 * np.abs(want).max())


# ---------------------------------------------------------------------------
# Implementation options: remat policies and grouped-conv implementations.
# ---------------------------------------------------------------------------
# A tiny member of each family; stochastic depth and dropout on, so their masks must
# be recomputed identically under remat. F0 at 1/8 width with 16-wide groups has
# bottlenecks of 1, 2, 6 and 6 groups. The NF-RegNet keeps one stage of two blocks (a
# block without a projection shortcut) of B0's 1, 3, 6, 6: compiling its grouped
# convolutions is most of these tests' time.
TINY = {
    'F0': dict(width=0.125, group_size=16, depths=(1, 1, 1, 1), stochdepth_rate=0.2,
               drop_rate=0.2),
    'nf_resnet26': dict(width=0.0625, stochdepth_rate=0.2, drop_rate=0.2),
    'nf_regnet_b0': dict(width=0.1, group_size=4, depths=(1, 2, 1, 1),
                         stochdepth_rate=0.2, drop_rate=0.2),
}
NUM_CLASSES = 10


def _inputs(batch=2):
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3), jnp.float32)
  ct = jax.random.normal(jax.random.PRNGKey(3), (batch, NUM_CLASSES), jnp.float32)
  return x, ct


@functools.lru_cache(maxsize=None)
def _params(name):
  x, _ = _inputs()
  net = models.create(name, NUM_CLASSES, **TINY[name])
  return jax.jit(lambda r, x: net.init(r, x, True), **JIT)(jax.random.PRNGKey(0), x)


def _param_shapes(name):
  x, _ = _inputs()
  net = models.create(name, NUM_CLASSES, **TINY[name])
  return jax.eval_shape(lambda r, x: net.init(r, x, True), jax.random.PRNGKey(0), x)


# The families with grouped convolutions (NF-ResNets have none).
GROUPED = ('F0', 'nf_regnet_b0')


@functools.lru_cache(maxsize=None)
def _logits_and_grads(name):
  """{option: (logits, grads)}: training-mode logits and d(sum(logits * ct))/dparams,
  the same rng for every net, for each remat policy ('remat=none' is the reference)
  and, where the family has grouped convs, each grouped-conv form ('groups=lax',
  'groups=split'). All in one compiled program: one compile instead of six, XLA
  sharing what the programs have in common."""
  options = {f'remat={r}': dict(remat=r) for r in models.REMAT_POLICIES}
  if name in GROUPED:
    options.update({f'groups={g}': dict(groups=g) for g in ('lax', 'split')})
  nets = {k: models.create(name, NUM_CLASSES, **TINY[name], **o) for k, o in options.items()}
  x, ct = _inputs()

  @functools.partial(jax.jit, **JIT)
  def f(params):
    out = {}
    for key, net in nets.items():
      def loss(p, net=net):
        logits = net.apply(p, jax.random.PRNGKey(2), x, True)['logits']
        return jnp.sum(logits * ct), logits
      (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
      out[key] = (logits, grads)
    return out

  return f(_params(name))


def _assert_trees_close(a, b, rtol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
    assert err <= rtol, (jax.tree_util.keystr(path), err)


# One stays in the fast subset.
@pytest.mark.parametrize('name', [n if n == 'nf_resnet26' else
                                  pytest.param(n, marks=pytest.mark.slow) for n in TINY])
def test_remat_computes_the_same_function(name):
  """Every remat policy: the logits and gradients of remat='none'."""
  out = _logits_and_grads(name)
  ref_logits, ref_grads = out['remat=none']
  policies = [r for r in models.REMAT_POLICIES if r != 'none']
  assert len(policies) == 3
  for remat in policies:
    logits, grads = out[f'remat={remat}']
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-7, err_msg=remat)
    _assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize('name', list(TINY))
def test_remat_changes_saved_residuals(name):
  """What the backward pass keeps, as JAX hands it to XLA, per policy.

  (XLA's own buffer sizes cannot be checked on CPU: XLA:CPU drops the optimisation
  barriers of remat, so its CSE merges the recomputation back into the forward pass.
  benchmarks/step_memory.py reports XLA's figure on a GPU.)
  """
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  params = _param_shapes(name)
  kept, size = {}, {}
  for remat in models.REMAT_POLICIES:
    net = models.create(name, NUM_CLASSES, remat=remat, **TINY[name])
    kept[remat] = nf_testing.saved_residuals(net, params, x)
    size[remat] = sum(b for b, _ in kept[remat])
  conv = f"named '{layers.CONV_NAME}'"
  # Without remat, activation outputs and other elementwise intermediates are kept.
  assert sum(conv not in why and 'argument' not in why for _, why in kept['none']) > 10
  # 'convs': conv outputs and the input images, nothing else.
  assert all(conv in why or 'argument' in why for _, why in kept['convs']), kept['convs']
  assert size['convs'] < 0.5 * size['none'], size
  # Per block: smaller than 'none'; 'blocks' keeps fewer conv outputs than
  # 'block_convs' (only those outside the blocks).
  assert size['block_convs'] < size['none'] and size['blocks'] < size['none'], size
  count = {r: sum(conv in why for _, why in kept[r]) for r in kept}
  assert count['blocks'] < count['block_convs'], count


def test_remat_and_groups_errors():
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'convs', "
                     r"'block_convs', 'blocks'\), got 'all'"):
    models.create('F0', remat='all')
  with pytest.raises(ValueError, match=r"groups must be one of \('auto', 'lax', "
                     r"'split'\), got 'dense'"):
    models.create('nf_regnet_b0', groups='dense')
  with pytest.raises(ValueError, match='NFResNet has no grouped convolutions'):
    models.create('nf_resnet50', groups='split')
  with pytest.raises(ValueError, match="BNResNet takes no remat policy; remat='convs'"):
    models.create('bn_resnet26', remat='convs')
  with pytest.raises(ValueError, match='BNResNet has no grouped convolutions'):
    models.create('bn_resnet26', groups='lax')
  with pytest.raises(ValueError, match='remat must be one of'):  # the module itself
    hk.transform(lambda: models.NFRegNet(10, remat='everything')).init(None)
  with pytest.raises(ValueError, match=r"grouped conv impl must be one of \('auto', "
                     r"'lax', 'split'\), got 'dense'"):
    with layers.grouped_conv_impl('dense'):
      pass


@pytest.mark.slow
@pytest.mark.parametrize('name', GROUPED)
def test_grouped_conv_implementations_agree(name):
  """Split per-group convs (the default on CPU from SPLIT_MIN_POSITIONS output
  positions) == one XLA grouped conv ('lax', the default on GPU/TPU): logits and
  every gradient."""
  out = _logits_and_grads(name)
  lax_logits, lax_grads = out['groups=lax']
  for logits, grads in (out['remat=none'], out['groups=split']):
    np.testing.assert_allclose(logits, lax_logits, rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads, lax_grads, rtol=1e-4)


def test_grouped_conv_default_split_rule():
  """Which form the default picks on CPU: split once a conv has SPLIT_MIN_POSITIONS
  output positions (F0 at batch 16, 64 px: stage 2 has 16*8*8 = 1024, stage 3 256,
  stage 4 64: left grouped), all grouped for tiny inputs (batch 4, 32 px)."""
  def grouped_convs(groups, shape):
    net = models.create('F0', NUM_CLASSES, groups=groups, **TINY['F0'])
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = _param_shapes('F0')
    jaxpr = str(jax.make_jaxpr(lambda p, x: net.apply(p, None, x, False))(params, x))
    return len(re.findall(r'feature_group_count=[2-9]', jaxpr))

  n_lax = grouped_convs('lax', (16, 64, 64, 3))
  assert n_lax == 6, n_lax  # two grouped 3x3 convs in each block with > 1 group (3)
  assert grouped_convs('auto', (4, 32, 32, 3)) == n_lax
  assert grouped_convs('auto', (16, 64, 64, 3)) == 2  # stage 4 only
  assert grouped_convs('split', (16, 64, 64, 3)) == 0


# ---------------------------------------------------------------------------
# Behaviour every family shares (family-specific facts live in test_nfnet.py,
# test_nf_resnet.py and test_nf_regnet.py).
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('name,overrides,rate,num_blocks', [
    ('F0', {}, 0.1, 12),
    ('nf_resnet50', dict(stochdepth_rate=0.25), 0.25, 16),
    ('nf_regnet_b0', {}, 0.1, 16),
])
def test_stochastic_depth_rates_grow_linearly(name, overrides, rate, num_blocks):
  rates = []

  def icpt(next_f, args, kwargs, ctx):
    if isinstance(ctx.module, layers.StochDepth) and ctx.method_name == '__call__':
      rates.append(ctx.module.drop_rate)
    return next_f(*args, **kwargs)

  nf_testing.trace(name, size=32, interceptor=icpt, **overrides)
  assert rates == pytest.approx([rate * i / num_blocks for i in range(num_blocks)])


@pytest.mark.parametrize('cls,bad,valid,bad_name,close', [
    (models.NFNet, 'F9', r"valid: \['F0', 'F0\+', 'F1'", 'F9', 'F0'),
    (models.NFResNet, '34', r"valid: \['26', '50', '101'", 'nf_resnet34', 'nf_resnet50'),
    (models.NFRegNet, 'B9', r"valid: \['B0', 'B1'", 'nf_regnet_b9', 'nf_regnet_b0'),
])
def test_unknown_variant_lists_valid(cls, bad, valid, bad_name, close):
  with pytest.raises(ValueError, match=valid):
    hk.transform(lambda: cls(10, variant=bad)).init(None)
  with pytest.raises(ValueError, match=close):
    models.create(bad_name)


@pytest.mark.parametrize('make_block,ch', [
    (lambda: nfnet.NFNetBlock(32, 32, group_size=8, stochdepth_rate=0.5,
                              act=layers.activation('gelu')), 32),
    (lambda: nf_resnet.NFResBlock(32, 32, stochdepth_rate=0.5,
                                  act=layers.activation('relu'), name='nf_res_block'), 32),
    (lambda: nf_regnet.NFRegNetBlock(16, 16, stochdepth_rate=0.5,
                                     act=layers.activation('silu')), 16),
], ids=['NFNet', 'NFResNet', 'NFRegNet'])
def test_stochastic_depth_only_in_training(make_block, ch):
  """Block level: in training whole examples lose their residual branch (no rescaling);
  in evaluation nothing is dropped and the output is deterministic."""
  f = hk.transform(lambda x, is_training: make_block()(x, is_training)[0])
  x = np.random.default_rng(0).standard_normal((32, 4, 4, ch)).astype(np.float32)
  shapes = jax.eval_shape(lambda x: f.init(jax.random.PRNGKey(0), x, False), x)
  params = nf_testing.make_params(shapes, skip_gain=1.0)
  apply = jax.jit(f.apply, static_argnums=3, **JIT)
  full = np.asarray(apply(params, None, x, False))
  np.testing.assert_array_equal(full, apply(params, None, x, False))
  assert not np.allclose(full, x)
  a = np.asarray(apply(params, jax.random.PRNGKey(1), x, True))
  b = np.asarray(apply(params, jax.random.PRNGKey(2), x, True))
  for out in (a, b):
    dropped = np.all(out == x, axis=(1, 2, 3))
    kept = np.all(np.isclose(out, full, atol=1e-6), axis=(1, 2, 3))
    assert np.all(dropped | kept) and dropped.any() and kept.any()
  assert not np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['nf_resnet26', 'nf_regnet_b0'])
def test_training_forward_uses_dropout_and_stochdepth(name):
  m = models.create(name, 10, drop_rate=0.5, stochdepth_rate=0.5)
  x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
  shapes, _ = nf_testing.trace(name, size=64, num_classes=10)
  params = nf_testing.make_params(shapes, skip_gain=1.0)
  train = jax.jit(lambda p, r, x: m.apply(p, r, x, is_training=True), **JIT)
  a = train(params, jax.random.PRNGKey(0), x)['logits']
  b = train(params, jax.random.PRNGKey(1), x)['logits']
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)


@pytest.mark.slow
@pytest.mark.parametrize('name,replicate', [('nf_resnet26', False), ('nf_regnet_b0', True)])
def test_forward_bfloat16_matches_float32(name, replicate):
  shapes, run, x, _, _ = nf_testing.probe_model(name, replicate_strided=replicate)
  params = nf_testing.make_params(shapes, skip_gain=1.0)
  out32, _ = run(params, x)
  out16, _ = run(params, x.astype(jnp.bfloat16))
  assert out16['logits'].dtype == jnp.float32 and out16['pool'].dtype == jnp.bfloat16
  l16, l32 = np.asarray(out16['logits']), np.asarray(out32['logits'])
  assert np.all(np.isfinite(l16))
  assert np.linalg.norm(l16 - l32) / np.linalg.norm(l32) < 0.05
  # `dtype` casts float32 images inside the model.
  m = models.create(name, 10, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda p, x: m.apply(p, None, x, is_training=False), params, x)
  assert out['pool'].dtype == jnp.bfloat16 and out['logits'].dtype == jnp.float32
