r"""Fine-tune a pretrained NF network on a folder of your own images.

  python -m nfnet_jax.train --config=experiments/finetune_folder.py:F0 --workdir=... \
      --config.init_from=F0_haiku.npz --config.data.folder=/path/to/images

The argument is any registered model; timm's weights on the Hugging Face Hub load
without torch (docs/pretrained.md lists them), e.g. ECA-NFNet-L0 (24M parameters):

  python -m nfnet_jax.train --config=experiments/finetune_folder.py:eca_nfnet_l0 \
      --workdir=... --config.init_from=hf-hub:timm/eca_nfnet_l0.ra2_in1k \
      --config.data.folder=/path/to/images

`init_from` takes a file (DeepMind's *_haiku.npz, a saved .npz, a model.safetensors)
or an hf-hub: name (downloaded once into huggingface_hub's cache; needs
`pip install 'nfnet_jax[hub]'`).

The folder holds one subfolder per class, in train/ and val/ subfolders; val/ is
the eval split whenever it exists, else 10% of each class is held out. The
classifier is re-initialised for the folder's classes; the body starts from the
pretrained weights. AdamW-free SGD at a small learning rate, short schedule, no AGC
on a small batch, light augmentation.
"""
from nfnet_jax import configs
from nfnet_jax.models import registry


def get_config(arg: str = 'F0'):
  """`arg`: a registered model name ('F0', 'eca_nfnet_l0', 'nf_regnet_b0', ...)."""
  model, _ = configs.config_arg(arg, 'experiments/finetune_folder.py', registry.names(),
                                default='F0')
  c = configs.base_config()  # RandAugment is off below, so no model's RA setting is needed
  c.model = model
  c.data.source = 'folder'
  c.data.holdout_fraction = 0.1   # only for a folder without val/ (val/ always wins)
  c.data.randaugment.enabled = False
  c.data.mix.enabled = False
  c.batch_size = 64
  c.num_epochs = 10.0
  c.warmup_epochs = 1.0
  c.optimizer.base_lr = 0.01
  c.optimizer.agc_clipping = 0.0
  c.model_kwargs = dict(stochdepth_rate=0.1, drop_rate=0.2)
  c.eval_batch_size = 64
  c.log_every = 10
  c.checkpoint_every_steps = 500
  return c
