"""Checkpoints (orbax): atomic, the last k kept, never with NaN, incomplete ones set
aside.

A checkpoint is `workdir/checkpoints/<step>/` with two items: `state` (the training
state, see `steps.make_init_fn`) and `meta` (JSON: step, seed, model, batch size).
"""
from __future__ import annotations

import json
import logging as logging_std
import os
import time
from typing import Any, Optional

from absl import logging
import jax


def checkpoint_dir(workdir: str) -> str:
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


def manager(workdir: str, keep: int):
  """An orbax CheckpointManager over `workdir/checkpoints`, keeping the last `keep`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = checkpoint_dir(workdir)
  set_aside_incomplete(ckpt_dir)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(ckpt_dir, options=options)


def save(mngr, state, step: int, meta: dict) -> None:
  """Saves asynchronously (orbax copies the arrays to host before returning). The
  train step never produces a non-finite state, so neither is any checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr, abstract_state) -> tuple[Optional[dict[str, Any]], Optional[dict]]:
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


class QuietOrbax(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname
