"""timm's NF architectures, without torch: small random-weight builds of timm's own code
(tests/fixtures/make_timm_fixtures.py wrote their safetensors files and timm's logits)
load into the registered models and give timm's logits.

Tolerance: both sides compute in float32 on CPU, and sum in different orders (PyTorch
standardises the kernels inside F.batch_norm; grouped convs, SE and ECA reductions are
reassociated); seen max |diff| <= 3.2e-6 on logits of scale 0.7..4.9. A model that differs
from timm's by a padding, an epsilon, a gamma or a channel count is off by 1e-3 or more.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import models, pretrained, timm_convert

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
ATOL = 2e-5


def _logit_fixtures() -> tuple[np.ndarray, dict[str, dict]]:
  """(images [N, H, W, 3], case -> {spec, logits})."""
  cases: dict[str, dict] = {}
  with np.load(os.path.join(FIXTURES, 'timm_logits.npz')) as data:
    images = data['images']
    for key in data.files:
      if key == 'images':
        continue
      case, what = key.split('/')
      cases.setdefault(case, {})[what] = (json.loads(str(data[key])) if what == 'spec'
                                          else data[key])
  return images, cases


IMAGES, CASES = _logit_fixtures()


def load_timm_fixture(case: str, spec: dict) -> dict:
  """The case's safetensors file as this package's params (the one place the
  fixtures are read): the package's own torch-free reader, `pretrained.read_checkpoint`,
  then `timm_convert.from_timm` with the fixture's reduced-size overrides (the
  registered full-size model that `pretrained.load` checks against is larger)."""
  raw = pretrained.read_checkpoint(os.path.join(FIXTURES, 'timm', f'{case}.safetensors'))
  arrays = {f'{m}.{leaf}': a for m, leaves in raw.items() for leaf, a in leaves.items()}
  return timm_convert.from_timm(arrays, spec['timm_name'], overrides=spec['overrides'])


# timm 1.0.31's counts: (parameters, multiply-adds of convs, ECA's Conv1d and linears
# at the test resolution, from forward hooks: the hooks of tests/test_timm_parity.py).
TIMM_COUNTS = {
    'dm_nfnet_f0': (71_489_284, 12_384_198_656),
    'nfnet_l0': (35_074_488, 7_025_301_504),
    'eca_nfnet_l0': (24_143_924, 7_014_465_280),
    'eca_nfnet_l1': (41_407_728, 14_730_391_040),
    'eca_nfnet_l2': (56_722_348, 29_781_742_848),
    'nf_regnet_b1': (10_223_984, 999_308_928),
    'nf_resnet50': (25_557_032, 6_758_334_464),
}


@pytest.mark.parametrize('timm_name', sorted(TIMM_COUNTS))
def test_parameters_and_macs_are_timms(timm_name):
  assert models.summarize(timm_convert.registry_name(timm_name)) == TIMM_COUNTS[timm_name]


def test_registered_under_timms_names_with_its_pretrained_facts():
  """timm's names (`timm/` where DeepMind's model has the name), timm's sizes and crop;
  DeepMind's nf_resnet50 stays DeepMind's."""
  assert timm_convert.registry_name('eca_nfnet_l0') == 'eca_nfnet_l0'
  assert timm_convert.registry_name('nf_resnet50') == 'timm/nf_resnet50'
  for timm_name in models.timm_models.TIMM_MODELS:
    assert timm_convert.registry_name(timm_name) in models.names()
  info = models.info('eca_nfnet_l0')
  assert (info['train_imsize'], info['test_imsize'], info['crop_fraction'],
          info['interpolation']) == (224, 288, 1.0, 'bicubic')
  assert models.info('dm_nfnet_f3')['crop_fraction'] == 0.94
  assert models.info('nf_resnet50')['options'] == {}
  assert models.info('timm/nf_resnet50')['options']['avg_pool_shortcut'] is True
  with pytest.raises(ValueError, match="Unknown timm model 'eca_nfnet_l9'. Did you mean"):
    timm_convert.from_timm({}, 'eca_nfnet_l9')


def test_fixtures_cover_every_timm_architecture():
  """One fixture per timm name except dm_nfnet_f1..f6 (F0's code at other depths)."""
  want = {n for n in models.timm_models.TIMM_MODELS if not n.startswith('dm_nfnet_f')}
  assert {c['spec']['timm_name'] for c in CASES.values()} == want | {'dm_nfnet_f0'}


@pytest.mark.parametrize('case', sorted(CASES))
def test_timm_fixture_logits(case):
  spec, want = CASES[case]['spec'], CASES[case]['logits']
  params = load_timm_fixture(case, spec)
  name = timm_convert.registry_name(spec['timm_name'])
  net = models.create(name, spec['num_classes'], **spec['overrides'])
  got = jax.jit(lambda p, x: net.apply(p, None, x, False)['logits'])(
      params, jnp.asarray(IMAGES))
  diff = float(np.abs(np.asarray(got) - want).max())
  print(f'{case} ({name}): max |ours - timm| = {diff:.3g}, logit scale '
        f'{float(np.abs(want).max()):.3g}')
  assert diff <= ATOL
