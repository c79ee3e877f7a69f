"""NFNet: exact sizes from the paper, module names, signal propagation, precision."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nf_testing import JIT  # -O0: a forward pass or two per compile
from nfnet_jax import models
from nfnet_jax.models import nfnet, registry

# The paper: parameters (M) at 1000 classes and GMACs at test resolution.
PAPER = {'F0': (71.5, 12.38), 'F1': (132.6, 35.54), 'F2': (193.8, 62.59),
         'F3': (254.9, 114.76), 'F4': (316.1, 215.24), 'F5': (377.2, 289.76),
         'F6': (438.4, 377.28)}


@pytest.mark.parametrize('variant', list(PAPER))
def test_params_and_macs_match_paper(variant):
  params, macs = models.summarize(variant)
  assert round(params / 1e6, 1) == PAPER[variant][0]
  assert round(macs / 1e9, 2) == PAPER[variant][1]


def test_variant_table():
  facts = {'F0': ([1, 2, 6, 3], 192, 256, (4, 5), 0.2),
           'F3': ([4, 8, 24, 12], 320, 416, (4, 15), 0.4),
           'F7': ([8, 16, 48, 24], 480, 608, (4, 15), 0.5)}
  for v, (depth, tr, te, ra, dr) in facts.items():
    for name in (v, v + '+'):
      info = registry.info(name)
      assert (info['depth'], info['train_imsize'], info['test_imsize'], info['randaug'],
              info['drop_rate']) == (depth, tr, te, ra, dr)
  assert registry.info('F2')['width'] == [256, 512, 1536, 1536]
  assert registry.info('F2+')['width'] == [384, 768, 2048, 2048]


def _f0_shapes(num_classes=1000):
  m = models.create('F0', num_classes)
  return jax.eval_shape(lambda r, x: m.init(r, x, False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def test_module_names_and_shapes_match_released_layout():
  shapes = _f0_shapes()
  assert len(shapes) == 94
  exp = {'NFNet/~/stem_conv0': {'w': (3, 3, 3, 16)}, 'NFNet/~/stem_conv3': {'w': (3, 3, 64, 128)},
         'NFNet/~/nf_block/~/conv0': {'w': (1, 1, 128, 128)},
         'NFNet/~/nf_block/~/conv_shortcut': {'w': (1, 1, 128, 256)},
         'NFNet/~/nf_block_3/~/conv1b': {'w': (3, 3, 128, 768)},  # 6 groups of 128
         'NFNet/~/nf_block_1/~/squeeze_excite/~/linear_1': {'w': (256, 512), 'b': (512,)},
         'NFNet/~/final_conv': {'w': (1, 1, 1536, 3072), 'gain': (3072,), 'bias': (3072,)},
         'NFNet/~/linear': {'w': (3072, 1000), 'b': (1000,)}}
  for mod, leaves in exp.items():
    for leaf, shape in leaves.items():
      assert shapes[mod][leaf].shape == shape, (mod, leaf)
  assert set(shapes['NFNet/~/nf_block_2']) == {'skip_gain'}
  assert 'NFNet/~/nf_block_2/~/conv_shortcut' not in shapes  # same shape: identity skip
  assert set(shapes['NFNet/~/nf_block_4/~/conv1']) == {'w', 'gain', 'bias'}


@pytest.mark.slow
def test_forward_float32_bfloat16_and_determinism():
  m = models.create('F0', 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  params = jax.jit(lambda r, x: m.init(r, x, True), **JIT)(jax.random.PRNGKey(1), x)
  params = jax.tree_util.tree_map(  # switch the residual branches on
      lambda p: jnp.full_like(p, 0.5) if p.ndim == 0 else p, params)
  fwd = jax.jit(m.apply, static_argnums=(3,), **JIT)
  out32 = fwd(params, None, x, False)
  assert out32['logits'].shape == (2, 10) and out32['pool'].shape == (2, 3072)
  np.testing.assert_array_equal(out32['logits'], fwd(params, None, x, False)['logits'])
  out16 = fwd(params, None, x.astype(jnp.bfloat16), False)
  assert out16['logits'].dtype == jnp.float32 and out16['pool'].dtype == jnp.bfloat16
  np.testing.assert_allclose(out16['logits'], out32['logits'], atol=0.05, rtol=0.05)
  # Training mode: stochastic depth + dropout change the output, per rng.
  a = fwd(params, jax.random.PRNGKey(2), x, True)['logits']
  b = fwd(params, jax.random.PRNGKey(3), x, True)['logits']
  assert not np.allclose(a, b)
  assert not np.allclose(a, out32['logits'])


@pytest.mark.slow
def test_signal_propagation_follows_expected_std():
  """Block by block: with its input at the variance the model expects (1/beta^2) and the
  skip gains at 1, each block's output variance is the next expected_std^2 (docs/models.md);
  with skip gain 0 the stream keeps its variance (identity blocks / unit-variance
  projections). Inputs to strided blocks are 2x2-replicated noise, so the 2x2 average
  pool of the shortcut sees the variance it is designed for."""
  alpha = 0.2
  # Independent derivation of the rule in docs/models.md: grow after each block, reset to 1 after
  # the first block of each stage (which still counts one growth step).
  expected_in, stds, s = [], [], 1.0
  for depth in [1, 2, 6, 3]:
    for i in range(depth):
      expected_in.append(s)
      s = (1.0 if i == 0 else s)
      s = (s ** 2 + alpha ** 2) ** 0.5
      stds.append(s)
  make = registry.module_fn('F0', 10, stochdepth_rate=0.0)
  record = []

  def icpt(next_f, args, kwargs, ctx):
    mod = ctx.module
    if not (isinstance(mod, nfnet.NFNetBlock) and ctx.method_name == '__call__'):
      return next_f(*args, **kwargs)
    x = args[0]
    key = hk.next_rng_key()
    if mod.stride > 1:
      z = jax.random.normal(key, (x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3]))
      z = jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)
    else:
      z = jax.random.normal(key, x.shape)
    out, res_var = next_f(z / mod.beta, *args[1:], **kwargs)
    record.append((jnp.float32(mod.beta), jnp.mean(jnp.var(out, axis=(0, 1, 2)))))
    return out, res_var

  def fwd(x):
    record.clear()
    with hk.intercept_methods(icpt):
      make()(x, is_training=False)
    return [b for b, _ in record], [v for _, v in record]

  f = hk.transform(fwd)
  x = jnp.zeros((24, 64, 64, 3))
  params = jax.jit(f.init)(jax.random.PRNGKey(0), x)
  for gain in (1.0, 0.0):
    p = jax.tree_util.tree_map(lambda v: jnp.full_like(v, gain) if v.ndim == 0 else v,
                               params)
    betas, out_vars = jax.jit(f.apply)(p, jax.random.PRNGKey(1), x)
    betas, out_vars = np.array(betas, np.float64), np.array(out_vars)
    np.testing.assert_allclose(1 / betas, expected_in, rtol=1e-6)
    target = np.square(stds) if gain else np.array(
        [1.0 if i in (0, 1, 3, 9) else e ** 2 for i, e in enumerate(expected_in)])
    np.testing.assert_allclose(out_vars, target, atol=0.06)
  # The growth is visible: without the reset the last block of stage 3 would be 1.44.
  assert stds[8] ** 2 == pytest.approx(1.24)


def test_return_metrics_keys():
  m = models.create('F0', 10)
  x = jnp.ones((2, 32, 32, 3))
  out = jax.eval_shape(lambda x: m.apply(
      m.init(jax.random.PRNGKey(0), x, False), None, x, False, return_metrics=True), x)
  assert {f'avg_var_{i}' for i in range(13)} <= set(out)
  assert {f'res_avg_var_{i}' for i in range(12)} <= set(out)
  assert {f'avg_sq_mean_{i}' for i in range(13)} <= set(out)
