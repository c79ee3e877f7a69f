r"""Trains and evaluates NFNets, data-parallel over every device of every host.

  python -m nfnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m nfnet_jax.train --config=experiments/nfnet.py:F0 --workdir=gs://... \
      --config.batch_size=4096 --mode=train_and_eval

The train step is written per device, pmap style: it sees its local batch and
`lax.psum`s gradients and metrics over the data axis 'data'. `jax.jit(jax.shard_map(
...))` runs it over a 1-D mesh of all devices; that is what `jax.pmap` itself is
built on in current JAX. Randomness (dropout, stochastic depth, augmentation) is a
function of (seed, step, global example index), so results do not depend on the
device count. Re-running the same command resumes from the last checkpoint in
`workdir`; SIGTERM/SIGINT (TPU preemption) save a checkpoint before exiting.
"""
from __future__ import annotations

import functools
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
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from nfnet_jax import layers, metrics_writer, models, optim, sam
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
Batch = dict[str, np.ndarray]


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses."""


# ---------------------------------------------------------------------------
# Configuration checks (before anything is compiled).
# ---------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int) -> None:
  """Raises ValueError naming the bad key and the valid choices."""
  if config.model not in models.names():
    raise ValueError(f'config.model={config.model!r} is not a model; valid: '
                     f'{", ".join(models.names())}')
  if config.compute_dtype not in ('bfloat16', 'float32'):
    raise ValueError(f"config.compute_dtype must be 'bfloat16' or 'float32', got "
                     f'{config.compute_dtype!r}')
  b, k = config.batch_size, config.grad_accum_steps
  if b <= 0 or b % num_devices:
    raise ValueError(f'config.batch_size={b} must be a positive multiple of the '
                     f'{num_devices} devices')
  if b % num_processes:
    raise ValueError(f'config.batch_size={b} does not divide over {num_processes} hosts')
  if k < 1 or (b // num_devices) % k:
    raise ValueError(f'config.grad_accum_steps={k} must divide the per-device batch '
                     f'{b // num_devices}')
  if config.sam.enabled and k > 1:
    raise ValueError('config.sam.enabled with config.grad_accum_steps > 1 is not '
                     'supported')
  if not 0 < config.sam.fraction <= 1:
    raise ValueError(f'config.sam.fraction={config.sam.fraction} must be in (0, 1]')
  if config.eval_batch_size % num_devices:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be a '
                     f'multiple of the {num_devices} devices')
  opt = config.optimizer.name
  if opt not in ('sgd', 'adam', 'adamw'):
    raise ValueError(f"config.optimizer.name={opt!r}; valid: 'sgd', 'adam', 'adamw'")


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
  return models.create(config.model, num_classes, **config.model_kwargs.to_dict())


def init_state(config, model, tx, image_size: int, params=None) -> dict[str, Any]:
  """Replicated training state: params, opt_state, ema_params, step, counters, rng."""
  rng = jax.random.PRNGKey(config.seed)
  if params is None:
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = jax.jit(functools.partial(model.init, is_training=True))(
        jax.random.fold_in(rng, 1), dummy)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return dict(params=params, opt_state=tx.init(params),
              ema_params=jax.tree.map(jnp.copy, params),
              step=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), jnp.int32),
              skipped=jnp.zeros((), jnp.int32), rng=rng)


def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] 1.0 where the (hard) label is among the top-k logits."""
  target = jnp.argmax(labels, axis=-1)
  target_logit = jnp.take_along_axis(logits, target[:, None], axis=-1)
  rank = jnp.sum(logits > target_logit, axis=-1)
  return (rank < k).astype(jnp.float32)


def make_train_step(config, model, tx, schedule) -> Callable:
  """The per-device step: (state, local batch) -> (state, metrics), psum over AXIS."""
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
      i, mb = xs
      g, aux = grad_fn(params, mb, rng, offset + i * micro)
      acc_g, acc_aux = carry
      return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_aux, aux)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())))
    (grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), split))
    return grads, aux

  def step_fn(state, batch):
    local = batch['images'].shape[0]
    offset = jax.lax.axis_index(AXIS) * local
    rng = jax.random.fold_in(state['rng'], state['step'])
    grads, (loss_sum, top1) = gradients(state['params'], batch, rng, offset)
    grads = jax.lax.psum(grads, AXIS)
    loss_sum, top1, count = jax.lax.psum(
        (loss_sum, top1, jnp.sum(batch['mask'])), AXIS)
    loss = loss_sum / jnp.maximum(count, 1.0)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = optim.ema_update(state['ema_params'], params, state['step'] - state['skipped'],
                           config.ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = dict(
        params=keep(params, state['params']),
        opt_state=keep(opt_state, state['opt_state']),
        ema_params=keep(ema, state['ema_params']),
        step=state['step'] + 1,
        nonfinite=jnp.where(finite, 0, state['nonfinite'] + 1),
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
    return new_state, metrics

  return step_fn


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


class Trainer:
  """Compiled steps over a mesh of all devices, plus host-side batch assembly."""

  def __init__(self, config, model, tx, schedule):
    self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P(AXIS))
    shard = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
    self.train_step = jax.jit(
        shard(make_train_step(config, model, tx, schedule), in_specs=(P(), P(AXIS)),
              out_specs=(P(), P())), donate_argnums=(0,))
    self.eval_step = jax.jit(
        shard(make_eval_step(config, model), in_specs=(P(), P(), P(AXIS)), out_specs=P()))

  def global_batch(self, local: Batch) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local.items()}

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


def evaluate(trainer: Trainer, state, eval_iter: Iterator[Batch]) -> dict[str, float]:
  """Top-1, top-5, loss of raw and EMA params over the whole eval split."""
  totals = None
  for batch in eval_iter:
    sums = trainer.eval_step(state['params'], state['ema_params'],
                             trainer.global_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The eval split is empty')
  totals = jax.device_get(totals)
  out = {}
  for which, t in totals.items():
    n = max(float(t['count']), 1.0)
    out.update({f'{which}_top1': float(t['top1']) / n, f'{which}_top5': float(t['top5']) / n,
                f'{which}_loss': float(t['loss']) / n})
  out['count'] = float(totals['raw']['count'])
  return out


# ---------------------------------------------------------------------------
# Checkpoints (orbax): atomic, last k kept, never with NaN.
# ---------------------------------------------------------------------------
def checkpoint_manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def all_finite(tree) -> bool:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.device_get(jnp.all(jnp.stack(leaves))))


def save_checkpoint(mngr, state, step: int, meta: dict) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not all_finite((state['params'], state['ema_params'], state['opt_state'])):
    raise NonFiniteError(f'Refusing to write checkpoint {step}: it contains NaN/Inf')
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr, abstract_state) -> tuple[Optional[dict], Optional[dict]]:
  """(state, meta) of the latest complete checkpoint, or (None, None)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = mngr.latest_step()
  if step is None:
    return None, None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


# ---------------------------------------------------------------------------
# Main loop.
# ---------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM/SIGINT into a flag checked between steps."""

  def __init__(self):
    self.signum = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum


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
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = 'train') -> dict[str, float]:
  """Runs training (and/or evaluation); returns the last metrics (final eval if any)."""
  from nfnet_jax import data  # TF is imported lazily inside, only if the config uses it.

  nproc, pidx = jax.process_count(), jax.process_index()
  validate_config(config, jax.device_count(), nproc)
  info = data.dataset_info(config.data)
  num_classes = info['num_classes']
  model = create_model(config, num_classes)
  total_steps, warmup_steps = schedule_lengths(config, info['num_train'])
  tx, schedule = optim.build_optimizer(config.optimizer, total_steps, warmup_steps,
                                       config.batch_size)
  trainer = Trainer(config, model, tx, schedule)
  writer = metrics_writer.MetricsWriter(workdir, enabled=pidx == 0)
  logging.info('%s: %d classes, %d train / %d eval examples, %d devices on %d hosts, '
               '%d steps (%d warmup)', config.model, num_classes, info['num_train'],
               info['num_eval'], jax.device_count(), nproc, total_steps, warmup_steps)

  init_params = None
  if config.init_from:
    from nfnet_jax import pretrained  # pylint: disable=g-import-not-at-top
    init_params = pretrained.load(config.init_from, model=config.model,
                                  num_classes=num_classes, rng=config.seed)
  state = init_state(config, model, tx, info['train_size'], init_params)
  mngr = checkpoint_manager(workdir, config.keep_checkpoints)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated), state)
  restored, meta = restore_checkpoint(mngr, abstract)
  if restored is not None:
    state = restored
    logging.info('Resumed from checkpoint at step %d (%s)', int(state['step']), meta)
  state = trainer.replicate(state)
  start_step = int(jax.device_get(state['step']))

  def eval_now(step: int) -> dict[str, float]:
    it = data.build_eval_iter(config.data, config.eval_batch_size, pidx, nproc)
    metrics = evaluate(trainer, state, it)
    logging.info('eval @ %d: top-1 %.2f%% (EMA %.2f%%), top-5 %.2f%%, loss %.4f '
                 'on %d examples', step, 100 * metrics['raw_top1'],
                 100 * metrics['ema_top1'], 100 * metrics['raw_top5'],
                 metrics['raw_loss'], metrics['count'])
    writer.write(step, metrics, prefix='eval')
    return metrics

  if mode == 'eval':
    return eval_now(start_step)

  train_iter = data.build_train_iter(config.data, config.batch_size, config.seed,
                                     start_step=start_step, process_index=pidx,
                                     process_count=nproc)
  preempt = _Preemption()
  last_ckpt_time, last = time.time(), {}
  progress = None
  if sys.stderr.isatty() and pidx == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step')
  t0, seen = time.time(), 0
  meta = lambda step: dict(step=step, seed=config.seed, model=config.model)
  step = start_step
  while step < total_steps:
    batch = trainer.global_batch(next(train_iter))
    state, metrics = trainer.train_step(state, batch)
    step += 1
    seen += config.batch_size
    if progress is not None:
      progress.update(1)
    if step % config.log_every == 0 or step == total_steps:
      metrics = jax.device_get(metrics)
      nonfinite = int(jax.device_get(state['nonfinite']))
      dt = time.time() - t0
      ips = seen / max(dt, 1e-9)
      eta = (total_steps - step) * config.batch_size / max(ips, 1e-9)
      last = {k: float(v) for k, v in metrics.items()}
      last['images_per_sec'] = ips
      last['skipped'] = float(jax.device_get(state['skipped']))
      logging.info('step %d/%d loss %.4f top-1 %.2f%% lr %.4g %.0f img/s ETA %s%s', step,
                   total_steps, last['loss'], 100 * last['top1'], last['lr'], ips,
                   time.strftime('%H:%M:%S', time.gmtime(eta)),
                   f' (skipped {int(last["skipped"])} non-finite)' if last['skipped'] else '')
      writer.write(step, last, prefix='train')
      t0, seen = time.time(), 0
      if nonfinite >= config.max_consecutive_nonfinite:
        raise NonFiniteError(f'{nonfinite} consecutive non-finite losses at step {step}; '
                             'stopping (last checkpoint is finite)')
    if config.eval_every and mode == 'train_and_eval' and step % config.eval_every == 0 \
        and step < total_steps:
      eval_now(step)
    due = ((config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
           or (config.checkpoint_every_minutes and
               time.time() - last_ckpt_time > 60 * config.checkpoint_every_minutes))
    if preempt.signum is not None or due or step == total_steps:
      save_checkpoint(mngr, state, step, meta(step))
      last_ckpt_time = time.time()
      if preempt.signum is not None:
        mngr.wait_until_finished()
        logging.warning('Signal %d: checkpoint saved at step %d; exiting. Re-run the same '
                        'command to resume.', preempt.signum, step)
        writer.close()
        sys.exit(128 + preempt.signum)
  mngr.wait_until_finished()
  if progress is not None:
    progress.close()
  if info['num_eval']:
    last = eval_now(step)
  writer.close()
  return last


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
  app.run(main)
