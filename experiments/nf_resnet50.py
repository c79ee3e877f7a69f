"""NF-ResNet-50 on ImageNet: 90 epochs at batch 1024, no AGC, no RandAugment or mixing.

  python -m nfnet_jax.train --config=experiments/nf_resnet50.py --workdir=...

Provenance: DeepMind's nfnets release (deepmind-research/nfnets) ships no
NF-ResNet experiment file. This recipe takes from the release's default ImageNet
experiment (nfnets/experiment.py, written for ResNet-50) its batch 1024, 90
epochs, lr 0.1 x batch / 256 with 5 warmup epochs then cosine to 0, Nesterov SGD,
label smoothing 0.1, no RandAugment or mixing, and its eval transform
('crop_resize': the aspect-preserving centre crop, `data.eval_crop='center_crop'`);
224 px train and test come from the NF-ResNet variant table. It differs from that
file in weight decay (5e-5 here, 1e-4 there), bfloat16 compute (float32 there) and
an EMA of the weights evaluated beside the raw ones (none there).
"""
from nfnet_jax import configs


def get_config(arg: str = ''):
  configs.config_arg(arg, 'experiments/nf_resnet50.py')  # takes no argument
  c = configs.base_config()
  c.model = 'nf_resnet50'
  c.model_kwargs = dict(stochdepth_rate=0.0)
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.agc_clipping = 0.0
  c.optimizer.weight_decay = 5e-5
  c.data.eval_crop = 'center_crop'
  c.data.randaugment.enabled = False
  c.data.mix.enabled = False
  return c
