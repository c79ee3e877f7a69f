"""NF-ResNet-50 on ImageNet (Brock, De, Smith 2021): NFNet-style recipe without AGC at
batch 1024, no RandAugment/mixing beyond flips and crops, 224 px."""
from nfnet_jax import configs


def get_config(arg: str = ''):
  del arg
  c = configs.base_config()
  c.model = 'nf_resnet50'
  c.model_kwargs = dict(stochdepth_rate=0.0)
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.agc_clipping = 0.0
  c.optimizer.weight_decay = 5e-5
  c.data.image_size = c.data.eval_size = 224
  c.data.randaugment.enabled = False
  c.data.mix.enabled = False
  return c
