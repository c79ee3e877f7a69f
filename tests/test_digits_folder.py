"""A user's own image folder, end to end: scikit-learn's 8x8 digit scans (shipped with
the package, no download) written as 32 px PNGs in root/train/ and root/val/, and the
quickstart config trained on them through the real CLI.

One run (module fixture `digits_run`) serves every assertion: the folder's val/ split
is used in full (not replaced by a holdout), the start-up line says what the eval
transform does, and the held-out top-1 is far above what the fixed S + 32 eval crop
gave (42.90 % after 100 full-width quickstart steps, measured with the middle half of
each 32 px image; benchmarks/RESULTS.md has this run's figures). The run augments on
the device with every augmentation on (data.augment_on='device': MixUp and CutMix,
RandAugment at one layer of magnitude 2, Inception crops and flips), so the same top-1
shows that training with the augmentation learns.
"""
from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 1438, 359   # 80 / 20 of the 1797 scans, a fixed permutation
SIZE = 32


def write_digits_folder(root: Path) -> None:
  """root/{train,val}/<digit>/<index>.png: each 8x8 scan (0-16) scaled to 0-255,
  upscaled bicubically to SIZE x SIZE, RGB."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  assert len(order) == NUM_TRAIN + NUM_VAL
  for split, ids in (('train', order[:NUM_TRAIN]), ('val', order[NUM_TRAIN:])):
    for i in ids:
      folder = root / split / str(digits.target[i])
      folder.mkdir(parents=True, exist_ok=True)
      scan = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
      image = Image.fromarray(scan).resize((SIZE, SIZE), Image.BICUBIC).convert('RGB')
      image.save(folder / f'{i}.png')


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """The quickstart config (cut to two blocks, batch 64, 300 steps) on the digits
  folder, with data.holdout_fraction=0.1 as a fine-tuning config sets it: the val/
  folder must still be the eval split. MixUp/CutMix, RandAugment and the rest of the
  train transform's random part run in the train step (augment_on='device'). XLA
  optimises as it does for a user (not the suite's -O0): over 300 steps the
  unoptimised code costs more than its shorter compile saves. Returns (completed
  process, seconds)."""
  root = tmp_path_factory.mktemp('digits')
  write_digits_folder(root / 'images')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  cmd = [sys.executable, '-m', 'nfnet_jax.train', '--config=experiments/quickstart.py',
         f'--workdir={root / "run"}', '--config.data.source=folder',
         f'--config.data.folder={root / "images"}', '--config.data.holdout_fraction=0.1',
         f'--config.data.folder_cache_dir={root / "cache"}',
         '--config.model_kwargs.depths=(1,1)', '--config.batch_size=64',
         '--config.total_steps=300', '--config.warmup_epochs=1.0',
         '--config.ema_decay=0.99', '--config.eval_batch_size=128',
         '--config.checkpoint_every_steps=0', '--config.log_every=100',
         '--config.data.augment_on=device', '--config.data.randaugment.enabled=True',
         '--config.data.randaugment.num_layers=1', '--config.data.randaugment.magnitude=2',
         '--config.data.mix.enabled=True']
  start = time.monotonic()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  seconds = time.monotonic() - start
  final = re.findall(r'Final top-1: .*', done.stdout)
  sys.stderr.write(f'digits run: {seconds:.0f} s, {final}\n')  # shown with pytest -s
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done, seconds


def _final(done) -> tuple[float, float, int]:
  m = re.findall(r'Final top-1: ([\d.]+)% \(EMA ([\d.]+)%\) on (\d+) held-out', done.stdout)
  assert len(m) == 1, done.stdout[-2000:] + done.stderr[-2000:]
  return float(m[0][0]), float(m[0][1]), int(m[0][2])


@pytest.mark.slow
def test_val_folder_wins_over_a_holdout_fraction(digits_run):
  done, _ = digits_run
  assert (f'10 classes, {NUM_TRAIN} train and {NUM_VAL} eval images, eval split '
          in done.stderr), done.stderr[-4000:]
  assert 'data.holdout_fraction=0.1 unused' in done.stderr


@pytest.mark.slow
def test_start_up_line_says_what_the_eval_transform_does(digits_run):
  done, _ = digits_run
  assert ('eval: bicubic resize of the whole image to 37x37, centre crop 32x32 (86.5% '
          'of each side; data.eval_crop=squash, data.eval_crop_fraction=auto)'
          in done.stderr), done.stderr[-4000:]


@pytest.mark.slow
def test_held_out_top1_on_every_val_image_is_far_above_the_old_crop(digits_run):
  done, _ = digits_run
  top1, ema_top1, count = _final(done)
  assert count == NUM_VAL
  # Chance is 10 %, the old crop gave 42.90 %. The bar sits well under the lowest of
  # three seeds measured with this command (benchmarks/RESULTS.md): float
  # reassociation on another CPU moves the trajectory as a seed does.
  assert top1 >= 65.0, (top1, ema_top1)
