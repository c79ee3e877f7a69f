"""The training config (nfnet_jax/configs.py): schedule lengths. Config validation
is tested through the command line in tests/test_cli.py and through
train_and_evaluate in tests/test_train.py."""
import pytest

from nfnet_jax import configs

IMAGENET_TRAIN = 1_281_167


def test_paper_schedule_in_steps():
  c = configs.nfnet_config('F0')  # 360 epochs, 5 warmup, batch 4096
  per_epoch = IMAGENET_TRAIN / 4096  # 312.78 steps
  total, warmup = configs.schedule_lengths(c, IMAGENET_TRAIN)
  assert (total, warmup) == (112_603, 1564)
  assert total == -(-360 * IMAGENET_TRAIN // 4096) and warmup == round(5 * per_epoch)


@pytest.mark.parametrize('total_steps, warmup', [
    (60, 1),          # 60 * 5 / 360 = 0.83: the whole run used to be warmup
    (1000, 14),       # 1000 * 5 / 360 = 13.9
    (56_301, 782),    # half the recipe: half the warmup (1564 / 2)
    (112_603, 1564),  # the recipe's own length: unchanged
    (200_000, 1564),  # longer than the recipe: warmup stays 5 epochs
])
def test_total_steps_scales_warmup_to_its_fraction(total_steps, warmup):
  c = configs.nfnet_config('F0')
  c.total_steps = total_steps
  assert configs.schedule_lengths(c, IMAGENET_TRAIN) == (total_steps, warmup)


def test_no_warmup_stays_none():
  c = configs.nfnet_config('F0')
  c.warmup_epochs, c.total_steps = 0.0, 60
  assert configs.schedule_lengths(c, IMAGENET_TRAIN) == (60, 0)
