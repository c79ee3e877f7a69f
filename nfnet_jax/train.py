r"""Trains and evaluates NFNets, data-parallel over every device of every host.

  python -m nfnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m nfnet_jax.train --config=experiments/nfnet.py:F0 --workdir=/ckpt/f0 \
      --config.batch_size=4096 --mode=train_and_eval

The train step is written per device, pmap style: it sees its local batch and
`lax.psum`s gradients and metrics over the data axis 'data'. `jax.jit(jax.shard_map(
...))` runs it over a 1-D mesh of all devices; that is what `jax.pmap` itself is
built on in current JAX. Randomness (dropout, stochastic depth, augmentation) is a
function of (seed, step, global example index), so results do not depend on the
device or host count. Re-running the same command resumes from the last complete
checkpoint in `workdir`; SIGTERM/SIGINT (TPU preemption) save a checkpoint and exit
with status 128 + signal. Hosts agree on when to stop or save through the step itself
(a psum of per-host flags), so a signal that reaches the hosts at different steps
still gives one checkpoint at one step.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import logging as logging_std
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from nfnet_jax import configs, layers, metrics_writer, models, optim, sam
from nfnet_jax import agc as agc_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'train_and_eval'],
                          'train: train, then evaluate once at the end; '
                          'eval: evaluate the latest checkpoint in workdir, or '
                          'config.init_from; train_and_eval: train, eval periodically.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-host runs outside '
                                   'Cloud TPU (where initialize() needs no arguments).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', None,
                                 'Call jax.distributed.initialize(); default: when '
                                 'coordinator flags are given or on a TPU pod.')

AXIS = 'data'
MODES = ('train', 'eval', 'train_and_eval')
Batch = dict[str, np.ndarray]
# Host -> step flags, psum'd over all devices so that every host sees the same value.
_PREEMPT, _SAVE_DUE = 0, 1


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses, or a non-finite state to be saved."""


class Preempted(SystemExit):
  """Raised after the checkpoint of a SIGTERM/SIGINT is written; exit status 128+sig."""

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step


# ---------------------------------------------------------------------------
# Configuration checks (before anything is compiled).
# ---------------------------------------------------------------------------
def _check_keys(config, reference, prefix: str) -> None:
  """Every key of `config` must exist in `reference` (recursively)."""
  for key in config.keys():
    name = f'{prefix}.{key}'
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=3)
      hint = f' Did you mean {" or ".join(close)}?' if close else ''
      raise ValueError(f'Unknown config key {name}.{hint} Valid keys of {prefix}: '
                       f'{", ".join(sorted(reference.keys()))}')
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and name != 'config.model_kwargs':
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f'{name} must be a group of keys, got {value!r}')
      _check_keys(value, ref, name)


def _check_model(config, num_classes: int = 10) -> None:
  """config.model is registered and config.model_kwargs fit its constructor."""
  if config.model not in models.names():
    close = difflib.get_close_matches(str(config.model), models.names(), n=3)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise ValueError(f'config.model={config.model!r} is not a model.{hint} Valid: '
                     f'{", ".join(models.names())}')
  import haiku as hk  # pylint: disable=g-import-not-at-top
  kwargs = config.model_kwargs.to_dict()
  make = models.module_fn(config.model, num_classes, **kwargs)
  try:  # Builds the module (no parameters, no computation).
    hk.transform(lambda: make()).init(None)
  except (TypeError, ValueError) as e:
    module = {m.__name__: m for m in (models.NFNet, models.NFResNet, models.NFRegNet)}[
        models.info(config.model)['family']]
    valid = [p for p in inspect.signature(module.__init__).parameters
             if p not in ('self', 'num_classes', 'variant', 'name')]
    raise ValueError(f'config.model_kwargs={kwargs} does not fit model '
                     f'{config.model!r}: {e}. Valid keys: {", ".join(valid)}') from None


def unknown_override(argv: list[str]) -> Optional[str]:
  """Message for the first `--config.a.b=...` whose key is not a config key, or None."""
  reference = configs.base_config()
  for arg in argv:
    if not arg.lstrip('-').startswith('config.'):
      continue
    path = arg.lstrip('-').split('=', 1)[0].split('.')[1:]
    node, prefix = reference, 'config'
    for key in path:
      if prefix == 'config.model_kwargs' or not isinstance(node, ml_collections.ConfigDict):
        break
      if key not in node:
        close = difflib.get_close_matches(key, list(node.keys()), n=3)
        hint = f' Did you mean {" or ".join(close)}?' if close else ''
        return (f'Unknown config key {prefix}.{key} (from {arg}).{hint} Valid keys of '
                f'{prefix}: {", ".join(sorted(node.keys()))}')
      node, prefix = node[key], f'{prefix}.{key}'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown --config.<key>."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    sys.stderr.write(f'FATAL Flags parsing error: {unknown_override(argv) or repr(e)}\n')
    sys.exit(1)


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int, mode: str = 'train') -> None:
  """Raises ValueError naming the bad key and the valid choices. No compilation."""
  _check_keys(config, configs.base_config(), 'config')
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; valid: {", ".join(MODES)}')
  _check_model(config)
  if config.get('remat', 'none') not in models.REMAT_POLICIES:
    raise ValueError(f'config.remat must be one of {models.REMAT_POLICIES}, got '
                     f'{config.remat!r}')
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
  if config.sam.enabled and k > 1:
    raise ValueError('config.sam.enabled with config.grad_accum_steps > 1 is not '
                     'supported')
  if not 0 < config.sam.fraction <= 1:
    raise ValueError(f'config.sam.fraction={config.sam.fraction} must be in (0, 1]')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be positive')
  opt = config.optimizer.name
  if opt not in ('sgd', 'adam', 'adamw'):
    raise ValueError(f"config.optimizer.name={opt!r}; valid: 'sgd', 'adam', 'adamw'")
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


def schedule_lengths(config, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from epochs, or config.total_steps when set."""
  steps_per_epoch = num_train / config.batch_size
  total = config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return total, min(warmup, total)


# ---------------------------------------------------------------------------
# State and steps.
# ---------------------------------------------------------------------------
def create_model(config, num_classes: int):
  """The model of `config`; with config.remat set, the same function under remat."""
  kwargs = config.model_kwargs.to_dict()
  if config.get('remat', 'none') != 'none':
    return models.create(config.model, num_classes, remat=config.remat, **kwargs)
  return models.create(config.model, num_classes, **kwargs)


def make_init_fn(config, model, tx, image_size: int) -> Callable:
  """params (or None: fresh init) -> the training state.

  State: params, opt_state, ema_params (float32), step, nonfinite (consecutive
  non-finite steps), skipped (all of them), rng.
  """
  def init(params=None):
    rng = jax.random.PRNGKey(config.seed)
    if params is None:
      dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
      params = model.init(jax.random.fold_in(rng, 1), dummy, is_training=True)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return dict(params=params, opt_state=tx.init(params),
                ema_params=jax.tree.map(lambda x: x, params),
                step=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), jnp.int32),
                skipped=jnp.zeros((), jnp.int32), rng=rng)
  return init


def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] 1.0 where the (hard) label is among the top-k logits."""
  target = jnp.argmax(labels, axis=-1)
  target_logit = jnp.take_along_axis(logits, target[:, None], axis=-1)
  rank = jnp.sum(logits > target_logit, axis=-1)
  return (rank < k).astype(jnp.float32)


def make_train_step(config, model, tx, schedule) -> Callable:
  """Per device: (state, local batch, host flags) -> (state, metrics, control)."""
  global_batch = config.batch_size
  accum = config.grad_accum_steps
  cdt = jnp.bfloat16 if config.compute_dtype == 'bfloat16' else jnp.float32
  ls = config.label_smoothing

  def loss_fn(params, batch, rng, offset):
    """Sum of the local examples' losses divided by the *global* batch size."""
    with layers.example_offset(offset):
      out = model.apply(params, rng, batch['images'].astype(cdt), True)
    logits = out['logits']
    per_example = optim.softmax_cross_entropy(logits, batch['labels'], ls)
    mask = batch['mask']
    loss_sum = jnp.sum(per_example * mask)
    top1 = jnp.sum(_top_k_correct(logits, batch['labels'], 1) * mask)
    return loss_sum / global_batch, (loss_sum, top1)

  def gradients(params, batch, rng, offset):
    """Local gradient of sum(local losses) / global batch, summed over micro-batches."""
    if config.sam.enabled:
      grads, (_, aux) = sam.sam_gradient(
          lambda p, b, r: loss_fn(p, b, r, offset), params, batch, rng,
          rho=config.sam.rho, fraction=config.sam.fraction, axis_name=AXIS)
      return grads, aux
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
      return grad_fn(params, batch, rng, offset)
    micro = batch['images'].shape[0] // accum
    split = jax.tree.map(lambda x: x.reshape((accum, micro) + x.shape[1:]), batch)

    def body(carry, xs):
      i, mb = xs  # Micro-batch i holds this device's examples [i * micro, (i+1) * micro).
      g, aux = grad_fn(params, mb, rng, offset + i * micro)
      acc_g, acc_aux = carry
      return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_aux, aux)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())))
    (grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), split))
    return grads, aux

  def step_fn(state, batch, flags_in):
    local = batch['images'].shape[0]
    offset = jax.lax.axis_index(AXIS) * local  # Global index of this device's row 0.
    rng = jax.random.fold_in(state['rng'], state['step'])
    grads, (loss_sum, top1) = gradients(state['params'], batch, rng, offset)
    # The whole update (AGC included) sees the gradient of the global batch.
    grads = jax.lax.psum(grads, AXIS)
    loss_sum, top1, count = jax.lax.psum(
        (loss_sum, top1, jnp.sum(batch['mask'])), AXIS)
    loss = loss_sum / jnp.maximum(count, 1.0)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # A non-finite loss, gradient or new state skips the update: the state (and so
    # every checkpoint) stays finite. (The EMA mixes finite params, so it is too.)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & all_finite((params, opt_state)))
    ema = optim.ema_update(state['ema_params'], params, state['step'] - state['skipped'],
                           config.ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    nonfinite = jnp.where(finite, 0, state['nonfinite'] + 1)
    new_state = dict(
        params=keep(params, state['params']),
        opt_state=keep(opt_state, state['opt_state']),
        ema_params=keep(ema, state['ema_params']),
        step=state['step'] + 1,
        nonfinite=nonfinite,
        skipped=state['skipped'] + (~finite).astype(jnp.int32),
        rng=state['rng'])
    metrics = dict(loss=loss, top1=top1 / jnp.maximum(count, 1.0), grad_norm=grad_norm,
                   lr=schedule(state['step'] - state['skipped']),
                   finite=finite.astype(jnp.float32))
    if config.log_agc_clip_fraction and config.optimizer.agc_clipping:
      fracs = agc_lib.clip_fraction(grads, state['params'], config.optimizer.agc_clipping,
                                    config.optimizer.agc_eps)
      metrics['agc_clip_fraction'] = jnp.mean(jnp.stack(
          [jnp.asarray(f, jnp.float32) for f in jax.tree.leaves(fracs)]))
    control = dict(flags=jax.lax.psum(flags_in[0], AXIS), nonfinite=nonfinite,
                   skipped=new_state['skipped'])
    return new_state, metrics, control

  return step_fn


def all_finite(tree) -> jax.Array:
  """Scalar bool: every float leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_eval_step(config, model) -> Callable:
  """Per-device eval: sums of loss, top-1, top-5, count for raw and EMA params."""
  cdt = jnp.bfloat16 if config.compute_dtype == 'bfloat16' else jnp.float32

  def one(params, batch):
    logits = model.apply(params, None, batch['images'].astype(cdt), False)['logits']
    mask = batch['mask']
    loss = optim.softmax_cross_entropy(logits, batch['labels'], 0.0)
    return dict(loss=jnp.sum(loss * mask),
                top1=jnp.sum(_top_k_correct(logits, batch['labels'], 1) * mask),
                top5=jnp.sum(_top_k_correct(logits, batch['labels'], 5) * mask),
                count=jnp.sum(mask))

  def step_fn(params, ema_params, batch):
    sums = dict(raw=one(params, batch), ema=one(ema_params, batch))
    return jax.lax.psum(sums, AXIS)

  return step_fn


def _cpu_init_options() -> Optional[dict[str, Any]]:
  # Initialisation runs once; on CPU, LLVM's optimisation of its ~100 RNG kernels
  # costs more (tens of seconds for an NFNet) than running them unoptimised.
  return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


class Trainer:
  """Compiled steps over a mesh of all devices, plus host-side array assembly."""

  def __init__(self, config, model, tx, schedule, image_size: int):
    # Devices ordered by host, so host p's local batch is rows [p*local, (p+1)*local)
    # of the global batch, as the input pipeline numbers them.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P(AXIS))
    shard = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
    self.train_step = jax.jit(
        shard(make_train_step(config, model, tx, schedule),
              in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P(), P())),
        donate_argnums=(0,))
    self.eval_step = jax.jit(
        shard(make_eval_step(config, model), in_specs=(P(), P(), P(AXIS)), out_specs=P()))
    init = make_init_fn(config, model, tx, image_size)
    self.abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
        jax.eval_shape(init))
    self._init = jax.jit(init, out_shardings=self.replicated,
                         compiler_options=_cpu_init_options())

  def init_state(self, params=None) -> dict[str, Any]:
    """Fresh state (replicated); `params`: host arrays to start from (fine-tuning)."""
    if params is not None:  # Same values on every host -> a replicated global array.
      params = jax.tree.map(lambda x: jax.make_array_from_callback(
          np.shape(x), self.replicated, lambda idx, x=x: np.asarray(x)[idx]), params)
    return self._init(params)

  def global_batch(self, local: Batch) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local.items()}

  def host_flags(self, flags_: np.ndarray) -> jax.Array:
    """This host's flags [F] -> a global [devices, F] array (one row per device)."""
    local = np.tile(np.asarray(flags_, np.int32)[None], (jax.local_device_count(), 1))
    return jax.make_array_from_process_local_data(self.data_sharding, local)


def evaluate(trainer: Trainer, state, eval_iter: Iterator[Batch]) -> dict[str, float]:
  """Top-1, top-5, loss of raw and EMA params over the whole eval split."""
  totals = None
  for batch in eval_iter:
    sums = trainer.eval_step(state['params'], state['ema_params'],
                             trainer.global_batch(batch))
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise ValueError('The eval split is empty')
  out = {}
  for which, t in totals.items():
    n = max(float(t['count']), 1.0)
    out.update({f'{which}_top1': float(t['top1']) / n, f'{which}_top5': float(t['top5']) / n,
                f'{which}_loss': float(t['loss']) / n})
  out['count'] = float(totals['raw']['count'])
  return out


# ---------------------------------------------------------------------------
# Checkpoints (orbax): atomic, last k kept, never with NaN, incomplete ones skipped.
# ---------------------------------------------------------------------------
def _checkpoint_dir(workdir: str) -> str:
  if '://' not in workdir:  # gs://... stays as is.
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, 'checkpoints')


def _is_complete(step_dir) -> bool:
  """A step directory orbax finished: commit marker (or metadata with a commit time)
  and both items."""
  if not ((step_dir / 'state').exists() and (step_dir / 'meta').exists()):
    return False
  if (step_dir / 'commit_success.txt').exists():
    return True
  try:
    meta = json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())
    return bool(meta.get('commit_timestamp_nsecs'))
  except (OSError, ValueError):
    return False


def set_aside_incomplete(ckpt_dir: str) -> list[str]:
  """Renames step directories without a commit (killed mid-save on a file system
  without atomic rename) to `incomplete-<name>-<time>`, so orbax neither restores
  them nor collides with them. orbax's own `*.orbax-checkpoint-tmp*` directories are
  never listed as steps. Process 0 only; returns the new names."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = epath.Path(ckpt_dir)
  moved = []
  if jax.process_index() == 0 and root.exists():
    for d in sorted(root.iterdir()):
      if d.is_dir() and d.name.isdigit() and not _is_complete(d):
        new = root / f'incomplete-{d.name}-{int(time.time())}'
        logging.warning('Checkpoint %s is incomplete (killed mid-save?); ignoring it, '
                        'moved to %s', d, new.name)
        d.rename(new)
        moved.append(new.name)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('nfnet_jax: incomplete checkpoints set aside')
  return moved


def checkpoint_manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = _checkpoint_dir(workdir)
  set_aside_incomplete(ckpt_dir)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(ckpt_dir, options=options)


def save_checkpoint(mngr, state, step: int, meta: dict) -> None:
  """Saves asynchronously (orbax copies the arrays to host before returning). The
  train step never produces a non-finite state, so neither is any checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr, abstract_state) -> tuple[Optional[dict], Optional[dict]]:
  """(state, meta) of the latest complete checkpoint, or (None, None)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = mngr.latest_step()
  if step is None:
    return None, None
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'Cannot restore checkpoint {step} in {mngr.directory}: {type(e).__name__}: {e}\n'
        'If the model or optimizer config changed since it was written, use a new '
        '--workdir; if the checkpoint is damaged, move its directory away to resume '
        'from the one before.') from e
  return restored['state'], restored['meta']


# ---------------------------------------------------------------------------
# Main loop.
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _catch_signals():
  """SIGTERM/SIGINT set a flag (read between steps); a second one stops at once."""
  caught: list[int] = []

  def handle(signum, frame):  # pylint: disable=unused-argument
    if caught:
      raise KeyboardInterrupt
    caught.append(signum)
    logging.warning('Signal %d: saving a checkpoint after the current step', signum)

  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _maybe_initialize_distributed() -> None:
  want = _DISTRIBUTED.value
  if want is None:
    want = bool(_COORDINATOR.value) or bool(os.environ.get('TPU_WORKER_HOSTNAMES', '')
                                            .count(','))
  if not want:
    return
  kwargs = {}
  if _COORDINATOR.value:
    kwargs = dict(coordinator_address=_COORDINATOR.value,
                  num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  # Cross-process collectives on CPU (tests, CPU clusters) need an implementation;
  # gloo (TCP) ships with jaxlib. No effect on TPU/GPU.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = 'train') -> dict[str, float]:
  """Runs training (and/or evaluation); returns the last metrics (final eval if any).

  Raises Preempted (a SystemExit) after saving on SIGTERM/SIGINT, NonFiniteError
  after config.max_consecutive_nonfinite non-finite steps in a row.
  """
  from nfnet_jax import data  # TF is imported lazily inside, only if the config uses it.

  nproc, pidx = jax.process_count(), jax.process_index()
  validate_config(config, jax.device_count(), nproc, mode)
  info = data.dataset_info(config.data)
  num_classes = info['num_classes']
  model = create_model(config, num_classes)
  total_steps, warmup_steps = schedule_lengths(config, info['num_train'])
  tx, schedule = optim.build_optimizer(config.optimizer, total_steps, warmup_steps,
                                       config.batch_size)
  trainer = Trainer(config, model, tx, schedule, info['train_size'])
  logging.info('%s: %d classes, %d train / %d eval examples, %d devices on %d hosts, '
               '%d steps (%d warmup)', config.model, num_classes, info['num_train'],
               info['num_eval'], jax.device_count(), nproc, total_steps, warmup_steps)
  if config.grad_accum_steps > 1:
    local = config.batch_size // jax.device_count()
    logging.info('Gradient accumulation: %d micro-batches of %d per device',
                 config.grad_accum_steps, local // config.grad_accum_steps)

  mngr = checkpoint_manager(workdir, config.keep_checkpoints)
  state, meta = restore_checkpoint(mngr, trainer.abstract_state)
  if state is not None:
    logging.info('Resumed from checkpoint at step %d (%s)', int(state['step']), meta)
    for key in ('seed', 'model', 'batch_size'):
      if key in meta and meta[key] != config[key]:
        logging.warning('The checkpoint was written with config.%s=%r, this run has %r; '
                        'the run is no longer the one the first command started',
                        key, meta[key], config[key])
  elif config.init_from:
    from nfnet_jax import pretrained  # pylint: disable=g-import-not-at-top
    state = trainer.init_state(pretrained.load(config.init_from, model=config.model,
                                               num_classes=num_classes, rng=config.seed))
    logging.info('Starting from %s', config.init_from)
  elif mode == 'eval':
    raise ValueError(f'--mode=eval needs a checkpoint in {_checkpoint_dir(workdir)} or '
                     'config.init_from (a released weights file)')
  else:
    state = trainer.init_state()
  start_step = int(jax.device_get(state['step']))
  writer = metrics_writer.MetricsWriter(workdir, enabled=pidx == 0)

  # Any eval batch size works: rounded up to a multiple of the devices, the padding
  # rows have mask 0.
  eval_batch = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()

  def eval_now(step: int, state) -> dict[str, float]:
    it = data.build_eval_iter(config.data, eval_batch, pidx, nproc)
    metrics = evaluate(trainer, state, it)
    logging.info('eval @ %d: top-1 %.2f%% (EMA %.2f%%), top-5 %.2f%%, loss %.4f '
                 'on %d examples', step, 100 * metrics['raw_top1'],
                 100 * metrics['ema_top1'], 100 * metrics['raw_top5'],
                 metrics['raw_loss'], metrics['count'])
    writer.write(step, metrics, prefix='eval')
    return metrics

  try:
    if mode == 'eval':
      return eval_now(start_step, state)
    with _catch_signals() as caught:
      train_iter = data.build_train_iter(config.data, config.batch_size, config.seed,
                                         start_step=start_step, process_index=pidx,
                                         process_count=nproc)
      step, state = _train_loop(config, trainer, mngr, writer, state, start_step,
                                total_steps, train_iter, caught,
                                eval_now if mode == 'train_and_eval' else None)
    if info['num_eval']:
      return eval_now(step, state)
    return {}
  finally:
    mngr.wait_until_finished()
    writer.close()


def _train_loop(config, trainer: Trainer, mngr, writer, state, start_step: int,
                total_steps: int, train_iter: Iterator[Batch], caught: list[int],
                eval_fn: Optional[Callable[[int, Any], Any]]) -> tuple[int, Any]:
  """Steps until total_steps; returns (last step, state). Saves every N steps / minutes,
  at the end and on a signal (then raises Preempted)."""
  pidx = jax.process_index()
  progress = None
  if sys.stderr.isatty() and pidx == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step')
  meta = lambda step: dict(step=step, seed=config.seed, model=config.model,
                           batch_size=config.batch_size)
  max_bad = config.max_consecutive_nonfinite
  last_save, t0, seen = time.time(), None, 0
  pending = None  # Control outputs of the previous step, read one step late.
  step = start_step
  try:
    while step < total_steps:
      batch = trainer.global_batch(next(train_iter))
      minutes = config.checkpoint_every_minutes
      host = np.zeros([2], np.int32)
      host[_PREEMPT] = bool(caught)
      host[_SAVE_DUE] = bool(minutes) and time.time() - last_save > 60 * minutes
      state, metrics, control = trainer.train_step(state, batch, trainer.host_flags(host))
      step += 1
      # Decisions use the previous step's psum'd flags (ready by now, so the device
      # queue keeps one step), which are the same on every host.
      stop = save = False
      if pending is not None:
        prev = jax.device_get(pending)
        stop, save = bool(prev['flags'][_PREEMPT]), bool(prev['flags'][_SAVE_DUE])
        _check_nonfinite(prev, step - 1, max_bad)
        if t0 is None:  # Throughput excludes the first step (compilation).
          t0, seen = time.time(), 0
      pending = control
      seen += config.batch_size
      if progress is not None:
        progress.update(1)
      if step % config.log_every == 0 or step == total_steps:
        _log(step, total_steps, jax.device_get(metrics), jax.device_get(control), writer,
             seen / max(time.time() - t0, 1e-9) if t0 else float('nan'), config.batch_size)
        if t0 is not None:
          t0, seen = time.time(), 0
      if eval_fn and config.eval_every and step % config.eval_every == 0 \
          and step < total_steps:
        eval_fn(step, state)
      every = config.checkpoint_every_steps
      if stop or save or step == total_steps or (every and step % every == 0):
        _check_nonfinite(jax.device_get(control), step, max_bad)
        save_checkpoint(mngr, state, step, meta(step))
        last_save = time.time()
        if stop:
          mngr.wait_until_finished()
          logging.warning('Signal %s: checkpoint saved at step %d; exiting. Re-run the '
                          'same command to resume.', caught[0] if caught else '(another '
                          'host)', step)
          raise Preempted(caught[0] if caught else signal.SIGTERM, step)
  finally:
    if progress is not None:
      progress.close()
  return step, state


def _check_nonfinite(control, step: int, max_bad: int) -> None:
  if int(control['nonfinite']) >= max_bad:
    raise NonFiniteError(
        f'{int(control["nonfinite"])} consecutive non-finite losses/gradients at step '
        f'{step} (config.max_consecutive_nonfinite={max_bad}); stopping. Their updates '
        'were skipped and no checkpoint holds NaN: lower the learning rate or tighten '
        'config.optimizer.agc_clipping, then re-run to resume from the last checkpoint.')


def _log(step, total_steps, metrics, control, writer, ips: float, batch_size: int):
  last = {k: float(v) for k, v in metrics.items()}
  last['images_per_sec'] = ips
  last['skipped'] = float(control['skipped'])
  eta = (total_steps - step) * batch_size / ips if ips > 0 else float('nan')
  logging.info('step %d/%d loss %.4f top-1 %.2f%% lr %.4g %.0f img/s ETA %s%s', step,
               total_steps, last['loss'], 100 * last['top1'], last['lr'], ips,
               time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?',
               f' (skipped {int(last["skipped"])} non-finite)' if last['skipped'] else '')
  writer.write(step, last, prefix='train')


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  _maybe_initialize_distributed()
  logging.info('JAX %s, %d devices (%s), process %d/%d', jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_index(),
               jax.process_count())
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, _MODE.value)
  if jax.process_index() == 0 and 'raw_top1' in result:
    print(f'Final top-1: {100 * result["raw_top1"]:.2f}% (EMA {100 * result["ema_top1"]:.2f}%)'
          f' on {int(result["count"])} held-out examples', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
