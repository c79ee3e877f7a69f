"""Step-time overhead of AGC: no clipping vs nfnet_jax.agc vs optax.adaptive_grad_clip.

One jitted train step (forward, backward, [clip], weight decay, SGD+Nesterov, apply)
per variant; steps of all variants are interleaved so that machine noise hits them
alike; the median of --steps timed steps (after --warmup) is reported, with the ratio
to the unclipped step.

  python benchmarks/agc_overhead.py                       # nf_resnet26 at width 0.25
  python benchmarks/agc_overhead.py --model F0 --batch 256 --image 192 --dtype bfloat16
  python benchmarks/agc_overhead.py --model mlp           # plain-JAX stand-in, no Haiku

Writes the table to --json (alias --out; JSON).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Any, Callable, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from nfnet_jax.agc import agc, clip_fraction, nfnet_mask  # noqa: E402
from nfnet_jax.optim import add_weight_decay, softmax_cross_entropy  # noqa: E402

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def plain_model(key: jax.Array, images: jax.Array, num_classes: int,
                widths=(32, 64, 128)) -> Tuple[Dict[str, Dict[str, jax.Array]], ApplyFn]:
  """Stand-in without Haiku: strided scaled-WS 3x3 convs + mean pool + 2-layer MLP.

  Params are named like the Haiku models ('Plain/~/conv0': {w, gain, bias}, ...,
  'Plain/~/linear': {w, b}) so :func:`nfnet_mask` finds the classifier.
  """
  params, cin = {}, images.shape[-1]
  keys = iter(jax.random.split(key, len(widths) + 2))
  for i, c in enumerate(widths):
    params[f"Plain/~/conv{i}"] = {
        "w": jax.random.normal(next(keys), (3, 3, cin, c)) / np.sqrt(9 * cin),
        "gain": jnp.ones(c), "bias": jnp.zeros(c)}
    cin = c
  params["Plain/~/mlp"] = {"w": jax.random.normal(next(keys), (cin, 2 * cin)) /
                           np.sqrt(cin), "b": jnp.zeros(2 * cin)}
  params["Plain/~/linear"] = {"w": 0.01 * jax.random.normal(next(keys),
                                                            (2 * cin, num_classes)),
                              "b": jnp.zeros(num_classes)}

  def apply(p, rng, x):
    del rng
    for i in range(len(widths)):
      c = p[f"Plain/~/conv{i}"]
      w = c["w"]
      mean, var = w.mean((0, 1, 2)), w.var((0, 1, 2))
      fan_in = np.prod(w.shape[:3])
      w = (w - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, 1e-4)) * c["gain"]
      x = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + c["bias"]) * 1.7139588594436646
    x = x.mean((1, 2))
    x = jax.nn.relu(x @ p["Plain/~/mlp"]["w"] + p["Plain/~/mlp"]["b"])
    return x @ p["Plain/~/linear"]["w"] + p["Plain/~/linear"]["b"]

  return params, apply


def haiku_model(name: str, key: jax.Array, images: jax.Array, num_classes: int,
                **overrides) -> Tuple[Any, ApplyFn]:
  from nfnet_jax import models  # Haiku only on this path
  net = models.create(name, num_classes=num_classes, **overrides)
  params = jax.jit(lambda k, x: net.init(k, x, is_training=True))(key, images)
  return params, lambda p, rng, x: net.apply(p, rng, x, is_training=True)["logits"]


def optimizers(clipping: float) -> Dict[str, optax.GradientTransformation]:
  """The NFNet recipe's tail, with no clipping / ours / optax's (same mask)."""
  tail = lambda: [add_weight_decay(2e-5), optax.sgd(0.1, momentum=0.9, nesterov=True)]
  return {
      "no_clip": optax.chain(*tail()),
      "nfnet_jax.agc": optax.chain(agc(clipping, mask=nfnet_mask), *tail()),
      "optax.adaptive_grad_clip": optax.chain(
          optax.masked(optax.adaptive_grad_clip(clipping), nfnet_mask), *tail()),
  }


def make_step(apply: ApplyFn, tx: optax.GradientTransformation, diagnostics: bool):
  def loss_fn(p, rng, x, y):
    return softmax_cross_entropy(apply(p, rng, x), y).mean()

  def step(p, s, rng, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, rng, x, y)
    u, s = tx.update(g, s, p)
    out = {"loss": loss}
    if diagnostics:
      fr = jax.tree.leaves(clip_fraction(g, p, mask=nfnet_mask))
      out["clip_fraction"] = jnp.mean(jnp.stack(fr))
    return optax.apply_updates(p, u), s, out

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> Dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="nf_resnet26",
                  help="a nfnet_jax.models name (e.g. nf_resnet26, F0) or 'mlp'")
  ap.add_argument("--width", type=float, default=0.25,
                  help="width multiplier override for Haiku models (0 = none)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--image", type=int, default=64)
  ap.add_argument("--num_classes", type=int, default=10)
  ap.add_argument("--dtype", default="float32", help="image/compute dtype")
  ap.add_argument("--clipping", type=float, default=0.01)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  report.add_output_args(ap, json_default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "agc_overhead.json"))
  args = ap.parse_args(argv)

  key = jax.random.key(0)
  images = jax.random.normal(key, (args.batch, args.image, args.image, 3),
                             jnp.dtype(args.dtype))
  labels = jax.nn.one_hot(jnp.arange(args.batch) % args.num_classes, args.num_classes)
  if args.model == "mlp":
    params, apply = plain_model(key, images, args.num_classes)
  else:
    overrides = {"width": args.width} if args.width else {}
    params, apply = haiku_model(args.model, key, images, args.num_classes, **overrides)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  runs = {k: (make_step(apply, tx, False), tx) for k, tx in optimizers(args.clipping).items()}
  runs["nfnet_jax.agc + clip_fraction"] = (
      make_step(apply, optimizers(args.clipping)["nfnet_jax.agc"], True),
      optimizers(args.clipping)["nfnet_jax.agc"])
  state = {}
  for k, (step, tx) in runs.items():
    p = jax.tree.map(jnp.copy, params)
    state[k] = (p, tx.init(p))

  def train_call(k):
    def call():
      p, s, out = runs[k][0](*state[k], key, images, labels)
      state[k] = (p, s)
      return p, out
    return call

  times = timing.time_interleaved({k: train_call(k) for k in runs}, jax.block_until_ready,
                                  args.steps, args.warmup)

  # The optimizer update alone (same grads every call): isolates the clipping cost
  # from the forward/backward pass, whose noise dominates small CPU runs.
  grads = jax.tree.map(lambda x: 1e-2 * jnp.ones_like(x), params)
  upd = {k: jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
         for k, tx in optimizers(args.clipping).items()}
  upd_times = timing.time_interleaved(
      {k: functools.partial(f, grads, runs[k][1].init(params), params)
       for k, f in upd.items()}, jax.block_until_ready, 5 * args.steps, warmup=1)

  base = statistics.median(times["no_clip"])
  rows = [{"variant": k, "median_ms": 1e3 * statistics.median(t),
           "ratio": statistics.median(t) / base,
           "update_only_ms": (1e3 * statistics.median(upd_times[k])
                              if k in upd_times else None)}
          for k, t in times.items()]
  info = device.jax_device_info()
  result = {
      "date": report.now(), **info, "optax": optax.__version__,
      "cpu_count": os.cpu_count(), "model": args.model,
      "width": args.width if args.model != "mlp" else None, "batch": args.batch,
      "image": args.image, "dtype": args.dtype, "params": int(n_params),
      "steps": args.steps, "rows": rows,
  }
  print(f"{args.model} batch {args.batch} {args.image}px {args.dtype}, "
        f"{n_params / 1e6:.2f}M params, {info['device_kind']}, jax {jax.__version__}, "
        f"median of {args.steps} interleaved steps")
  print(f"{'variant':32s} {'ms/step':>9s} {'ratio':>7s} {'update-only ms':>15s}")
  for r in rows:
    u = "" if r["update_only_ms"] is None else f"{r['update_only_ms']:.3f}"
    print(f"{r['variant']:32s} {r['median_ms']:9.2f} {r['ratio']:7.3f} {u:>15s}")
  report.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
