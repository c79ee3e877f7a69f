"""The step builders (nfnet_jax/steps.py): the accuracy counted by the train and eval
steps. The steps themselves run in tests/test_train.py (real training processes)."""
import numpy as np
import pytest

from nfnet_jax import steps


def _reference_top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """numpy: 1 where the label is among the first k classes of a row whose logits are
  all finite, the classes ordered by float32 logit, largest first, and among equal
  logits the label last (ties are broken against it)."""
  out = np.zeros(len(logits), np.float32)
  for i, (row, label) in enumerate(zip(np.asarray(logits, np.float32),
                                       labels.argmax(-1))):
    if np.all(np.isfinite(row)):
      order = sorted(range(len(row)), key=lambda j: (-row[j], j == label))
      out[i] = label in order[:k]
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
  got = np.asarray(steps.top_k_correct(logits, labels, k))
  want = _reference_top_k(logits, labels, k)
  np.testing.assert_array_equal(got, want)
  assert got[[0, 3, 6, 9, 12, 15]].sum() == 0  # non-finite rows score 0
  # Finite rows rank as numpy does, with both outcomes present.
  finite = np.all(np.isfinite(logits), axis=-1)
  assert 0 < got[finite].sum() < finite.sum()


@pytest.mark.parametrize('k', [1, 5])
def test_top_k_breaks_ties_against_the_label(k):
  """Logits drawn from 4 values (ties in almost every row), constant rows and NaN
  rows: equal to the numpy reference, constant rows never correct."""
  rng = np.random.default_rng(1)
  n, c = 256, 10
  logits = rng.integers(0, 4, size=(n, c)).astype(np.float32)
  labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
  target = labels.argmax(-1)
  logits[:8] = 0.0                                # constant rows: a dead network
  logits[8:12] = 3.0
  logits[12, :] = np.nan                          # NaN rows
  logits[13, target[13]] = np.nan
  logits[14, (target[14] + 1) % c] = np.nan
  got = np.asarray(steps.top_k_correct(logits, labels, k))
  np.testing.assert_array_equal(got, _reference_top_k(logits, labels, k))
  assert got[:15].sum() == 0
  # Rows where the label ties for place k with another class (would count if ties
  # went to the label) do occur, and score 0.
  t = logits[np.arange(n), target]
  above, tied = (logits > t[:, None]).sum(-1), (logits == t[:, None]).sum(-1) - 1
  tie_at_k = (above < k) & (above + tied >= k) & np.isfinite(logits).all(-1)
  assert tie_at_k[15:].sum() > 10 and got[tie_at_k].sum() == 0
  assert 0 < got.sum() < n


def test_top_k_ties_count_against_the_label():
  logits = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0]], np.float32)
  labels = np.eye(3, dtype=np.float32)[[1, 2]]
  for k, want in ((1, [0.0, 0.0]), (2, [1.0, 0.0]), (3, [1.0, 1.0])):
    np.testing.assert_array_equal(steps.top_k_correct(logits, labels, k), want)


@pytest.mark.parametrize('k', [1, 5])
def test_top_k_of_bfloat16_logits_near_ties_are_ties(k):
  """float32 logits that differ by less than bfloat16's resolution round to equal
  bfloat16 logits (bfloat16 evaluation): the tie counts against the label, and the
  result equals the reference on the bfloat16 values widened to float32."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  n, c = 128, 10
  f32 = rng.normal(size=(n, c)).astype(np.float32)
  labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
  target = labels.argmax(-1)
  # Each row: the label and k other classes at the top, 1e-3 apart (one bfloat16
  # step at 4.0 is 2^-5): in bfloat16 the label ties with all k of them.
  for i in range(n):
    others = [j for j in rng.permutation(c) if j != target[i]][:k]
    f32[i, target[i]] = 4.0 + 1e-3
    f32[i, others] = 4.0 + 1e-3 * np.arange(k)
  assert steps.top_k_correct(f32, labels, k).sum() == n
  bf16 = jnp.asarray(f32, jnp.bfloat16)
  got = np.asarray(steps.top_k_correct(bf16, labels, k))
  np.testing.assert_array_equal(got, _reference_top_k(np.asarray(bf16, np.float32),
                                                      labels, k))
  assert got.sum() == 0


@pytest.mark.slow
def test_a_dead_network_evaluates_to_zero():
  """A real (tiny) NFNet whose classifier is zeroed gives the same logits for every
  class: `steps.evaluate` scores it 0 % top-1 and top-5, at the loss of chance."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs, data, optim, train  # pylint: disable=g-import-not-at-top
  config = configs.base_config()
  config.model_kwargs = dict(width=0.125, group_size=None, depths=(1, 1))
  config.data.source = 'offline'
  config.data.use_tf = False
  config.data.offline.num_train = 16
  config.data.offline.num_eval = 24
  config.data.image_size = config.data.eval_size = 16
  config.batch_size = 8
  info = data.dataset_info(config.data)
  model = train.create_model(config, info['num_classes'])
  tx, schedule = optim.build_optimizer(config.optimizer, 10, 0, config.batch_size)
  trainer = steps.Trainer(config, model, tx, schedule, info['train_size'])
  state = trainer.init_state()
  is_fc = lambda path: path[0].key == 'NFNet/~/linear'  # the classifier (w and b)
  leaves = jax.tree_util.tree_leaves_with_path(state['params'])
  assert sum(is_fc(path) for path, _ in leaves) == 2
  for key in ('params', 'ema_params'):
    state[key] = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if is_fc(path) else x, state[key])
  got = steps.evaluate(trainer, state, data.build_eval_iter(config.data, 8))
  assert got['count'] == 24
  for which in ('raw', 'ema'):
    assert got[f'{which}_top1'] == 0.0 and got[f'{which}_top5'] == 0.0, got
    assert got[f'{which}_loss'] == pytest.approx(np.log(info['num_classes']), rel=1e-6)
