"""Training with the one augmentation learns: experiments/quickstart.py through the real
CLI with MixUp/CutMix and RandAugment on, augmented in the train step
(augment_on='device').

Where else it runs needs no run of its own: the host pipelines build the same batches
bit for bit (tests/test_augment_placement.py, the TF and the TF-free numpy path), and a
run that augments on the host trains to the same checkpoints as one that augments on
the device (tests/test_train.py, `device_runs`).

A file of its own so that the test runner's workers take these runs beside the other
trained-run files."""
from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # Per run; CI needs a fraction of it.


@pytest.mark.slow
def test_quickstart_with_augmentation_learns(tmp_path: Path):
  """experiments/quickstart.py, shortened (two blocks, 300 steps of 32 images) with
  MixUp/CutMix and RandAugment on (one layer, M=2): held-out top-1 well above chance
  (10 %). (The full quickstart needs ~800 steps.)"""
  config = REPO / 'experiments' / 'quickstart.py'
  cmd = [sys.executable, '-m', 'nfnet_jax.train',
         f'--config={config}',
         f'--workdir={tmp_path / "quick"}',
         '--config.data.augment_on=device', '--config.data.randaugment.enabled=True',
         '--config.data.randaugment.num_layers=1', '--config.data.randaugment.magnitude=2',
         '--config.data.mix.enabled=True',
         '--config.model_kwargs.depths=(1, 1)', '--config.total_steps=300',
         '--config.batch_size=32', '--config.data.offline.num_train=9600',
         '--config.data.offline.num_eval=200', '--config.eval_batch_size=200',
         '--config.warmup_epochs=0.1', '--config.optimizer.base_lr=0.8',
         '--config.log_every=50', '--config.checkpoint_every_steps=0',
         '--config.ema_decay=0.9']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  final = re.findall(r'Final top-1: ([\d.]+)% \(EMA ([\d.]+)%\) on 200 held-out', done.stdout)
  assert len(final) == 1, done.stdout[-2000:] + done.stderr[-2000:]
  assert float(final[0][0]) >= 30.0, final
