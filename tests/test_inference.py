"""Folded-WS inference computes the model's function on pre-standardised kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import inference, layers, models

# Tiny members of each family (grouped convs in NFNet and NF-RegNet).
TINY = {'F0': dict(width=0.125, group_size=16, depths=(1, 1, 1, 1)),
        'nf_resnet26': dict(width=0.0625),
        'nf_regnet_b0': dict(width=0.1, group_size=4)}
NUM_CLASSES = 10
JIT = dict(compiler_options={'xla_backend_optimization_level': 0})


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', ['F0', 'nf_resnet26', pytest.param(
    'nf_regnet_b0', marks=pytest.mark.slow)])
def test_folded_inference_equals_reference(name, dtype):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3), jnp.float32).astype(dtype)
  ref = models.create(name, NUM_CLASSES, **TINY[name])
  # Random parameters (gains and biases too), skip gains 0.5 so that every residual
  # branch reaches the logits; drawn in numpy, which is cheaper than a compiled init.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda r: ref.init(r, x, False), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda v: np.full(v.shape, 0.5, np.float32) if v.ndim == 0 else
                        (rng.standard_normal(v.shape) * 0.3 + 0.5).astype(np.float32),
                        shapes)
  folded = inference.folded_model(name, NUM_CLASSES, **TINY[name])
  fp = jax.jit(lambda p: inference.fold_params(p, dtype))(params)
  convs = [m for m in params if set(params[m]) == {'w', 'gain', 'bias'}]
  assert convs and all(set(fp[m]) == {'kernel', 'bias'} and fp[m]['kernel'].dtype == dtype
                       for m in convs)
  tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
  for m in convs[:3]:  # the folded kernel is WSConv2D's standardised kernel
    want = np.asarray(layers.standardize_weight(params[m]['w'], params[m]['gain']))
    np.testing.assert_allclose(np.asarray(fp[m]['kernel'], np.float32), want, rtol=tol,
                               atol=tol * np.max(np.abs(want)))
  linears = [m for m in params if m not in convs and 'w' in params[m]]
  assert linears and all(fp[m].keys() == params[m].keys() for m in linears)
  # The folded model declares exactly the folded tree.
  shapes = jax.eval_shape(lambda r: folded.init(r, x), jax.random.PRNGKey(0))
  assert jax.tree.map(lambda v: (v.shape, v.dtype), shapes) == jax.tree.map(
      lambda v: (v.shape, v.dtype), fp)
  a = jax.jit(lambda p: ref.apply(p, None, x, False)['logits'], **JIT)(params)
  b = jax.jit(lambda p: folded.apply(p, None, x, False)['logits'], **JIT)(fp)
  np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                             rtol=1e-5, atol=1e-6)
  assert float(np.std(np.asarray(a, np.float32))) > 1e-3  # not trivially zero logits
