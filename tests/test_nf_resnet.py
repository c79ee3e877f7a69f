"""NF-ResNets: sizes by hand, module names, strides, signal propagation, precision.

Parameters for forward passes are drawn in numpy from the shapes that `jax.eval_shape`
gives (WS convs standardise their kernels, so any N(0, 1/fan_in) draw is an honest
init); running Haiku's initialisers eagerly costs a compile per parameter shape on CPU.
The initialisers themselves are checked separately through `hk.custom_creator`.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nf_testing import count, expected_curve, make_params, probe_model, trace
from nfnet_jax import layers, models
from nfnet_jax.models import base, nf_resnet, registry

DEPTHS = {'26': [2, 2, 2, 2], '50': [3, 4, 6, 3], '101': [3, 4, 23, 3],
          '152': [3, 8, 36, 3], '200': [3, 24, 36, 3], '288': [24, 24, 24, 24],
          '600': [50, 50, 50, 50]}
FAST = ['26', '50', '101']


# ---------------------------------------------------------------------------
# Independent hand computation of sizes.
# ---------------------------------------------------------------------------
def _conv(k, cin, cout):  # kernel + per-channel gain + bias
  return k * k * cin * cout + 2 * cout


def hand_params(depths, num_classes=1000, width=1.0, use_se=False):
  widths = [int(w * width) for w in (256, 512, 1024, 2048)]
  ch = int(64 * width)
  total = _conv(7, 3, ch)
  for w, d in zip(widths, depths):
    for i in range(d):
      mid = w // 4
      total += _conv(1, ch, mid) + _conv(3, mid, mid) + _conv(1, mid, w) + 1  # + skip_gain
      if i == 0:
        total += _conv(1, ch, w)  # projection shortcut
      if use_se:
        h = int(w * 0.25)
        total += (w * h + h) + (h * w + w)
      ch = w
  return total + ch * num_classes + num_classes


def hand_macs(depths, size=224, num_classes=1000):
  h = size // 4  # 7x7 s2 conv, then 3x3 s2 max-pool
  total = (size // 2) ** 2 * 49 * 3 * 64
  ch = 64
  for w, d, s in zip((256, 512, 1024, 2048), depths, (1, 2, 2, 2)):
    for i in range(d):
      stride = s if i == 0 else 1
      mid, ho = w // 4, h // stride
      total += h * h * ch * mid + ho * ho * 9 * mid * mid + ho * ho * mid * w
      if i == 0:
        total += ho * ho * ch * w
      ch, h = w, ho
  return total + ch * num_classes


# ---------------------------------------------------------------------------
# Facts and sizes.
# ---------------------------------------------------------------------------
def test_variant_table():
  assert list(nf_resnet.VARIANTS) == list(DEPTHS)
  for v, depth in DEPTHS.items():
    info = registry.info(f'nf_resnet{v}')
    assert info['depth'] == depth
    assert info['width'] == [256, 512, 1024, 2048]
    assert (info['train_imsize'], info['test_imsize'], info['drop_rate']) == (224, 224, 0.0)
    assert info['family'] == 'NFResNet'
  assert base.expected_stds([2, 2]) == pytest.approx(expected_curve([2, 2])[1])


def test_resnet50_params_and_macs_by_hand():
  params, macs = models.summarize('nf_resnet50')
  assert params == hand_params(DEPTHS['50'])
  # Published: torchvision ResNet-50 has 25,557,032 parameters (BN scale/offset where we
  # have WS gain/bias); the NF-ResNet adds one skip gain per block (16).
  assert params == 25_557_032 + 16
  assert macs == hand_macs(DEPTHS['50']) == 4_089_184_256  # ResNet-50's 4.09 GMACs


def test_se_and_width_options_by_hand():
  shapes, _ = trace('nf_resnet26', use_se=True)
  assert count(shapes) == hand_params(DEPTHS['26'], use_se=True)
  se = shapes['NF_ResNet/~/nf_res_block_2/~/squeeze_excite/~/linear']
  assert se['w'].shape == (512, 128)
  assert shapes['NF_ResNet/~/nf_res_block_2/~/squeeze_excite/~/linear_1']['w'].shape == (
      128, 512)
  shapes, outs = trace('nf_resnet26', num_classes=7, width=0.5)
  assert count(shapes) == hand_params(DEPTHS['26'], num_classes=7, width=0.5)
  assert outs['pool'][0] == (2, 1024)


@pytest.mark.parametrize('variant', [pytest.param(v, marks=[] if v in FAST else
                                                  pytest.mark.slow) for v in DEPTHS])
def test_every_variant_shapes_and_params(variant):
  shapes, outs = trace(f'nf_resnet{variant}', size=64, batch=2, num_classes=10)
  assert outs['logits'] == ((2, 10), jnp.float32)
  assert outs['pool'][0] == (2, 2048)
  assert count(shapes) == hand_params(DEPTHS[variant], num_classes=10)
  blocks = [m for m in shapes if m.count('/~/') == 1 and 'nf_res_block' in m]
  assert len(blocks) == sum(DEPTHS[variant])


def test_module_names_strides_and_shapes():
  convs = {}

  def icpt(next_f, args, kwargs, ctx):
    out = next_f(*args, **kwargs)
    if isinstance(ctx.module, layers.WSConv2D) and ctx.method_name == '__call__':
      convs[ctx.module.module_name] = (ctx.module.stride, args[0].shape[1:3], out.shape[1:])
    return out

  shapes, _ = trace('nf_resnet50', size=64, interceptor=icpt)
  assert len(shapes) == 1 + 16 * 4 + 4 + 1
  p = 'NF_ResNet/~/'
  exp = {'initial_conv': {'w': (7, 7, 3, 64), 'gain': (64,), 'bias': (64,)},
         'nf_res_block/~/conv0': {'w': (1, 1, 64, 64)},
         'nf_res_block/~/conv1': {'w': (3, 3, 64, 64)},
         'nf_res_block/~/conv2': {'w': (1, 1, 64, 256)},
         'nf_res_block/~/conv_shortcut': {'w': (1, 1, 64, 256)},
         'nf_res_block_3/~/conv0': {'w': (1, 1, 256, 128)},
         'nf_res_block_3/~/conv1': {'w': (3, 3, 128, 128)},
         'nf_res_block_3/~/conv_shortcut': {'w': (1, 1, 256, 512)},
         'nf_res_block_15/~/conv2': {'w': (1, 1, 512, 2048), 'gain': (2048,)},
         'linear': {'w': (2048, 1000), 'b': (1000,)}}
  for mod, leaves in exp.items():
    for leaf, shape in leaves.items():
      assert shapes[p + mod][leaf].shape == shape, (mod, leaf)
  assert set(shapes[p + 'nf_res_block_1']) == {'skip_gain'}
  shortcuts = sorted(m for m in shapes if m.endswith('conv_shortcut'))
  assert shortcuts == sorted(p + f'nf_res_block{s}/~/conv_shortcut'
                             for s in ('', '_3', '_7', '_13'))
  assert not any('squeeze_excite' in m for m in shapes)
  # Stem: 64 px -> 7x7 s2 conv 32 px -> 3x3 s2 max-pool 16 px.
  assert convs[p + 'initial_conv'] == (2, (64, 64), (32, 32, 64))
  assert convs[p + 'nf_res_block/~/conv0'][1] == (16, 16)
  # The stride sits on the 3x3 conv and on the 1x1 shortcut (strided, no pooling).
  b3 = p + 'nf_res_block_3/~/'
  assert convs[b3 + 'conv0'] == (1, (16, 16), (16, 16, 128))
  assert convs[b3 + 'conv1'] == (2, (16, 16), (8, 8, 128))
  assert convs[b3 + 'conv2'] == (1, (8, 8), (8, 8, 512))
  assert convs[b3 + 'conv_shortcut'] == (2, (16, 16), (8, 8, 512))
  assert convs[p + 'nf_res_block_15/~/conv2'][2] == (2, 2, 2048)


def test_initialisers():
  """skip gains 0, WS gains 1 and biases 0, classifier N(0, 0.01) with zero bias."""
  inits = {}

  def creator(next_creator, shape, dtype, init, context):
    inits[(context.module_name, context.name)] = init
    return next_creator(shape, dtype, init)

  def fwd(x):
    with hk.custom_creator(creator):
      nf_resnet.NFResNet(10, variant='26')(x, is_training=False)

  jax.eval_shape(hk.transform(fwd).init, jax.random.PRNGKey(0),
                 jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))

  def run(key, shape):
    init = hk.transform(lambda: inits[key](shape, jnp.float32))
    return np.asarray(init.apply({}, jax.random.PRNGKey(0)))

  assert run(('NF_ResNet/~/nf_res_block_5', 'skip_gain'), ()) == 0.0
  assert np.all(run(('NF_ResNet/~/nf_res_block/~/conv1', 'gain'), (8,)) == 1.0)
  assert np.all(run(('NF_ResNet/~/nf_res_block/~/conv1', 'bias'), (8,)) == 0.0)
  w = run(('NF_ResNet/~/linear', 'w'), (512, 256))
  assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005
  assert np.all(run(('NF_ResNet/~/linear', 'b'), (10,)) == 0.0)


# ---------------------------------------------------------------------------
# Real forward passes on nf_resnet26 (nf_testing.probe_model).
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def resnet26():
  return probe_model('nf_resnet26', replicate_strided=False)


def test_forward_float32_deterministic_and_mean_free(resnet26):
  shapes, run, x, _, _ = resnet26
  params = make_params(shapes, skip_gain=1.0)
  out, _ = run(params, x)
  assert out['logits'].shape == (8, 10) and out['logits'].dtype == jnp.float32
  assert out['pool'].shape == (8, 2048)
  assert np.all(np.isfinite(out['logits'])) and float(np.std(out['logits'])) > 1e-3
  again, _ = run(params, x)
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  # Scaled WS keeps per-channel means from growing with depth (the paper's point).
  assert max(float(out[f'avg_sq_mean_{i}']) for i in range(1, 9)) < 0.1


def test_signal_propagation_whole_network(resnet26):
  """N(0,1) images, skip gains 1: block outputs follow expected_std^2 (docs/models.md).

  Stages 1-2 within 5%; stages 3-4 (4x4 and 2x2 maps at 64 px) within 20%, where
  zero padding hides up to 5/9 of each 3x3 kernel and shrinks the residual branch.
  With skip gains 0 identity blocks change nothing, and each transition's projection
  gives Var(input) / expected_in^2 (beta assumes a growth that skip gain 0 removes).
  """
  shapes, run, x, _, _ = resnet26
  e_in, e_out = expected_curve(DEPTHS['26'])
  out, _ = run(make_params(shapes, skip_gain=1.0), x)
  ratio = np.array([float(out[f'avg_var_{i + 1}']) / e ** 2 for i, e in enumerate(e_out)])
  np.testing.assert_allclose(ratio[:4], 1.0, atol=0.05)
  np.testing.assert_allclose(ratio, 1.0, atol=0.2)
  np.testing.assert_allclose([float(out[f'res_avg_var_{i}']) for i in range(4)], 1.0,
                             atol=0.15)
  out0, _ = run(make_params(shapes, skip_gain=0.0), x)
  v0 = np.array([float(out0[f'avg_var_{i + 1}']) for i in range(8)])
  np.testing.assert_allclose(v0[1::2], v0[0::2], rtol=1e-5)  # identity blocks
  assert v0[0] == pytest.approx(1.0, abs=0.1)
  np.testing.assert_allclose(v0[2::2] / v0[1:-1:2], 1 / np.square(e_in[2::2]), atol=0.08)


def test_signal_propagation_block_by_block(resnet26):
  """Each block fed N(0, expected_in^2) noise: beta = 1/expected_in and, with skip
  gains 1, the output variance is the next expected_std^2 (docs/models.md); with skip gains
  0, identity blocks keep expected_in^2 and projections give unit variance."""
  shapes, run, x, betas, _ = resnet26
  e_in, e_out = expected_curve(DEPTHS['26'])
  for gain in (1.0, 0.0):
    _, out_vars = run(make_params(shapes, gain), x, True)
    np.testing.assert_allclose(1 / np.array(betas), e_in, rtol=1e-6)
    target = np.square(e_out) if gain else np.array(
        [1.0 if i % 2 == 0 else e ** 2 for i, e in enumerate(e_in)])
    np.testing.assert_allclose(np.array(out_vars), target, atol=0.06)
