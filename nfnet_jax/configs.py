"""The training config: the base that every file in experiments/ starts from, and
its validation (every check runs before anything is built or compiled).

Defaults are the NFNet recipe of the paper: batch 4096, 360 epochs,
SGD + Nesterov 0.9, lr 0.1 * batch / 256 with 5 warmup epochs then cosine to 0,
weight decay 2e-5 (not on gains and biases), AGC 0.01, label smoothing 0.1, EMA
0.99999, bfloat16 compute, stochastic depth 0.25.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import ml_collections

from nfnet_jax import errors, optim

MODES = ('train', 'eval', 'train_and_eval')


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


# ---------------------------------------------------------------------------
# Validation: every check of a config, before anything is built or compiled.
# ---------------------------------------------------------------------------
def _check_keys(config, reference, prefix: str) -> None:
  """Every key of `config` must exist in `reference` (recursively)."""
  for key in config.keys():
    name = f'{prefix}.{key}'
    if key not in reference:
      raise ValueError(errors.unknown_name('config key', key, sorted(reference.keys()),
                                           shown=name))
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and name != 'config.model_kwargs':
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f'{name} must be a group of keys, got {value!r}')
      _check_keys(value, ref, name)


def _check_model(config, num_classes: int = 10) -> None:
  """config.model is registered and config.model_kwargs fit its constructor."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  try:
    family = models.info(config.model)['family']
  except ValueError as e:
    raise ValueError(f'config.model: {e}') from None
  kwargs = config.model_kwargs.to_dict()
  make = models.module_fn(config.model, num_classes, **kwargs)
  try:  # Builds the module (no parameters, no computation).
    hk.transform(lambda: make()).init(None)
  except (TypeError, ValueError) as e:
    module = {m.__name__: m for m in (models.NFNet, models.NFResNet, models.NFRegNet)}[
        family]
    valid = [p for p in inspect.signature(module.__init__).parameters
             if p not in ('self', 'num_classes', 'variant', 'name')]
    raise ValueError(f'config.model_kwargs={kwargs} does not fit model '
                     f'{config.model!r}: {e}. Valid keys: {", ".join(valid)}') from None


def unknown_override(argv: list[str]) -> Optional[str]:
  """Message for the first `--config.a.b=...` whose key is not a config key, or None."""
  reference = base_config()
  for arg in argv:
    if not arg.lstrip('-').startswith('config.'):
      continue
    path = arg.lstrip('-').split('=', 1)[0].split('.')[1:]
    node, prefix = reference, 'config'
    for key in path:
      if prefix == 'config.model_kwargs' or not isinstance(node, ml_collections.ConfigDict):
        break
      if key not in node:
        return errors.unknown_name('config key', key, sorted(node.keys()),
                                   shown=f'{prefix}.{key} (from {arg})')
      node, prefix = node[key], f'{prefix}.{key}'
  return None


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int, mode: str = 'train') -> None:
  """Raises ValueError naming the bad key and the valid choices. No compilation."""
  from nfnet_jax import fast  # pylint: disable=g-import-not-at-top
  _check_keys(config, base_config(), 'config')
  if mode not in MODES:
    raise ValueError(errors.unknown_name('mode', mode, MODES))
  _check_model(config)
  if config.get('remat', 'none') not in fast.REMAT_POLICIES:
    raise ValueError('config.remat: ' + errors.unknown_name(
        'remat policy', config.remat, fast.REMAT_POLICIES))
  if config.compute_dtype not in ('bfloat16', 'float32'):
    raise ValueError(f"config.compute_dtype must be 'bfloat16' or 'float32', got "
                     f'{config.compute_dtype!r}')
  b, k = config.batch_size, config.grad_accum_steps
  if b <= 0 or b % num_devices:
    raise ValueError(f'config.batch_size={b} must be a positive multiple of the '
                     f'{num_devices} devices ({num_processes} hosts); e.g. '
                     f'{max(num_devices, b // num_devices * num_devices)}')
  if k < 1 or (b // num_devices) % k:
    raise ValueError(f'config.grad_accum_steps={k} must divide the per-device batch '
                     f'{b // num_devices} (config.batch_size={b} / {num_devices} devices)')
  _check_augment_on(config.data, b // num_devices)
  if config.sam.enabled and k > 1:
    raise ValueError('config.sam.enabled with config.grad_accum_steps > 1 is not '
                     'supported')
  if not 0 < config.sam.fraction <= 1:
    raise ValueError(f'config.sam.fraction={config.sam.fraction} must be in (0, 1]')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be positive')
  try:
    optim.check_name(config.optimizer.name)
  except ValueError as e:
    raise ValueError(f'config.optimizer.name: {e}') from None
  if config.total_steps < 0 or (not config.total_steps and config.num_epochs <= 0):
    raise ValueError(f'config.total_steps={config.total_steps} / config.num_epochs='
                     f'{config.num_epochs}: set a positive number of steps or epochs')
  for key in ('log_every', 'keep_checkpoints', 'max_consecutive_nonfinite'):
    if config[key] < 1:
      raise ValueError(f'config.{key}={config[key]} must be >= 1')
  for key in ('eval_every', 'checkpoint_every_steps', 'checkpoint_every_minutes',
              'warmup_epochs'):
    if config[key] < 0:
      raise ValueError(f'config.{key}={config[key]} must be >= 0 (0: off)')
  if not 0 <= config.ema_decay <= 1:
    raise ValueError(f'config.ema_decay={config.ema_decay} must be in [0, 1]')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'config.label_smoothing={config.label_smoothing} must be in [0, 1)')


def _check_augment_on(data, per_device: int) -> None:
  """data.augment_on and what 'device' needs: the TF pipeline (the numpy path
  augments on the host) and, with within-batch pairing, an even number of rows per
  device (each device pairs its own rows 2i and 2i+1)."""
  from nfnet_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  data_config.check_augment_config(data)
  if data.get('augment_on', 'host') != 'device':
    return
  if not data.use_tf:
    raise ValueError("data.augment_on='device' needs the TF input pipeline "
                     "(data.use_tf=True); the numpy path augments on the host: use "
                     "data.augment_on='host' with data.use_tf=False")
  if (data_config.mix_on(data) and data.mix.get('pairing', 'paper') == 'within_batch'
      and per_device % 2):
    raise ValueError(f"data.augment_on='device' with data.mix.pairing='within_batch' "
                     f'pairs rows 2i and 2i+1 on each device: the per-device batch '
                     f'{per_device} must be even')


def schedule_lengths(config, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) of the learning-rate schedule.

  total_steps: config.total_steps when set, else num_epochs of `num_train` examples.
  warmup_steps: warmup_epochs of examples; when config.total_steps cuts the run
  shorter than num_epochs, warmup shrinks by the same ratio, so it keeps its fraction
  of the schedule (5 of 360 epochs in the paper's recipe: 60 steps warm up for 1).
  """
  steps_per_epoch = num_train / config.batch_size
  by_epochs = int(math.ceil(config.num_epochs * steps_per_epoch))
  total = config.total_steps or by_epochs
  warmup = config.warmup_epochs * steps_per_epoch
  if 0 < total < by_epochs:
    warmup *= total / by_epochs
  return total, min(int(round(warmup)), total)
