"""Layers against hand-written numpy references."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import layers


def _np_standardize(w, gain, eps=1e-4):
  w = np.asarray(w, np.float64)
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
  return gain * (w - mean) / np.sqrt(np.maximum(var * fan_in, eps))


def _np_conv_same(x, w, stride, groups):
  """Direct NHWC/HWIO grouped convolution with TF SAME padding, in float64."""
  n, h, wd, c = x.shape
  kh, kw, ci, co = w.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  ph = max((oh - 1) * stride + kh - h, 0)
  pw = max((ow - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, oh, ow, co))
  cog = co // groups
  for g in range(groups):
    for i in range(oh):
      for j in range(ow):
        patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw,
                   g * ci:(g + 1) * ci]
        out[:, i, j, g * cog:(g + 1) * cog] = np.einsum(
            'nhwc,hwco->no', patch, w[..., g * cog:(g + 1) * cog])
  return out


@pytest.mark.parametrize('stride,groups,k', [(1, 1, 3), (2, 2, 3), (2, 1, 1), (1, 4, 3)])
def test_wsconv_matches_numpy(stride, groups, k):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 8)).astype(np.float32)
  f = hk.transform(lambda x: layers.WSConv2D(8, k, stride=stride,
                                             feature_group_count=groups)(x))
  params = f.init(jax.random.PRNGKey(0), x)
  mod = list(params)[0]
  w = rng.standard_normal(params[mod]['w'].shape).astype(np.float32) * 0.3 + 0.1
  gain = rng.uniform(0.5, 2, 8).astype(np.float32)
  bias = rng.standard_normal(8).astype(np.float32)
  params = {mod: {'w': w, 'gain': gain, 'bias': bias}}
  got = np.asarray(f.apply(params, None, x))
  want = _np_conv_same(x.astype(np.float64), _np_standardize(w, gain), stride, groups) + bias
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_standardized_kernel_moments():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 32)) * 5 + 2
  w_hat = np.asarray(layers.standardize_weight(w, jnp.ones(32)), np.float64)
  fan_in = 3 * 3 * 16
  np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(w_hat.var(axis=(0, 1, 2)), 1 / fan_in, rtol=1e-4)


def test_standardize_eps_floor_and_timm_mode():
  w = jnp.zeros((1, 1, 4, 2))  # zero variance: the eps floor keeps it finite
  assert np.all(np.isfinite(layers.standardize_weight(w, jnp.ones(2))))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 2))
  fan_in = 36
  wn = np.asarray(w, np.float64)
  mean, var = wn.mean((0, 1, 2)), wn.var((0, 1, 2))
  want = (wn - mean) / np.sqrt(var + 1e-5) / np.sqrt(fan_in)
  got = layers.standardize_weight(w, jnp.ones(2), eps=1e-5, eps_mode='add')
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('name', ['gelu', 'relu', 'silu', 'elu', 'tanh', 'sigmoid',
                                  'softplus', 'leaky_relu'])
def test_gamma_gives_unit_variance(name):
  z = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)
  y = np.asarray(layers.activation(name)(jnp.asarray(z)), np.float64)
  assert abs(y.var() - 1.0) < 0.01


def test_compute_gamma_matches_exact_relu():
  # Exact 1/std(relu(z)) = 1/sqrt(1/2 - 1/(2*pi)) = 1.712859 (docs/models.md).
  assert abs(layers.compute_gamma(jax.nn.relu) - 1.712859) < 2e-3


def test_unknown_activation():
  with pytest.raises(ValueError, match='valid'):
    layers.activation('swishy')


def test_stochdepth_and_dropout_only_in_training():
  x = jnp.ones((64, 2, 2, 3))
  f = hk.transform(lambda x, t: layers.StochDepth(0.5)(x, t))
  y_eval = f.apply({}, jax.random.PRNGKey(0), x, False)
  np.testing.assert_array_equal(y_eval, x)
  y = np.asarray(f.apply({}, jax.random.PRNGKey(0), x, True))
  per_example = y.reshape(64, -1)
  assert set(np.unique(per_example)) <= {0.0, 1.0}  # no rescaling
  assert np.all(per_example.min(1) == per_example.max(1))  # whole example dropped
  assert 10 < per_example[:, 0].sum() < 54
  d = hk.transform(lambda x, t: layers.dropout(x, 0.25, t))
  np.testing.assert_array_equal(d.apply({}, jax.random.PRNGKey(0), x, False), x)
  yd = np.asarray(d.apply({}, jax.random.PRNGKey(0), x, True))
  np.testing.assert_allclose(np.unique(yd), [0.0, 1 / 0.75], rtol=1e-6)


def test_per_example_masks_do_not_depend_on_split():
  """Masks for rows [4:8] drawn as a local batch with offset 4 equal the full batch's."""
  key = jax.random.PRNGKey(3)
  full = layers.per_example_uniform(key, 8, (5,))
  with layers.example_offset(4):
    part = layers.per_example_uniform(key, 4, (5,))
  np.testing.assert_array_equal(full[4:], part)


def test_standardize_weight_in_a_compute_dtype():
  """`dtype` sets where the statistics run: float32 is the model's default; bfloat16
  (what a naive mixed-precision port does on rounded weights) agrees to bf16
  precision and returns bf16."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 8)) * 0.2 + 0.05
  gain = jnp.linspace(0.5, 2.0, 8)
  ref = layers.standardize_weight(w, gain)
  np.testing.assert_array_equal(layers.standardize_weight(w, gain, dtype=jnp.float32), ref)
  low = layers.standardize_weight(w, gain, dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(low, np.float32) - np.asarray(ref)))
  assert 0 < err <= 2 ** -6 * float(np.max(np.abs(ref))), err


def test_wsconv_params_are_declared_once():
  """`WSConv2D.params` declares w/gain/bias with their initialisers (and the folded
  kernel/bias of inference); `__call__` uses exactly these."""
  inits = {}

  def creator(next_creator, shape, dtype, init, context):
    inits[context.name] = (tuple(shape), dtype, init)
    return next_creator(shape, dtype, init)

  def f(x, folded=False):
    conv = layers.WSConv2D(6, 3, feature_group_count=2, name='c')
    with hk.custom_creator(creator):
      return conv.params(x.shape[-1], folded, jnp.bfloat16) if folded else conv(x)

  x = jnp.ones((1, 5, 5, 4))
  params = hk.transform(f).init(jax.random.PRNGKey(0), x)
  assert {k: v.shape for k, v in params['c'].items()} == {
      'w': (3, 3, 2, 6), 'gain': (6,), 'bias': (6,)}
  init = inits['w'][2]
  assert isinstance(init, hk.initializers.VarianceScaling)
  assert (init.scale, init.mode, init.distribution) == (1.0, 'fan_in', 'normal')
  np.testing.assert_array_equal(params['c']['gain'], np.ones(6))
  np.testing.assert_array_equal(params['c']['bias'], np.zeros(6))
  folded = hk.transform(lambda x: f(x, True)).init(jax.random.PRNGKey(0), x)
  assert {k: (v.shape, v.dtype) for k, v in folded['c'].items()} == {
      'kernel': ((3, 3, 2, 6), jnp.bfloat16), 'bias': ((6,), jnp.bfloat16)}
  with pytest.raises(ValueError, match='5 input channels do not divide into 2 groups'):
    hk.transform(f).init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 5)))


def test_split_grouped_conv_equals_xla_grouped_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 12))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6))
  for stride in (1, 2):
    ref = jax.lax.conv_general_dilated(x, k, (stride, stride), 'SAME', dimension_numbers=(
        'NHWC', 'HWIO', 'NHWC'), feature_group_count=3)
    with layers.grouped_conv_impl('split'):
      jaxpr = str(jax.make_jaxpr(lambda x, k: layers.conv2d(x, k, stride, 'SAME', 3))(x, k))
      out = layers.conv2d(x, k, stride, 'SAME', 3)
    assert 'feature_group_count=3' not in jaxpr and jaxpr.count('conv_general') == 3
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_workarounds_switch_decides_how_auto_runs_grouped_convs(monkeypatch):
  # 32 x 32 output positions: above layers.SPLIT_MIN_POSITIONS, so only the switch
  # decides. Tracing only: nothing is compiled.
  x, k = jnp.zeros((1, 32, 32, 8)), jnp.zeros((3, 3, 2, 8))
  convs = lambda: str(jax.make_jaxpr(lambda x, k: layers.conv2d(x, k, 1, 'SAME', 4))(
      x, k)).count('conv_general_dilated')
  monkeypatch.delenv('NFNET_JAX_CPU_WORKAROUNDS', raising=False)
  assert convs() == (4 if jax.default_backend() == 'cpu' else 1)
  monkeypatch.setenv('NFNET_JAX_CPU_WORKAROUNDS', '0')
  assert convs() == 1
  monkeypatch.setenv('NFNET_JAX_CPU_WORKAROUNDS', '1')
  assert convs() == 4
  monkeypatch.setenv('NFNET_JAX_CPU_WORKAROUNDS', 'yes')
  with pytest.raises(ValueError, match=r"NFNET_JAX_CPU_WORKAROUNDS='yes': expected 0"):
    convs()
