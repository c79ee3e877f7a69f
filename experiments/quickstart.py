r"""A small NFNet on the built-in offline dataset: minutes on a CPU (measured accuracy
and time in benchmarks/RESULTS.md).

  python -m nfnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/quickstart

The same blocks as NFNet-F0 (scaled WS, gamma-scaled GELU, SE, skip gains, stochastic
depth, AGC, Nesterov SGD, EMA) at width 1/8 with ungrouped 3x3 convs (XLA's grouped
convs are slow on CPU), on 32x32 images of 10 procedurally generated classes. arg
'numpy' uses the TF-free input path.
"""
from nfnet_jax import configs


def get_config(arg: str = ''):
  _, opts = configs.config_arg(arg, 'experiments/quickstart.py', options=('numpy',))
  c = configs.base_config()
  c.model = 'F0'
  c.model_kwargs = dict(width=0.125, group_size=None, depths=(1, 1, 2, 1),
                        stochdepth_rate=0.1, drop_rate=0.1)
  c.data.source = 'offline'
  c.data.image_size = c.data.eval_size = 32   # the shapes are rendered at this size
  c.data.randaugment.enabled = False
  c.data.mix.enabled = False
  c.data.use_tf = 'numpy' not in opts
  c.batch_size = 128
  c.num_epochs = 10.0
  c.warmup_epochs = 1.0
  c.optimizer.base_lr = 0.4         # peak lr 0.2 at batch 128
  c.optimizer.agc_clipping = 0.04   # smaller batch -> a looser clip (paper, sec. 4.1)
  c.ema_decay = 0.999
  c.compute_dtype = 'float32'       # bf16 convs are slow on CPU
  c.eval_batch_size = 500
  c.eval_every = 0
  c.log_every = 50
  c.checkpoint_every_steps = 200
  c.checkpoint_every_minutes = 0.0
  return c
