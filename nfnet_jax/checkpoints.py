"""Checkpoints (orbax): written in the background while training goes on, committed
atomically, verified on restore, the last k kept, never with NaN, incomplete or
damaged ones set aside (renamed, never deleted); and `start`, the state a run starts
from.

A checkpoint is `workdir/checkpoints/<step>/` with two items: `state` (the training
state, see `steps.make_init_fn`) and `meta` (JSON: the step, what wrote it, and a
checksum of every array of the state). Only orbax's public API is used: which steps
are committed is orbax's answer (`CheckpointManager.all_steps`,
`orbax.checkpoint.utils`). docs/training.md describes the format, the checksum and
what happens on a damaged checkpoint or a full disk.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging as logging_std
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax import errors

def checkpoint_dir(workdir: str) -> str:
  if '://' not in workdir:  # gs://... stays as is.
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, 'checkpoints')


def _path(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _complete_steps(ckpt_dir: str) -> list[int]:
  """Steps of the checkpoints in `ckpt_dir` that orbax has committed, newest first.
  Reads only."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not _path(ckpt_dir).exists():
    return []
  return sorted(ocp.utils.checkpoint_steps(ckpt_dir), reverse=True)


# What a checkpoint's meta must hold, beyond `step` and `checksum`: each key that is
# present has this JSON type (older checkpoints lack some keys; none has another type).
_META_TYPES: dict[str, type] = dict(
    seed=int, model=str, model_kwargs=dict, num_classes=int, batch_size=int,
    optimizer=str, schedule=dict, state_spec=str)


def _is_int(value: Any) -> bool:
  """A JSON integer (bool is an int subclass in Python; JSON's true is not one)."""
  return isinstance(value, int) and not isinstance(value, bool)


def _checksum_problem(value: Any) -> Optional[str]:
  """None if `value` is a checksum as `checksum` returns it (JSON: {leaf path: [sum,
  weighted sum]}, each an integer in [0, 2^32)), else what is wrong with it."""
  if not isinstance(value, dict) or not value:
    return f'its checksum is {type(value).__name__}, not an object of arrays'
  for key, sums in value.items():
    if not (isinstance(sums, list) and len(sums) == 2 and all(
        _is_int(v) and 0 <= v < 2**32 for v in sums)):
      return f'its checksum of {key} is {json.dumps(sums)[:40]}, not two 32-bit integers'
  return None


def meta_problem(meta: Any, step: int, accept_unverified: bool = False) -> Optional[str]:
  """None if `meta` (a checkpoint's parsed JSON meta) is well-formed for checkpoint
  `step`, else what is wrong: not a JSON object, `step` missing or another step, no
  checksum (unless `accept_unverified`), a malformed checksum, or a field of another
  type than `_META_TYPES` says."""
  if not isinstance(meta, dict):
    return f'its meta is {json.dumps(meta)[:40]}, not a JSON object'
  if not _is_int(meta.get('step')) or meta['step'] != step:
    return f'its meta records step {json.dumps(meta.get("step"))[:40]}, not {step}'
  for key, kind in _META_TYPES.items():
    value = meta.get(key, kind())
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
      return f'its meta field {key} is {json.dumps(value)[:40]}, not {kind.__name__}'
  if 'checksum' in meta:
    return _checksum_problem(meta['checksum'])
  if not accept_unverified:
    return ('it has no checksum, so its arrays cannot be verified (only '
            'config.accept_unverified_checkpoints=True restores such a checkpoint)')
  return None


def _read_meta(step_dir) -> tuple[Any, Optional[str]]:
  """(the parsed JSON of a checkpoint's `meta` item, as orbax's JsonSave wrote it;
  None and why when it cannot be read or parsed)."""
  try:
    return json.loads((step_dir / 'meta' / 'metadata').read_text()), None
  except OSError as e:
    return None, f'unreadable: meta: {_first_line(e)}'
  except ValueError as e:
    return None, f'unreadable: meta is not JSON ({_first_line(e)})'


def latest_meta(workdir: str) -> Optional[tuple[int, dict[str, Any]]]:
  """(step, meta) of the newest complete checkpoint whose meta reads and is
  well-formed (with or without a checksum), or None.

  Reads files only: nothing in the workdir is created or changed."""
  ckpt_dir = checkpoint_dir(workdir)
  for step in _complete_steps(ckpt_dir):
    meta, problem = _read_meta(_path(ckpt_dir) / str(step))
    if problem is None and meta_problem(meta, step, accept_unverified=True) is None:
      return step, meta
  return None


def kept_note(ckpt_dir: str, but: Optional[int] = None) -> str:
  """'the last good checkpoint, step N, is kept' (the newest complete one in
  `ckpt_dir` other than step `but`), or 'there is no earlier checkpoint': what a run
  stopped by an error leaves to resume from. Reads only."""
  good = [s for s in _complete_steps(ckpt_dir) if s != but]
  return (f'the last good checkpoint, step {good[0]}, is kept' if good else
          'there is no earlier checkpoint')


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a complete checkpoint (reads only)."""
  return bool(_complete_steps(checkpoint_dir(workdir)))


def _set_aside(step_dir, why: str) -> str:
  """Renames a step directory to `<why>-<step>-<time>` (process 0); the new name."""
  new = step_dir.parent / f'{why}-{step_dir.name}-{int(time.time())}'
  if jax.process_index() == 0:
    step_dir.rename(new)
  return new.name


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'nfnet_jax: {name}')


def set_aside_incomplete(ckpt_dir: str) -> list[str]:
  """Renames step directories that orbax has not committed (on a file system without
  atomic rename, such as GCS, a save killed midway leaves `<step>/` without orbax's
  commit) to `incomplete-<name>-<time>`, so orbax neither restores them nor collides
  with them. orbax's own temporary directories are never steps. Process 0 only;
  returns the new names."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = _path(ckpt_dir)
  moved = []
  if jax.process_index() == 0 and root.exists():
    for d in sorted(root.iterdir()):
      if d.is_dir() and d.name.isdigit() and not ocp.utils.is_checkpoint_finalized(d):
        new = _set_aside(d, 'incomplete')
        logging.warning('Checkpoint %s is incomplete (killed mid-save?); ignoring it, '
                        'moved to %s', d, new)
        moved.append(new)
  _sync('incomplete checkpoints set aside')
  return moved


# ---------------------------------------------------------------------------
# What a checkpoint holds: the state's layout and a checksum of its arrays.
# ---------------------------------------------------------------------------
def state_spec(abstract_state) -> str:
  """A digest of the state's tree paths, shapes and dtypes: equal digests, same
  layout. Any change of model, width, classes or optimizer changes it."""
  lines = [f'{jax.tree_util.keystr(path)} {tuple(x.shape)} {jnp.dtype(x.dtype).name}'
           for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)]
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]


def _words(x: jax.Array) -> jax.Array:
  """The bytes of `x` as uint32 words [n] (narrower items widened, wider split)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _leaf_sums(tree):
  """Per leaf, uint32 [2]: the wrap-around sum of its words, and of word i times
  (2i + 1). A change of any one word changes the second sum (odd weights are
  invertible mod 2^32); moved words change it too."""
  def sums(x):
    w = _words(x)
    weight = 2 * jnp.arange(w.size, dtype=jnp.uint32) + 1
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                      jnp.sum(w * weight, dtype=jnp.uint32)])
  return jax.tree.map(sums, tree)


def checksum(state) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of the state's arrays, computed on device (one
  read of the state; the result is a few bytes per array)."""
  sums = jax.device_get(_leaf_sums(state))
  return {jax.tree_util.keystr(path): [int(v) for v in value]
          for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def run_meta(config, num_classes: int, total_steps: int, warmup_steps: int,
             abstract_state) -> dict[str, Any]:
  """What each checkpoint records about the run that wrote it (JSON values)."""
  opt = config.optimizer
  return json.loads(json.dumps(dict(
      seed=config.seed, model=config.model, model_kwargs=config.model_kwargs.to_dict(),
      num_classes=num_classes, batch_size=config.batch_size, optimizer=opt.name,
      schedule=dict(total_steps=total_steps, warmup_steps=warmup_steps,
                    base_lr=opt.base_lr, end_lr=opt.end_lr,
                    scale_lr_by_batch=opt.scale_lr_by_batch),
      state_spec=state_spec(abstract_state))))


def check_same_layout(workdir: str, meta: dict[str, Any]) -> None:
  """Raises errors.RunError, before orbax reads or changes anything, when the newest
  checkpoint of `workdir` holds another layout of state than `meta` (of `run_meta`)
  describes: another model, width, class count or optimizer."""
  found = latest_meta(workdir)
  if found is None:
    return
  step, saved = found
  if 'state_spec' in saved:
    same = saved['state_spec'] == meta['state_spec']
  else:  # Older checkpoints record the model only.
    same = saved.get('model', meta['model']) == meta['model']
  if same:
    return
  diffs = [(k, saved[k], meta[k]) for k in ('model', 'num_classes', 'optimizer')
           if k in saved and saved[k] != meta[k]]
  kwargs = saved.get('model_kwargs')
  if isinstance(kwargs, dict):
    diffs += [(f'model_kwargs.{k}', kwargs.get(k), meta['model_kwargs'].get(k))
              for k in sorted(set(kwargs) | set(meta['model_kwargs']))
              if kwargs.get(k) != meta['model_kwargs'].get(k)]
  was = ', '.join(f'{k}={a!r}' for k, a, _ in diffs) or 'a state of other shapes'
  now = ', '.join(f'{k}={b!r}' for k, _, b in diffs) or 'another'
  raise errors.RunError(
      f'{checkpoint_dir(workdir)} holds checkpoints of another run: step {step} was '
      f'written with {was}; this run has {now}. Nothing was changed: re-run with the '
      'config that wrote it, or use a new --workdir.')


# ---------------------------------------------------------------------------
# Save and restore.
# ---------------------------------------------------------------------------
class QuietOrbax(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); with
  `keep_errors=False` its ERROR records too, where the caller reports the error.

  orbax logs through absl's logger, as this package does: it has no logger of its own
  (a `logging.getLogger('orbax')` whose level a caller could set is the API that is
  missing), so its records are told apart by the file that logged them."""

  def __init__(self, keep_errors: bool = True):
    super().__init__()
    self.min_level = logging_std.WARNING if keep_errors else logging_std.CRITICAL

  def filter(self, record: logging_std.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    return record.levelno == logging_std.WARNING or record.levelno >= self.min_level


def _no_room(directory: str, state) -> Optional[str]:
  """Why the file system of `directory` cannot hold a checkpoint of `state` (less
  free space than the state's bytes), else None. Not checked for a `gs://` (or other
  remote) directory."""
  if '://' in directory:
    return None
  need = sum(x.nbytes for x in jax.tree.leaves(state))
  free = shutil.disk_usage(directory).free
  if free >= need:
    return None
  return (f'OSError: No space left on device (the state needs {need / 2**20:.1f} MiB, '
          f'{free / 2**20:.1f} MiB free)')


def _first_line(e: BaseException) -> str:
  """`Type: first line` of an exception, without tensorstore's spec dump."""
  text = (str(e).strip().splitlines() or [''])[0].split(' See full TensorStore')[0]
  return f'{type(e).__name__}: {text[:200]}'


class Manager:
  """The checkpoints of a run, `workdir/checkpoints`, through an orbax
  CheckpointManager that keeps the last `keep`.

  With `asynchronous` (the default) `save` returns once orbax holds the state in host
  memory, and the files are written while training goes on. A write that fails is
  reported (errors.RunError, one line) by the next `save` or by `wait`, whichever
  comes first; orbax deletes checkpoints beyond `keep` only after a newer one is
  committed, so the last good one stays. orbax's own error records (with tracebacks,
  from its writer threads too) are dropped while the manager is open: each of its
  errors reaches `save`, `wait` or `restore`, which report it in one line.

  Raises errors.RunError when the directory cannot be created (e.g. a full disk).
  """

  def __init__(self, workdir: str, keep: int, asynchronous: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.directory = checkpoint_dir(workdir)
    self.pending: Optional[int] = None  # The step whose write may still be running.
    self._quiet = QuietOrbax(keep_errors=False)
    self._closed = False
    set_aside_incomplete(self.directory)
    # cleanup_tmp_directories: orbax removes what an interrupted or failed save left
    # (its temporary directories) when the manager opens, i.e. when a run resumes.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True)
    logging_std.getLogger('absl').addFilter(self._quiet)
    try:
      self.orbax = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:  # It creates the directory: a full disk (no inode) fails here.
      logging_std.getLogger('absl').removeFilter(self._quiet)
      raise errors.RunError(
          f'Cannot create {self.directory}: {_first_line(e)}. Nothing was written; fix '
          'the cause (e.g. free space) and re-run the same command.') from None

  def save(self, state, step: int, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step` with `meta` and the state's checksum; returns
    once orbax holds a copy of the state (the train step may then donate it). The
    train step never produces a non-finite state, so no checkpoint holds NaN.

    First waits for the previous write (one write at a time). Raises
    errors.RunError when that write failed, or this one fails before returning
    (see `wait`).
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.wait(step)
    no_room = _no_room(self.directory, state)
    if no_room:
      raise errors.RunError(
          f'Cannot save checkpoint {step} in {self.directory}: {no_room}. Stopped at '
          f'step {step}; {kept_note(self.directory)}, nothing of checkpoint {step} was '
          'written. Fix the cause (e.g. free space) and re-run the same command to '
          'resume.')
    meta = dict(meta, step=step, checksum=checksum(state))
    self.pending = step
    try:
      self.orbax.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e, stopped_at=step)

  def wait(self, step: Optional[int]) -> None:
    """Blocks until the last save is written and committed. Raises errors.RunError
    when it failed (e.g. the disk is full), naming `step` as where the run stopped,
    after removing orbax's partial directory; earlier checkpoints are untouched."""
    if self.pending is None:
      return
    try:
      self.orbax.wait_until_finished()
      self.orbax.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self.pending, e, stopped_at=step)
    self.pending = None

  def _failed(self, step: int, e: BaseException, stopped_at: Optional[int]):
    """Removes what the failed write of `step` left and raises errors.RunError.

    orbax's `wait_until_finished` returns at the first of a save's writes that fails,
    while its other writes may still run: no public API waits for or cancels them.
    One of them may create a temporary directory again after it is removed here (the
    next manager's `cleanup_tmp_directories` removes it), or print 'Exception ignored
    ... Event loop is closed' when it ends; `_no_room` keeps the usual case, a disk
    already full when a save starts, away from this path.
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.pending = None
    with contextlib.suppress(Exception):  # Its error is the one being reported.
      self.orbax.wait_until_finished()
    # No other save is being written: every temporary directory is this one's.
    partial = [d for d in _path(self.directory).iterdir()
               if d.is_dir() and ocp.utils.is_tmp_checkpoint(d)]
    if jax.process_index() == 0:
      for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    _sync(f'partial checkpoint {step} removed')
    self.orbax.reload()
    stopped = f'Stopped at step {stopped_at}; ' if stopped_at is not None else ''
    raise errors.RunError(
        f'Cannot save checkpoint {step} in {self.directory}: {_first_line(e)}. '
        f'{stopped}{kept_note(self.directory, but=step)}'
        + (', the partial one removed' if partial else '') +
        '. Fix the cause (e.g. free space) and re-run the same command to resume.')

  def close(self) -> None:
    """Waits for the last write and closes the manager (again: nothing). A write that
    failed is reported here as one warning line: `close` runs on the way out of a
    run, where another error may already be on its way."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait(step=None)
    except errors.RunError as e:
      logging.warning('%s', e)
    finally:
      # A failed write was reported above: an error orbax raises here repeats it.
      with contextlib.suppress(Exception):
        self.orbax.close()
      logging_std.getLogger('absl').removeFilter(self._quiet)

  def restore(self, abstract_state, accept_unverified: bool = False
              ) -> tuple[Optional[dict[str, Any]], Optional[dict]]:
    """(state, meta) of the newest committed checkpoint that verifies, or (None, None)
    if there is none.

    A checkpoint is damaged when its meta is malformed (not a JSON object, another
    step, a field of another type: `meta_problem`) or has no checksum (unless
    `accept_unverified`: then it is restored unverified, with a warning), when its
    arrays do not match the checksum, or when orbax cannot read it. A damaged one is
    renamed to `damaged-<step>-<time>` (one log line) and the one before it is tried.
    Raises errors.RunError when every checkpoint is damaged (nothing is then started
    from scratch over them).
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    root = _path(self.directory)
    set_aside, unverified = [], False
    for step in sorted(self.orbax.all_steps(), reverse=True):
      meta, problem = _read_meta(root / str(step))
      if problem is None:
        problem = meta_problem(meta, step, accept_unverified)
      if problem is None:  # The meta is sound: read the arrays and check them.
        try:
          restored = self.orbax.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
          problem = _verify(restored['state'], meta) if 'checksum' in meta else None
        except Exception as e:  # pylint: disable=broad-except
          # orbax stops at the first read that fails and drops the others unawaited
          # (no public API waits for or cancels them): Python may print 'Exception
          # ignored in: <coroutine ...>' for them when they are collected.
          problem = f'unreadable: {_first_line(e)}'
      if problem is None:
        if 'checksum' not in meta:
          logging.warning('Checkpoint %d has no checksum: restored without verification '
                          '(config.accept_unverified_checkpoints=True)', step)
        return restored['state'], meta
      new = _set_aside(root / str(step), 'damaged')
      _sync(f'damaged checkpoint {step} set aside')
      logging.warning('Checkpoint %d is damaged (%s): moved to %s, trying the one before',
                      step, problem, new)
      set_aside.append(new)
      unverified |= isinstance(meta, dict) and 'checksum' not in meta
      self.orbax.reload()
    if set_aside:
      hint = (' (to restore one without a checksum, move it back and pass '
              '--config.accept_unverified_checkpoints=True)' if unverified else '')
      raise errors.RunError(
          f'Every checkpoint in {root} is damaged (set aside as {", ".join(set_aside)}): '
          f'nothing to resume from. Move one back by hand to use it anyway{hint}, or '
          'start over with a new --workdir.')
    return None, None


def _verify(state, meta: dict[str, Any]) -> Optional[str]:
  """None if the state matches meta's checksum, else what differs."""
  saved, now = meta['checksum'], checksum(state)
  bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if bad:
    return f'{len(bad)} of {len(now)} arrays differ from their checksums, e.g. {bad[0]}'
  return None


# ---------------------------------------------------------------------------
# Where a run starts.
# ---------------------------------------------------------------------------
def start(config, workdir: str, mode: str, trainer, run_meta: dict[str, Any]
          ) -> tuple[Optional[Manager], dict[str, Any]]:
  """(checkpoint manager or None, state) a run starts from: the workdir's newest good
  checkpoint, else config.init_from, else a fresh initialisation (`trainer` is a
  `steps.Trainer`). Raises errors.RunError when there is nothing to evaluate."""
  found = has_checkpoint(workdir)
  if found:
    check_same_layout(workdir, run_meta)
  elif mode == 'eval' and not config.init_from:
    raise errors.RunError(
        f'--mode=eval: no checkpoint in {checkpoint_dir(workdir)} and no '
        'config.init_from, so nothing to evaluate (nothing was created). Train in this '
        'workdir first, or pass --config.init_from=<weights file>.')
  mngr = None
  if found or mode != 'eval':
    mngr = Manager(workdir, config.keep_checkpoints)
    try:
      state, meta = mngr.restore(trainer.abstract_state,
                                 config.get('accept_unverified_checkpoints', False))
    except BaseException:
      mngr.close()
      raise
    if state is not None:
      logging.info('Resumed from checkpoint at step %d (%s)', int(state['step']),
                   ', '.join(f'{k} {meta[k]}' for k in ('model', 'seed', 'batch_size')
                             if k in meta))
      for key in ('seed', 'model', 'batch_size'):
        if key in meta and meta[key] != config[key]:
          logging.warning('The checkpoint was written with config.%s=%r, this run has '
                          '%r; the run is no longer the one the first command started',
                          key, meta[key], config[key])
      if mode != 'eval' and meta.get('schedule', run_meta['schedule']) != run_meta[
          'schedule']:
        logging.warning('The checkpoint was written with the schedule %s; this run has '
                        '%s: from step %d the learning rate follows this run\'s',
                        meta['schedule'], run_meta['schedule'], int(state['step']))
      return mngr, state
  if config.init_from:
    state = trainer.init_state(_load_init(config, run_meta['num_classes'], trainer, mode))
    logging.info('Starting from %s', config.init_from)
  elif mode == 'eval':
    raise errors.RunError(f'--mode=eval: no usable checkpoint in '
                          f'{checkpoint_dir(workdir)} and no config.init_from')
  else:
    state = trainer.init_state()
  return mngr, state


def _load_init(config, num_classes: int, trainer, mode: str):
  """config.init_from's params; for training, with the classifier resized to the
  data's classes. --mode=eval refuses weights whose classifier does not fit the data
  (it would score an untrained classifier)."""
  from nfnet_jax import hub, pretrained  # pylint: disable=g-import-not-at-top
  try:  # a file or Hub name load refuses is one line, not a traceback
    if mode != 'eval':
      return pretrained.load(config.init_from, model=config.model,
                             num_classes=num_classes, rng=config.seed)
    params = pretrained.load(config.init_from, model=config.model)
  except (OSError, ValueError, pretrained.UnsafePickleError, hub.HubError) as e:
    raise errors.RunError(f'config.init_from: {e}') from None
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(np.shape(v))
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(params), shapes(trainer.abstract_state['params'])
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      raise errors.RunError(
          f'--mode=eval: config.init_from={config.init_from} does not fit this data\'s '
          f'{num_classes} classes ({key}: {got.get(key)} in the file, {want.get(key)} '
          'here), so it would score an untrained classifier. Evaluate on data with the '
          'classes the weights were trained on, or fine-tune first (--mode=train).')
  return params
