r"""NFNet-F0..F7 (and F0+..F7+) on ImageNet with the paper's recipe.

  python -m nfnet_jax.train --config=experiments/nfnet.py:F1 --workdir=...
  python -m nfnet_jax.train --config=experiments/nfnet.py:F6,sam --workdir=...

arg: '<variant>[,sam]'. 'sam' turns on SAM (rho 0.05) with the ascent gradient on 20%
of each device's batch, as the paper's F6/F7 runs. Words are checked as written
(F0, not f0).
"""
from nfnet_jax import configs
from nfnet_jax.models import nfnet


def get_config(arg: str = 'F0'):
  variant, opts = configs.config_arg(arg, 'experiments/nfnet.py', list(nfnet.VARIANTS),
                                     ('sam',), default='F0')
  c = configs.nfnet_config(variant)
  if 'sam' in opts:
    c.sam.enabled = True
    c.sam.fraction = 0.2
  return c
