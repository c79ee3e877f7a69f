"""Tests of the NFNet recipe in nfnet_jax.optim against hand-written numpy math."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nfnet_jax import optim

NO_DECAY = ("gain", "skip_gain", "bias", "b", "scale", "offset")


def np_agc(g, p, clipping, eps):
  """Paper's AGC by hand (leading axes reduced; <=1 non-unit dims = one unit)."""
  g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
  lead = 0 if sum(d != 1 for d in g.shape) <= 1 else {2: 1, 3: 1, 4: 3}[g.ndim]
  gu = g.reshape(-1, 1) if lead == 0 else g.reshape(int(np.prod(g.shape[:lead])), -1)
  pu = p.reshape(gu.shape)
  out = gu.copy()
  for j in range(gu.shape[1]):
    gn, mx = np.linalg.norm(gu[:, j]), clipping * max(np.linalg.norm(pu[:, j]), eps)
    if gn > mx:
      out[:, j] *= mx / gn
  return out.reshape(g.shape)


def np_lr(t, peak, warmup, total, end=0.0):
  if t < warmup:
    return peak * t / warmup
  c = min((t - warmup) / (total - warmup), 1.0)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * c))


def small_tree(seed):
  rng = np.random.default_rng(seed)
  shapes = {
      "NFNet/~/stem_conv0": {"w": (3, 3, 2, 4), "gain": (4,), "bias": (4,)},
      "NFNet/~/nf_block": {"skip_gain": ()},
      "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (4, 2), "b": (2,)},
      "NFNet/~/linear": {"w": (4, 3), "b": (3,)},
  }
  params = {m: {n: (rng.normal(size=s) * 0.5 if n != "bias" else np.zeros(s))
                .astype(np.float32) for n, s in d.items()} for m, d in shapes.items()}
  return params, rng


def test_schedule_values():
  s = optim.lr_schedule(0.1, 4096, total_steps=1000, warmup_steps=50)
  peak = 0.1 * 4096 / 256
  for t, want in [(0, 0.0), (25, peak / 2), (50, peak), (525, peak / 2),
                  (1000, 0.0), (1500, 0.0)]:
    assert float(s(t)) == pytest.approx(want, abs=1e-6), t
  for t in [1, 13, 49, 51, 300, 777, 999]:
    assert float(s(t)) == pytest.approx(np_lr(t, peak, 50, 1000), rel=1e-5, abs=1e-6), t
  vals = np.asarray(jax.jit(jax.vmap(s))(jnp.arange(1001)))
  assert (np.diff(vals[:51]) > 0).all() and (np.diff(vals[50:]) <= 1e-7).all()
  s = optim.lr_schedule(0.4, 1024, 100, 10, end_lr=0.001, scale_by_batch=False)
  assert float(s(10)) == pytest.approx(0.4) and float(s(100)) == pytest.approx(0.001)


def test_default_config_is_the_recipe():
  c = optim.default_config()
  assert (c.name, c.base_lr, c.scale_lr_by_batch, c.end_lr, c.momentum, c.nesterov,
          c.weight_decay, c.agc_clipping, c.agc_eps) == (
              "sgd", 0.1, True, 0.0, 0.9, True, 2e-5, 0.01, 1e-3)


def _hand_trajectory(params, grads_seq, lr_fn, wd, mu, clip, eps, order="agc_wd",
                     clip_classifier=False):
  p = {m: {n: v.astype(np.float64) for n, v in d.items()} for m, d in params.items()}
  mom = {m: {n: np.zeros_like(v) for n, v in d.items()} for m, d in p.items()}
  for t, grads in enumerate(grads_seq):
    for m, d in p.items():
      for n in d:
        g = np.asarray(grads[m][n], np.float64)
        decay = n not in NO_DECAY
        clipped = clip_classifier or not (m == "NFNet/~/linear" and n == "w")
        if order == "wd_agc" and decay:
          g = g + wd * d[n]
        if clipped:
          g = np_agc(g, d[n], clip, eps)
        if order == "agc_wd" and decay:
          g = g + wd * d[n]
        mom[m][n] = mu * mom[m][n] + g
        d[n] = d[n] - lr_fn(t) * (g + mu * mom[m][n])
  return p


def test_sgd_trajectory_agc_then_decay_then_nesterov():
  params, rng = small_tree(0)
  # per-unit grad scales spanning 1e-3..10 so some units are clipped, others not
  grads_seq = [jax.tree.map(lambda x: (rng.normal(size=x.shape) * 10.0 ** rng.uniform(
      -3, 1, size=x.shape[-1:] if x.ndim else ())).astype(np.float32), params)
               for _ in range(6)]
  cfg = ml_collections.ConfigDict(dict(optim.default_config()))
  cfg.weight_decay, cfg.agc_clipping = 0.05, 0.02  # large, so the order shows
  tx, sched = optim.build_optimizer(cfg, total_steps=8, warmup_steps=2, batch_size=512)
  state, p = tx.init(params), params
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for g in grads_seq:
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
  lr = lambda t: np_lr(t, 0.2, 2, 8)
  for t in range(8):
    assert float(sched(t)) == pytest.approx(lr(t), rel=1e-6, abs=1e-9)
  ref = _hand_trajectory(params, grads_seq, lr, 0.05, 0.9, 0.02, 1e-3)
  swapped = _hand_trajectory(params, grads_seq, lr, 0.05, 0.9, 0.02, 1e-3, "wd_agc")
  differs = 0
  for m in params:
    for n in params[m]:
      np.testing.assert_allclose(p[m][n], ref[m][n], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{m}/{n}")
      differs += not np.allclose(ref[m][n], swapped[m][n], rtol=1e-3, atol=1e-5)
      assert not np.allclose(p[m][n], params[m][n]), f"{m}/{n} did not move"
  # the order matters for the clipped and decayed leaves (conv w, SE w): pinned
  assert differs == 2
  clip_all = _hand_trajectory(params, grads_seq, lr, 0.05, 0.9, 0.02, 1e-3,
                              clip_classifier=True)
  assert not np.allclose(clip_all["NFNet/~/linear"]["w"], p["NFNet/~/linear"]["w"],
                         rtol=1e-3)  # and the classifier weight is not clipped


def test_agc_can_be_disabled():
  params, rng = small_tree(1)
  g = jax.tree.map(lambda x: np.full(x.shape, 3.0, np.float32), params)
  for off in (0.0, None):
    cfg = dict(agc_clipping=off, weight_decay=0.0, base_lr=0.1, end_lr=0.0)
    tx, _ = optim.build_optimizer(cfg, 10, 2, 256)
    state = tx.init(params)
    _, state = tx.update(g, state, params)   # step 0: lr 0
    u, _ = tx.update(g, state, params)      # step 1: lr 0.05
    plain = -0.05 * (3.0 + 0.9 * (0.9 * 3.0 + 3.0))
    for leaf in jax.tree.leaves(u):
      np.testing.assert_allclose(leaf, plain, rtol=1e-6)


def test_weight_decay_mask():
  p = {"conv": {"w": np.ones((2, 2)), "gain": np.ones(2), "bias": np.ones(2)},
       "blk": {"skip_gain": np.ones(())}, "lin": {"w": np.ones(3), "b": np.ones(3)},
       "Dense_0": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
       "bn": {"scale": np.ones(2), "offset": np.ones(2)}}
  p = jax.tree.map(lambda x: x.astype(np.float32) * 2.0, p)
  g = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.bfloat16), p)
  tx = optim.add_weight_decay(0.1)
  out, _ = tx.update(g, tx.init(p), p)
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    name = path[-1].key
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(leaf, np.float32),
                               1.0 if name in NO_DECAY else 1.2, rtol=1e-2)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, tx.init(p))


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_other_optimizers(name):
  p = {"lin": {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}}
  g = jax.tree.map(np.zeros_like, p)
  cfg = dict(name=name, base_lr=1e-2, scale_lr_by_batch=False, weight_decay=0.1,
             agc_clipping=None)
  tx, _ = optim.build_optimizer(cfg, 10, 0, 256)
  state = tx.init(p)
  u, state = tx.update(g, state, p)
  assert np.all(np.asarray(u["lin"]["w"]) < 0)        # decay shrinks the weight
  np.testing.assert_array_equal(u["lin"]["b"], 0.0)    # never the bias
  with pytest.raises(ValueError, match="Unknown optimizer 'lion'. Valid: sgd, adam, adamw"):
    optim.build_optimizer(dict(name="lion"), 10, 0, 256)


def test_softmax_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  ids = rng.integers(0, 5, 6)
  onehot = np.eye(5, dtype=np.float32)[ids]
  soft = 0.7 * onehot + 0.3 * np.eye(5, dtype=np.float32)[(ids + 1) % 5]
  z = logits.astype(np.float64)
  logp = z - z.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  for lab in (onehot, soft):
    for ls in (0.0, 0.1):
      want = -((lab * (1 - ls) + ls / 5) * logp).sum(1)
      got = optim.softmax_cross_entropy(logits, lab, ls)
      assert got.shape == (6,) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(optim.softmax_cross_entropy(logits, ids),
                             optim.softmax_cross_entropy(logits, onehot), rtol=1e-6)
  np.testing.assert_allclose(optim.softmax_cross_entropy(logits, onehot, 0.0),
                             optax.softmax_cross_entropy(logits, onehot), rtol=1e-5)
  out = optim.softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), soft)
  assert out.dtype == jnp.float32


def test_ema():
  assert float(optim.ema_decay(0)) == pytest.approx(0.1)
  assert float(optim.ema_decay(5)) == pytest.approx(6 / 15)
  assert float(optim.ema_decay(10**7)) == pytest.approx(0.99999, abs=1e-7)
  assert float(optim.ema_decay(3, decay=0.2)) == pytest.approx(0.2)
  rng = np.random.default_rng(0)
  p0 = {"w": rng.normal(size=(3, 2)).astype(np.float32), "step": np.int32(7)}
  ema, ref = jax.tree.map(lambda x: x, p0), p0["w"].astype(np.float64)
  p = p0
  for t in range(4):  # t = number of updates done before this one
    p = {"w": jnp.asarray(p["w"] + rng.normal(size=(3, 2)), jnp.bfloat16),
         "step": np.int32(8 + t)}
    ema = jax.jit(optim.ema_update)(ema, p, t)
    d = min(0.99999, (1 + t) / (10 + t))
    ref = d * ref + (1 - d) * np.asarray(p["w"], np.float64)
  assert ema["w"].dtype == jnp.float32 and int(ema["step"]) == 11
  np.testing.assert_allclose(ema["w"], ref, rtol=1e-5)
