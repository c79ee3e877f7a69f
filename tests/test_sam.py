"""Tests of nfnet_jax.sam.sam_gradient against closed-form least-squares gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax.sam import ascent_size, sam_gradient

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
  ga = np_grad(params, x[:k], y[:k])
  norm = np.sqrt(np.sum(ga["w"] ** 2) + ga["b"] ** 2)
  at = {n: np.asarray(params[n], np.float64) + rho * ga[n] / norm for n in params}
  return np_grad(at, x, y), at


def make(seed=0, n=10, d=3):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=d).astype(np.float32), "b": np.float32(0.3)}
  batch = {"x": rng.normal(size=(n, d)).astype(np.float32),
           "y": rng.normal(size=n).astype(np.float32)}
  return params, batch


sam = jax.jit(sam_gradient, static_argnames=("loss_fn", "rho", "fraction", "axis_name"))


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


def test_fraction_uses_only_leading_examples_for_ascent():
  params, batch = make(2)
  want, at = np_sam(params, batch["x"], batch["y"], 0.05, k=2)
  g, (_, aux) = sam(loss_fn, params, batch, jax.random.key(0), rho=0.05, fraction=0.2)
  for n in params:
    np.testing.assert_allclose(g[n], want[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["at"][n], at[n], rtol=1e-6)
  _, full_at = np_sam(params, batch["x"], batch["y"], 0.05, k=10)
  assert not np.allclose(at["w"], full_at["w"], rtol=1e-3)  # the fraction mattered
  # poison the 80% not in the ascent subset: the perturbation stays finite and the
  # same, while the descent gradient (whole batch) turns NaN
  poisoned = {"x": batch["x"], "y": batch["y"].copy()}
  poisoned["y"][2:] = np.nan
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
    # reference: ascent on the first 2 of each device's 8 examples, averaged over
    # devices (= the gradient on their union), THEN normalised
    idx = np.concatenate([np.arange(8 * d, 8 * d + 2) for d in range(4)])
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
