"""Tests of nfnet_jax.sam.sam_gradient against closed-form least-squares gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.sam import ascent_rows, ascent_size, sam_gradient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_fn(params, batch, rng):
  """Mean squared error of a linear model; aux exposes the point it was evaluated at."""
  del rng
  r = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return jnp.mean(r ** 2), {"at": params}


def np_grad(params, x, y):
  """Closed form: d/dw mean(r^2) = 2/n x^T r, d/db = 2/n sum(r)."""
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  r = x.astype(np.float64) @ w + b - y
  return {"w": 2 * x.T @ r / len(y), "b": 2 * r.sum() / len(y)}


def np_sam(params, x, y, rho, k):
  """SAM with the ascent on rows floor(j * n / k), j < k (spread over the batch)."""
  rows = (np.arange(k) * len(y)) // k
  ga = np_grad(params, x[rows], y[rows])
  norm = np.sqrt(np.sum(ga["w"] ** 2) + ga["b"] ** 2)
  at = {n: np.asarray(params[n], np.float64) + rho * ga[n] / norm for n in params}
  return np_grad(at, x, y), at


def make(seed=0, n=10, d=3):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=d).astype(np.float32), "b": np.float32(0.3)}
  batch = {"x": rng.normal(size=(n, d)).astype(np.float32),
           "y": rng.normal(size=n).astype(np.float32)}
  return params, batch


sam = jax.jit(sam_gradient, static_argnames=("loss_fn", "rho", "fraction", "axis_name",
                                             "perturbation"))


def test_ascent_size():
  assert [ascent_size(10, 0.2), ascent_size(3, 0.01), ascent_size(7, 1.0),
          ascent_size(64, 0.2), ascent_size(4, 2.0)] == [2, 1, 7, 13, 4]


@pytest.mark.parametrize("fraction", [1.0, 0.2])
def test_rho_zero_is_plain_gradient(fraction):
  params, batch = make()
  g, (loss, aux) = sam(loss_fn, params, batch, jax.random.key(0), rho=0.0,
                       fraction=fraction)
  plain = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
  for n in params:
    np.testing.assert_array_equal(g[n], plain[n])
    np.testing.assert_array_equal(aux["at"][n], params[n])
  assert float(loss) == pytest.approx(float(loss_fn(params, batch, None)[0]))


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_full_fraction_matches_hand_reference(rho):
  params, batch = make(1)
  g, (loss, aux) = sam(loss_fn, params, batch, jax.random.key(0), rho=rho)
  want, at = np_sam(params, batch["x"], batch["y"], rho, k=10)
  for n in params:
    np.testing.assert_allclose(g[n], want[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["at"][n], at[n], rtol=1e-6)
  r = batch["x"].astype(np.float64) @ at["w"] + at["b"] - batch["y"]
  assert float(loss) == pytest.approx(np.mean(r ** 2), rel=1e-5)  # at perturbed point
  step = np.sqrt(sum(np.sum((np.asarray(aux["at"][n], np.float64) - params[n]) ** 2)
                     for n in params))
  assert step == pytest.approx(rho, rel=1e-5)  # the perturbation has norm rho


def test_fraction_uses_only_the_ascent_rows():
  params, batch = make(2)
  want, at = np_sam(params, batch["x"], batch["y"], 0.05, k=2)
  g, (_, aux) = sam(loss_fn, params, batch, jax.random.key(0), rho=0.05, fraction=0.2)
  for n in params:
    np.testing.assert_allclose(g[n], want[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["at"][n], at[n], rtol=1e-6)
  _, full_at = np_sam(params, batch["x"], batch["y"], 0.05, k=10)
  assert not np.allclose(at["w"], full_at["w"], rtol=1e-3)  # the fraction mattered
  # poison the 80% not in the ascent subset (rows 0 and 5 of 10): the perturbation
  # stays finite and the same, while the descent gradient (whole batch) turns NaN
  poisoned = {"x": batch["x"], "y": batch["y"].copy()}
  poisoned["y"][[1, 2, 3, 4, 6, 7, 8, 9]] = np.nan
  g, (_, aux) = sam(loss_fn, params, poisoned, jax.random.key(0), rho=0.05,
                    fraction=0.2)
  for n in params:
    np.testing.assert_allclose(aux["at"][n], at[n], rtol=1e-6)
  assert np.isnan(np.asarray(g["w"])).all()


def test_zero_gradient_no_nan():
  params, batch = make(3)
  batch["y"] = batch["x"] @ params["w"] + params["b"]  # exact fit: gradient 0
  g, (_, aux) = sam(loss_fn, params, batch, jax.random.key(0), rho=0.05)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((g, aux)))


SHARD_MAP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    if hasattr(jax, "shard_map"):
      shard_map = jax.shard_map
    else:
      from jax.experimental.shard_map import shard_map
    sys.path.insert(0, "tests")
    from test_sam import loss_fn, make, np_grad
    from nfnet_jax.sam import sam_gradient
    mesh = jax.make_mesh((4,), ("data",))
    params, batch = make(4, n=32)

    def step(p, b, rng, vma):
      g, (loss, aux) = sam_gradient(loss_fn, p, b, rng, rho=0.1, fraction=0.25,
                                    axis_name="data")
      # jax.grad of a replicated param: local under check_vma=False (pmap-style,
      # reduce with pmean); already summed over devices under check_vma=True.
      g = jax.tree.map(lambda t: t / 4, g) if vma else jax.lax.pmean(g, "data")
      return g, aux["at"]

    b = jax.device_put(batch, NamedSharding(mesh, P("data")))
    p = jax.device_put(params, NamedSharding(mesh, P()))
    # reference: ascent on every 4th row of the global batch (8 of 32: 2 per device),
    # averaged over devices (= the gradient on their union), THEN normalised
    idx = np.arange(0, 32, 4)
    ga = np_grad(params, batch["x"][idx], batch["y"][idx])
    norm = np.sqrt(np.sum(ga["w"] ** 2) + ga["b"] ** 2)
    at_ref = {n: params[n] + 0.1 * ga[n] / norm for n in params}
    g_ref = np_grad(at_ref, batch["x"], batch["y"])
    for vma in (False, True):
      f = jax.jit(shard_map(lambda p, b, r: step(p, b, r, vma), mesh=mesh,
                            in_specs=(P(), P("data"), P()), out_specs=(P(), P()),
                            check_vma=vma))
      g, at = f(p, b, jax.random.key(0))
      for n in params:
        np.testing.assert_allclose(at[n], at_ref[n], rtol=1e-5)
        np.testing.assert_allclose(g[n], g_ref[n], rtol=1e-4, atol=1e-6)
    print("SAM_SHARD_MAP_OK")
    """)


def test_shard_map_ascent_gradient_is_averaged_before_norm():
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SAM_SHARD_MAP_OK" in out.stdout


@pytest.mark.parametrize("batch, fraction", [(64, 0.2), (4096, 0.2), (48, 0.25), (40, 1 / 3),
                                             (16, 0.05), (32, 1.0)])
def test_ascent_rows_span_the_global_batch_whatever_the_device_count(batch, fraction):
  """The union of the devices' ascent rows is the same set for 1..8 devices: K rows
  evenly spread, floor(j * B / K); with MixUp + CutMix (first half of the global batch
  MixUp, second half CutMix) it holds rows of both kinds. The old rule (first rows of
  each device's batch) gave only MixUp rows on one device."""
  k = ascent_size(batch, fraction)
  want = sorted((np.arange(k) * batch) // k)
  for n in (1, 2, 4, 8):
    if batch % n:
      continue
    local = batch // n
    got = []
    for d in range(n):
      rows, valid = (np.asarray(a) for a in ascent_rows(local, fraction, n, d))
      assert rows.min() >= 0 and rows.max() < local
      assert len(rows) == -(-k // n)  # the same static size on every device
      got += list(d * local + rows[valid > 0])
    assert sorted(got) == want, (n, got)
  if k >= 2:
    mixup, cutmix = [r for r in want if r < batch // 2], [r for r in want if r >= batch // 2]
    assert mixup and cutmix
    assert len(mixup) - len(cutmix) in (0, 1)


EIGHT_DEVICES_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from test_sam import masked_loss, make_masked, np_grad
    from nfnet_jax.sam import sam_gradient
    B, FRACTION, RHO = 64, 0.2, 0.1   # 13 ascent rows: uneven over 8 devices (padding)
    params, batch = make_masked(5, B)
    rows = (np.arange(13) * B) // 13

    def np_at(idx):
      ga = np_grad(params, batch["x"][idx], batch["y"][idx])
      norm = np.sqrt(np.sum(ga["w"] ** 2) + ga["b"] ** 2)
      return {n: params[n] + RHO * ga[n] / norm for n in params}

    def run(n, perturbation):
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
      def step(p, b, r):
        _, (_, aux) = sam_gradient(masked_loss, p, b, r, rho=RHO, fraction=FRACTION,
                                   axis_name="data", perturbation=perturbation)
        return jax.tree.map(lambda t: t[None], aux["at"])
      f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P()),
                                out_specs=P("data"), check_vma=False))
      b = jax.device_put(batch, NamedSharding(mesh, P("data")))
      return jax.device_get(f(params, b, jax.random.key(0)))

    ref = np_at(rows)
    one = run(1, "global")
    eight = run(8, "global")
    for n in params:
      np.testing.assert_allclose(one[n][0], ref[n], rtol=1e-5)
      for d in range(8):  # every device, the same perturbation as one device
        np.testing.assert_allclose(eight[n][d], ref[n], rtol=1e-5)
    per = run(8, "per_device")
    for d in range(8):  # each device: the gradient of its own ascent rows only
      own = rows[(rows >= 8 * d) & (rows < 8 * d + 8)]
      want = np_at(own)
      for n in params:
        np.testing.assert_allclose(per[n][d], want[n], rtol=1e-5)
    assert not np.allclose(per["w"][0], per["w"][1])

    # The train step's SAM: 1 and 8 devices give the same update, although the
    # ascent rows (4 of 16: rows 0, 4, 8, 12) sit on 4 of the 8 devices and the
    # model draws per-example noise (as dropout / stochastic depth do), which must
    # follow each row's global index in the ascent pass too.
    import haiku as hk, optax
    from nfnet_jax import configs, layers, steps

    def noisy(images, is_training):
      w = hk.get_parameter("w", (12, 3), jnp.float32, init=jnp.zeros)
      keep = layers.per_example_uniform(hk.next_rng_key(), images.shape[0]) > 0.4
      h = images.reshape(images.shape[0], -1) @ w
      return {"logits": jnp.tanh(h) * keep[:, None]}

    config = configs.base_config()
    config.update(batch_size=16, grad_accum_steps=1, compute_dtype="float32",
                  label_smoothing=0.0, ema_decay=0.0)
    config.sam.update(enabled=True, rho=0.5, fraction=0.25, perturbation="global")
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    p0 = {"~": {"w": rng.normal(size=(12, 3)).astype(np.float32)}}
    data = dict(images=rng.normal(size=(16, 2, 2, 3)).astype(np.float32),
                labels=np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)],
                mask=np.ones([16], np.float32))

    def train_step(n):
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
      fn = jax.jit(jax.shard_map(steps.make_train_step(config, hk.transform(noisy), tx,
                                                       lambda s: 1.0),
                                 mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=(P(), P(), P()), check_vma=False))
      state = dict(params=p0, opt_state=tx.init(p0), ema_params=p0,
                   step=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), jnp.int32),
                   skipped=jnp.zeros((), jnp.int32), rng=jax.random.key(3))
      b = jax.device_put(data, NamedSharding(mesh, P("data")))
      flags = jax.device_put(np.zeros([n, 2], np.int32), NamedSharding(mesh, P("data")))
      new, metrics, _ = fn(state, b, flags)
      return np.asarray(new["params"]["~"]["w"]), float(metrics["loss"])

    (w1, l1), (w8, l8) = train_step(1), train_step(8)
    assert not np.allclose(w1, p0["~"]["w"])
    np.testing.assert_allclose(w8, w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    print("SAM_EIGHT_OK")
    """)


def masked_loss(params, batch, rng):
  """Sum of weighted squared errors / batch, as the train step's loss (mask weights)."""
  del rng
  r = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return jnp.sum(r ** 2 * batch["mask"]) / 64, {"at": params}


def make_masked(seed, n):
  params, batch = make(seed, n=n)
  batch["mask"] = np.ones([n], np.float32)
  return params, batch


def test_one_and_eight_devices_perturb_with_the_same_rows():
  """Global mode: 1 and 8 (simulated) devices give the same perturbation, from the
  same 13 rows of 64 (uneven over 8 devices: the padding rows weigh 0); per-device
  mode: each device's own rows."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SAM_EIGHT_OK" in out.stdout


def test_uneven_rows_without_a_mask_are_refused():
  params, batch = make(0, n=10)
  mesh = jax.make_mesh((1,), ("data",))
  # One device: 2 rows of 10 always split evenly; no error.
  g, _ = sam(loss_fn, params, batch, jax.random.key(0), rho=0.05, fraction=0.2)
  assert np.isfinite(np.asarray(g["w"])).all()
  with pytest.raises(ValueError, match="perturbation"):
    sam(loss_fn, params, batch, jax.random.key(0), rho=0.05, fraction=0.2,
        perturbation="sideways")
