"""Tests of nfnet_jax.agc against a hand-written numpy reference, optax, and real uses."""

import functools
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnet_jax.agc import (agc, classifier_mask, clip_fraction, nfnet_mask,
                           output_first_unit_axes, path_names)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Leaf shapes of every layout the default rule knows (and edge cases of the squeeze).
SHAPES = [(), (1,), (7,), (1, 5), (5, 1), (6, 4), (3, 4, 5), (3, 3, 2, 4),
          (1, 1, 4, 8), (1, 1, 1, 6), (2, 2, 2, 3, 4)]


def np_units(x):
  """[unit_size, num_units] float64 view of x under the paper's rule, by hand."""
  x = np.asarray(x, np.float64)
  if sum(d != 1 for d in x.shape) <= 1:
    return x.reshape(-1, 1)                         # one unit
  lead = {2: 1, 3: 1, 4: 3, 5: 4}[x.ndim]           # reduced leading axes
  return x.reshape(int(np.prod(x.shape[:lead])), -1)


def np_agc(g, p, clipping=0.01, eps=1e-3):
  """Hand reference: per unit, if ||G|| > c*max(||W||,eps): G *= c*max(||W||,eps)/||G||."""
  gu, pu = np_units(g), np_units(p)
  out = gu.copy()
  for j in range(gu.shape[1]):
    gn = np.sqrt(np.sum(gu[:, j] ** 2))
    mx = clipping * max(np.sqrt(np.sum(pu[:, j] ** 2)), eps)
    if gn > mx:
      out[:, j] = gu[:, j] * mx / gn
  return out.reshape(np.shape(g))


def np_frac(g, p, clipping=0.01, eps=1e-3):
  gu, pu = np_units(g), np_units(p)
  gn = np.sqrt((gu ** 2).sum(0))
  return float(np.mean(gn > clipping * np.maximum(np.sqrt((pu ** 2).sum(0)), eps)))


def random_tree(seed, dtype=np.float32):
  """Params and grads over SHAPES; each unit's grad scale is random so that some
  units are clipped and others not; plus an all-zero grad and an all-zero param."""
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i, s in enumerate(SHAPES):
    p = rng.normal(size=s).astype(np.float32)
    g = rng.normal(size=s) * 10.0 ** rng.uniform(-4, 0, size=s[-1:] if s else ())
    params[f"l{i}"], grads[f"l{i}"] = p, g.astype(dtype)
  params["zero_p"] = np.zeros((4, 3), np.float32)
  grads["zero_p"] = rng.normal(size=(4, 3)).astype(dtype)
  params["zero_g"] = rng.normal(size=(3, 3, 2, 2)).astype(np.float32)
  grads["zero_g"] = np.zeros((3, 3, 2, 2), dtype)
  return params, grads


@jax.jit
def _agc_jit(grads, params, clipping):
  """One compiled agc per tree structure (clipping is traced), shared by the tests."""
  return agc(clipping).update(grads, optax.EmptyState(), params)[0]


def run_agc(grads, params, eager=False, **kw):
  if eager:
    tx = agc(**kw)
    return tx.update(grads, tx.init(params), params)[0]
  if set(kw) <= {"clipping"}:
    return _agc_jit(grads, params, kw.get("clipping", 0.01))
  tx = agc(**kw)
  return jax.jit(tx.update)(grads, tx.init(params), params)[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clipping", [0.01, 0.2])
def test_matches_numpy_reference(seed, clipping):
  params, grads = random_tree(seed)
  out = run_agc(grads, params, clipping=clipping)
  fracs = []
  for k in params:
    ref = np_agc(grads[k], params[k], clipping)
    assert out[k].dtype == jnp.float32 and out[k].shape == grads[k].shape
    np.testing.assert_allclose(out[k], ref, rtol=2e-6, atol=1e-12, err_msg=k)
    fracs.append(np_frac(grads[k], params[k], clipping))
  assert 0 < np.mean(fracs) < 1  # both clipped and unclipped units were exercised
  # zero params: the eps floor still clips, to norm clipping*eps per column, no NaN
  np.testing.assert_allclose(np.linalg.norm(out["zero_p"], axis=0),
                             clipping * 1e-3, rtol=1e-5)
  np.testing.assert_array_equal(out["zero_g"], 0.0)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_bf16_grads_norms_in_f32_and_dtype_kept():
  params, grads = random_tree(3, dtype=jnp.bfloat16)
  out = run_agc(grads, params)
  for k in params:
    assert out[k].dtype == jnp.bfloat16, k
    g32 = np.asarray(grads[k], np.float32)
    ref = np_agc(g32, params[k]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out[k], np.float32), ref, rtol=1e-2,
                               atol=0, err_msg=k)
  # unclipped units come back bit-identical
  p = {"w": np.ones((8, 2), np.float32)}
  g = {"w": jnp.asarray(np.full((8, 2), 1e-4), jnp.bfloat16)}
  assert (run_agc(g, p)["w"] == g["w"]).all()
  # float32 norms: a unit of 4096 bf16 ones has norm 64 (a bf16 running sum of
  # squares would stall at 256 -> norm 16); threshold 0.7 * 100 = 70 -> not clipped
  g = {"w": jnp.ones((4096, 1), jnp.bfloat16)}
  p = {"w": np.full((4096, 1), 100 / 64, np.float32)}
  assert (run_agc(g, p, clipping=0.7)["w"] == g["w"]).all()
  o = run_agc(g, p, clipping=0.25)["w"]  # threshold 25 -> scale 25/64
  np.testing.assert_allclose(np.asarray(o, np.float32), 25 / 64, rtol=4e-3)
  # the clip decision uses the float32 norm sqrt(3000) = 54.772 (in bf16 the sum of
  # squares rounds to 3008 and its sqrt to 54.75); threshold 54.765 lies between
  g = {"w": jnp.ones((3000, 1), jnp.bfloat16)}
  p = {"w": np.full((3000, 1), 2 * 54.765 / np.sqrt(3000), np.float32)}
  assert float(clip_fraction(g, p, clipping=0.5)["w"]) == 1.0


def test_idempotent():
  params, grads = random_tree(4)
  once = run_agc(grads, params)
  twice = run_agc(once, params)
  for k in params:
    np.testing.assert_allclose(twice[k], once[k], rtol=1e-6, atol=1e-12, err_msg=k)
  assert any(not np.allclose(once[k], grads[k]) for k in params)


def test_masks_pass_through():
  params, grads = random_tree(5)
  full = run_agc(grads, params)
  sub = ("l2", "l5", "l6", "l7", "zero_p")
  params, grads = {k: params[k] for k in sub}, {k: grads[k] for k in sub}
  keep = {"l6", "l7", "zero_p"}
  tree_mask = {k: k not in keep for k in params}
  for mask in (tree_mask, lambda p: {k: k not in keep for k in p}):
    out = run_agc(grads, params, mask=mask)
    for k in params:
      want = grads[k] if k in keep else full[k]
      np.testing.assert_array_equal(out[k], want, err_msg=k)
    assert not np.array_equal(full["l7"], grads["l7"])  # the mask mattered
  # a prefix mask (one bool for a whole subtree)
  nested_p = {"a": {"x": params["l5"], "y": params["l7"]}, "b": params["l6"]}
  nested_g = {"a": {"x": grads["l5"], "y": grads["l7"]}, "b": grads["l6"]}
  out = run_agc(nested_g, nested_p, mask={"a": False, "b": True})
  np.testing.assert_array_equal(out["a"]["x"], grads["l5"])
  np.testing.assert_array_equal(out["a"]["y"], grads["l7"])
  np.testing.assert_allclose(out["b"], full["l6"], rtol=1e-6)


@jax.jit
def _optax_agc_jit(grads, params):
  tx = optax.adaptive_grad_clip(0.01, eps=1e-3)
  return tx.update(grads, tx.init(params), params)[0]


@pytest.mark.parametrize("seed", [0, 7])
def test_agrees_with_optax_adaptive_grad_clip(seed):
  # optax's unitwise_norm uses the same unit axes for ranks 0-5 (checked in its
  # source); it compares with `<` and divides by max(norm, 1e-6), both of which only
  # differ from ours on measure-zero ties or norms below 1e-6, avoided here.
  params, grads = random_tree(seed)
  ref = _optax_agc_jit(grads, params)
  ours = run_agc(grads, params)
  for k in params:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-12, err_msg=k)
  # with an explicit axis (a 1-D conv kernel (W, I, O): units over (0, 1))
  p = {"k": np.random.default_rng(seed).normal(size=(5, 3, 4)).astype(np.float32)}
  g = {"k": np.random.default_rng(seed + 1).normal(size=(5, 3, 4)).astype(np.float32)}
  tx = optax.adaptive_grad_clip(0.01, axis=(0, 1))
  ref = tx.update(g, tx.init(p), p)[0]["k"]
  ours = run_agc(g, p, unit_axes=lambda path, x: (0, 1))["k"]
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  assert not np.allclose(ours, run_agc(g, p)["k"])  # the override changed the units


def test_unit_axes_override_and_errors():
  rng = np.random.default_rng(0)
  p = {"conv1d": rng.normal(size=(5, 3, 4)).astype(np.float32),
       "lin": rng.normal(size=(6, 4)).astype(np.float32)}
  g = jax.tree.map(lambda x: x * 3.0, p)
  sel = lambda path, x: (0, 1) if jax.tree_util.keystr(path) == "['conv1d']" else None
  out = run_agc(g, p, unit_axes=sel)
  np.testing.assert_allclose(  # reference: (W, I, O) as (W*I, O) columns
      out["conv1d"], np_agc(g["conv1d"].reshape(15, 4), p["conv1d"].reshape(15, 4))
      .reshape(5, 3, 4), rtol=1e-6)
  np.testing.assert_allclose(out["lin"], np_agc(g["lin"], p["lin"]), rtol=1e-6)
  x6 = {"w": np.ones((2, 2, 2, 2, 2, 2), np.float32)}
  with pytest.raises(ValueError, match="unit_axes"):
    run_agc(x6, x6)
  out6 = run_agc(x6, x6, unit_axes=lambda path, x: tuple(range(5)))["w"]
  np.testing.assert_allclose(out6, 0.01, rtol=1e-6)
  tx = agc()
  with pytest.raises(ValueError, match="params"):
    tx.update(g, tx.init(p))
  with pytest.raises(ValueError, match="shape"):
    tx.update({"w": np.ones((2, 3))}, (), {"w": np.ones((3, 2))})


def test_non_array_leaves_pass_through():
  """Equinox-style trees: functions, ints and None gradients are left alone."""
  act = jax.nn.relu
  params = {"w": np.ones((3, 2), np.float32), "act": act, "n": 3,
            "ids": np.arange(4), "frozen": np.ones(2, np.float32)}
  grads = {"w": np.full((3, 2), 5.0, np.float32), "act": act, "n": 3,
           "ids": np.arange(4), "frozen": None}
  out = run_agc(grads, params, eager=True)
  assert out["act"] is act and out["n"] == 3 and out["frozen"] is None
  np.testing.assert_array_equal(out["ids"], np.arange(4))
  np.testing.assert_allclose(out["w"], np_agc(grads["w"], params["w"]), rtol=1e-6)
  assert clip_fraction(grads, params)["act"] is None


def test_clip_fraction():
  params, grads = random_tree(6)
  fr = jax.jit(functools.partial(clip_fraction, clipping=0.05))(grads, params)
  for k in params:
    assert fr[k].dtype == jnp.float32
    np.testing.assert_allclose(fr[k], np_frac(grads[k], params[k], 0.05), err_msg=k)
  # exactly 3 of 8 columns above the threshold
  p = np.ones((4, 8), np.float32)                  # column norms 2 -> threshold 0.02
  g = np.full((4, 8), 1e-3, np.float32)
  g[:, [1, 4, 6]] = 1.0
  assert float(clip_fraction({"w": g}, {"w": p})["w"]) == 0.375
  assert clip_fraction({"w": g}, {"w": p}, mask={"w": False})["w"] is None


def test_nfnet_mask():
  z = np.zeros((2, 2))
  hk_params = {
      "NFNet/~/stem_conv0": {"w": z, "gain": z, "bias": z},
      "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": z, "b": z},
      "NFNet/~/nf_block/~/squeeze_excite/~/linear_1": {"w": z, "b": z},
      "NFNet/~/nf_block": {"skip_gain": z},
      "NFNet/~/linear": {"w": z, "b": z},
  }
  m = nfnet_mask(hk_params)
  off = [(k, l) for k, v in m.items() for l, b in v.items() if not b]
  assert off == [("NFNet/~/linear", "w")]
  for root in ("NF_ResNet", "NF_RegNet"):
    m = nfnet_mask({f"{root}/~/linear": {"w": z, "b": z},
                    f"{root}/~/block/~/linear": {"w": z}})
    assert m == {f"{root}/~/linear": {"w": False, "b": True},
                 f"{root}/~/block/~/linear": {"w": True}}
  flax_params = {"params": {"Conv_0": {"kernel": z, "bias": z},
                            "head": {"kernel": z, "bias": z}}}
  m = nfnet_mask(flax_params, classifier_names=("head",))
  assert m["params"]["head"] == {"kernel": False, "bias": True}
  assert m["params"]["Conv_0"] == {"kernel": True, "bias": True}
  with pytest.warns(UserWarning, match="nfnet_mask matches no leaf"):
    assert all(jax.tree.leaves(nfnet_mask(flax_params)))  # default rule: Haiku only



# ---------------------------------------------------------------------------------
# Masks in every library: docs/agc.md's snippets, paths, warnings
# ---------------------------------------------------------------------------------

def _doc_snippet(heading: str) -> str:
  """The first python block under `### <heading>` in docs/agc.md."""
  doc = open(os.path.join(REPO, "docs", "agc.md")).read()
  section = doc.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("heading,classifier", [
    ("Haiku", "head/w"),
    ("Flax linen", "params/Dense_1/kernel"),
    ("Flax nnx", "head/kernel/value"),
    ("Equinox", "layers/1/weight"),
])
def test_doc_snippet_leaves_only_the_classifier_unclipped(heading, classifier):
  """Each library's snippet runs as written, without a mask warning; its logged clip
  fractions are None (masked) for the classifier weight alone."""
  ns = {}
  with warnings.catch_warnings():
    warnings.filterwarnings("error", ".*matches no leaf", UserWarning)  # a wrong mask
    exec(compile(_doc_snippet(heading), f"docs/agc.md: {heading}", "exec"), ns)
  leaves = lambda t: {"/".join(path_names(p)): v for p, v in
                      jax.tree_util.tree_leaves_with_path(t, is_leaf=lambda x: x is None)}
  params, frac = leaves(ns["params"]), leaves(ns["frac"])
  arrays = {k for k, v in params.items() if v is not None}
  assert classifier in arrays and len(arrays) == 4, sorted(params)
  assert {k for k in arrays if frac[k] is None} == {classifier}
  assert all(0 <= float(frac[k]) <= 1 for k in arrays - {classifier})
  assert np.isfinite(float(ns["loss"]))


def test_classifier_mask_names_paths_as_each_library_does():
  z = np.zeros((2, 2), np.float32)
  hk_params = {"NFNet/~/stem": {"w": z},
               "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": z, "b": z},
               "NFNet/~/linear": {"w": z, "b": z}}
  off = lambda m, t: sorted("/".join(path_names(p)) for p, keep in
                            jax.tree_util.tree_leaves_with_path(m(t)) if not keep)
  assert off(classifier_mask("NFNet/~/linear/w"), hk_params) == ["NFNet/~/linear/w"]
  # a path is an ending, compared name by name: "linear/w" is also the SE's linear
  assert off(classifier_mask("linear/w"), hk_params) == [
      "NFNet/~/linear/w", "NFNet/~/nf_block/~/squeeze_excite/~/linear/w"]
  assert off(classifier_mask("near/w"), {"linear": {"w": z}, "near": {"w": z}}) == ["near/w"]
  # the same leaves as nfnet_mask's rule
  assert jax.tree.leaves(classifier_mask("NFNet/~/linear/w")(hk_params)) == \
      jax.tree.leaves(nfnet_mask(hk_params))
  # Equinox: attribute and sequence keys (None for the non-array leaves); a predicate
  import equinox as eqx
  eqx_params = eqx.filter(eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0)), eqx.is_array)
  assert off(classifier_mask("layers/1/weight"), eqx_params) == ["layers/1/weight"]
  last_weight = classifier_mask(where=lambda n: n[-2:] == ("1", "weight"))
  assert off(last_weight, eqx_params) == ["layers/1/weight"]
  with pytest.raises(ValueError, match="path"):
    classifier_mask()
  with pytest.raises(ValueError, match="path"):
    classifier_mask("/")


def test_classifier_mask_on_nnx_state_and_optimizer_arrays():
  """nnx.split trees end in GetAttrKey('value'); nnx.Optimizer passes plain arrays."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

  _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  pure = nnx.to_pure_dict(state)
  mask = classifier_mask("head/kernel")
  for tree in (state, pure):
    m = mask(tree)
    flat = {"/".join(path_names(p)): b for p, b in jax.tree_util.tree_leaves_with_path(m)}
    assert sorted(k for k, b in flat.items() if not b) in (
        ["head/kernel/value"], ["head/kernel"]), flat
    assert sum(flat.values()) == 3
  # only an attribute named value is nnx's wrapper; a dict key "value" is a name
  with pytest.warns(UserWarning, match="matches no leaf"):
    classifier_mask("head/kernel")({"head": {"kernel": {"value": np.zeros(2)}}})
  # AGC through nnx: the classifier kernel's gradient passes through untouched
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), state)
  tx = agc(0.01, mask=mask)
  out = tx.update(grads, tx.init(state), state)[0]
  np.testing.assert_array_equal(out["head"]["kernel"].value, 100.0)
  assert float(jnp.abs(out["hidden"]["kernel"].value).max()) < 100.0


def test_a_mask_that_matches_nothing_warns_once_per_mask():
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))

  x = np.ones((2, 3), np.float32)
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32),
                        jax.eval_shape(MLP().init, jax.random.key(0), x))
  grads = jax.tree.map(lambda p: 10.0 * p, params)
  step = lambda mask: jax.jit(lambda g, p: clip_fraction(g, p, mask=mask))(grads, params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # nfnet_mask names Haiku's classifier only: on linen it clips Dense_1/kernel, and says so
    fr = step(nfnet_mask)
    assert float(fr["params"]["Dense_1"]["kernel"]) == 1.0
    step(nfnet_mask)
    head = classifier_mask("head/kernel")   # the classifier is named Dense_1 here
    fr = step(head)
    jax.jit(lambda g, p: agc(mask=head).update(g, (), p))(grads, params)
    right = classifier_mask("Dense_1/kernel")
    assert step(right)["params"]["Dense_1"]["kernel"] is None
  said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert len(said) == 2, said
  assert said[0].startswith("nfnet_mask matches no leaf of the params")
  assert said[1].startswith("classifier_mask('head/kernel') matches no leaf")
  assert "params/Dense_1/bias, params/Dense_1/kernel" in said[1]
  with pytest.warns(UserWarning, match="head/kernel"):  # another mask object: warns
    classifier_mask("head/kernel")(params)


def test_output_first_unit_axes_makes_rows_the_units():
  rng = np.random.default_rng(3)
  p = {"lin": rng.normal(size=(5, 3)).astype(np.float32),          # (out, in)
       "conv": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),    # (out, in, kh, kw)
       "b": rng.normal(size=(5,)).astype(np.float32)}
  g = jax.tree.map(lambda x: x * rng.uniform(0, 0.05, size=x.shape[:1]).reshape(
      (-1,) + (1,) * (x.ndim - 1)) * 10.0 ** rng.uniform(-3, 1, size=x.shape), p)
  out = run_agc(g, p, unit_axes=output_first_unit_axes)
  np.testing.assert_allclose(out["lin"], np_agc(g["lin"].T, p["lin"].T).T, rtol=1e-6)
  conv_ref = np_agc(g["conv"].reshape(4, -1).T, p["conv"].reshape(4, -1).T).T
  np.testing.assert_allclose(out["conv"], conv_ref.reshape(4, 2, 3, 3), rtol=1e-6)
  np.testing.assert_allclose(out["b"], np_agc(g["b"], p["b"]), rtol=1e-6)
  assert not np.allclose(out["lin"], run_agc(g, p)["lin"])  # not the (in, out) units
  assert output_first_unit_axes((), np.zeros((1, 6))) is None

def _train(loss_fn, params, batch, tx, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss, g

  losses, grads = [], []
  for _ in range(steps):
    params, state, loss, g = step(params, state)
    losses.append(float(loss))
    grads.append(g)
  return params, losses, grads


def test_flax_model_trains_with_agc():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.relu(nn.Dense(16)(x.mean((1, 2))))
      return nn.Dense(3, name="head")(x)

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 16)
  centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], np.float32)
  x = rng.normal(size=(16, 8, 8, 2)).astype(np.float32) + centres[labels, None, None]
  y = jax.nn.one_hot(labels, 3)
  model = Net()
  # Flax's own init compiles slowly on CPU: take its shapes, fill them with numpy.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(
      np.prod(s.shape[:-1]))).astype(np.float32) if len(s.shape) > 1 else
      np.zeros(s.shape, np.float32), shapes)
  loss_fn = lambda p, b: optax.softmax_cross_entropy(model.apply(p, b[0]), b[1]).mean()
  mask = functools.partial(nfnet_mask, classifier_names=("head",))
  tx = optax.chain(agc(0.1, mask=mask), optax.sgd(0.5, momentum=0.9))
  new, losses, grads = _train(loss_fn, params, (x, y), tx, 15)
  assert losses[-1] < 0.5 * losses[0]
  # AGC was active: each unit's first update is bounded by clipping*max(||W||, eps)*lr
  fr = jax.jit(lambda g, p: clip_fraction(g, p, 0.1, mask=mask))(grads[0], params)
  assert fr["params"]["head"]["kernel"] is None
  assert float(fr["params"]["Conv_0"]["bias"]) == 1.0  # zero-init bias: eps floor


def test_plain_function_model_with_agc():
  rng = np.random.default_rng(1)
  params = {"w1": rng.normal(size=(4, 32)).astype(np.float32) / 2,
            "b1": np.zeros(32, np.float32),
            "w2": rng.normal(size=(32, 1)).astype(np.float32) / 6}
  x = rng.normal(size=(64, 4)).astype(np.float32)
  y = np.sin(x.sum(1, keepdims=True))

  def loss_fn(p, b):
    h = jnp.tanh(b[0] @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - b[1]) ** 2)

  clipped = optax.chain(agc(0.05), optax.sgd(0.1, momentum=0.9))
  _, losses, grads = _train(loss_fn, params, (x, y), clipped, 30)
  assert losses[-1] < 0.5 * losses[0]
  g0 = grads[0]
  u = run_agc(g0, params, clipping=0.05)
  assert not np.allclose(u["b1"], g0["b1"])  # zero-init bias was clipped
  for k in params:  # every unit of the update within the bound
    gn = np.linalg.norm(np_units(u[k]), axis=0)
    bound = 0.05 * np.maximum(np.linalg.norm(np_units(params[k]), axis=0), 1e-3)
    assert (gn <= bound * (1 + 1e-5)).all(), k


def test_import_is_light():
  code = ("import sys, nfnet_jax.agc, nfnet_jax.optim, nfnet_jax.sam; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'haiku', 'tensorflow', 'flax', 'torch', 'tensorflow_datasets'}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


SHARD_MAP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    if hasattr(jax, "shard_map"):
      shard_map = jax.shard_map
    else:
      from jax.experimental.shard_map import shard_map
    from nfnet_jax.agc import agc, clip_fraction
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(0)
    # near a solution, so column 0 (small norm) is clipped and the others are not
    w_true = rng.normal(size=(6, 3)) * [0.1, 1.0, 30.0]
    b_true = np.array([0.0, 1.0, 50.0])
    params = {"w": (w_true + 0.05 * rng.normal(size=(6, 3))).astype(np.float32),
              "b": (b_true + [0.5, 0.0, 0.0]).astype(np.float32)}
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = (x @ w_true + b_true).astype(np.float32)
    loss = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    tx = optax.chain(agc(0.05), optax.sgd(0.1, momentum=0.9, nesterov=True))

    def update(g, p, s):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, clip_fraction(g, p, 0.05)

    # pmap semantics (check_vma=False): local gradient, then pmean
    step_local = lambda p, s, x, y: update(
        jax.lax.pmean(jax.grad(loss)(p, x, y), "data"), p, s)
    # default shard_map (check_vma=True): the gradient of a pmean-ed loss
    step_vma = lambda p, s, x, y: update(
        jax.grad(lambda p: jax.lax.pmean(loss(p, x, y), "data"))(p), p, s)

    def ref_step(p, s, x, y, scale=1.0):
      g = jax.tree.map(lambda t: t * scale, jax.grad(loss)(p, x, y))
      return update(g, p, s)

    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    p0 = jax.device_put(params, NamedSharding(mesh, P()))
    specs = dict(mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                 out_specs=(P(), P(), P()))
    for fn, vma in ((step_local, False), (step_vma, True)):
      sharded = jax.jit(shard_map(fn, check_vma=vma, **specs))
      p1, s1 = p0, tx.init(p0)
      p2, s2 = params, tx.init(params)
      p3, s3 = params, tx.init(params)
      fracs = []
      for _ in range(3):
        p1, s1, f1 = sharded(p1, s1, xs, ys)
        p2, s2, f2 = jax.jit(ref_step)(p2, s2, x, y)
        p3, s3, _ = jax.jit(ref_step)(p3, s3, x, y, 4.0)  # a summed-not-averaged bug
        assert all(float(f1[k]) == float(f2[k]) for k in params)
        fracs += [float(f) for f in f1.values()]
      for k in params:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-6)
      assert 0 < np.mean(fracs) < 1, fracs  # some units clipped, some not
      assert not np.allclose(p3["b"], p2["b"], rtol=1e-4)  # so scale errors show
    print("SHARD_MAP_OK", jax.__version__)
    """)


def test_shard_map_four_cpu_devices():
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARD_MAP_OK" in out.stdout
