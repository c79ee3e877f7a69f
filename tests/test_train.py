"""Training entry point (nfnet_jax/train.py): device/host-count independence, gradient
accumulation, preemption and resume, non-finite steps, evaluation and summaries.

The runs are real `python -m nfnet_jax.train` processes on a tiny NFNet-F0 (width 1/8,
ungrouped, two blocks, dropout 0.5, stochastic depth 0.5) on 16 px offline images with
flips, pad-crops, MixUp and CutMix. They are started together, in parallel, by the
module fixture `runs`, and share a persistent XLA compilation cache, so each distinct
program is compiled once (tests/conftest.py; at -O0: these tests are about the training loop, not about
XLA's code quality):

  one        1 device, numpy input pipeline  (the reference run)
  eight      1 process x 8 devices, grad_accum_steps=2 (2 micro-batches of 1 row per
             device), a checkpoint every step
  two_hosts  2 processes x 4 devices (jax.distributed on localhost), with a SIGTERM
             to the second process only while step 3's batch is read: both stop
             after step 4 (compared with 'eight' up to there)
  preempted  'one' with a real SIGTERM at a random step; then `resumed`, the same
             command again, with a partial step directory and an orbax tmp dir added
  damaged    'eight's workdir with its last checkpoint damaged, the same command again
  nan        'one' with a NaN in the batches of steps 2, 4 and 5, and
             max_consecutive_nonfinite=2: step 2 is skipped, 5 stops the run
  evaluate   --mode=eval on a copy of 'one's workdir
  tf         'one' through the TF input pipeline (RandAugment on too), in
             --mode=train_and_eval with an eval every 2 steps
Only 'one', 'evaluate' and 'tf' evaluate; the others have no eval split, which saves
compiling the eval step for their device counts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from test_checkpoints import small_filesystem  # pylint: disable=unused-import

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
TIMEOUT = 900  # Per run; CI needs a fraction of it.

TINY_CONFIG = textwrap.dedent('''
    """Tiny NFNet for tests; arg 'tf': the TF input pipeline with RandAugment."""
    from nfnet_jax import configs


    def get_config(arg=''):
      c = configs.base_config()
      c.model = 'F0'
      c.model_kwargs = dict(width=0.125, group_size=None, depths=(1, 1),
                            stochdepth_rate=0.5, drop_rate=0.5)
      c.data.source = 'offline'
      c.data.use_tf = arg == 'tf'
      c.data.randaugment.enabled = arg == 'tf'
      c.data.randaugment.num_layers = 2
      c.data.offline.num_train = 64
      c.data.offline.num_eval = 40
      c.data.image_size = c.data.eval_size = 16
      c.data.prefetch = 1
      c.data.num_parallel_calls = 2
      c.batch_size = 16
      c.total_steps = %d
      c.warmup_epochs = 0.0
      c.optimizer.base_lr = 0.4
      c.optimizer.agc_clipping = 0.01
      c.log_agc_clip_fraction = True
      c.compute_dtype = 'float32'
      c.ema_decay = 0.9
      c.eval_batch_size = 32
      c.log_every = 1
      c.checkpoint_every_steps = 0
      c.checkpoint_every_minutes = 0.0
      return c
''' % STEPS)

# Runs the real entry point after wrapping the input pipeline: 'nan' puts a NaN into
# the batches of the given steps (comma-separated), 'sigterm' sends this process a
# real SIGTERM while the batch of that step is being fetched, 'fill' fills the
# workdir's file system to 16 KiB free then (once a checkpoint is committed), 'slow'
# takes 1 s for each of those batches.
HOOK = textwrap.dedent('''
    import os, signal, sys, time
    import numpy as np
    what, steps = sys.argv[1], {int(s) for s in sys.argv[2].split(',')}
    del sys.argv[1:3]
    from nfnet_jax import data
    build = data.build_train_iter

    def hooked(cfg, batch_size, seed, start_step=0, **kwargs):
      for step, batch in enumerate(build(cfg, batch_size, seed, start_step=start_step,
                                         **kwargs), start=start_step + 1):
        if step in steps:
          if what == 'nan':
            batch = dict(batch, images=np.array(batch['images']))
            batch['images'][0, 0, 0, 0] = np.nan
          elif what == 'sigterm':
            os.kill(os.getpid(), signal.SIGTERM)
          elif what == 'fill':
            workdir = next(a.split('=', 1)[1] for a in sys.argv
                           if a.startswith('--workdir='))
            from nfnet_jax import checkpoints
            # The earlier save is written in the background: committed first.
            deadline = time.time() + 120
            while not checkpoints.has_checkpoint(workdir) and time.time() < deadline:
              time.sleep(0.05)
            st = os.statvfs(workdir)
            with open(os.path.join(workdir, 'filler'), 'wb') as f:
              f.write(bytes(max(st.f_bavail * st.f_frsize - 16384, 0)))
          elif what == 'slow':
            time.sleep(1.0)
        yield batch

    data.build_train_iter = hooked
    import runpy
    runpy.run_module('nfnet_jax.train', run_name='__main__', alter_sys=True)  # -m
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class Run:
  """One `python -m nfnet_jax.train` process (or the HOOK wrapper around it)."""

  def __init__(self, root: Path, name: str, devices: int, *flags: str,
               arg: str = '', hook: tuple[str, str] | None = None,
               workdir: Path | None = None):
    self.name, self.root = name, root
    self.workdir = workdir or root / name
    self.log = root / f'{name}.log'
    entry = (['-c', HOOK, *hook] if hook else ['-m', 'nfnet_jax.train'])
    timer = []  # NFNET_TEST_TIMES=1: log each run's CPU time (needs /usr/bin/time).
    if os.environ.get('NFNET_TEST_TIMES'):
      timer = ['/usr/bin/time', '-f', f'CPU {name} %U user %S sys %e wall']
    self.cmd = [*timer, sys.executable, *entry, f'--config={root / "tiny.py"}:{arg}',
                f'--workdir={self.workdir}', *flags]
    self.env = dict(
        os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
        XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices} '
                   '--xla_backend_optimization_level=0'),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    self.proc = None
    self.rc = None

  def start(self) -> 'Run':
    self._out = open(self.log, 'w')
    self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._out,
                                 stderr=subprocess.STDOUT, text=True)
    return self

  def wait(self) -> 'Run':
    if self.rc is None:
      try:
        self.rc = self.proc.wait(timeout=TIMEOUT)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.rc = self.proc.wait()
      self._out.close()
    return self

  @property
  def output(self) -> str:
    return self.log.read_text()

  def ok(self) -> 'Run':
    assert self.wait().rc == 0, f'{self.name} exited {self.rc}:\n{self.output[-6000:]}'
    return self

  def metrics(self, prefix: str = 'train') -> dict[int, dict[str, float]]:
    """{step: {name: value}} of metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (self.workdir / 'metrics.jsonl').read_text().splitlines():
      rec = json.loads(line)
      vals = {k.split('/', 1)[1]: v for k, v in rec.items() if k.startswith(prefix + '/')}
      if vals:
        out[rec['step']] = vals
    return out

  def losses(self) -> np.ndarray:
    m = self.metrics()
    return np.array([m[s]['loss'] for s in sorted(m)])

  def steps(self) -> list[int]:
    return sorted(int(p.name) for p in (self.workdir / 'checkpoints').iterdir()
                  if p.name.isdigit())

  def state(self, step: int | None = None) -> dict:
    return load_state(self.workdir / 'checkpoints' / str(step or self.steps()[-1]))


def load_state(step_dir: Path) -> dict:
  """A checkpoint's state as numpy arrays (whatever mesh wrote it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ocp.StandardCheckpointer()
  meta = ckpt.metadata(step_dir / 'state')
  meta = getattr(meta, 'item_metadata', meta)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                        meta)
  return jax.tree.map(np.asarray, ckpt.restore(step_dir / 'state', target))


def leaves(tree) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], rtol=rtol, atol=atol, err_msg=k)


def assert_trees_equal(a, b):
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


# ---------------------------------------------------------------------------
# The runs, started together.
# ---------------------------------------------------------------------------
class Runs:
  """Starts every run as early as its inputs allow; `get(name)` waits for one."""

  def __init__(self, root: Path):
    self.root = root
    (root / 'tiny.py').write_text(TINY_CONFIG)
    self.runs: dict[str, Run] = {}
    # k + 2 < STEPS: the save lands at k..k+2 and must come before the last step.
    self.sigterm_step = random.Random().randint(1, STEPS - 3)
    self.nan_steps = (2, 4, 5)
    self.tmpfs: Path | None = None
    self.tmpfs_error = ''
    self.done = threading.Event()
    self.error: BaseException | None = None

  def _run(self, name, devices, *flags, **kw) -> Run:
    run = Run(self.root, name, devices, *flags, **kw)
    self.runs[name] = run
    return run.start()

  def start(self) -> 'Runs':
    # Cold runs: each compiles its own programs. 'one' first, as the others share
    # its programs through the cache.
    one = self._run('one', 1)
    no_eval = '--config.data.offline.num_eval=0'
    self._run('eight', 8, no_eval, '--config.grad_accum_steps=2',
              '--config.checkpoint_every_steps=1')
    port = _free_port()
    for i in range(2):
      self._run(f'two_hosts_{i}', 4, no_eval, f'--coordinator_address=localhost:{port}',
                '--num_processes=2', f'--process_id={i}', workdir=self.root / 'two_hosts',
                hook=('sigterm', '3') if i else None)

    def warm():
      try:
        one.wait()
        preempted = self._run('preempted', 1, hook=('sigterm', str(self.sigterm_step)))
        self._run('nan', 1, '--config.max_consecutive_nonfinite=2',
                  '--config.checkpoint_every_steps=1',
                  hook=('nan', ','.join(map(str, self.nan_steps))))
        if one.rc == 0:
          shutil.copytree(one.workdir, self.root / 'evaluate')
          mark_eval_rows(self.root / 'evaluate' / 'metrics.jsonl')
          self._run('evaluate', 1, '--mode=eval', workdir=self.root / 'evaluate')
        self._run('tf', 1, '--mode=train_and_eval', '--config.eval_every=2', arg='tf')
        if one.rc == 0:  # Resumed with a longer schedule.
          shutil.copytree(one.workdir, self.root / 'longer')
          self._run('longer', 1, no_eval, '--config.total_steps=6',
                    workdir=self.root / 'longer')
        self.start_disk_full(no_eval)
        eight = self.runs['eight'].wait()
        if eight.rc == 0:  # Its last checkpoint damaged, then the same command again.
          shutil.copytree(eight.workdir, self.root / 'damaged')
          self.damaged_file = damage_array_file(self.root / 'damaged' / 'checkpoints' /
                                                str(STEPS))
          self._run('damaged', 8, no_eval, '--config.grad_accum_steps=2',
                    '--config.checkpoint_every_steps=1', workdir=self.root / 'damaged')
        preempted.wait()
        self.preempted_steps = preempted.steps()  # Before the rerun adds its own.
        if preempted.rc == 128 + signal.SIGTERM:
          self.half_written = self.simulate_half_written(preempted.workdir)
        self._run('resumed', 1, workdir=preempted.workdir)
      except BaseException as e:  # pylint: disable=broad-except
        self.error = e
      finally:
        self.done.set()

    threading.Thread(target=warm, daemon=True).start()
    return self

  def start_disk_full(self, no_eval: str) -> None:
    """'one' with a checkpoint every 2 steps into a 64 MiB tmpfs that fills up while
    step 3's batch is fetched (once step 2's checkpoint is committed): step 4's save
    finds no room."""
    mnt = self.root / 'tmpfs'
    mnt.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      self.tmpfs_error = done.stderr.strip() or f'mount exited {done.returncode}'
      return
    self.tmpfs = mnt
    self._run('disk_full', 1, no_eval, '--config.checkpoint_every_steps=2',
              hook=('fill', '3'), workdir=mnt / 'run')

  @staticmethod
  def simulate_half_written(workdir: Path) -> dict[str, Path]:
    """What a kill mid-save leaves: a later step dir with part of a checkpoint (as on
    a file system without atomic rename, e.g. GCS; on this one orbax counts it as
    committed, so the resumed run finds it damaged), and an orbax tmp dir (on POSIX)
    for the step the resumed run will write last."""
    ckpts = workdir / 'checkpoints'
    last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    partial = ckpts / str(last + 1)
    (partial / 'state').mkdir(parents=True)
    (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\0' * 10)
    (partial / 'meta').mkdir()
    tmp = ckpts / f'{STEPS}.orbax-checkpoint-tmp'
    (tmp / 'state').mkdir(parents=True)
    return dict(partial=partial, tmp=tmp, last=last)

  def get(self, name: str) -> Run:
    if name in ('preempted', 'nan', 'evaluate', 'resumed', 'tf', 'longer', 'damaged',
                'disk_full'):
      self.done.wait(TIMEOUT)
      if self.error:
        raise self.error
    if name not in self.runs:
      pytest.fail(f'run {name} was not started (see {self.root})')
    return self.runs[name].wait()

  def stop(self):
    self.done.wait(TIMEOUT)
    for run in self.runs.values():
      if run.proc is not None and run.proc.poll() is None:
        run.proc.kill()
      run.wait()
    if self.tmpfs is not None:
      subprocess.run(['umount', '-l', str(self.tmpfs)], check=False)


def mark_eval_rows(path: Path) -> None:
  """Sets eval/count to -1 in the eval rows of a metrics.jsonl: a row that is still
  there after another evaluation of its step was kept, not replaced."""
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  for row in rows:
    if 'eval/count' in row:
      row['eval/count'] = -1.0
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def damage_array_file(step_dir: Path) -> tuple[Path, int]:
  """Inverts 4 KiB (or the middle half of a smaller file) in the middle of every file
  of a checkpoint's array data (OCDBT's d/ files; all of the state's files where
  there are none), keeping their sizes; returns (the largest of them, its size).
  Every file, not one: with several devices a data file can hold bytes the
  checkpoint does not reference, and damage there changes nothing that is read."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  data_files = [p for p in files if p.parent.name == 'd'] or files
  for path in data_files:
    data = bytearray(path.read_bytes())
    n = min(4096, len(data) // 2)
    mid = (len(data) - n) // 2
    data[mid:mid + n] = bytes(255 - b for b in data[mid:mid + n])
    path.write_bytes(bytes(data))
  largest = max(data_files, key=lambda p: p.stat().st_size)
  return largest, largest.stat().st_size


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  r = Runs(tmp_path_factory.mktemp('train_runs')).start()
  yield r
  r.stop()


# ---------------------------------------------------------------------------
# Tests on the runs.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_reference_run_logs_and_prints_final_top1(runs):
  one = runs.get('one').ok()
  assert 'Final top-1:' in one.output
  m = one.metrics()
  assert sorted(m) == list(range(1, STEPS + 1))
  for k in ('loss', 'top1', 'lr', 'grad_norm', 'images_per_sec', 'agc_clip_fraction'):
    assert k in m[STEPS], k
  assert m[1]['agc_clip_fraction'] > 0  # AGC acts in these runs.
  assert all(v['finite'] == 1 and v['skipped'] == 0 for v in m.values())
  assert f'step {STEPS}/{STEPS} loss' in one.output and 'img/s ETA' in one.output
  assert one.steps() == [STEPS]
  # Without a terminal: the compile's length in one line, before the first step, and
  # a rate from the first step on (the clock starts when its call returns).
  compiled = one.output.find('Compiled the train step in ')
  assert 0 <= compiled < one.output.find('step 1/5 loss'), one.output[-3000:]
  assert all(np.isfinite(v['images_per_sec']) and v['images_per_sec'] > 0
             for v in m.values()), m


@pytest.mark.slow
def test_eight_devices_accumulating_gradients_equal_one_device(runs):
  """8 devices, each accumulating 2 micro-batches of 1 row, train as 1 device with
  the whole batch of 16: the same losses, gradients and state."""
  one, eight = runs.get('one').ok(), runs.get('eight').ok()
  assert '8 devices on 1 hosts' in eight.output and 'micro-batches' in eight.output
  m1, m8 = one.metrics(), eight.metrics()
  # Step 1 and every later one: the accumulated gradient is the big batch's (its norm
  # and the AGC clip fraction are computed on it).
  for k in ('loss', 'grad_norm', 'agc_clip_fraction'):
    np.testing.assert_allclose([m8[s][k] for s in m8], [m1[s][k] for s in m1],
                               rtol=1e-5, err_msg=k)
  assert m1[1]['agc_clip_fraction'] > 0  # AGC clips in these runs.
  for key in ('params', 'opt_state', 'ema_params'):
    assert_trees_close(eight.state()[key], one.state()[key])
  # The check can fail: dropout and stochastic depth make the loss noisy, so equal
  # curves mean equal masks.
  assert np.ptp(one.losses()) > 1e-3


@pytest.mark.slow
def test_a_signal_to_one_host_stops_all_hosts_at_the_same_step(runs):
  p0, p1 = runs.get('two_hosts_0'), runs.get('two_hosts_1')
  for p in (p0, p1):
    assert p.rc == 128 + signal.SIGTERM, p.output[-4000:]
    assert '8 devices on 2 hosts' in p.output
  saved = [re.findall(r'checkpoint saved at step (\d+)', p.output) for p in (p0, p1)]
  assert saved[0] == saved[1] == ['4'], saved
  assert 'Signal (another host): checkpoint saved' in p0.output
  assert 'Signal 15: checkpoint saved' in p1.output
  assert p0.steps() == [4]


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  eight = runs.get('eight').ok()
  two = runs.get('two_hosts_0')
  runs.get('two_hosts_1')
  # Process 0 alone writes the job's metrics: each step once.
  steps = [json.loads(l)['step'] for l in (two.workdir / 'metrics.jsonl').open()]
  assert steps == [1, 2, 3, 4]
  np.testing.assert_allclose(two.losses(), eight.losses()[:4], rtol=1e-5)
  for key in ('params', 'ema_params', 'opt_state'):
    assert_trees_close(two.state(4)[key], eight.state(4)[key])


@pytest.mark.slow
def test_tf_input_pipeline_and_periodic_eval(runs):
  tf = runs.get('tf').ok()
  m, ev = tf.metrics(), tf.metrics('eval')
  assert sorted(m) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v['loss']) and v['finite'] == 1 for v in m.values())
  assert sorted(ev) == [2, 4, STEPS] and ev[STEPS]['count'] == 40
  assert 'Final top-1' in tf.output
  # RandAugment and the TF crops/flips: another augmentation, another curve.
  assert not np.allclose(tf.losses(), runs.get('one').losses(), rtol=1e-4)


@pytest.mark.slow
def test_sigterm_then_rerun_equals_uninterrupted_run_bitwise(runs):
  one = runs.get('one').ok()
  pre = runs.get('preempted')
  k = runs.sigterm_step
  assert pre.rc == 128 + signal.SIGTERM, pre.output[-4000:]
  saved = re.findall(r'Signal 15: checkpoint saved at step (\d+)', pre.output)
  assert len(saved) == 1, pre.output[-4000:]
  stopped = int(saved[0])
  # The flag set by the signal while step k's batch is fetched rides in step k; the
  # hosts read it one step later.
  assert k <= stopped <= k + 2 and stopped < STEPS
  assert runs.preempted_steps == [stopped]
  res = runs.get('resumed').ok()
  half = runs.half_written
  assert half['last'] == stopped
  assert f'Resumed from checkpoint at step {stopped} ' in res.output
  assert f'Checkpoint {half["partial"].name} is damaged (unreadable: meta' in res.output
  assert list(half['partial'].parent.glob(f'damaged-{half["partial"].name}-*'))
  assert res.steps()[-1] == STEPS
  assert_trees_equal(res.state(), one.state())  # params, opt_state, EMA, counters
  # metrics.jsonl holds the interrupted run's steps, then the resumed ones.
  np.testing.assert_array_equal(res.losses(), one.losses())


@pytest.mark.slow
def test_damaged_checkpoint_is_set_aside_and_rerun_equals_uninterrupted_run(runs):
  eight, run = runs.get('eight').ok(), runs.get('damaged')
  assert run.rc == 0, run.output[-4000:]
  path, size = runs.damaged_file
  lines = [l for l in run.output.splitlines() if f'Checkpoint {STEPS} is damaged' in l]
  assert len(lines) == 1, run.output[-4000:]
  moved = list((run.workdir / 'checkpoints').glob(f'damaged-{STEPS}-*'))
  assert len(moved) == 1 and f'moved to {moved[0].name}, trying the one before' in lines[0]
  # Set aside whole, never deleted: the damaged file is still there, as damaged.
  kept = moved[0] / path.relative_to(run.workdir / 'checkpoints' / str(STEPS))
  assert kept.stat().st_size == size
  assert f'Resumed from checkpoint at step {STEPS - 1} ' in run.output
  assert run.steps()[-1] == STEPS
  assert_trees_equal(run.state(), eight.state())  # params, opt_state, EMA, counters


@pytest.mark.slow
def test_checkpoint_without_checksum_is_refused_unless_the_config_accepts_it(runs,
                                                                            tmp_path):
  """'one's only checkpoint with its checksum deleted: --mode=eval sets it aside and
  stops with one line naming the option; moved back, it evaluates with
  --config.accept_unverified_checkpoints=True (a warning says so), as 'one' did."""
  one = runs.get('one').ok()
  workdir = tmp_path / 'wd'
  shutil.copytree(one.workdir, workdir)
  meta_file = workdir / 'checkpoints' / str(STEPS) / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  del meta['checksum']
  meta_file.write_text(json.dumps(meta))
  done = _cli(runs.root, workdir, '--mode=eval')
  out = done.stdout + done.stderr
  assert done.returncode == 1 and 'Traceback' not in out, out[-4000:]
  (moved,) = (workdir / 'checkpoints').glob(f'damaged-{STEPS}-*')
  assert done.stderr.strip().splitlines()[-1] == (
      f'Error: Every checkpoint in {workdir}/checkpoints is damaged (set aside as '
      f'{moved.name}): nothing to resume from. Move one back by hand to use it anyway '
      '(to restore one without a checksum, move it back and pass '
      '--config.accept_unverified_checkpoints=True), or start over with a new '
      '--workdir.')
  assert len([l for l in out.splitlines() if 'it has no checksum' in l]) == 1
  moved.rename(workdir / 'checkpoints' / str(STEPS))
  done = _cli(runs.root, workdir, '--mode=eval',
              '--config.accept_unverified_checkpoints=True')
  out = done.stdout + done.stderr
  assert done.returncode == 0, out[-4000:]
  assert f'Checkpoint {STEPS} has no checksum: restored without verification' in out
  final = [l for l in one.output.splitlines() if l.startswith('Final top-1')]
  assert final and final == [l for l in done.stdout.splitlines()
                             if l.startswith('Final top-1')]


@pytest.mark.slow
def test_workdir_of_another_width_is_refused_untouched(runs, tmp_path):
  one = runs.get('one').ok()
  workdir = tmp_path / 'wd'
  shutil.copytree(one.workdir, workdir)
  (workdir / 'checkpoints' / '9' / 'state').mkdir(parents=True)  # would be set aside
  snapshot = lambda: sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in workdir.rglob('*'))
  before = snapshot()
  done = _cli(runs.root, workdir, '--config.model_kwargs.width=0.25')
  assert done.returncode == 1, done.stderr[-4000:]
  out = done.stdout + done.stderr
  assert 'Traceback' not in out and len(out.splitlines()) < 15, out
  assert out.strip().splitlines()[-1] == (
      f'Error: {workdir}/checkpoints holds checkpoints of another run: step {STEPS} was '
      'written with model_kwargs.width=0.125; this run has model_kwargs.width=0.25. '
      'Nothing was changed: re-run with the config that wrote it, or use a new '
      '--workdir.')
  assert snapshot() == before


@pytest.mark.slow
def test_resume_with_another_schedule_warns_once(runs):
  run = runs.get('longer').ok()
  warned = [l for l in run.output.splitlines() if 'written with the schedule' in l]
  assert len(warned) == 1, run.output[-4000:]
  assert "'total_steps': 5" in warned[0] and "'total_steps': 6" in warned[0]
  assert warned[0].endswith(f'from step {STEPS} the learning rate follows this run\'s')
  assert run.steps()[-1] == 6
  assert 'written with the schedule' not in runs.get('resumed').output  # same schedule


@pytest.mark.slow
def test_full_disk_stops_at_the_failed_save_with_one_message(runs):
  if runs.tmpfs is None:
    pytest.skip(f'cannot mount a small tmpfs here: {runs.tmpfs_error}')
  run = runs.get('disk_full')
  assert run.rc == 1, run.output[-4000:]
  assert 'Traceback' not in run.output and 'ERROR' not in run.output, run.output[-4000:]
  errors = [l for l in run.output.splitlines() if 'Cannot save' in l]
  assert len(errors) == 1 and errors[0].startswith(
      f'Error: Cannot save checkpoint 4 in {run.workdir}/checkpoints: '), run.output[-3000:]
  assert 'OSError: No space left on device (the state needs ' in errors[0]
  assert ('Stopped at step 4; the last good checkpoint, step 2, is kept, nothing of '
          'checkpoint 4 was written.') in errors[0]
  assert sorted(p.name for p in (run.workdir / 'checkpoints').iterdir()) == ['2']
  assert int(run.state(2)['step']) == 2  # The kept checkpoint restores.
  assert sorted(run.metrics()) == [1, 2, 3, 4]  # Nothing after the failed save.


@pytest.mark.slow
def test_second_sigterm_exits_at_once(runs, tmp_path):
  runs.get('one').ok()  # Its programs are in the cache.
  run = Run(tmp_path, 'twice', 1, '--config.data.offline.num_eval=0',
            hook=('slow', '2,3,4,5'))
  (tmp_path / 'tiny.py').write_text(TINY_CONFIG)
  run.start()
  deadline = time.time() + TIMEOUT
  while 'step 1/5' not in run.output and run.proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  run.proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  t0 = time.time()
  run.proc.send_signal(signal.SIGTERM)
  rc = run.proc.wait(timeout=60)
  elapsed = time.time() - t0
  run.rc = rc
  run._out.close()  # pylint: disable=protected-access
  assert rc == 128 + signal.SIGTERM, run.output[-4000:]
  assert elapsed < 3, elapsed
  assert 'Signal 15: saving a checkpoint within two steps, then exiting' in run.output
  assert 'Signal 15 again: exiting now, without saving' in run.output
  assert 'Traceback' not in run.output


@pytest.mark.slow
def test_nan_batch_is_skipped_and_counted(runs):
  run = runs.get('nan')
  m = run.metrics()
  assert sorted(m) == [1, 2, 3, 4, 5]
  assert m[2]['finite'] == 0 and np.isnan(m[2]['loss'])
  assert [m[s]['finite'] for s in range(1, 6)] == [1, 0, 1, 0, 0]
  assert [m[s]['skipped'] for s in range(1, 6)] == [0, 1, 1, 2, 3]
  assert 'skipped 1 non-finite' in run.output
  one = runs.get('one').ok()  # The same run before the NaN, another one after it.
  assert m[1]['loss'] == one.metrics()[1]['loss']
  assert m[3]['loss'] != one.metrics()[3]['loss']
  # The checkpoints of steps 2 and 4 (skipped updates) are finite; the skipped step
  # is counted in the state.
  assert run.steps() == [2, 3, 4]
  for step in run.steps():
    state = run.state(step)
    for v in leaves(state).values():
      assert np.all(np.isfinite(v))
    assert int(state['skipped']) == {2: 1, 3: 1, 4: 2}[step]
  # Step 4's update was skipped: its state is step 3's, bar the counters.
  s3, s4 = run.state(3), run.state(4)
  for key in ('params', 'opt_state', 'ema_params'):
    assert_trees_equal(s4[key], s3[key])


@pytest.mark.slow
def test_consecutive_nans_stop_with_a_clear_error(runs):
  run = runs.get('nan')
  assert run.rc == 1, run.output[-4000:]
  assert 'NonFiniteError: 2 consecutive non-finite losses/gradients at step 5' in run.output
  assert 'config.max_consecutive_nonfinite=2' in run.output
  assert max(run.steps()) == 4  # Nothing written after the limit was hit.


@pytest.mark.slow
def test_eval_mode_and_summaries(runs):
  one, ev = runs.get('one').ok(), runs.get('evaluate').ok()
  final = [l for l in one.output.splitlines() if l.startswith('Final top-1')]
  assert final and final == [l for l in ev.output.splitlines()
                             if l.startswith('Final top-1')]
  assert 'on 40 held-out examples' in final[0]
  ev_metrics = ev.metrics('eval')
  assert ev_metrics[STEPS]['count'] == 40
  # Evaluating step 5 again replaced the training run's eval row of step 5 (marked
  # count -1 in the copy) instead of adding a second one; the train rows are kept.
  rows = [json.loads(l) for l in (ev.workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['eval/count'] for r in rows if r['step'] == STEPS and 'eval/count' in r] == [40]
  assert ev.metrics() == one.metrics()
  # TensorBoard: the event file holds the same scalars as metrics.jsonl.
  from test_metrics_writer import read_scalars  # pylint: disable=g-import-not-at-top
  scalars = read_scalars(one.workdir)
  np.testing.assert_allclose([scalars[s, 'train/loss'] for s in range(1, STEPS + 1)],
                             one.losses(), rtol=1e-6)
  assert scalars[STEPS, 'eval/raw_top1'] == pytest.approx(one.metrics('eval')[STEPS]['raw_top1'])


# ---------------------------------------------------------------------------
# In-process tests (nothing is compiled).
# ---------------------------------------------------------------------------
def tiny_config():
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  ns = {}
  exec(compile(TINY_CONFIG, 'tiny.py', 'exec'), ns)  # pylint: disable=exec-used
  return ns['get_config']('')


@pytest.fixture
def no_compilation():
  """Fails the test if XLA compiles anything, or fetches a program from the cache."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  compiled = []

  def listen_duration(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiled.append(event)

  def listen(event, **kwargs):
    # A hit in the suite's persistent cache (tests/conftest.py) skips the backend
    # compile, and with it the event above.
    if event.startswith('/jax/compilation_cache/'):
      compiled.append(event)

  monitoring.register_event_duration_secs_listener(listen_duration)
  monitoring.register_event_listener(listen)
  yield compiled
  monitoring.unregister_event_duration_listener(listen_duration)
  monitoring.unregister_event_listener(listen)
  assert not compiled, f'something was compiled: {compiled}'


@pytest.mark.parametrize('edit, message', [
    (lambda c: setattr(c, 'bach_size', 8), 'Unknown config key config.bach_size. Did you '
     'mean batch_size'),
    (lambda c: setattr(c.optimizer, 'learning_rate', 0.1),
     'Unknown config key config.optimizer.learning_rate'),
    (lambda c: setattr(c.data, 'sorce', 'tfds'), 'Did you mean source?'),
    (lambda c: setattr(c, 'model', 'F9'), "config.model: Unknown model 'F9'"),
    (lambda c: setattr(c, 'model', 'nf_resnet_50'), 'Did you mean nf_resnet50'),
    (lambda c: c.model_kwargs.__setattr__('widht', 0.5), 'Did you mean width'),
    (lambda c: setattr(c, 'compute_dtype', 'float16'), 'Valid: bfloat16, float32'),
    (lambda c: setattr(c, 'compute_dtype', 'bf16'), 'config.compute_dtype'),
    (lambda c: setattr(c, 'eval_dtype', 'float16'), 'config.eval_dtype'),
    (lambda c: setattr(c, 'batch_size', 0), 'config.batch_size=0 must be a positive'),
    (lambda c: setattr(c, 'grad_accum_steps', 3), 'config.grad_accum_steps=3 must divide'),
    (lambda c: setattr(c.optimizer, 'name', 'lamb'),
     "config.optimizer.name: Unknown optimizer 'lamb'. Valid: sgd, adam, adamw"),
    (lambda c: setattr(c, 'log_every', 0), 'config.log_every=0 must be >= 1'),
    (lambda c: setattr(c.data, 'source', 'imagenet'), 'Valid: tfds, folder, offline'),
], ids=['key', 'nested_key', 'data_key', 'model', 'model_close', 'model_kwargs', 'dtype',
        'dtype_spelling', 'eval_dtype', 'batch', 'accum', 'optimizer', 'log_every', 'data_source'])
def test_bad_config_refused_before_compilation(edit, message, tmp_path, no_compilation):
  from nfnet_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  edit(config)
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert message in str(e.value), str(e.value)
  if 'dtype' in message:  # the valid choices are named
    assert 'bfloat16' in str(e.value) and 'float32' in str(e.value), str(e.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_valid_choices_are_listed():
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.model = 'F9'
  with pytest.raises(ValueError, match=r'Valid: F0, F0\+, F1, .*nf_resnet50.*nf_regnet_b0'):
    configs.validate_config(config, 1, 1)
  config = tiny_config()
  with pytest.raises(ValueError, match=r'config.batch_size=12 must be a positive multiple '
                     r'of the 8 devices \(2 hosts\)'):
    config.batch_size = 12
    configs.validate_config(config, 8, 2)
  config.batch_size = 16
  config.grad_accum_steps = 4
  with pytest.raises(ValueError, match=r'config.grad_accum_steps=4 must divide the '
                     r'per-device batch 2 \(config.batch_size=16 / 8 devices\)'):
    configs.validate_config(config, 8, 2)
  with pytest.raises(ValueError, match="Unknown mode 'test'. Valid: train, eval, "
                     "train_and_eval"):
    configs.validate_config(tiny_config(), 1, 1, mode='test')
  config = tiny_config()
  config.remat = 'conv'
  with pytest.raises(ValueError, match=r"config.remat: Unknown remat policy 'conv'. Did "
                     r"you mean convs\? Valid: none, convs, block_convs, blocks"):
    configs.validate_config(config, 1, 1)
  config.model, config.remat = 'bn_resnet26', 'convs'  # the family's own refusal
  config.model_kwargs = dict(width=0.125, depths=(1, 1))
  with pytest.raises(ValueError, match=r"config.remat: BNResNet takes no remat policy"):
    configs.validate_config(config, 1, 1)


def test_unknown_command_line_key_is_refused(tmp_path):
  """--config.<key>=... overrides (absl + ml_collections, as train.py defines them)."""
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  (tmp_path / 'tiny.py').write_text(TINY_CONFIG)

  def parse(*overrides):
    argv = ['prog', f'--config={tmp_path / "tiny.py"}', *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'test', flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config

  assert parse('--config.optimizer.base_lr=1').optimizer.base_lr == 1
  assert parse('--config.model_kwargs.width=0.5').model_kwargs.width == 0.5
  bad = ['--config.optimizer.learning_rate=1']
  with pytest.raises(AttributeError, match='learning_rate'):
    parse(*bad)  # ml_collections' own error: an AttributeError naming just the key.
  # What train.py's flag parser reports instead:
  assert configs.unknown_override(['prog', '--config=x.py', *bad]) == (
      'Unknown config key config.optimizer.learning_rate (from '
      '--config.optimizer.learning_rate=1). Valid: agc_clipping, '
      'agc_eps, base_lr, end_lr, momentum, name, nesterov, scale_lr_by_batch, '
      'weight_decay')
  assert 'Did you mean batch_size' in configs.unknown_override(['--config.batchsize=8'])
  assert configs.unknown_override(['--config.data.offline.seed=3', '--config.seed=1',
                                 '--config.model_kwargs.anything=1']) is None


@pytest.mark.parametrize('path, args', [
    ('quickstart.py', ['', 'numpy']), ('nfnet.py', ['F0', 'F3', 'F6,sam', 'F7+,sam']),
    ('nf_resnet50.py', ['']), ('nf_regnet.py', ['B0', 'B8']),
    ('finetune_folder.py', ['F0'])])
def test_experiment_configs_are_valid(path, args):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('exp', REPO / 'experiments' / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in args:
    config = module.get_config(arg)
    configs.validate_config(config, num_devices=8, num_processes=1)


def _cli(tmp_path: Path, workdir: Path, *flags: str,
         devices: int = 1) -> subprocess.CompletedProcess:
  """`python -m nfnet_jax.train` with the tiny config (written to tmp_path)."""
  (tmp_path / 'tiny.py').write_text(TINY_CONFIG)
  run = Run(tmp_path, 'cli', devices, *flags, workdir=workdir)
  return subprocess.run(run.cmd, cwd=REPO, env=run.env, capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)


@pytest.mark.slow
def test_full_disk_at_the_start_is_one_line_and_writes_nothing(tmp_path,
                                                               small_filesystem):
  """The workdir's file system is full when the run starts: the first metrics record
  (the event file's header) fails, and the run stops with one line, before training,
  leaving no event file and no checkpoint."""
  from test_metrics_writer import fill  # pylint: disable=g-import-not-at-top
  fill(small_filesystem)
  workdir = small_filesystem / 'run'
  done = _cli(tmp_path, workdir)
  out = done.stdout + done.stderr
  assert done.returncode == 1 and 'Traceback' not in out, out[-4000:]
  assert re.fullmatch(
      rf'Error: Cannot write metrics to {re.escape(str(workdir))}/events\.out\.'
      r'tfevents\.\S+: OSError: No space left on device; nothing was written to it\. '
      r'Stopped at step 0; there is no earlier checkpoint\. Fix the cause \(e\.g\. '
      r'free space\) and re-run the same command to resume\.',
      done.stderr.strip().splitlines()[-1]), out[-4000:]
  assert sorted(p.name for p in workdir.iterdir()) == ['checkpoints', 'metrics.jsonl']
  assert not list((workdir / 'checkpoints').iterdir())
  assert (workdir / 'metrics.jsonl').stat().st_size == 0


def test_eval_mode_refuses_weights_for_another_class_count(tmp_path):
  """Released weights (1000 classes) on 10-class data: --mode=eval would score a
  random classifier; training would replace it (fine-tuning)."""
  from nfnet_jax import errors, pretrained, train  # pylint: disable=g-import-not-at-top
  weights = tmp_path / 'b0_1000.npz'
  shapes = pretrained.model_shapes('nf_regnet_b0', 1000)
  pretrained.save({m: {k: np.zeros(v, np.float32) for k, v in leaves.items()}
                   for m, leaves in shapes.items()}, weights)
  config = tiny_config()
  config.model, config.model_kwargs, config.init_from = 'nf_regnet_b0', {}, str(weights)
  config.data.image_size = config.data.eval_size = 32  # the model's total stride
  with pytest.raises(errors.RunError, match=r"--mode=eval: config.init_from=.*b0_1000.npz "
                     r"does not fit this data's 10 classes \(\['.*linear'\]\['b'\]: "
                     r"\(1000,\) in the file, \(10,\) here\), so it would score an "
                     r"untrained classifier"):
    train.train_and_evaluate(config, str(tmp_path / 'w'), mode='eval')
  assert not (tmp_path / 'w').exists()


def test_signal_handlers_are_restored():
  from nfnet_jax import train  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGTERM)
  with train._catch_signals() as caught:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
      if caught:
        break
      time.sleep(0.01)
    assert caught == [signal.SIGTERM]
  assert signal.getsignal(signal.SIGTERM) is before


def test_numpy_pipeline_gives_each_process_its_own_rows():
  """The global batch is the same for 1 or 2 processes; process p gets its rows."""
  from nfnet_jax import data  # pylint: disable=g-import-not-at-top
  cfg = tiny_config().data
  whole = data.build_train_iter(cfg, 16, 0, start_step=2, process_index=0, process_count=1)
  parts = [data.build_train_iter(cfg, 16, 0, start_step=2, process_index=p,
                                 process_count=2) for p in range(2)]
  for _ in range(2):
    w, a, b = next(whole), next(parts[0]), next(parts[1])
    for key in w:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])
    assert not np.array_equal(a['images'], b['images'])


def test_eta_shows_days(caplog):
  """The paper's recipe runs for days: the ETA must not wrap at 24 h."""
  from nfnet_jax import train  # pylint: disable=g-import-not-at-top
  fmt = train.format_duration
  assert fmt(59) == '00:00:59' and fmt(86399) == '23:59:59'
  assert fmt(40.7 * 3600) == '1d 16:42:00' and fmt(86400) == '1d 00:00:00'
  assert fmt(12 * 86400 + 3661) == '12d 01:01:01' and fmt(float('nan')) == '?'

  class Writer:
    def write(self, *args, **kwargs):
      pass

  # 1000 steps of 64 images at 0.5 img/s: 128,000 s = 1 d 11:33:20.
  metrics = dict(loss=1.0, top1=0.5, lr=0.1)
  with caplog.at_level('INFO'):
    train._log(0, 1000, metrics, dict(skipped=0), Writer(), 0.5, 64)  # pylint: disable=protected-access
  assert 'ETA 1d 11:33:20' in caplog.text


# ---------------------------------------------------------------------------
# data.augment_on='device': the TF pipeline emits uint8 inputs and random
# parameters; the train step mixes, RandAugments and normalises each device's rows.
# (That training so augmented learns: the run of tests/test_digits_folder.py.)
# ---------------------------------------------------------------------------
DEVICE_AUG = '--config.data.augment_on=device'


@pytest.fixture(scope='module')
def device_runs(tmp_path_factory):
  """The tiny config through the TF pipeline (MixUp, CutMix, RandAugment), no eval:

    device     augment_on='device', a checkpoint every step, all kept (the reference)
    host       augment_on='host' (the same batches, augmented by the same function
               on the host's CPU), the same checkpoints
    accum      'device' on 2 devices with grad_accum_steps=2 (micro-batches of 4 rows)
    preempted  'device' with a SIGTERM while a random step's batch is fetched; then
    resumed    the same command again
  """
  root = tmp_path_factory.mktemp('device_runs')
  (root / 'tiny.py').write_text(TINY_CONFIG)
  flags_ = ('--config.data.offline.num_eval=0', DEVICE_AUG)
  out = dict(sigterm_step=random.Random().randint(1, STEPS - 3))
  every = ('--config.checkpoint_every_steps=1', f'--config.keep_checkpoints={STEPS}')
  out['device'] = Run(root, 'device', 1, *flags_, *every, arg='tf').start()
  out['host'] = Run(root, 'host', 1, '--config.data.offline.num_eval=0',
                    *every, arg='tf').start()
  try:
    out['device'].wait()  # Its compiled programs are in the cache for the next ones.
    out['accum'] = Run(root, 'accum', 2, *flags_, '--config.grad_accum_steps=2',
                       arg='tf').start()
    out['preempted'] = Run(root, 'preempted', 1, *flags_, arg='tf',
                           hook=('sigterm', str(out['sigterm_step']))).start().wait()
    out['preempted_steps'] = out['preempted'].steps()
    out['resumed'] = Run(root, 'resumed', 1, *flags_, arg='tf',
                         workdir=out['preempted'].workdir).start()
    yield out
  finally:
    for run in out.values():
      if isinstance(run, Run) and run.proc is not None:
        if run.proc.poll() is None:
          run.proc.kill()
        run.wait()


@pytest.mark.slow
def test_device_augmentation_step_equals_host_step_on_the_same_batch(device_runs):
  """One step fed by augment_on='device' is the step fed by the host-augmented
  batch (one augmentation function: equal batches by construction)."""
  dev, host = device_runs['device'].ok(), device_runs['host'].ok()
  assert dev.steps() == host.steps() == list(range(1, STEPS + 1))
  # Bit for bit: the batches are (uint8 levels, labels, normalised images).
  assert dev.losses()[0] == host.losses()[0]
  assert_trees_equal(dev.state(1), host.state(1))  # params, opt_state, EMA, counters
  # And every later step too.
  np.testing.assert_array_equal(dev.losses(), host.losses())
  assert_trees_equal(dev.state(), host.state())


@pytest.mark.slow
def test_device_augmentation_with_two_devices_and_gradient_accumulation(device_runs):
  """Each device augments its own rows, then splits them into micro-batches: the
  same training as one device with the whole batch."""
  dev, accum = device_runs['device'].ok(), device_runs['accum'].ok()
  np.testing.assert_allclose(accum.losses(), dev.losses(), rtol=1e-5)
  for key in ('params', 'ema_params', 'opt_state'):
    assert_trees_close(accum.state()[key], dev.state()[key])


@pytest.mark.slow
def test_device_augmentation_resumes_bitwise_after_sigterm(device_runs):
  dev, pre = device_runs['device'].ok(), device_runs['preempted']
  k = device_runs['sigterm_step']
  assert pre.rc == 128 + signal.SIGTERM, pre.output[-4000:]
  saved = re.findall(r'Signal 15: checkpoint saved at step (\d+)', pre.output)
  assert len(saved) == 1, pre.output[-4000:]
  stopped = int(saved[0])
  assert k <= stopped <= k + 2 and stopped < STEPS
  assert device_runs['preempted_steps'] == [stopped]
  res = device_runs['resumed'].ok()
  assert f'Resumed from checkpoint at step {stopped} ' in res.output
  assert res.steps()[-1] == STEPS
  assert_trees_equal(res.state(), dev.state())  # params, opt_state, EMA, counters
  np.testing.assert_array_equal(res.losses(), dev.losses())


def test_augment_on_device_refusals_before_compilation(tmp_path, no_compilation):
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.data.augment_on = 'device'
  for use_tf in (False, True):     # Both pipelines feed the device's augmentation.
    config.data.use_tf = use_tf
    configs.validate_config(config, 8, 1)  # 2 rows per device.
  config.data.mix.pairing = 'within_batch'
  configs.validate_config(config, 8, 1)
  with pytest.raises(ValueError, match=r"pairs rows 2i and 2i\+1 on each device: the "
                     r'per-device batch 1 must be even'):
    configs.validate_config(config, 16, 2)
  config.data.mix.enabled = False  # Nothing to pair.
  configs.validate_config(config, 16, 2)
  config.data.augment_on = 'gpu'
  with pytest.raises(ValueError, match=r"data.augment_on must be one of \('host', "
                     r"'device'\), got 'gpu'"):
    configs.validate_config(config, 1, 1)
