r"""Gradient accumulation: the micro-batch loop as `lax.scan` vs unrolled, images/s.

  python benchmarks/grad_accum.py --json /tmp/grad_accum.json
  python benchmarks/grad_accum.py --model nf_resnet50 --width 0.25 --micro 128 --accum 4

The training step sums the gradients of `accum` micro-batches (config.grad_accum_steps)
in a `lax.scan`; on CPU it unrolls that loop (nfnet_jax/steps.py). This measures why:
the gradient of the same model on the same images, computed as

  one       one batch of `micro` images (the work of one micro-batch)
  scan      `accum` micro-batches in a lax.scan, gradients summed
  unrolled  the same scan with unroll=True

each jitted, timed interleaved (median of --steps calls after --warmup), reported as
images/s and as the ratio to `one`, plus the largest difference between the scan's and
the unrolled loop's gradients. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='nf_resnet26')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--image', type=int, default=32)
  p.add_argument('--micro', type=int, default=256, help='images per micro-batch')
  p.add_argument('--accum', type=int, default=2, help='micro-batches per step')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  report.add_output_args(p)
  args = p.parse_args(argv)
  if args.accum < 2 or args.micro < 1:
    p.error('--accum must be >= 2 and --micro >= 1')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top

  net = models.create(args.model, num_classes=10, width=args.width,
                      stochdepth_rate=0.0, drop_rate=0.0)
  n, s = args.micro * args.accum, args.image
  images = np.random.default_rng(0).normal(size=(n, s, s, 3)).astype(np.float32)
  labels = jax.nn.one_hot(np.arange(n) % 10, 10)
  params = net.init(jax.random.PRNGKey(0), images[:1], True)

  def loss(p, x, y):
    logits = net.apply(p, None, x, True)['logits']
    return optax.softmax_cross_entropy(logits, y).mean()

  def accumulated(unroll):
    def f(p, x, y):
      xs = (x.reshape((args.accum, args.micro) + x.shape[1:]),
            y.reshape((args.accum, args.micro) + y.shape[1:]))
      def body(acc, batch):
        return jax.tree.map(jnp.add, acc, jax.grad(loss)(p, *batch)), None
      return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), xs, unroll=unroll)[0]
    return jax.jit(f)

  one = jax.jit(jax.grad(loss))
  scan, unrolled = accumulated(1), accumulated(True)
  calls = {'one': (lambda: one(params, images[:args.micro], labels[:args.micro]),
                   args.micro),
           'scan': (lambda: scan(params, images, labels), n),
           'unrolled': (lambda: unrolled(params, images, labels), n)}
  # Both loops compute the same sum of micro-batch gradients.
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(scan(params, images, labels)),
      jax.tree.leaves(unrolled(params, images, labels))))
  times = timing.time_interleaved({k: c for k, (c, _) in calls.items()},
                                  jax.block_until_ready, args.steps, args.warmup)
  info = device.jax_device_info()
  rate = {k: calls[k][1] / statistics.median(t) for k, t in times.items()}
  records = [dict(date=report.now(), **info, variant=k, model=args.model,
                  width=args.width, image=s, micro=args.micro, accum=args.accum,
                  images=calls[k][1], step_s_median=statistics.median(times[k]),
                  images_per_s=rate[k], vs_one=rate[k] / rate['one'],
                  max_abs_grad_diff_scan_vs_unrolled=diff)
             for k in calls]
  print(f'{args.model} width {args.width}, {s} px, {args.accum} x {args.micro} images, '
        f'{info.get("device_kind")}')
  print('| variant | images | ms/call (median) | img/s | vs one |')
  print('|---|---:|---:|---:|---:|')
  for r in records:
    print(f"| {r['variant']} | {r['images']} | {1000 * r['step_s_median']:.0f} | "
          f"{r['images_per_s']:.0f} | {r['vs_one']:.2f}x |")
  print(f'max |grad(scan) - grad(unrolled)|: {diff:.2e}')
  report.write_json(args.json, records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
