"""The base training config that every file in experiments/ starts from.

Defaults are the NFNet recipe of the paper (DESIGN.md): batch 4096, 360 epochs,
SGD + Nesterov 0.9, lr 0.1 * batch / 256 with 5 warmup epochs then cosine to 0,
weight decay 2e-5 (not on gains and biases), AGC 0.01, label smoothing 0.1, EMA
0.99999, bfloat16 compute, stochastic depth 0.25.
"""
import ml_collections

from nfnet_jax import optim


def base_config() -> ml_collections.ConfigDict:
  """Returns the full set of training keys with the paper's defaults."""
  from nfnet_jax.data.config import default_config as data_config  # TF-free
  c = ml_collections.ConfigDict()
  c.model = 'F0'
  c.model_kwargs = ml_collections.ConfigDict(dict(stochdepth_rate=0.25))
  c.init_from = ''              # released DeepMind file (*.npz / *_haiku.npz) to start from
  c.seed = 0
  c.batch_size = 4096           # global, over all hosts and devices
  c.grad_accum_steps = 1        # micro-batches per step (AGC sees the summed gradient)
  c.num_epochs = 360.0
  c.warmup_epochs = 5.0
  c.total_steps = 0             # > 0 overrides num_epochs
  c.label_smoothing = 0.1
  c.ema_decay = 0.99999
  c.compute_dtype = 'bfloat16'  # activations; master weights are float32
  # 'convs': recompute the elementwise work in the backward pass from saved conv
  # outputs (F0 b256/192px: 28.3 -> 4.9 GiB of residuals; no conv recomputed).
  # 'block_convs' / 'blocks': per block (see nfnet_jax.fast.model). Same results.
  c.remat = 'none'
  c.optimizer = optim.default_config()
  c.sam = ml_collections.ConfigDict(dict(enabled=False, rho=0.05, fraction=1.0))
  c.data = data_config()
  c.data.model = c.get_ref('model')  # Image sizes default to this model's variant table.
  c.eval_batch_size = 1000
  c.eval_every = 0              # steps; 0: evaluate only at the end (train_and_eval)
  c.log_every = 100
  c.log_agc_clip_fraction = False
  c.checkpoint_every_steps = 5000
  c.checkpoint_every_minutes = 30.0
  c.keep_checkpoints = 3
  c.max_consecutive_nonfinite = 10
  return c


def nfnet_config(variant: str) -> ml_collections.ConfigDict:
  """The paper's recipe for NFNet-`variant` (e.g. 'F0', 'F3+') on ImageNet."""
  from nfnet_jax.models import registry
  c = base_config()
  info = registry.info(variant)
  c.model = variant
  c.data.randaugment.num_layers, c.data.randaugment.magnitude = info['randaug']
  return c
