"""Full-size timm models against the registered ones: every name in
`timm_models.TIMM_MODELS`, built by timm (random weights), converted with
`timm_convert.from_timm`, must have timm's parameter count and multiply-adds and give timm's logits.

Needs torch and timm (not dependencies of nfnet_jax): skipped without them.

    pip install torch timm && pytest tests/test_timm_parity.py

One 64 x 64 image per model, our side run op by op (no jit: compiling F6 would take
minutes); timm's tolerance as tests/test_timm_fixtures.py, scaled by the logits.
"""
import importlib.util
import os

import numpy as np
import pytest

from nfnet_jax import models, timm_convert
from nfnet_jax.models import timm_models

# Logits agree to max|diff| <= RTOL * max|logits| + ATOL in float32 (both sides sum in
# other orders; deeper models reassociate more).
RTOL, ATOL = 1e-4, 1e-5


def _fixture_script():
  """tests/fixtures/make_timm_fixtures.py as a module (it imports torch and timm): its
  `randomise` redraws gains, biases and the classifier as for the small fixtures."""
  path = os.path.join(os.path.dirname(__file__), 'fixtures', 'make_timm_fixtures.py')
  spec = importlib.util.spec_from_file_location('make_timm_fixtures', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _timm_macs(torch, model, images) -> int:
  """Multiply-adds of timm's model on `images` (batch 1) as summary.summarize counts:
  every Conv2d, Conv1d (ECA) and Linear, from forward hooks."""
  total = [0]

  def hook(mod, _, out):
    if isinstance(mod, torch.nn.Linear):
      total[0] += mod.in_features * mod.out_features
    else:  # out [1, O, *spatial]: each output element costs in/groups * kernel MACs
      total[0] += out[0].numel() * mod.weight[0].numel()

  kinds = (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)
  handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
  with torch.no_grad():
    model(images)
  for h in handles:
    h.remove()
  return total[0]


@pytest.mark.parametrize('timm_name', list(timm_models.TIMM_MODELS))
def test_full_size_timm_model(timm_name):
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)  # timm's own init draws from the global generator
  model = timm.create_model(timm_name, pretrained=False).eval()
  _fixture_script().randomise(model, 0)  # no parameter left at a constant init
  images = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = model(images).numpy()
  timm_params = sum(p.numel() for p in model.parameters())
  timm_macs = _timm_macs(torch, model, images)

  params = timm_convert.from_timm(model.state_dict(), timm_name)
  del model
  name = timm_convert.registry_name(timm_name)
  assert models.summarize(name, image_size=64) == (timm_params, timm_macs)
  assert sum(int(np.prod(v.shape)) for m in params.values() for v in m.values()) == timm_params
  net = models.create(name)
  got = np.asarray(net.apply(params, None, jnp.asarray(images.permute(0, 2, 3, 1).numpy()),
                             False)['logits'])
  diff = float(np.abs(got - want).max())
  scale = float(np.abs(want).max())
  print(f'{timm_name} ({name}): {timm_params} parameters, max |ours - timm| = {diff:.3g} '
        f'on logits of scale {scale:.3g}')
  assert diff <= RTOL * scale + ATOL
