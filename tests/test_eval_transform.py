"""The eval transform as a user meets it: how much of the image it keeps at small and
at the paper's sizes (through `nfnet_jax.data.build_eval_iter` on PNG folders), the
line a run logs about it and the renamed key (through the CLI), and which split a
folder with train/ and val/ evaluates on (`nfnet_jax.data.dataset_info`)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('tensorflow')
from PIL import Image  # noqa: E402

from nfnet_jax import data  # noqa: E402
from nfnet_jax.data import config as data_config  # noqa: E402
from nfnet_jax.data import transforms as T  # noqa: E402
from nfnet_jax.data._tf import tf  # noqa: E402
from nfnet_jax.models import registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, images: dict[str, list[np.ndarray]]) -> Path:
  """root/<split>/c<k>/<k>.png, one image per class k: images = {split: [uint8 HWC]}."""
  for split, arrays in images.items():
    for k, array in enumerate(arrays):
      (root / split / f'c{k}').mkdir(parents=True)
      Image.fromarray(array).save(root / split / f'c{k}' / f'{k}.png')
  return root


def _eval_images(folder: Path, size: int, **overrides) -> np.ndarray:
  """[N, size, size, 3] float32 0-255 eval images of `folder`'s val/, label order."""
  cfg = data.default_config()
  cfg.source, cfg.folder, cfg.folder_verify = 'folder', str(folder), 'none'
  cfg.folder_cache_dir = str(folder / '.cache')
  cfg.image_size = cfg.eval_size = size
  cfg.normalize = False
  for key, value in overrides.items():
    cfg[key] = value
  batches = list(data.build_eval_iter(cfg, 2, 0, 1))
  images = np.concatenate([b['images'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches]).argmax(-1)
  mask = np.concatenate([b['mask'] for b in batches]) > 0
  return images[mask][np.argsort(labels[mask])]


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
  rng = np.random.default_rng(0)
  val = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
  root = _folder(tmp_path_factory.mktemp('small'), {'train': val, 'val': val})
  return root, val


def test_small_images_keep_six_sevenths_of_the_side(small_folder):
  """Inception-crop training at 32 px: resize to 37 (not 64), cut the centre 32, so
  the crop keeps 86.5 % of each side, not the middle half."""
  root, val = small_folder
  got = _eval_images(root, 32)
  for image, out in zip(val, got):
    ref = T.resize(tf.constant(image), 37).numpy()[3:35, 3:35]
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_whole_image_training_crops_evaluate_without_a_crop(small_folder):
  """pad_crop (CIFAR-style), resize and none train on whole images; eval too."""
  root, val = small_folder
  for crop in ('pad_crop', 'resize', 'none'):
    got = _eval_images(root, 32, crop=crop)
    np.testing.assert_array_equal(got, np.stack(val).astype(np.float32), err_msg=crop)


def test_explicit_fraction_sets_the_crop(small_folder):
  root, val = small_folder
  got = _eval_images(root, 32, eval_crop_fraction=0.5)   # the old middle half
  np.testing.assert_allclose(got[0], T.resize(tf.constant(val[0]), 64).numpy()[16:48, 16:48],
                             atol=1e-3)
  got = _eval_images(root, 32, eval_crop_fraction=1.0, crop='inception')
  np.testing.assert_array_equal(got[0], val[0].astype(np.float32))


@pytest.mark.parametrize('fraction', [-0.1, 1.5])
def test_fraction_outside_zero_one_is_refused(small_folder, fraction):
  root, _ = small_folder
  with pytest.raises(ValueError, match=r'data.eval_crop_fraction must be in \(0, 1\]'):
    _eval_images(root, 32, eval_crop_fraction=fraction)


def test_registered_sizes_keep_the_papers_resize_plus_32():
  """Every registered model's train and test size (all >= 192 px) resizes to
  S + 32 (DeepMind's resize_crop_32 / crop_resize, and the Inception fallback)."""
  sizes = set()
  for name in registry.names():
    info = registry.info(name)
    sizes |= {int(info['train_imsize']), int(info['test_imsize'])}
  assert min(sizes) == 192
  for s in sorted(sizes):
    assert data_config.eval_resize_side(s) == s + 32, s
    assert data_config.eval_resize_side(s, 0.0, 'inception') == s + 32, s


def test_papers_windows_at_nfnet_and_regnet_test_sizes(tmp_path):
  """F0's squash at 256 px (resize 288, offset 16) and NF-RegNet B0's centre crop at
  224 px (side int(min(h, w) / 256 * 224)) on a 300x200 image, bit for bit."""
  image = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
  root = _folder(tmp_path / 'big', {'train': [image], 'val': [image]})
  got = _eval_images(root, 256)
  want = T.resize(tf.constant(image), 288).numpy()[16:272, 16:272]
  np.testing.assert_array_equal(got[0], want)
  got = _eval_images(root, 224, eval_crop='center_crop')
  side = int(200 / 256 * 224)                        # 175: DeepMind's crop_resize
  top, left = (300 - side + 1) // 2, (200 - side + 1) // 2
  want = T.resize(tf.constant(image[top:top + side, left:left + side]), 224).numpy()
  np.testing.assert_array_equal(got[0], want)


def test_describe_eval_at_the_papers_sizes():
  cfg = data.default_config()
  cfg.model = 'F0'
  assert data.describe_eval(cfg).startswith(
      'eval: bicubic resize of the whole image to 288x288, centre crop 256x256 (88.9% ')
  cfg.model, cfg.eval_crop = 'nf_regnet_b0', 'center_crop'
  assert data.describe_eval(cfg).startswith(
      'eval: centre square of 87.5% of the short side, bicubic resize to 224x224')


def _env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))


def test_cli_logs_the_eval_transform_and_refuses_the_old_key(small_folder, tmp_path):
  """Two commands, in parallel: --mode=eval on an empty workdir logs what the eval
  transform does once its config is valid (then stops: nothing to evaluate); the
  old key data.eval_resize_margin gets one 'renamed to' line."""
  root, _ = small_folder
  base = [sys.executable, '-m', 'nfnet_jax.train', '--config=experiments/quickstart.py']
  run = subprocess.Popen(
      [*base, f'--workdir={tmp_path / "w"}', '--mode=eval', '--config.data.source=folder',
       f'--config.data.folder={root}', '--config.data.folder_verify=none',
       f'--config.data.folder_cache_dir={tmp_path / "cache"}'],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  old = subprocess.run([*base, '--check_config', '--config.data.eval_resize_margin=0'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                       check=False)
  out, err = run.communicate(timeout=300)
  assert ('eval: bicubic resize of the whole image to 37x37, centre crop 32x32 (86.5% of '
          'each side; data.eval_crop=squash, data.eval_crop_fraction=auto)' in err), err
  assert old.returncode == 1 and 'Traceback' not in old.stderr, old.stderr
  lines = [l for l in old.stderr.splitlines() if 'eval_resize_margin' in l]
  assert lines == ['FATAL Flags parsing error: config.data.eval_resize_margin was renamed '
                   'to config.data.eval_crop_fraction (the share of the side the eval crop '
                   'keeps: 1.0 = no crop, 0 = auto; see docs/data.md)'], old.stderr
  assert not (tmp_path / 'w').exists(), out


def _finetune_data(folder: Path):
  """The data config of experiments/finetune_folder.py, pointed at `folder`."""
  spec = importlib.util.spec_from_file_location(
      'finetune_folder', REPO / 'experiments' / 'finetune_folder.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config('F0').data
  cfg.folder, cfg.folder_verify = str(folder), 'none'
  cfg.folder_cache_dir = str(folder / '.cache')
  return cfg


def test_val_folder_wins_over_the_finetune_holdout(tmp_path, caplog):
  """finetune_folder.py sets holdout_fraction=0.1; a val/ folder is still the eval
  split, in full, and every training image trains. Without val/, 10 % is held out."""
  rng = np.random.default_rng(2)
  img = lambda: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # noqa: E731
  for split, n in (('train', 10), ('val', 3)):
    for k in range(2):
      (tmp_path / 'both' / split / f'c{k}').mkdir(parents=True)
      (tmp_path / 'flat' / f'c{k}').mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(img()).save(tmp_path / 'both' / split / f'c{k}' / f'{i}.png')
        if split == 'train':
          Image.fromarray(img()).save(tmp_path / 'flat' / f'c{k}' / f'{i}.png')
  caplog.set_level('INFO')
  info = data.dataset_info(_finetune_data(tmp_path / 'both'))
  assert (info['num_train'], info['num_eval']) == (20, 6)
  assert ('2 classes, 20 train and 6 eval images, eval split '
          f'{tmp_path / "both" / "val"} (data.holdout_fraction=0.1 unused' in caplog.text)
  info = data.dataset_info(_finetune_data(tmp_path / 'flat'))
  assert (info['num_train'], info['num_eval']) == (18, 2)
  assert '18 train and 2 eval images, eval split 0.1 of each class of' in caplog.text
