"""The step builders (nfnet_jax/steps.py): the accuracy counted by the train and eval
steps. The steps themselves run in tests/test_train.py (real training processes)."""
import numpy as np
import pytest

from nfnet_jax import steps


def _reference_top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """numpy: 1 where the label is among the k largest logits of a row whose logits are
  all finite (rows without ties: argsort order is then the ranking)."""
  out = np.zeros(len(logits), np.float32)
  for i, (row, label) in enumerate(zip(logits, labels.argmax(-1))):
    if np.all(np.isfinite(row)):
      out[i] = label in np.argsort(-row, kind='stable')[:k]
  return out


@pytest.mark.parametrize('k', [1, 5])
def test_top_k_matches_numpy_and_nan_is_never_correct(k):
  rng = np.random.default_rng(0)
  n, c = 64, 10
  logits = rng.normal(size=(n, c)).astype(np.float32)
  labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
  # Make a third of the rows correct at top-1, so that both outcomes occur.
  target = labels.argmax(-1)
  logits[::3, :][np.arange(len(logits[::3])), target[::3]] = 10.0
  logits[0] = np.nan                             # all NaN
  logits[3, target[3]] = np.nan                  # the label's logit is NaN
  logits[6, (target[6] + 1) % c] = np.nan        # another logit is NaN, label ranks 1st
  logits[9, (target[9] + 1) % c] = np.inf        # +inf elsewhere
  logits[12, target[12]] = np.inf                # +inf at the label
  logits[15, (target[15] + 2) % c] = -np.inf     # -inf elsewhere, label ranks 1st
  got = np.asarray(steps._top_k_correct(logits, labels, k))  # pylint: disable=protected-access
  want = _reference_top_k(logits, labels, k)
  np.testing.assert_array_equal(got, want)
  assert got[[0, 3, 6, 9, 12, 15]].sum() == 0  # non-finite rows score 0
  # Finite rows rank as numpy does, with both outcomes present.
  finite = np.all(np.isfinite(logits), axis=-1)
  assert 0 < got[finite].sum() < finite.sum()


def test_top_k_ties_count_for_the_label():
  logits = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0]], np.float32)
  labels = np.eye(3, dtype=np.float32)[[1, 2]]
  np.testing.assert_array_equal(steps._top_k_correct(logits, labels, 1), [1.0, 0.0])  # pylint: disable=protected-access
  np.testing.assert_array_equal(steps._top_k_correct(logits, labels, 2), [1.0, 1.0])  # pylint: disable=protected-access
