"""Training pause per checkpoint: synchronous vs asynchronous saves of a full state.

Builds the training state the Trainer holds for a model (params, optimizer state, EMA
params, counters, RNG: `steps.Trainer.abstract_state`, filled with random numbers
instead of running the model's init) and saves it with `checkpoints.Manager` into
--dir, --saves times per mode, the modes interleaved:

  sync   Manager(asynchronous=False): `save` returns once the checkpoint is written
         and committed (what every save did before saves were asynchronous).
  async  Manager(asynchronous=True), what `train` uses: `save` returns once orbax
         holds the state in host memory; the files are written in the background.

Per save it times the pause (how long `save` blocks the caller: the training loop)
and the write (until `wait` returns, called right after `save`: in a run the write
overlaps the following train steps). The state's checksum, computed inside every
save, is timed on its own too.

  python benchmarks/checkpoint_pause.py                       # NFNet-F0, 3 saves each
  python benchmarks/checkpoint_pause.py --model F0 --saves 3 --dir /tmp/ckpt_pause

Needs free space for two checkpoints of the state in --dir (about 2 GB for F0);
removes what it wrote. Writes the records to --json (alias --out; JSON).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='F0', help='a models.create name (default F0)')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--image', type=int, default=192, help='train resolution (px)')
  p.add_argument('--saves', type=int, default=3, help='saves per mode (default 3)')
  p.add_argument('--dir', default=None,
                 help='where to write (default: a new directory under the temp dir)')
  report.add_output_args(p, json_default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'checkpoint_pause.json'))
  return p.parse_args(argv)


def full_state(model_name: str, num_classes: int, image: int) -> dict[str, Any]:
  """The Trainer's state for `model_name` (as `train` builds it from the base config),
  random-filled: the model is traced once for the shapes, never run."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnet_jax import configs, optim, steps, train  # pylint: disable=g-import-not-at-top
  config = configs.base_config()
  config.model = model_name
  model = train.create_model(config, num_classes)
  tx, schedule = optim.build_optimizer(config.optimizer, 10_000, 0, config.batch_size)
  abstract = steps.Trainer(config, model, tx, schedule, image).abstract_state
  rng = np.random.default_rng(0)

  def fill(x):
    if np.issubdtype(x.dtype, np.floating):
      value = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
    else:
      value = np.zeros(x.shape, x.dtype)
    return jax.device_put(value, x.sharding)
  return jax.tree.map(fill, abstract)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from nfnet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  state = full_state(args.model, args.num_classes, args.image)
  leaves = jax.tree.leaves(state)
  state_bytes = sum(x.nbytes for x in leaves)
  root = args.dir or tempfile.mkdtemp(prefix='checkpoint_pause-')
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(root))).free
  if free < 3 * state_bytes:
    print(f'{root}: {free / 2**30:.1f} GiB free, need about {3 * state_bytes / 2**30:.1f} '
          'GiB (two checkpoints and a partial one); pass --dir', file=sys.stderr)
    return 1
  print(f'{args.model}: {len(leaves)} arrays, {state_bytes / 2**20:.0f} MiB; '
        f'writing to {root}', flush=True)

  checkpoints.checksum(state)  # Compiles the checksum.
  t0 = time.perf_counter()
  checkpoints.checksum(state)
  checksum_s = time.perf_counter() - t0

  modes = {'sync': False, 'async': True}
  managers = {m: checkpoints.Manager(os.path.join(root, m), keep=2, asynchronous=a)
              for m, a in modes.items()}
  times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
  try:
    for i in range(1, args.saves + 1):
      for mode, mngr in managers.items():  # interleaved: machine noise hits both
        t0 = time.perf_counter()
        mngr.save(state, i, {})
        t1 = time.perf_counter()
        mngr.wait(i)
        t2 = time.perf_counter()
        times[mode].append((t1 - t0, t2 - t0))
        print(f'save {i} {mode:5s}: pause {t1 - t0:6.2f} s, written after '
              f'{t2 - t0:6.2f} s', flush=True)
  finally:
    for mngr in managers.values():
      mngr.close()
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
    else:
      for mode in modes:
        shutil.rmtree(os.path.join(root, mode), ignore_errors=True)

  rows = []
  for mode in modes:
    pauses, writes = zip(*times[mode])
    rows.append(dict(mode=mode, saves=len(pauses),
                     pause_median_s=statistics.median(pauses),
                     pause_max_s=max(pauses),
                     write_median_s=statistics.median(writes)))
  print(f'\n{args.model} state {state_bytes / 2**20:.0f} MiB, checksum {checksum_s:.2f} s '
        '(inside every pause)')
  print('| mode | saves | pause median s | pause max s | written after (median) s |')
  print('|---|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['mode']} | {r['saves']} | {r['pause_median_s']:.2f} | "
          f"{r['pause_max_s']:.2f} | {r['write_median_s']:.2f} |")
  ratio = rows[0]['pause_median_s'] / max(rows[1]['pause_median_s'], 1e-9)
  print(f'pause sync / async: {ratio:.1f}x')
  report.write_json(args.json, dict(
      date=report.now(), **device.jax_device_info(), cpu_count=os.cpu_count(),
      model=args.model, num_classes=args.num_classes, image=args.image,
      state_arrays=len(leaves), state_bytes=state_bytes, checksum_s=checksum_s,
      command='python benchmarks/checkpoint_pause.py ' + ' '.join(
          sys.argv[1:] if argv is None else argv), rows=rows, pause_ratio=ratio))
  return 0


if __name__ == '__main__':
  sys.exit(main())
