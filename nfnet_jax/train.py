r"""Trains and evaluates NFNets, data-parallel over every device of every host.

  python -m nfnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m nfnet_jax.train --config=experiments/nfnet.py:F0 --workdir=/ckpt/f0 \
      --config.batch_size=4096 --mode=train_and_eval

This module holds the flags, `train_and_evaluate` and the loop; the compiled steps
are in `steps`, checkpoints in `checkpoints`, the config and its checks in `configs`.
Re-running the same command resumes from the last complete checkpoint in `workdir`;
SIGTERM/SIGINT (TPU preemption) save a checkpoint and exit with status 128 + signal.
Hosts agree on when to stop or save through the step itself (a psum of per-host
flags), so a signal that reaches the hosts at different steps still gives one
checkpoint at one step. docs/training.md describes the loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from nfnet_jax import (checkpoints, configs, console, errors, metrics_writer, models,
                       optim, steps)
from nfnet_jax.data import config as data_config  # no TensorFlow: eval transform wording
from nfnet_jax.steps import Batch, Trainer, evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
_MODE = flags.DEFINE_enum('mode', 'train', list(configs.MODES),
                          'train: train, then evaluate once at the end; '
                          'eval: evaluate the latest checkpoint in workdir, or '
                          'config.init_from; train_and_eval: train, eval periodically.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-host runs outside '
                                   'Cloud TPU (where initialize() needs no arguments).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_CHECK_CONFIG = flags.DEFINE_bool('check_config', False,
                                  'Parse and validate the command line and config, print '
                                  'a one-line summary, exit (0: valid). Builds nothing.')
_CHECK_PATHS = flags.DEFINE_bool('check_paths', True,
                                 'With --check_config: also check what the file system '
                                 'must hold (workdir, data, config.init_from). '
                                 '--nocheck_paths checks the values only, for a command '
                                 'that will run on another machine (a launcher).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', None,
                                 'Call jax.distributed.initialize(); default: when '
                                 'coordinator flags are given or on a TPU pod.')

# Host -> step flags, psum'd over all devices so that every host sees the same value.
_PREEMPT, _SAVE_DUE = 0, 1


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses, or a non-finite state to be saved."""


class Preempted(SystemExit):
  """Raised after the checkpoint of a SIGTERM/SIGINT is written; exit status 128+sig."""

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step


def _fail(kind: str, message: str) -> None:
  """One line on stderr, exit status 1: a user's mistake needs no traceback."""
  sys.stderr.write(f'FATAL {kind}: {message}\n')
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown --config.<key>.

  --config.model_kwargs.<key>=<value> is applied here, after the other flags (so
  against the final config.model): any keyword of the model's constructor may be
  set, whether or not the config file names it.
  """
  argv, model_kwargs = configs.split_model_kwargs(argv)
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv.
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _fail('Flags parsing error', configs.unknown_override(argv) or repr(e))
  except flags.Error as e:
    _fail('Flags parsing error', _flag_error_line(str(e)))
  if _CONFIG.value is not None:
    try:  # A config file that does not load is reported on first use.
      _CONFIG.value.keys()
    except OSError as e:
      _fail('Flags parsing error', f'--config={config_spec()}: '
            f'{str(e).strip().splitlines()[-1].strip()}')
  if model_kwargs and _CONFIG.value is not None:
    try:
      configs.set_model_kwargs(_CONFIG.value, model_kwargs)
    except ValueError as e:
      _fail('Flags parsing error', str(e))
  return rest


def _flag_error_line(message: str) -> str:
  """One line for a flag error. A config file's get_config(arg) that raised comes as
  its whole traceback: its last line, the exception, says what is wrong."""
  if 'Traceback (most recent call last)' not in message:
    return configs.one_line(message)
  last = message.strip().splitlines()[-1].strip()
  return last.split(': ', 1)[1] if last.split(':', 1)[0].isidentifier() else last


def config_spec() -> str:
  """The --config=FILE[:ARG] as given."""
  return flags.FLAGS['config'].config_filename


def create_model(config, num_classes: int):
  """The model of `config`; with config.remat set, the same function under remat."""
  kwargs = config.model_kwargs.to_dict()
  if config.get('bn_cross_device', False):  # BatchNorm statistics over all devices.
    kwargs['cross_replica_axis'] = steps.AXIS
  return models.create(config.model, num_classes, remat=config.get('remat', 'none'),
                       **kwargs)


# ---------------------------------------------------------------------------
# Main loop.
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _catch_signals():
  """SIGTERM/SIGINT set a flag (read between steps); a second one stops at once."""
  caught: list[int] = []

  def handle(signum, frame):  # pylint: disable=unused-argument
    if caught:  # Exits now: the last complete checkpoint stays the one to resume.
      logging.warning('Signal %d again: exiting now, without saving', signum)
      logging.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    caught.append(signum)
    logging.warning('Signal %d: saving a checkpoint within two steps, then exiting',
                    signum)

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

  Raises ValueError for a config that `configs.validate_config` refuses, RunError
  (nothing created) when `configs.check_run` refuses the workdir, the data or
  config.init_from, Preempted (a SystemExit) after saving on SIGTERM/SIGINT,
  NonFiniteError after config.max_consecutive_nonfinite non-finite steps in a row.
  """
  from nfnet_jax import data  # TF is imported lazily inside, only if the config uses it.

  nproc, pidx = jax.process_count(), jax.process_index()
  configs.validate_config(config, jax.device_count(), nproc, mode)
  try:
    configs.check_run(config, workdir, mode)
    # Verifies the image folder's files (the check above only lists them).
    info = data.dataset_info(config.data)
  except (OSError, ValueError) as e:
    raise errors.RunError(configs.one_line(e)) from None
  num_classes = info['num_classes']
  model = create_model(config, num_classes)
  total_steps, warmup_steps = configs.schedule_lengths(config, info['num_train'])
  tx, schedule = optim.build_optimizer(config.optimizer, total_steps, warmup_steps,
                                       config.batch_size)
  trainer = Trainer(config, model, tx, schedule, info['train_size'])
  logging.info('%s: %d classes, %d train / %d eval examples, train %d px / eval %d px, '
               '%d devices on %d hosts, %d steps (%d warmup)', config.model, num_classes,
               info['num_train'], info['num_eval'], info['train_size'], info['eval_size'],
               jax.device_count(), nproc, total_steps, warmup_steps)
  logging.info(configs.compile_notice(config, mode, jax.device_count()))
  if config.grad_accum_steps > 1:
    local = config.batch_size // jax.device_count()
    logging.info('Gradient accumulation: %d micro-batches of %d per device',
                 config.grad_accum_steps, local // config.grad_accum_steps)

  run_meta = checkpoints.run_meta(config, num_classes, total_steps, warmup_steps,
                                  trainer.abstract_state)
  mngr, state = checkpoints.start(config, workdir, mode, trainer, run_meta)
  start_step = int(jax.device_get(state['step']))
  writer = None

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
    # One eval row per step: evaluating a step again (--mode=eval, a finished run
    # re-run) replaces its row.
    writer.replace(step, metrics, prefix='eval')
    return metrics

  try:
    writer = metrics_writer.MetricsWriter(workdir, enabled=pidx == 0, step=start_step)
    if mode == 'eval':
      return eval_now(start_step, state)
    with _catch_signals() as caught:
      train_iter = data.build_train_iter(config.data, config.batch_size, config.seed,
                                         start_step=start_step, process_index=pidx,
                                         process_count=nproc)
      step, state = _train_loop(config, trainer, mngr, writer, state, run_meta,
                                start_step, total_steps, train_iter, caught,
                                eval_now if mode == 'train_and_eval' else None)
    mngr.wait(step)  # The last checkpoint is written (or its failure reported) first.
    if info['num_eval']:
      return eval_now(step, state)
    return {}
  except metrics_writer.WriteError as e:  # e.g. a full disk: one line, as for a save.
    if mngr is not None:
      mngr.close()  # A checkpoint being written ends before the kept one is named.
    raise errors.RunError(
        f'{e}. Stopped at step {e.step}; '
        f'{checkpoints.kept_note(checkpoints.checkpoint_dir(workdir))}. Fix the cause '
        '(e.g. free space) and re-run the same command to resume.') from None
  finally:
    if mngr is not None:
      mngr.close()
    if writer is not None:
      writer.close()


def _train_loop(config, trainer: Trainer, mngr, writer, state, run_meta: dict[str, Any],
                start_step: int, total_steps: int, train_iter: Iterator[Batch],
                caught: list[int], eval_fn: Optional[Callable[[int, Any], Any]]
                ) -> tuple[int, Any]:
  """Steps until total_steps; returns (last step, state). Saves every N steps / minutes,
  at the end and on a signal (then raises Preempted)."""
  pidx = jax.process_index()
  max_bad = config.max_consecutive_nonfinite
  # Throughput: images since the last log line over the time since then; the clock
  # first starts when the first step's call returns, i.e. once XLA compiled it.
  last_save, t0, seen = time.time(), 0.0, 0
  pending = None  # Control outputs of the previous step, read one step late.
  step = start_step
  # In a terminal: a progress bar, with log lines printed above it.
  with console.progress_bar(total_steps, start_step, enabled=pidx == 0) as progress:
    while step < total_steps:
      batch = trainer.global_batch(next(train_iter))
      minutes = config.checkpoint_every_minutes
      host = np.zeros([2], np.int32)
      host[_PREEMPT] = bool(caught)
      host[_SAVE_DUE] = bool(minutes) and time.time() - last_save > 60 * minutes
      first = step == start_step
      with (console.compiling('the train step', progress) if first
            else contextlib.nullcontext()):
        state, metrics, control = trainer.train_step(state, batch,
                                                     trainer.host_flags(host))
      if first:
        t0 = time.time()
      step += 1
      # Decisions use the previous step's psum'd flags (ready by now, so the device
      # queue keeps one step), which are the same on every host.
      stop = save = False
      if pending is not None:
        prev = jax.device_get(pending)
        stop, save = bool(prev['flags'][_PREEMPT]), bool(prev['flags'][_SAVE_DUE])
        _check_nonfinite(prev, step - 1, max_bad)
      pending = control
      seen += config.batch_size
      if progress is not None:
        progress.update(1)
      if step % config.log_every == 0 or step == total_steps:
        # device_get waits for this step to finish: the rate covers its execution.
        metrics_now, control_now = jax.device_get((metrics, control))
        now = time.time()
        _log(step, total_steps, metrics_now, control_now, writer,
             seen / max(now - t0, 1e-9), config.batch_size)
        t0, seen = now, 0
      if eval_fn and config.eval_every and step % config.eval_every == 0 \
          and step < total_steps:
        eval_fn(step, state)
        t0, seen = time.time(), 0  # The eval (and its compile) is not train throughput.
      every = config.checkpoint_every_steps
      if stop or save or step == total_steps or (every and step % every == 0):
        _check_nonfinite(jax.device_get(control), step, max_bad)
        mngr.save(state, step, run_meta)  # Written while the next steps run.
        last_save = time.time()
        if stop:
          mngr.wait(step)
          logging.warning('Signal %s: checkpoint saved at step %d; exiting. Re-run the '
                          'same command to resume.', caught[0] if caught else '(another '
                          'host)', step)
          raise Preempted(caught[0] if caught else signal.SIGTERM, step)
  return step, state


def _check_nonfinite(control, step: int, max_bad: int) -> None:
  if int(control['nonfinite']) >= max_bad:
    raise NonFiniteError(
        f'{int(control["nonfinite"])} consecutive non-finite losses/gradients at step '
        f'{step} (config.max_consecutive_nonfinite={max_bad}); stopping. Their updates '
        'were skipped and no checkpoint holds NaN: lower the learning rate or tighten '
        'config.optimizer.agc_clipping, then re-run to resume from the last checkpoint.')


def format_duration(seconds: float) -> str:
  """'16:45:05', or '1d 16:45:05' from 24 h on; '?' when not finite."""
  if not math.isfinite(seconds):
    return '?'
  days, rest = divmod(int(round(max(seconds, 0.0))), 86400)
  hms = f'{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}'
  return f'{days}d {hms}' if days else hms


def _log(step, total_steps, metrics, control, writer, ips: float, batch_size: int):
  last = {k: float(v) for k, v in metrics.items()}
  last['images_per_sec'] = ips
  last['skipped'] = float(control['skipped'])
  eta = (total_steps - step) * batch_size / ips if ips > 0 else float('nan')
  logging.info('step %d/%d loss %.4f top-1 %.2f%% lr %.4g %.0f img/s ETA %s%s', step,
               total_steps, last['loss'], 100 * last['top1'], last['lr'], ips,
               format_duration(eta),
               f' (skipped {int(last["skipped"])} non-finite)' if last['skipped'] else '')
  writer.write(step, last, prefix='train')


def _exit(status: int, message: str) -> None:
  """Prints `message` and exits. With several processes, at once: JAX's exit handler
  would first wait (minutes) at a shutdown barrier for processes that may be gone,
  then abort."""
  logging.flush()
  sys.stderr.write(message + '\n')
  sys.stderr.flush()
  if jax.process_count() > 1:
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def main(argv) -> None:
  logging.get_absl_handler().addFilter(checkpoints.QuietOrbax())
  console.quiet_backend_probe()
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or (_WORKDIR.value is None and not _CHECK_CONFIG.value):
    raise app.UsageError('--config and --workdir are required')
  _maybe_initialize_distributed()
  # Every check of the config and of what the file system must hold, before anything
  # is created: --check_config runs exactly the checks of a run.
  try:
    configs.validate_config(_CONFIG.value, jax.device_count(), jax.process_count(),
                            _MODE.value)
    logging.info(data_config.describe_eval(_CONFIG.value.data))
    if _CHECK_PATHS.value or not _CHECK_CONFIG.value:  # A run always checks them.
      configs.check_run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except (ValueError, errors.MissingExtra) as e:
    _fail('Config error', configs.one_line(e))
  line = f'{configs.summary(_CONFIG.value, config_spec())}, --mode={_MODE.value}'
  if _CHECK_CONFIG.value:
    print(f'Config OK: {line}', flush=True)
    return
  logging.info('Config: %s', line)
  logging.info('JAX %s, %d devices (%s), process %d/%d', jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_index(),
               jax.process_count())
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except errors.RunError as e:
    _exit(1, f'Error: {e}')
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _exit(1, f'Error: process {jax.process_index()}: a step across the '
          f'{jax.process_count()} processes failed, most likely because another process '
          f'died ({str(e).splitlines()[0][:200]}). Restart the job with the same command '
          'on every host: it resumes from the last complete checkpoint.')
  if jax.process_index() == 0 and 'raw_top1' in result:
    print(f'Final top-1: {100 * result["raw_top1"]:.2f}% (EMA {100 * result["ema_top1"]:.2f}%)'
          f' on {int(result["count"])} held-out examples', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
