"""What every model family shares: pinned numerics, the registry, remat policies.

`tests/fixtures/model_logits.npz` (written by tests/fixtures/make_logit_fixtures.py)
holds fixed parameters, images and logits of one small model per family; the models
must reproduce those logits bit for bit and declare the same parameter tree.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import models

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
  np.testing.assert_array_equal(np.asarray(f(c['params'], images, False)),
                                c['logits_eval'])
  np.testing.assert_array_equal(np.asarray(f(c['params'], images, True)),
                                c['logits_train'])
