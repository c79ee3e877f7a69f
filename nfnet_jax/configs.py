"""The training config: the base that every file in experiments/ starts from, and
its checks, which all run before anything is built, compiled or created.

Where each check lives (docs/training.md, "The checks", is the one list): beside
what it checks. `validate_config` (values: names, ranges, the model built from
config.model_kwargs and its smallest image size) calls `data.check_config` for the
data keys, `registry.check_options` for the model's remat policy and
`optim.check_name`; `check_run` (what the file system must hold: a writable workdir,
the data, config.init_from that fits the model, something to evaluate) reads only. `python -m nfnet_jax.train` runs both
before a run and for --check_config; `config_arg` parses the experiments'
`--config=FILE:ARG` arguments.

Defaults are the NFNet recipe of the paper: batch 4096, 360 epochs,
SGD + Nesterov 0.9, lr 0.1 * batch / 256 with 5 warmup epochs then cosine to 0,
weight decay 2e-5 (not on gains and biases), AGC 0.01, label smoothing 0.1, EMA
0.99999, bfloat16 training compute with float32 evaluation, stochastic depth 0.25.
"""
from __future__ import annotations

import ast
import copy
import inspect
import logging
import math
import os
import pickle
import tempfile
from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from nfnet_jax import checkpoints, data, errors, hub, models, optim, pretrained, sam
from nfnet_jax.data import config as data_config
from nfnet_jax.data import tfds_location
from nfnet_jax.models import registry

MODES = ('train', 'eval', 'train_and_eval')
DTYPES = ('bfloat16', 'float32')


def base_config() -> ml_collections.ConfigDict:
  """Returns the full set of training keys with the paper's defaults."""
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
  c.data = data_config.default_config()
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


def summary(config, spec: str = '') -> str:
  """One line: what a run of `config` trains (printed by --check_config and at the
  start of a run); `spec` is the --config=FILE:ARG it came from."""
  train, test = data_config.image_sizes(config.data)
  kwargs = ', '.join(f'{k}={v!r}' for k, v in config.model_kwargs.items())
  sam_text = (f', SAM (rho {config.sam.rho}, ascent on {config.sam.fraction:.0%} of the '
              f'batch)' if config.sam.enabled else '')
  return (f'{spec + ": " if spec else ""}{config.model}({kwargs}) on '
          f'{config.data.source} data, train {train} px / eval {test} px, batch '
          f'{config.batch_size}{sam_text}, {config.compute_dtype} training, '
          f'{config.get("eval_dtype", "float32")} eval')


def compile_notice(config, mode: str, num_devices: int) -> str:
  """The log line before XLA compiles: what, and that the first step waits for it."""
  train, test = data_config.image_sizes(config.data)
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


# A power of two above every model's total stride: traced at this size, the smallest
# conv output is _PROBE_SIZE / stride pixels on a side.
_PROBE_SIZE = 512
_MODEL_FACTS: dict[str, tuple[dict[str, dict[str, tuple]], int]] = {}


def model_facts(model: str, kwargs: dict[str, Any], num_classes: int
                ) -> tuple[dict[str, dict[str, tuple]], int]:
  """({module: {leaf: shape}} of the params, total stride) of `model` built with
  `kwargs`: its init traced at _PROBE_SIZE px with jax.eval_shape (nothing computed
  or compiled; cached). The total stride is _PROBE_SIZE over the smallest side of any
  convolution's output: how many input pixels one pixel of the last stage covers."""
  key = repr((model, sorted(kwargs.items()), num_classes))
  if key not in _MODEL_FACTS:
    net = models.create(model, num_classes, **kwargs)
    sides = []

    def record(method, args, kw, context):
      out = method(*args, **kw)
      if 'conv' in type(context.module).__name__.lower() and getattr(out, 'ndim', 0) == 4:
        sides.append(int(out.shape[1]))
      return out

    def init(rng, images):
      with hk.intercept_methods(record):
        return net.init(rng, images, is_training=True)

    # Abstract inputs: not even the key is computed (an eager op would compile).
    out = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                         jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32))
    params = out[0] if models.is_stateful(model) else out
    shapes = {m: {leaf: tuple(v.shape) for leaf, v in leaves.items()}
              for m, leaves in params.items()}
    _MODEL_FACTS[key] = shapes, _PROBE_SIZE // max(min(sides, default=_PROBE_SIZE), 1)
  return _MODEL_FACTS[key]


def _check_model(config, num_classes: int = 10) -> int:
  """config.model is registered and config.model_kwargs build it: every layer has
  channels, widths are positive, depths at least one block. Returns the total stride."""
  valid = model_kwarg_names(config.model)
  kwargs = config.model_kwargs.to_dict()
  for key in kwargs:
    if key not in valid:
      raise ValueError(errors.unknown_name(f'keyword of model {config.model!r}', key,
                                           valid, shown=f'config.model_kwargs.{key}'))
  width, depths = kwargs.get('width'), kwargs.get('depths')
  if width is not None and not (isinstance(width, (int, float)) and width > 0):
    raise ValueError(f'config.model_kwargs.width={width!r} must be a positive number '
                     '(a multiplier of the stage widths)')
  if depths is not None and not (
      isinstance(depths, (tuple, list)) and depths
      and all(isinstance(d, int) and d >= 1 for d in depths)):
    raise ValueError(f'config.model_kwargs.depths={depths!r} must be a non-empty tuple '
                     'of blocks per stage, each >= 1, e.g. (1, 1, 2, 1)')
  for key in ('stochdepth_rate', 'drop_rate'):
    rate = kwargs.get(key)
    if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate < 1):
      raise ValueError(f'config.model_kwargs.{key}={rate!r} must be in [0, 1)')
  try:
    shapes, stride = model_facts(config.model, kwargs, num_classes)
  except ZeroDivisionError:  # A layer of no channels (fan-in 0).
    raise ValueError(f'config.model_kwargs={kwargs} leave model {config.model!r} a '
                     'layer without channels: raise the width') from None
  except (TypeError, ValueError, IndexError, KeyError) as e:
    raise ValueError(f'config.model_kwargs={kwargs} does not fit model '
                     f'{config.model!r}: {e}. Valid keys: {", ".join(valid)}') from None
  for module, leaves in shapes.items():
    for leaf, shape in leaves.items():
      if 0 in shape:
        raise ValueError(f'config.model_kwargs={kwargs} leave model {config.model!r} a '
                         f'layer without channels ({module}/{leaf} has shape {shape}): '
                         'raise the width')
  return stride


def _check_image_sizes(config, stride: int) -> None:
  """Train and eval sizes at least the model's total stride: below it the last stage
  sees less than one pixel of the image."""
  for key, size in zip(('image_size', 'eval_size'), data_config.image_sizes(config.data)):
    if size < stride:
      raise ValueError(f'config.data.{key}: {size} px is below the total stride of '
                       f'{config.model} as configured ({stride} px: one pixel of its last '
                       f'stage covers {stride}x{stride} input pixels); use at least '
                       f'{stride} px')


def _check_finite(config, prefix: str = 'config') -> None:
  """No value anywhere in the config is NaN or infinite."""
  for key, value in config.items():
    name = f'{prefix}.{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      _check_finite(value, name)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{name}={value} must be a finite number')


# Every seed feeds numpy, TF and JAX generators; all take [0, 2**32).
SEED_RANGE = (0, 2**32)


def _check_numbers(config) -> None:
  """Seeds in range, learning rates and the optimizer's coefficients meaningful."""
  for name, seed in (('seed', config.seed), ('data.offline.seed', config.data.offline.seed)):
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
      raise ValueError(f'config.{name}={seed} must be in [0, 2**32)')
  o = config.optimizer
  if not o.base_lr > 0:
    raise ValueError(f'config.optimizer.base_lr={o.base_lr} must be positive')
  for key in ('end_lr', 'weight_decay'):
    if o.get(key, 0.0) < 0:
      raise ValueError(f'config.optimizer.{key}={o[key]} must be >= 0')
  if not 0 <= o.get('momentum', 0.0) < 1:
    raise ValueError(f'config.optimizer.momentum={o.momentum} must be in [0, 1)')
  if (o.get('agc_clipping') or 0) < 0:
    raise ValueError(f'config.optimizer.agc_clipping={o.agc_clipping} must be >= 0 '
                     '(0: no AGC)')
  if config.sam.enabled and not config.sam.rho > 0:
    raise ValueError(f'config.sam.rho={config.sam.rho} must be positive')
  if not 0 <= config.data.holdout_fraction < 1:
    raise ValueError(f'config.data.holdout_fraction={config.data.holdout_fraction} must '
                     'be in [0, 1)')


def _check_sources(data) -> None:
  """Paths of one source set while another is used: the user meant that source."""
  for key, source in (('folder', 'folder'), ('data_dir', 'tfds'), ('manual_dir', 'tfds')):
    if data[key] and data.source != source:
      raise ValueError(f'config.data.{key}={data[key]} is set, but data.source is '
                       f'{data.source!r}, which does not read it: add '
                       f'--config.data.source={source}')


def _check_stateful(config) -> None:
  """What models with state (BatchNorm) cannot combine with."""
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
  _check_keys(config, base_config(), 'config')
  if mode not in MODES:
    raise ValueError(errors.unknown_name('mode', mode, MODES))
  _check_finite(config)
  stride = _check_model(config)
  try:
    data.check_config(config.data)
  except ValueError as e:
    raise ValueError(f'config.{e}' if str(e).startswith('data.') else str(e)) from None
  _check_sources(config.data)
  _check_image_sizes(config, stride)
  _check_numbers(config)
  if config.get('remat', 'none') not in models.REMAT_POLICIES:
    raise ValueError('config.remat: ' + errors.unknown_name(
        'remat policy', config.remat, models.REMAT_POLICIES))
  try:
    registry.check_options(config.model, remat=config.get('remat', 'none'))
  except ValueError as e:
    raise ValueError(f'config.remat: {e}') from None
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


# ---------------------------------------------------------------------------
# What the file system must hold: checked before anything is created.
# ---------------------------------------------------------------------------
def one_line(text: str) -> str:
  """`text` with its lines joined: error messages are printed as one line."""
  return ' '.join(part.strip() for part in str(text).splitlines() if part.strip())


def check_run(config: ml_collections.ConfigDict, workdir: Optional[str],
              mode: str = 'train') -> None:
  """Raises ValueError (one line) unless a run of `config` in `workdir` can start:
  the workdir is a writable directory or can be created as one (a `gs://` workdir is
  not checked here), the data is there (a prepared TFDS dataset, or its manual_dir
  to prepare it from; the image folder with its class folders), --mode=eval has
  something to evaluate, and config.init_from exists and fits the model (read with
  `pretrained.load`, as the run reads it). A workdir with a checkpoint resumes from
  it, so init_from is not read then. Call after `validate_config`. Reads only: the
  one probe of the workdir's writability is removed at once.
  """
  if workdir is not None:
    _check_workdir(workdir)
  resumes = workdir is not None and checkpoints.has_checkpoint(workdir)
  num_classes = _check_data(config.data, mode)
  if mode == 'eval' and not resumes and not config.init_from:
    raise ValueError(
        f'--mode=eval: no checkpoint in {checkpoints.checkpoint_dir(workdir or ".")} and '
        'no config.init_from, so nothing to evaluate (nothing was created). Train in '
        'this workdir first, or pass --config.init_from=<weights file>.')
  if config.init_from and not resumes:
    _check_init_from(config, num_classes, mode)


def _writable(directory: str) -> Optional[str]:
  """None if an entry can be created in `directory`, else why not. Creates and
  removes one empty directory: permission bits alone do not say it (a read-only
  mount, or root, who ignores them)."""
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.nfnet_jax-write-check-', dir=directory))
  except OSError as e:
    return e.strerror or str(e)
  return None


def _check_workdir(workdir: str) -> None:
  if '://' in workdir:  # A bucket: its first write tells.
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'is' if existing == path else f'cannot be created: {existing} is'
    raise ValueError(f'--workdir={workdir} {where} a file, not a directory')
  # The workdir (or the folder it will be made in) only: a probe inside checkpoints/
  # would change that folder's mtime, and a refused run leaves the workdir as it was.
  why = _writable(existing)
  if why:
    raise ValueError(f'--workdir={workdir}: cannot write in {existing} ({why}); '
                     'give a writable directory')


def _check_data(data_cfg, mode: str) -> int:
  """The data is there; returns its class count. The folder is listed, not verified
  (verification decodes every image and caches the verdicts: the run does it)."""
  cfg = copy.deepcopy(data_cfg)
  if cfg.source == 'offline':
    if mode == 'eval' and not cfg.offline.num_eval:
      raise ValueError('--mode=eval: config.data.offline.num_eval is 0, so nothing to '
                       'evaluate on')
    return int(cfg.offline.num_classes)
  if '://' in (cfg.data_dir if cfg.source == 'tfds' else cfg.folder):
    return _remote_classes(cfg)
  if cfg.source == 'folder':
    cfg.folder_verify = 'none'
  if cfg.source == 'tfds' and cfg.manual_dir:
    # TensorFlow only when the config reads TFDS (the numpy path never imports it).
    from nfnet_jax.data import sources  # pylint: disable=g-import-not-at-top
    try:
      builder = sources.tfds_builder(cfg, prepare=False)
    except ValueError as e:
      raise ValueError(f'config.data: {one_line(e)}') from None
    if not builder.is_prepared():  # The run prepares it from manual_dir.
      if not os.path.isdir(cfg.manual_dir):
        raise ValueError(f'config.data.manual_dir={cfg.manual_dir} is not a directory')
      label = (builder.info.supervised_keys or ('image', 'label'))[1]
      return int(builder.info.features[label].num_classes)
  try:
    if cfg.source == 'tfds':  # Missing data is said without importing TensorFlow.
      tfds_location.refuse_if_absent(cfg)
    info = data.dataset_info(cfg)
  except (OSError, ValueError) as e:
    raise ValueError(f'config.data: {one_line(e)}') from None
  if mode == 'eval' and not info['num_eval']:
    raise ValueError(f'--mode=eval: the {cfg.source} data has no eval split, so '
                     'nothing to evaluate on')
  return int(info['num_classes'])


def _remote_classes(cfg) -> int:
  """A bucket (gs://...) is read by the run; here only its class count is needed:
  TFDS knows it without the data, a folder's is not known before it is listed."""
  if cfg.source != 'tfds':
    raise ValueError(f'config.data.folder={cfg.folder}: a folder dataset is read from '
                     'the local file system; copy it to a local disk')
  from nfnet_jax.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow)
  builder = sources.tfds_builder(cfg, prepare=False)
  label = (builder.info.supervised_keys or ('image', 'label'))[1]
  return int(builder.info.features[label].num_classes)


# init_from files already found to fit: (path, size, mtime, model, kwargs, classes,
# mode). The command line checks before the run and the run checks again; the
# file is read once.
_FITTING_WEIGHTS: set[tuple] = set()


def _check_init_from(config, num_classes: int, mode: str) -> None:
  """config.init_from reads as `checkpoints` reads it (the classifier resized to the
  data's classes for training, as is for --mode=eval) and has the shapes of the
  model that config.model_kwargs build."""
  path = config.init_from
  kwargs = config.model_kwargs.to_dict()
  try:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, config.model,
           repr(kwargs), num_classes, mode)
  except OSError:  # pretrained.load says what is missing and where to download it.
    key = None
  if key in _FITTING_WEIGHTS:
    return
  quiet = logging.getLogger(pretrained.__name__)
  level = quiet.level
  quiet.setLevel(logging.WARNING)  # The run logs the classifier resize itself.
  try:
    if mode == 'eval':
      params = pretrained.load(path, model=config.model)
    else:
      params = pretrained.load(path, model=config.model, num_classes=num_classes, rng=0)
  except (OSError, ValueError, pickle.UnpicklingError, MemoryError, hub.HubError) as e:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise ValueError(f'config.init_from: {one_line(text)}') from None
  finally:
    quiet.setLevel(level)
  want, _ = model_facts(config.model, kwargs, num_classes)
  got = {m: {leaf: tuple(a.shape) for leaf, a in leaves.items()}
         for m, leaves in params.items()}
  del params
  for module in sorted(set(got) | set(want)):
    for leaf in sorted(set(got.get(module, {})) | set(want.get(module, {}))):
      g, w = got.get(module, {}).get(leaf), want.get(module, {}).get(leaf)
      if g == w:
        continue
      where = f'[{module!r}][{leaf!r}]: {g} in the file, {w} here'
      if mode == 'eval':
        raise ValueError(
            f"--mode=eval: config.init_from={path} does not fit this data's "
            f'{num_classes} classes ({where}), so it would score an untrained '
            'classifier. Evaluate on data with the classes the weights were trained '
            'on, or fine-tune first (--mode=train).')
      raise ValueError(f'config.init_from={path} does not fit {config.model} as '
                       f'config.model_kwargs={kwargs} build it ({where})')
  if key is not None:
    _FITTING_WEIGHTS.add(key)


# ---------------------------------------------------------------------------
# The experiments' --config=FILE:ARG arguments.
# ---------------------------------------------------------------------------
def config_arg(arg: str, experiment: str, variants: Sequence[str] = (),
               options: Sequence[str] = (), default: str = '') -> tuple[str, list[str]]:
  """Splits an experiment's argument 'VARIANT[,OPTION...]' and checks every word,
  case included: (variant, [options]). With no `variants` every word is an option.
  An unknown or repeated word is a ValueError naming the closest valid one."""
  words = [w.strip() for w in (arg or '').split(',')] if arg else []
  variant = default
  if variants:
    variant = words.pop(0) if words else default
    if variant not in variants:
      raise ValueError(f'{experiment}: ' + errors.unknown_name(
          'variant', variant, variants, shown=f'{variant!r} (from {arg!r})'))
  for word in words:
    if word not in options:
      raise ValueError(f'{experiment}: ' + errors.unknown_name(
          'option', word, options or ['(none)'], shown=f'{word!r} (from {arg!r})'))
  if len(set(words)) < len(words):
    raise ValueError(f'{experiment}: an option repeats in {arg!r}')
  return variant, words


def _check_augment_on(data, per_device: int) -> None:
  """data.augment_on and what 'device' needs: with within-batch pairing, an even
  number of rows per device (each device pairs its own rows 2i and 2i+1)."""
  data_config.check_augment_config(data)
  if data.get('augment_on', 'host') != 'device':
    return
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
