"""The training config: the base that every file in experiments/ starts from, and
its validation (every check runs before anything is built or compiled).

Defaults are the NFNet recipe of the paper: batch 4096, 360 epochs,
SGD + Nesterov 0.9, lr 0.1 * batch / 256 with 5 warmup epochs then cosine to 0,
weight decay 2e-5 (not on gains and biases), AGC 0.01, label smoothing 0.1, EMA
0.99999, bfloat16 training compute with float32 evaluation, stochastic depth 0.25.
"""
from __future__ import annotations

import ast
import inspect
import math
from typing import Optional

import ml_collections

from nfnet_jax import errors, optim, sam

MODES = ('train', 'eval', 'train_and_eval')
DTYPES = ('bfloat16', 'float32')


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
  c.eval_dtype = 'float32'      # evaluation activations (the paper's evaluation: float32)
  # 'convs': recompute the elementwise work in the backward pass from saved conv
  # outputs (no conv recomputed). 'block_convs' / 'blocks': per block. Same
  # results; every family supports every policy (docs/models.md).
  c.remat = 'none'
  c.optimizer = optim.default_config()
  # SAM: the ascent gradient on `fraction` of the global batch (rows spread evenly
  # over it, the same rows on any device count); perturbation 'global': one
  # perturbation from the ascent gradient averaged over all devices, 'per_device':
  # each device perturbs by its own rows' gradient (SAM's reference code). sam.py.
  c.sam = ml_collections.ConfigDict(dict(enabled=False, rho=0.05, fraction=1.0,
                                         perturbation='global'))
  c.data = data_config()
  c.data.model = c.get_ref('model')  # Image sizes default to this model's variant table.
  c.eval_batch_size = 1000
  c.eval_every = 0              # steps; 0: evaluate only at the end (train_and_eval)
  c.log_every = 100
  c.log_agc_clip_fraction = False
  c.checkpoint_every_steps = 5000
  c.checkpoint_every_minutes = 30.0
  c.keep_checkpoints = 3
  # A checkpoint without a checksum cannot be verified, so it is set aside as damaged
  # like one that fails its checksum; True restores it unverified (with a warning).
  c.accept_unverified_checkpoints = False
  c.max_consecutive_nonfinite = 10
  # Models with BatchNorm (bn_resnet*): False normalizes with each device's own batch
  # statistics (the paper's TPU baselines); True averages them over all devices.
  c.bn_cross_device = False
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
# Keys that were renamed: the old name gets a pointer to the new one.
RENAMED_KEYS = {
    'config.data.eval_resize_margin': 'config.data.eval_crop_fraction (the share of '
                                      'the side the eval crop keeps: 1.0 = no crop, '
                                      '0 = auto; see docs/data.md)',
}


def _unknown_key(key: str, choices: list[str], name: str, shown: Optional[str] = None) -> str:
  """The message for config key `name` (a full path) that is not in `choices`."""
  if name in RENAMED_KEYS:
    return f'{name} was renamed to {RENAMED_KEYS[name]}'
  return errors.unknown_name('config key', key, choices, shown=shown or name)


def _check_keys(config, reference, prefix: str) -> None:
  """Every key of `config` must exist in `reference` (recursively)."""
  for key in config.keys():
    name = f'{prefix}.{key}'
    if key not in reference:
      raise ValueError(_unknown_key(key, sorted(reference.keys()), name))
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and name != 'config.model_kwargs':
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f'{name} must be a group of keys, got {value!r}')
      _check_keys(value, ref, name)


def model_kwarg_names(model: str) -> list[str]:
  """The keyword arguments of `model`'s constructor that config.model_kwargs may set."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  try:
    family = models.info(model)['family']
  except ValueError as e:
    raise ValueError(f'config.model: {e}') from None
  module = {m.__name__: m for m in (models.NFNet, models.NFResNet, models.NFRegNet,
                                    models.BNResNet)}[family]
  return [p for p in inspect.signature(module.__init__).parameters
          if p not in ('self', 'num_classes', 'variant', 'name')]


_MODEL_KWARGS = 'config.model_kwargs.'


def split_model_kwargs(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """Takes the --config.model_kwargs.<key>=<value> flags out of `argv`.

  Returns (the other arguments, [(key, value text, the flag as given)]). ml_collections
  can only override keys the config file already has; these are applied afterwards
  by `set_model_kwargs`, so any constructor keyword can be set.
  """
  rest, found = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    name = arg.lstrip('-')
    if arg.startswith('-') and name.startswith(_MODEL_KWARGS) and i > 0:
      key, eq, value = name[len(_MODEL_KWARGS):].partition('=')
      if not eq and i + 1 < len(argv):  # --config.model_kwargs.width 0.5
        i += 1
        value = argv[i]
      found.append((key, value, arg if eq else f'{arg} {value}'))
    else:
      rest.append(arg)
    i += 1
  return rest, found


def parse_value(text: str):
  """A flag's text as a Python value: a literal (0.5, 128, None, (1, 2), 'x'),
  true/false, or else the text itself (e.g. gelu)."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_model_kwargs(config, overrides: list[tuple[str, str, str]]) -> None:
  """Sets config.model_kwargs[key] = value for each (key, text, flag) from
  `split_model_kwargs`; a key that config.model's constructor does not take is a
  ValueError naming the closest and the valid keys."""
  valid = model_kwarg_names(config.model)
  for key, text, flag in overrides:
    if key not in valid:
      raise ValueError(errors.unknown_name(
          f'keyword of model {config.model!r}', key, valid,
          shown=f'config.model_kwargs.{key} (from {flag})'))
    value = parse_value(text)
    old = config.model_kwargs.get(key)
    if old is not None and value is not None and not isinstance(value, type(old)) and not (
        isinstance(old, float) and isinstance(value, int)):
      raise ValueError(f'config.model_kwargs.{key}: {text!r} is not a '
                       f'{type(old).__name__} like the config\'s {old!r} (from {flag})')
    with config.unlocked():
      config.model_kwargs[key] = value


def summary(config) -> str:
  """One line: what a run of `config` trains, for --check_config."""
  from nfnet_jax.data.config import image_sizes  # pylint: disable=g-import-not-at-top
  train, test = image_sizes(config.data)
  kwargs = ', '.join(f'{k}={v!r}' for k, v in config.model_kwargs.items())
  return (f'{config.model}({kwargs}) on {config.data.source} data, train {train} px / '
          f'eval {test} px, batch {config.batch_size}, {config.compute_dtype} training, '
          f'{config.get("eval_dtype", "float32")} eval')


def compile_notice(config, mode: str, num_devices: int) -> str:
  """The log line before XLA compiles: what, and that the first step waits for it."""
  from nfnet_jax.data.config import image_sizes  # pylint: disable=g-import-not-at-top
  train, test = image_sizes(config.data)
  what = (f'the eval step ({test} px, {config.get("eval_dtype", "float32")})'
          if mode == 'eval' else
          f'the train step ({config.batch_size // max(num_devices, 1)} images of '
          f'{train} px per device, {config.compute_dtype})')
  wait = ('The first step waits for XLA, which can take many minutes on a CPU even '
          'for small models (longer for the large NFNets)')
  if mode == 'eval':
    return f'Compiling {config.model}: {what}. {wait}.'
  return (f'Compiling {config.model}: {what}. {wait}; the time so far is shown until '
          'it is done, and step rates and ETAs leave it out.')


def _check_model(config, num_classes: int = 10) -> None:
  """config.model is registered and config.model_kwargs fit its constructor."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  valid = model_kwarg_names(config.model)
  kwargs = config.model_kwargs.to_dict()
  for key in kwargs:
    if key not in valid:
      raise ValueError(errors.unknown_name(f'keyword of model {config.model!r}', key,
                                           valid, shown=f'config.model_kwargs.{key}'))
  make = models.module_fn(config.model, num_classes, **kwargs)
  try:  # Builds the module (no parameters, no computation).
    hk.transform(lambda: make()).init(None)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.model_kwargs={kwargs} does not fit model '
                     f'{config.model!r}: {e}. Valid keys: {", ".join(valid)}') from None


def _check_stateful(config) -> None:
  """What models with state (BatchNorm) cannot combine with."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  if not models.registry.is_stateful(config.model):
    if config.bn_cross_device:
      raise ValueError(f'config.bn_cross_device=True, but {config.model!r} has no '
                       'BatchNorm (only the bn_resnet* models do)')
    return
  if 'cross_replica_axis' in config.model_kwargs:
    raise ValueError('config.model_kwargs.cross_replica_axis is set by the training '
                     'loop; use config.bn_cross_device=True instead')
  if config.sam.enabled:
    raise ValueError(f'config.sam.enabled with the BatchNorm model {config.model!r} is '
                     'not supported (the perturbed pass would update its statistics)')
  if config.get('remat', 'none') != 'none':
    raise ValueError(f'config.remat={config.remat!r} with the BatchNorm model '
                     f'{config.model!r} is not supported; use remat=\'none\'')


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
        return _unknown_key(key, sorted(node.keys()), f'{prefix}.{key}',
                            shown=f'{prefix}.{key} (from {arg})')
      node, prefix = node[key], f'{prefix}.{key}'
  return None


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int, mode: str = 'train') -> None:
  """Raises ValueError naming the bad key and the valid choices. No compilation."""
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  _check_keys(config, base_config(), 'config')
  if mode not in MODES:
    raise ValueError(errors.unknown_name('mode', mode, MODES))
  _check_model(config)
  if config.get('remat', 'none') not in models.REMAT_POLICIES:
    raise ValueError('config.remat: ' + errors.unknown_name(
        'remat policy', config.remat, models.REMAT_POLICIES))
  _check_stateful(config)
  for key in ('compute_dtype', 'eval_dtype'):
    if config[key] not in DTYPES:
      raise ValueError(f'config.{key}: ' + errors.unknown_name('dtype', config[key], DTYPES))
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
  if config.sam.perturbation not in sam.PERTURBATIONS:
    raise ValueError('config.sam.perturbation: ' + errors.unknown_name(
        'SAM perturbation', config.sam.perturbation, sam.PERTURBATIONS))
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
