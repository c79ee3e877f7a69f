"""NF-RegNet-B0..B8 on ImageNet with their recipe (DeepMind's NF-RegNet experiment):
batch 1024, lr 0.4 not scaled by batch, warmup-cosine to 0.001, weight decay 5e-5
(B0) + 1e-5 per level, SGD + Nesterov without AGC, MixUp + CutMix without
RandAugment, float32, EMA 0.99999; train/test sizes from the variant table, eval by
the aspect-preserving centre crop.

  python -m nfnet_jax.train --config=experiments/nf_regnet.py:B0 --workdir=...
"""
from nfnet_jax import configs

LEVELS = [f'B{level}' for level in range(9)]


def get_config(arg: str = 'B0'):
  variant, _ = configs.config_arg(arg, 'experiments/nf_regnet.py', LEVELS, default='B0')
  level = int(variant[1:])
  name = f'nf_regnet_b{level}'
  c = configs.base_config()
  c.model = name
  c.model_kwargs = dict(stochdepth_rate=0.1)
  c.batch_size = 1024
  c.optimizer.base_lr = 0.4
  c.optimizer.scale_lr_by_batch = False
  c.optimizer.end_lr = 0.001
  c.optimizer.agc_clipping = 0.0
  c.optimizer.weight_decay = 5e-5 + 1e-5 * level
  c.compute_dtype = 'float32'
  c.data.eval_crop = 'center_crop'
  c.data.randaugment.enabled = False
  return c
