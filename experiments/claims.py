r"""The shared recipe of the paper-claim sweeps (`python -m nfnet_jax.claims`).

  python -m nfnet_jax.claims --claim nf_vs_bn --out /tmp/claims            # cpu scale
  python -m nfnet_jax.train --config=experiments/claims.py:cpu --workdir=/tmp/r \
      --config.model=bn_resnet26                                           # one run

Every run of a sweep starts from `get_config(scale)` and changes only what its claim
varies (model, batch size, clipping, seed), so both arms of a comparison share one
recipe and one budget. Scales:

- 'tiny': a few steps on 32 px images; only checks that a sweep runs end to end.
- 'cpu': the built-in offline dataset (10 classes: 5 shapes x 2 textures, 32 px),
  NF-ResNet/BN-ResNet layouts at 1/4 width, 32 epochs of 4096 images (1024 steps at
  batch 128), base_lr 0.2, float32; about 3 minutes per ResNet-26 run on 2 CPU cores.
- 'imagenet': ImageNet at 224 px for 90 epochs at batch 1024 (the NF-ResNet baseline
  schedule of DeepMind's code), bfloat16; what a pod user runs.

Recipe of all scales: SGD + Nesterov 0.9, lr = base_lr * batch / 256 (base_lr 0.1,
the paper's scaling; 0.2 at 'cpu' scale), linear warmup then cosine decay, label
smoothing 0.1, weight decay 5e-5, no AGC unless a claim turns it on, no stochastic
depth or dropout (the BN baseline has neither), EMA of the weights (and BN
statistics) evaluated beside them.
"""
from nfnet_jax import configs

SCALES = ('tiny', 'cpu', 'imagenet')


def get_config(arg: str = 'cpu'):
  """arg: '<scale>', '<scale>,F0' (NFNet-F0 instead of the ResNets, for the cost
  claim: at 'tiny'/'cpu' the quickstart's small F0 at the scale's width) or
  '<scale>,v1' (BN-ResNets in the post-activation layout, last BN of each residual
  branch initialised to zero)."""
  scale, opts = configs.config_arg(arg, 'experiments/claims.py', SCALES, ('F0', 'v1'),
                                   default='cpu')
  if len(opts) > 1:
    raise ValueError(f'experiments/claims.py: {arg!r} names {" and ".join(opts)}; '
                     'give one of them')
  variant = opts[0] if opts else ''
  c = _resnet_config(scale)
  if variant == 'v1':
    c.model = c.model.replace('nf_', 'bn_')
    c.model_kwargs = dict(c.model_kwargs.to_dict(), preactivation=False)
  if variant == 'F0':
    c.model = 'F0'
    if scale == 'imagenet':
      c.model_kwargs = dict(stochdepth_rate=0.25)
      c.data.image_size, c.data.eval_size = 192, 256
    else:
      c.model_kwargs = dict(c.model_kwargs.to_dict(), group_size=None)
  return c


def _resnet_config(scale: str):
  c = configs.base_config()
  c.model = 'nf_resnet26'
  c.model_kwargs = dict(stochdepth_rate=0.0, drop_rate=0.0)
  c.optimizer.base_lr = 0.1
  c.optimizer.agc_clipping = 0.0
  c.optimizer.weight_decay = 5e-5
  c.data.randaugment.enabled = False
  c.data.mix.enabled = False
  if scale == 'imagenet':
    c.model = 'nf_resnet50'
    c.batch_size = 1024
    c.num_epochs = 90.0
    c.warmup_epochs = 5.0
    c.ema_decay = 0.99999
    c.data.image_size = c.data.eval_size = 224
    c.log_every = 500
    return c
  c.model_kwargs = dict(stochdepth_rate=0.0, drop_rate=0.0, width=0.25)
  c.data.source = 'offline'
  c.data.use_tf = False
  c.compute_dtype = 'float32'   # bf16 convs are slow on CPU
  c.checkpoint_every_minutes = 0.0
  if scale == 'tiny':
    c.model_kwargs = dict(stochdepth_rate=0.0, drop_rate=0.0, width=1 / 32)
    c.data.offline.update(num_classes=5, num_train=64, num_eval=32)
    c.data.image_size = c.data.eval_size = 32  # the models' total stride: no smaller
    c.batch_size = 16
    c.num_epochs = 0.5
    c.warmup_epochs = 0.0
    c.ema_decay = 0.9
    c.eval_batch_size = 32
    c.log_every = 1
    c.checkpoint_every_steps = 0
    return c
  c.data.offline.update(num_classes=10, num_train=4096, num_eval=1000)
  c.data.image_size = c.data.eval_size = 32
  # At 1/4 width on this data an NF-ResNet spends its first ~400 steps at chance
  # (its residual branches start switched off, skip_gain = 0, and the shortcut path
  # alone learns nothing here) before it learns; 32 epochs leave room for both
  # phases. lr still linear in the batch: 0.1 at 128, 1.6 at 2048.
  c.optimizer.base_lr = 0.2
  c.batch_size = 128
  c.num_epochs = 32.0
  c.warmup_epochs = 1.0
  c.ema_decay = 0.99
  c.eval_batch_size = 500
  c.log_every = 64
  c.checkpoint_every_steps = 256
  return c
