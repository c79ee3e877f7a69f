"""Memory of the train step per remat policy, without running it.

For each `remat` policy of `nfnet_jax.models.create`, compiles the real train step
(`steps.Trainer`: jit(shard_map), donated state, AGC + SGD-Nesterov + EMA) on
abstract inputs and reports

  residuals   what JAX's autodiff keeps for the backward pass (before XLA fuses
              anything): batch-sized activations, GiB (print_saved_residuals)
  xla peak    XLA's static memory analysis of the compiled step on this backend:
              arguments + outputs + temporaries - donated aliases, GiB

Nothing is executed. The residuals need no compilation, so the full-size model at
the GPU batch is analysed on a CPU in seconds. The XLA column is skipped on CPU
unless `--xla`: XLA:CPU drops the optimisation barriers that keep remat from being
undone by CSE (0 `opt-barrier`s left in its compiled HLO), so on CPU every policy
shows the same XLA peak, which says nothing about a GPU or TPU. Prints a table;
`--json` writes the records.

  python benchmarks/step_memory.py --batch 256 --image 192      # F0, residuals
  python benchmarks/step_memory.py --batch 256 --image 192      # on a GPU: + XLA
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
# The residual parser is a test helper (tests/nf_testing.py), shared with the
# remat tests.
sys.path.insert(1, os.path.join(os.path.dirname(_HERE), 'tests'))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import train_step  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='F0')
  p.add_argument('--batch', type=int, default=32, help='global batch')
  p.add_argument('--image', type=int, default=192)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--remat', default='none,convs,block_convs',
                 help='comma-separated policies of nfnet_jax.models.REMAT_POLICIES')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--width', type=float, default=None)
  p.add_argument('--depths', default=None, help='e.g. 1,1,2,1')
  p.add_argument('--group-size', type=int, default=None)
  p.add_argument('--xla', action='store_true',
                 help='compile and report XLA memory on CPU too (not meaningful there)')
  report.add_output_args(p)
  args = p.parse_args(argv)
  args.policies = [s.strip() for s in args.remat.split(',') if s.strip()]
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  for s in args.policies:
    if s not in models.REMAT_POLICIES:
      p.error(f'unknown remat policy {s!r}; choose from {models.REMAT_POLICIES}')
  return args


def analyse(args, policy: str) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models, optim, steps  # pylint: disable=g-import-not-at-top
  import nf_testing  # pylint: disable=g-import-not-at-top  (imports Haiku)

  c = train_step.make_config(args)  # the benchmark's train config (AGC 0.01, ...)
  kw = c.model_kwargs.to_dict()
  net = models.create(args.model, args.num_classes, remat=policy, **kw)
  tx, schedule = optim.build_optimizer(c.optimizer, 10_000, 0, args.batch)
  trainer = steps.Trainer(c, net, tx, schedule, args.image)
  dt = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  sh = trainer.data_sharding
  batch = dict(
      images=jax.ShapeDtypeStruct((args.batch, args.image, args.image, 3), jnp.float32,
                                  sharding=sh),
      labels=jax.ShapeDtypeStruct((args.batch, args.num_classes), jnp.float32, sharding=sh),
      mask=jax.ShapeDtypeStruct((args.batch,), jnp.float32, sharding=sh))
  flags = jax.ShapeDtypeStruct((jax.device_count(), 2), jnp.int32, sharding=sh)
  rec = dict(kind='memory', variant=f'remat={policy}', remat=policy, model=args.model,
             batch=args.batch, image=args.image, dtype=args.dtype, model_kwargs=kw,
             date=report.now(), compile_s=None, compiled_memory=None, status='ok')
  rec.update(device.jax_device_info())
  if jax.default_backend() != 'cpu' or args.xla:
    t = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, batch, flags).compile()
    rec['compile_s'] = time.perf_counter() - t
    rec['compiled_memory'] = device.compiled_memory(compiled)
  params = trainer.abstract_state['params']
  local = args.batch // jax.device_count()
  x = jax.ShapeDtypeStruct((local, args.image, args.image, 3), dt)
  rec['residual_bytes_per_device'] = sum(
      nbytes for nbytes, _ in nf_testing.saved_residuals(net, params, x))
  return rec


def main(argv=None) -> int:
  args = parse_args(argv)
  records = []
  for policy in args.policies:
    print(f'[{policy}] ...', flush=True)
    records.append(analyse(args, policy))
  gib = device.GIB
  print(f'\n{records[0]["device_kind"]} x{records[0]["device_count"]}, jax '
        f'{records[0]["jax"]}, {args.model} b{args.batch} {args.image}px {args.dtype}, '
        f'{records[0]["date"]}')
  print(f'{"remat":<13} {"residuals GiB":>13} {"XLA temp GiB":>12} {"XLA peak GiB":>12} '
        f'{"vs none":>8} {"compile s":>9}')
  base = None
  for r in records:
    m = r['compiled_memory'] or {}
    peak = m.get('estimated_peak_bytes')
    base = base or peak
    ratio = f'{peak / base:8.2f}' if peak and base else '       –'
    temp = m.get('temp_size_in_bytes')
    print(f'{r["remat"]:<13} {r["residual_bytes_per_device"] / gib:13.2f} '
          f'{report.fmt(temp and temp / gib, "12.2f", "           –")} '
          f'{report.fmt(peak and peak / gib, "12.2f", "           –")} {ratio} '
          f'{report.fmt(r["compile_s"], "9.1f", "        –")}')
  report.write_json(args.json, records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
