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
import safetensors.numpy

from nfnet_jax import models, timm_convert

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
  fixtures are read: safetensors' numpy reader and timm_convert.from_timm)."""
  arrays = safetensors.numpy.load_file(os.path.join(FIXTURES, 'timm', f'{case}.safetensors'))
  return timm_convert.from_timm(arrays, spec['timm_name'], overrides=spec['overrides'])


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
