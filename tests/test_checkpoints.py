"""Checkpoints (nfnet_jax/checkpoints.py): checksums, damaged and incomplete
checkpoints set aside, a full disk, a workdir of another run. Small states; the
training-loop side (resume equals an uninterrupted run) is in tests/test_train.py."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
import subprocess

import numpy as np
import pytest

from nfnet_jax import checkpoints, errors


def _state(seed: int = 0) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return dict(params={'w': jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
                      'b': jnp.asarray(rng.normal(size=(256,)), jnp.float32)},
              step=jnp.asarray(seed, jnp.int32), rng=jnp.asarray([seed, 7], jnp.uint32))


def _abstract(state):
  import jax  # pylint: disable=g-import-not-at-top
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), state)


def _write(workdir: Path, steps=(1, 2)) -> dict[int, dict]:
  mngr = checkpoints.Manager(str(workdir), keep=5)
  states = {s: _state(s) for s in steps}
  for s in steps:
    mngr.save(states[s], s, dict(model='test'))
  mngr.close()
  return states


def _array_file(step_dir: Path) -> Path:
  """The largest file of a checkpoint's state: the one holding the arrays' bytes."""
  return max((p for p in (step_dir / 'state').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip_middle(path: Path, n: int = 4096) -> None:
  """Inverts n bytes in the middle of a file (same size)."""
  data = bytearray(path.read_bytes())
  mid = len(data) // 2 - n // 2
  data[mid:mid + n] = bytes(255 - b for b in data[mid:mid + n])
  path.write_bytes(bytes(data))


def _tree_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checksum_matches_numpy_and_sees_one_bit():
  """[sum, sum of word i * (2i+1)] of each leaf's 32-bit words, wrapping mod 2^32."""
  state = _state(3)
  got = checkpoints.checksum(state)

  def reference(x):
    words = np.ascontiguousarray(np.asarray(x)).view(np.uint32).ravel().astype(np.uint64)
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    return [int(words.sum() % 2**32), int((words * weights % 2**32).sum() % 2**32)]

  assert got == {"['params']['b']": reference(state['params']['b']),
                 "['params']['w']": reference(state['params']['w']),
                 "['rng']": reference(state['rng']), "['step']": reference(state['step'])}
  flipped = np.asarray(state['params']['w']).copy()
  flipped.view(np.uint32)[5, 17] ^= 1 << 31  # One bit: the sign of one weight.
  state['params']['w'] = flipped
  assert checkpoints.checksum(state)["['params']['w']"][1] != got["['params']['w']"][1]
  swapped = np.asarray(_state(3)['params']['w']).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # Same words, other places: the plain sum agrees.
  state['params']['w'] = swapped
  now = checkpoints.checksum(state)["['params']['w']"]
  assert now[0] == got["['params']['w']"][0] and now[1] != got["['params']['w']"][1]


# Edits of checkpoint 2's meta (a function of the parsed JSON -> the JSON written
# back), each with the reason the damaged line gives.
NO_CHECKSUM = ('(it has no checksum, so its arrays cannot be verified (only '
               'config.accept_unverified_checkpoints=True restores such a checkpoint))')
META_EDITS = {
    'no_checksum': (lambda m: {k: v for k, v in m.items() if k != 'checksum'},
                    NO_CHECKSUM),
    'null': (lambda m: None, '(its meta is null, not a JSON object)'),
    'list': (lambda m: [1, 2, 3], '(its meta is [1, 2, 3], not a JSON object)'),
    'string': (lambda m: 'meta', '(its meta is "meta", not a JSON object)'),
    'no_step': (lambda m: {k: v for k, v in m.items() if k != 'step'},
                '(its meta records step null, not 2)'),
    'other_step': (lambda m: dict(m, step=1), '(its meta records step 1, not 2)'),
    'model_type': (lambda m: dict(m, model=5), '(its meta field model is 5, not str)'),
    'checksum_type': (lambda m: dict(m, checksum='abc'),
                      '(its checksum is str, not an object of arrays)'),
    'checksum_value': (lambda m: dict(m, checksum=dict(m['checksum'], **{
        "['step']": [1, 'x']})), '(its checksum of [\'step\'] is [1, "x"], not two '
                                 '32-bit integers)'),
}


@pytest.mark.parametrize('damage', ['checksum', 'bit', 'overwrite', 'truncate', 'empty',
                                    'meta', *META_EDITS, 'no_checksum+bit',
                                    'no_checksum+truncate', 'null+truncate'])
def test_damaged_checkpoint_is_set_aside_and_the_previous_restored(damage, tmp_path,
                                                                   caplog):
  """Damage that orbax reads without complaint (a changed array, shown by editing the
  recorded checksum, and a flipped bit that the compressor lets through) is caught
  by the checksum; damage it cannot read is caught as unreadable; a meta that is not
  well-formed (no checksum, not an object, a field missing or of another type) is
  damage too, whatever the arrays. Either way the checkpoint is renamed, whole, and
  the one before restored."""
  import json  # pylint: disable=g-import-not-at-top
  states = _write(tmp_path)
  ckpts = tmp_path / 'checkpoints'
  target = _array_file(ckpts / '2')
  data, meta_file = bytearray(target.read_bytes()), ckpts / '2' / 'meta' / 'metadata'
  mid = len(data) // 2
  edit, arrays = damage.split('+')[0], damage.split('+')[-1]
  if edit == 'checksum':
    meta = json.loads(meta_file.read_text())
    meta['checksum']["['params']['w']"][1] ^= 1
    meta_file.write_text(json.dumps(meta))
  elif edit in META_EDITS:
    edited = META_EDITS[edit][0](json.loads(meta_file.read_text()))
    meta_file.write_text(json.dumps(edited))
  elif edit == 'meta':
    meta_file.write_text('{"step": 2, "chec')
  if arrays == 'bit':
    data[mid] ^= 1
  elif arrays == 'overwrite':  # 4 KiB of other bytes, same size
    data[mid:mid + 4096] = np.random.default_rng(0).bytes(4096)
  elif arrays == 'truncate':
    data = data[:mid]
  elif arrays == 'empty':
    data = b''
  if arrays in ('bit', 'overwrite', 'truncate', 'empty'):
    target.write_bytes(bytes(data))
  files = sorted(p.relative_to(ckpts / '2') for p in (ckpts / '2').rglob('*'))
  mngr = checkpoints.Manager(str(tmp_path), keep=5)
  with caplog.at_level(logging.WARNING):
    state, meta = mngr.restore(_abstract(states[2]))
  _tree_equal(state, states[1])
  assert meta['step'] == 1
  moved = [p for p in ckpts.iterdir() if p.name.startswith('damaged-2-')]
  assert len(moved) == 1 and not (ckpts / '2').exists()
  assert sorted(p.relative_to(moved[0]) for p in moved[0].rglob('*')) == files  # kept
  lines = [r.getMessage() for r in caplog.records if 'damaged' in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith('Checkpoint 2 is damaged (')
  assert f'moved to {moved[0].name}, trying the one before' in lines[0]
  checksum_line = "(1 of 4 arrays differ from their checksums, e.g. ['params']['w'])"
  if edit == 'checksum':
    assert checksum_line in lines[0]
  elif edit in META_EDITS:
    assert lines[0] == (f'Checkpoint 2 is damaged {META_EDITS[edit][1]}: moved to '
                        f'{moved[0].name}, trying the one before')
  elif damage == 'bit':
    assert checksum_line in lines[0] or '(unreadable: ' in lines[0]
  else:
    assert '(unreadable: ' in lines[0] and len(lines[0]) < 400, lines[0]
  assert not [r for r in caplog.records if 'without verification' in r.getMessage()]
  # Training goes on from step 1: the next save of step 2 does not collide.
  mngr.save(states[2], 2, dict(model='test'))
  mngr.close()
  assert mngr.orbax.all_steps() == [1, 2]


def _drop_checksums(workdir: Path, steps=(1, 2)) -> None:
  """Rewrites the metas of `steps` without their checksum (as an older version, or a
  hand edit, leaves them)."""
  import json  # pylint: disable=g-import-not-at-top
  for step in steps:
    meta_file = workdir / 'checkpoints' / str(step) / 'meta' / 'metadata'
    meta = json.loads(meta_file.read_text())
    del meta['checksum']
    meta_file.write_text(json.dumps(meta))


def _trainer(state):
  """What `checkpoints.start` needs of a `steps.Trainer`: the state's layout, and a
  fresh state (a marker, here: this test's start must not reach it)."""
  import types  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(abstract_state=_abstract(state),
                               init_state=lambda: pytest.fail('started from scratch'))


def test_unverified_checkpoints_are_refused_unless_the_config_accepts_them(tmp_path,
                                                                          caplog):
  """Through the config a run starts with: by default checkpoints without a checksum
  are damaged (all of them here: the run stops with one message naming the option);
  with config.accept_unverified_checkpoints=True the newest is restored, with a
  warning, and one without a checksum that orbax cannot read is still set aside."""
  import jax  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  config = configs.base_config()
  states = _write(tmp_path, steps=(1, 2, 3))
  _drop_checksums(tmp_path, (1, 2, 3))
  _flip_middle(_array_file(tmp_path / 'checkpoints' / '3'))
  (tmp_path / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt').write_bytes(b'')
  meta = dict(checkpoints.run_meta(config, 10, 100, 5, jax.eval_shape(lambda: states[1])),
              model='test')
  both = tmp_path / 'copy'
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(tmp_path / 'checkpoints', both / 'checkpoints')
  with pytest.raises(errors.RunError) as e:
    checkpoints.start(config, str(tmp_path), 'train', _trainer(states[1]), meta)
  assert str(e.value).startswith(f'Every checkpoint in {tmp_path}/checkpoints is damaged '
                                 '(set aside as damaged-3-')
  assert ('Move one back by hand to use it anyway (to restore one without a checksum, '
          'move it back and pass --config.accept_unverified_checkpoints=True), or start '
          'over with a new --workdir.') in str(e.value) and '\n' not in str(e.value)
  assert sorted(p.name.split('-')[1] for p in (tmp_path / 'checkpoints').iterdir()) == [
      '1', '2', '3']

  config.accept_unverified_checkpoints = True
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    mngr, state = checkpoints.start(config, str(both), 'train', _trainer(states[1]), meta)
  mngr.close()
  _tree_equal(state, states[2])
  lines = [r.getMessage() for r in caplog.records]
  assert len([l for l in lines if 'is damaged (unreadable: ' in l]) == 1, lines
  assert 'Checkpoint 2 has no checksum: restored without verification (config.' \
         'accept_unverified_checkpoints=True)' in lines
  assert sorted(p.name for p in (both / 'checkpoints').iterdir())[:2] == ['1', '2']


@pytest.mark.parametrize('bad', ['other_step', 'model_type', 'checksum_type'])
def test_a_malformed_newest_meta_is_not_taken_for_the_run_s_layout(bad, tmp_path):
  """`latest_meta` (what the layout check compares with) skips a checkpoint whose
  meta is malformed: it is damage, for `restore` to set aside, not another run."""
  import json  # pylint: disable=g-import-not-at-top
  _write(tmp_path)
  meta_file = tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta_file.write_text(json.dumps(META_EDITS[bad][0](json.loads(meta_file.read_text()))))
  step, meta = checkpoints.latest_meta(str(tmp_path))
  assert step == 1 and meta['step'] == 1


def test_every_checkpoint_damaged_is_an_error(tmp_path):
  states = _write(tmp_path)
  for step in (1, 2):
    _flip_middle(_array_file(tmp_path / 'checkpoints' / str(step)))
  mngr = checkpoints.Manager(str(tmp_path), keep=5)
  with pytest.raises(errors.RunError, match=r'Every checkpoint in .* is damaged \(set '
                     r'aside as damaged-2-\d+, damaged-1-\d+\): nothing to resume from'):
    mngr.restore(_abstract(states[2]))
  assert sorted(p.name.split('-')[1] for p in (tmp_path / 'checkpoints').iterdir()) == [
      '1', '2']


def test_uncommitted_step_directories_are_set_aside(tmp_path, monkeypatch):
  """A step directory that orbax does not count as committed (on GCS, where orbax
  commits a save with a marker file, one killed midway) is renamed to
  `incomplete-<step>-<time>`; committed checkpoints and orbax's temporary
  directories stay where they are."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _write(tmp_path, steps=(4, 6))
  ckpts = tmp_path / 'checkpoints'
  (ckpts / '8' / 'state').mkdir(parents=True)  # Killed mid-save.
  (ckpts / '9.orbax-checkpoint-tmp').mkdir()
  # This file system commits by renaming, so orbax counts every step directory as
  # committed: the test models one that commits with a marker, which 8 lacks.
  committed = ocp.utils.is_checkpoint_finalized
  monkeypatch.setattr(ocp.utils, 'is_checkpoint_finalized',
                      lambda path: path.name != '8' and committed(path))
  moved = checkpoints.set_aside_incomplete(str(ckpts))
  assert len(moved) == 1 and moved[0].startswith('incomplete-8-')
  assert sorted(p.name for p in ckpts.iterdir()) == [
      '4', '6', '9.orbax-checkpoint-tmp', moved[0]]


def test_another_layout_is_refused_before_anything_is_touched(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  c = configs.base_config()
  c.model_kwargs = dict(width=0.125)
  state = _state(1)
  meta = checkpoints.run_meta(c, 10, 100, 5, jax.eval_shape(lambda: state))
  mngr = checkpoints.Manager(str(tmp_path), keep=5)
  mngr.save(state, 1, meta)
  mngr.close()
  (tmp_path / 'checkpoints' / '3' / 'state').mkdir(parents=True)  # Would be set aside.
  before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
  checkpoints.check_same_layout(str(tmp_path), meta)  # Same run: fine.
  c.model_kwargs.width = 0.25
  other = dict(checkpoints.run_meta(c, 10, 100, 5, jax.eval_shape(lambda: state)),
               state_spec='another')
  with pytest.raises(errors.RunError, match=r'holds checkpoints of another run: step 1 '
                     r'was written with model_kwargs.width=0.125; this run has '
                     r'model_kwargs.width=0.25. Nothing was changed'):
    checkpoints.check_same_layout(str(tmp_path), other)
  assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob('*')) == before


@contextlib.contextmanager
def tmpfs(mnt, options: str):
  """A tmpfs mounted at `mnt` with mount `options` (needs root, or a kernel that lets
  this user mount one: elsewhere the test is skipped, saying so), unmounted after."""
  mnt.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(mnt)],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    pytest.skip(f'cannot mount a small tmpfs here (not root?): {done.stderr.strip()}')
  try:
    yield mnt
  finally:
    subprocess.run(['umount', '-l', str(mnt)], check=False)


@pytest.fixture
def small_filesystem(tmp_path):
  """A 1 MiB tmpfs."""
  with tmpfs(tmp_path / 'mnt', 'size=1m') as mnt:
    yield mnt


def _big(small: dict) -> dict:
  """`small` with a 512 KiB weight of random bits (incompressible)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bits = np.random.default_rng(0).integers(0, 2**32, size=(128, 1024), dtype=np.uint32)
  return dict(small, params=dict(small['params'], w=jnp.asarray(bits)))


def _leave_free(mnt: Path, free: int) -> None:
  """Fills the file system at `mnt` up to `free` bytes left."""
  st = os.statvfs(mnt)
  (mnt / 'filler').write_bytes(bytes(max(st.f_bavail * st.f_frsize - free, 0)))


def _resume(mnt: Path, small: dict) -> None:
  """Space freed, the same run resumes from step 1 and saves step 2."""
  (mnt / 'filler').unlink()
  mngr = checkpoints.Manager(str(mnt), keep=1)
  state, _ = mngr.restore(_abstract(small))
  _tree_equal(state, small)
  mngr.save(state, 2, {})
  mngr.close()
  assert sorted(os.listdir(mnt / 'checkpoints')) == ['2']


def test_full_disk_stops_at_the_save_and_keeps_the_last_good(small_filesystem, caplog):
  """A disk without room for the state: the save stops the run at once with one
  line, before anything of it is written; the last good checkpoint stays (keep=1)."""
  mngr = checkpoints.Manager(str(small_filesystem), keep=1)
  small = _state(1)
  mngr.save(small, 1, {})
  mngr.wait(1)
  _leave_free(small_filesystem, 16384)  # Room for small files, not for the state.
  with caplog.at_level(logging.INFO):
    with pytest.raises(errors.RunError) as e:
      mngr.save(_big(small), 2, {})
  assert str(e.value) == (
      f'Cannot save checkpoint 2 in {small_filesystem}/checkpoints: OSError: No space '
      'left on device (the state needs 0.5 MiB, 0.0 MiB free). Stopped at step 2; the '
      'last good checkpoint, step 1, is kept, nothing of checkpoint 2 was written. Fix '
      'the cause (e.g. free space) and re-run the same command to resume.')
  assert sorted(os.listdir(small_filesystem / 'checkpoints')) == ['1']
  mngr.close()
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  _resume(small_filesystem, small)


@pytest.mark.parametrize('reported_by', ['next save', 'end of run'])
def test_a_write_that_fails_in_the_background_is_reported_by_the_next_save_or_the_end(
    small_filesystem, reported_by, caplog):
  """The disk fills up while a checkpoint is written after `save` returned: the next
  save (or the wait at the end of a run) stops the run with one line naming that
  checkpoint; orbax's partial directory is removed, its error records are not shown,
  and the last good checkpoint stays (keep=1: orbax deletes the older one only once
  a newer one is committed)."""
  import jax  # pylint: disable=g-import-not-at-top
  mngr = checkpoints.Manager(str(small_filesystem), keep=1)
  small = _state(1)
  mngr.save(small, 1, {})
  mngr.wait(1)
  big = _big(small)
  # Room for the state's bytes, so the save starts, but not for orbax's other files.
  _leave_free(small_filesystem, sum(x.nbytes for x in jax.tree.leaves(big)) + 8192)
  with caplog.at_level(logging.INFO):
    mngr.save(big, 2, {})  # Returns: the files are written in the background.
    with pytest.raises(errors.RunError) as e:
      if reported_by == 'next save':
        mngr.save(small, 3, {})
      else:
        mngr.wait(3)
    mngr.close()
  message = str(e.value)
  assert message.startswith(f'Cannot save checkpoint 2 in {small_filesystem}/checkpoints:')
  assert 'Stopped at step 3; the last good checkpoint, step 1, is kept, the partial one ' \
         'removed. Fix the cause' in message and '\n' not in message
  assert len(message) < 500
  assert 'RESOURCE_EXHAUSTED' in message or 'No space left' in message
  assert mngr.orbax.all_steps() == [1]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no orbax noise
  _resume(small_filesystem, small)


def test_no_room_for_the_checkpoint_directory_is_one_line(tmp_path):
  """A file system without a free inode (a tmpfs of 3, all taken): the checkpoint
  directory cannot be created, and that is one line, not orbax's traceback."""
  with tmpfs(tmp_path / 'mnt', 'size=1m,nr_inodes=3') as mnt:
    (mnt / 'run').mkdir()
    with pytest.raises(OSError, match='No space left'):  # every inode taken
      for i in range(3):
        (mnt / f'file{i}').write_bytes(b'')
    with pytest.raises(errors.RunError) as e:
      checkpoints.Manager(str(mnt / 'run'), keep=3)
    assert str(e.value) == (
        f'Cannot create {mnt}/run/checkpoints: OSError: [Errno 28] No space left on '
        f"device: '{mnt}/run/checkpoints'. Nothing was written; fix the cause (e.g. free "
        'space) and re-run the same command.')
    assert sorted(p.name for p in (mnt / 'run').iterdir()) == []
