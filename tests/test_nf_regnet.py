"""NF-RegNets: sizes by hand, module names, strides, signal propagation, precision.

Parameters for forward passes are drawn in numpy from the shapes that `jax.eval_shape`
gives (WS convs standardise their kernels, so any N(0, 1/fan_in) draw is an honest
init); running Haiku's initialisers eagerly costs a compile per parameter shape on CPU.
The initialisers themselves are checked separately through `hk.custom_creator`.
"""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nf_testing import ALPHA, count, expected_curve, make_params, probe_model, trace
from nfnet_jax import layers, models
from nfnet_jax.models import nf_regnet, registry

# DeepMind's table (docs/models.md): widths (before x0.75), depths, train/test px, dropout.
TABLE = {
    'B0': ([48, 104, 208, 440], [1, 3, 6, 6], 192, 224, 0.2),
    'B1': ([48, 104, 208, 440], [2, 4, 7, 7], 224, 256, 0.2),
    'B2': ([56, 112, 232, 488], [2, 4, 8, 8], 240, 272, 0.3),
    'B3': ([56, 128, 248, 528], [2, 5, 9, 9], 288, 320, 0.3),
    'B4': ([64, 144, 288, 616], [2, 6, 11, 11], 320, 384, 0.4),
    'B5': ([80, 168, 336, 704], [3, 7, 14, 14], 384, 456, 0.4),
    'B6': ([88, 184, 376, 792], [3, 8, 16, 16], 448, 528, 0.5),
    'B7': ([96, 208, 416, 880], [4, 10, 19, 19], 512, 600, 0.5),
    'B8': ([104, 232, 456, 968], [4, 11, 22, 22], 600, 672, 0.5),
}
FAST = ['B0', 'B1', 'B2']


# ---------------------------------------------------------------------------
# Independent hand computation of sizes (the architecture of docs/models.md).
# ---------------------------------------------------------------------------
def _blocks(variant, width=0.75, expansion=2.25, group=8):
  """Per block: (in_ch, expanded width, out_ch, stride)."""
  table_widths, depths = TABLE[variant][:2]
  ch, out = int(table_widths[0] * width), []
  for w, d in zip(table_widths, depths):
    w = int(w * width)
    for i in range(d):
      e = 1.0 if not out else expansion
      mid = int(ch * e) // group * group
      out.append((ch, mid, w, 2 if i == 0 else 1))
      ch = w
  return out


def hand_params(variant, num_classes=1000):
  total = 3 * 3 * 3 * int(TABLE[variant][0][0] * 0.75) + 2 * int(TABLE[variant][0][0] * 0.75)
  for cin, mid, cout, stride in _blocks(variant):
    total += cin * mid + 2 * mid                  # conv0 1x1
    total += 9 * 8 * mid + 2 * mid                # conv1 3x3, groups of 8 channels
    h = int(mid * 0.5)
    total += (mid * h + h) + (h * mid + mid)      # squeeze-excite
    total += mid * cout + 2 * cout                # conv2 1x1
    if stride > 1 or cin != cout:
      total += cin * cout + 2 * cout              # conv_shortcut
    total += 1                                    # skip_gain
  ch = _blocks(variant)[-1][2]
  fc = 1280 * ch // 440
  return total + ch * fc + 2 * fc + fc * num_classes + num_classes


def hand_macs(variant, num_classes=1000):
  size = TABLE[variant][3]
  h = math.ceil(size / 2)
  total = h * h * 9 * 3 * int(TABLE[variant][0][0] * 0.75)
  for cin, mid, cout, stride in _blocks(variant):
    ho = math.ceil(h / stride)
    total += h * h * cin * mid + ho * ho * 9 * 8 * mid + ho * ho * mid * cout
    total += 2 * mid * int(mid * 0.5)
    if stride > 1 or cin != cout:
      total += ho * ho * cin * cout
    h = ho
  ch = _blocks(variant)[-1][2]
  fc = 1280 * ch // 440
  return total + h * h * ch * fc + fc * num_classes


# ---------------------------------------------------------------------------
# Facts and sizes.
# ---------------------------------------------------------------------------
def test_variant_table():
  assert list(nf_regnet.VARIANTS) == list(TABLE)
  for v, (widths, depths, train, test, drop) in TABLE.items():
    info = registry.info(f'nf_regnet_{v.lower()}')
    assert (info['width'], info['depth'], info['train_imsize'], info['test_imsize'],
            info['drop_rate']) == (widths, depths, train, test, drop)
    assert info['family'] == 'NFRegNet'


def test_b0_params_and_macs_by_hand():
  params, macs = models.summarize('nf_regnet_b0')
  assert params == hand_params('B0') == 8_595_372
  assert macs == hand_macs('B0') == 443_672_488  # 0.44 GMACs at 224 px


@pytest.mark.parametrize('variant', [pytest.param(v, marks=[] if v in FAST else
                                                  pytest.mark.slow) for v in TABLE])
def test_every_variant_shapes_and_params(variant):
  shapes, outs = trace(f'nf_regnet_{variant.lower()}', size=64, num_classes=10)
  assert outs['logits'] == ((2, 10), jnp.float32)
  last = int(TABLE[variant][0][-1] * 0.75)
  assert outs['pool'][0] == (2, 1280 * last // 440)
  assert count(shapes) == hand_params(variant, num_classes=10)
  blocks = [m for m in shapes if m.count('/~/') == 1 and '/~/nf_block' in m]
  assert len(blocks) == sum(TABLE[variant][1])


def test_module_names_strides_and_shapes():
  convs = {}

  def icpt(next_f, args, kwargs, ctx):
    out = next_f(*args, **kwargs)
    if isinstance(ctx.module, layers.WSConv2D) and ctx.method_name == '__call__':
      convs[ctx.module.module_name] = (ctx.module.stride, ctx.module.feature_group_count,
                                       args[0].shape[1:3], out.shape[1:])
    return out

  shapes, _ = trace('nf_regnet_b0', size=64, interceptor=icpt)
  assert len(shapes) == 1 + 16 * 6 + 4 + 2
  p = 'NF_RegNet/~/'
  # Stage widths int(0.75 * [48, 104, 208, 440]) = [36, 78, 156, 330]; expanded widths
  # int(in * 2.25) // 8 * 8 (the very first block: in * 1.0): 32, 80, 168, ...
  exp = {'initial_conv': {'w': (3, 3, 3, 36), 'gain': (36,), 'bias': (36,)},
         'nf_block/~/conv0': {'w': (1, 1, 36, 32)},
         'nf_block/~/conv1': {'w': (3, 3, 8, 32)},
         'nf_block/~/squeeze_excite/~/linear': {'w': (32, 16), 'b': (16,)},
         'nf_block/~/squeeze_excite/~/linear_1': {'w': (16, 32), 'b': (32,)},
         'nf_block/~/conv2': {'w': (1, 1, 32, 36)},
         'nf_block/~/conv_shortcut': {'w': (1, 1, 36, 36)},
         'nf_block_1/~/conv0': {'w': (1, 1, 36, 80)},
         'nf_block_1/~/conv1': {'w': (3, 3, 8, 80)},
         'nf_block_1/~/squeeze_excite/~/linear': {'w': (80, 40)},
         'nf_block_1/~/conv2': {'w': (1, 1, 80, 78)},
         'nf_block_1/~/conv_shortcut': {'w': (1, 1, 36, 78)},
         'nf_block_2/~/conv0': {'w': (1, 1, 78, 168)},
         'nf_block_15/~/conv2': {'w': (1, 1, 736, 330)},  # int(330 * 2.25) = 742 -> 736
         'final_conv': {'w': (1, 1, 330, 960), 'gain': (960,), 'bias': (960,)},
         'linear': {'w': (960, 1000), 'b': (1000,)}}
  for mod, leaves in exp.items():
    for leaf, shape in leaves.items():
      assert shapes[p + mod][leaf].shape == shape, (mod, leaf)
  assert set(shapes[p + 'nf_block_2']) == {'skip_gain'}
  shortcuts = sorted(m for m in shapes if m.endswith('conv_shortcut'))
  assert shortcuts == sorted(p + f'nf_block{s}/~/conv_shortcut'
                             for s in ('', '_1', '_4', '_10'))
  assert convs[p + 'initial_conv'] == (2, 1, (64, 64), (32, 32, 36))
  # Every stage's first block is strided, on the grouped 3x3 conv; its shortcut is
  # 2x2 average-pooled before an unstrided 1x1 conv.
  b0 = p + 'nf_block/~/'
  assert convs[b0 + 'conv0'] == (1, 1, (32, 32), (32, 32, 32))
  assert convs[b0 + 'conv1'] == (2, 4, (32, 32), (16, 16, 32))
  assert convs[b0 + 'conv_shortcut'] == (1, 1, (16, 16), (16, 16, 36))
  b1 = p + 'nf_block_1/~/'
  assert convs[b1 + 'conv1'] == (2, 10, (16, 16), (8, 8, 80))
  assert convs[b1 + 'conv_shortcut'] == (1, 1, (8, 8), (8, 8, 78))
  assert convs[p + 'final_conv'] == (1, 1, (2, 2), (2, 2, 960))


def test_initialisers():
  """skip gains 0, WS gains 1 and biases 0, classifier weights and bias zeros."""
  inits = {}

  def creator(next_creator, shape, dtype, init, context):
    inits[(context.module_name, context.name)] = init
    return next_creator(shape, dtype, init)

  def fwd(x):
    with hk.custom_creator(creator):
      nf_regnet.NFRegNet(10, variant='B0')(x, is_training=False)

  jax.eval_shape(hk.transform(fwd).init, jax.random.PRNGKey(0),
                 jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))

  def run(key, shape):
    init = hk.transform(lambda: inits[key](shape, jnp.float32))
    return np.asarray(init.apply({}, jax.random.PRNGKey(0)))

  assert run(('NF_RegNet/~/nf_block_5', 'skip_gain'), ()) == 0.0
  assert np.all(run(('NF_RegNet/~/final_conv', 'gain'), (8,)) == 1.0)
  assert np.all(run(('NF_RegNet/~/final_conv', 'bias'), (8,)) == 0.0)
  assert np.all(run(('NF_RegNet/~/linear', 'w'), (16, 4)) == 0.0)
  assert np.all(run(('NF_RegNet/~/linear', 'b'), (4,)) == 0.0)


# ---------------------------------------------------------------------------
# Real forward passes on nf_regnet_b0 (nf_testing.probe_model).
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def regnet_b0():
  return probe_model('nf_regnet_b0', replicate_strided=True)


def test_forward_float32_deterministic_and_mean_free(regnet_b0):
  shapes, run, x, _, _ = regnet_b0
  params = make_params(shapes, skip_gain=1.0)
  out, _ = run(params, x)
  assert out['logits'].shape == (8, 10) and out['logits'].dtype == jnp.float32
  assert out['pool'].shape == (8, 960)
  assert np.all(np.isfinite(out['logits'])) and float(np.std(out['logits'])) > 1e-3
  again, _ = run(params, x)
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  # Scaled WS keeps per-channel means from growing with depth (the paper's point).
  assert max(float(out[f'avg_sq_mean_{i}']) for i in range(17)) < 0.05


def test_signal_propagation_whole_network(regnet_b0):
  """N(0,1) images. The stem keeps unit variance. On white noise the 2x2 average pool
  of a transition shortcut quarters the variance (the architecture: the
  expected_std bookkeeping assumes spatially smooth signals there; the block-level
  test checks the curve itself); identity blocks add alpha^2 * Var(residual)."""
  shapes, run, x, _, _ = regnet_b0
  out, _ = run(make_params(shapes, skip_gain=1.0), x)
  var = np.array([float(out[f'avg_var_{i}']) for i in range(17)])
  res = np.array([float(out[f'res_avg_var_{i}']) for i in range(16)])
  assert var[0] == pytest.approx(1.0, abs=0.1)
  assert res[0] == pytest.approx(1.0, abs=0.1)
  assert var[1] == pytest.approx(var[0] / 4 + ALPHA ** 2 * res[0], rel=0.1)
  identity = [i for i in range(16) if i not in (0, 1, 4, 10)]
  np.testing.assert_allclose(var[1:][identity], var[:-1][identity] + ALPHA ** 2 *
                             res[identity], rtol=0.02)
  out0, _ = run(make_params(shapes, skip_gain=0.0), x)
  v0 = np.array([float(out0[f'avg_var_{i}']) for i in range(17)])
  np.testing.assert_allclose(v0[1:][identity], v0[:-1][identity], rtol=1e-5)
  assert v0[1] == pytest.approx(v0[0] / 4, rel=0.1)


def test_signal_propagation_block_by_block(regnet_b0):
  """Each block fed N(0, expected_in^2) noise: beta = 1/expected_in and, with skip
  gains 1, the output variance is the next expected_std^2 (docs/models.md); with skip gains
  0, identity blocks keep expected_in^2 and transitions give unit variance."""
  shapes, run, x, betas, strides = regnet_b0
  e_in, e_out = expected_curve(TABLE['B0'][1])
  for gain in (1.0, 0.0):
    _, out_vars = run(make_params(shapes, gain), x, True)
    np.testing.assert_allclose(1 / np.array(betas), e_in, rtol=1e-6)
    target = np.square(e_out) if gain else np.array(
        [1.0 if s > 1 else e ** 2 for s, e in zip(strides, e_in)])
    np.testing.assert_allclose(np.array(out_vars), target, atol=0.06)
