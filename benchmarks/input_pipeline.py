"""Input-pipeline throughput: images/s per host CPU core.

Generates ImageNet-sized JPEGs (default 256 images, 500x375, two classes) in a
temporary folder dataset and runs, through the real `nfnet_jax.data` pipeline
(file read, fused JPEG decode-and-crop, ...):

  train      Inception crop + flip + bicubic resize + MixUp/CutMix (2 decodes per
             output image) + RandAugment N=4 M=5 + normalise
  train_lite Inception crop + flip + resize + normalise (no mixing, no RandAugment)
  eval       resize to (S+32)^2, centre crop S, normalise

at 192 and 256 px. "img/s per core" = output images / process CPU-seconds
(user + sys): robust on a shared machine. Also printed: wall-clock img/s with all
cores, and the host cores one accelerator needs to sustain a given training rate
(F0 on one H200: 5,567 img/s, DESIGN.md; pass --rate for another).

  python benchmarks/input_pipeline.py [--images 256] [--batch 64] [--batches 6]
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import tempfile
import time

import numpy as np

F0_RATE = 5567.0


def make_jpegs(root: str, n: int, width: int = 500, height: int = 375) -> None:
  """n smooth-plus-noise JPEGs (quality 90, ~ImageNet file sizes) in 2 classes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:height, :width] / max(height, width)
  for i in range(n):
    phase = rng.uniform(0, 6, 3)
    img = np.stack([128 + 90 * np.sin(8 * xx * (c + 1) + 5 * yy + phase[c]) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    d = os.path.join(root, 'train', f'class{i % 2}')
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, 'JPEG', quality=90)
    with open(os.path.join(d, f'{i:05d}.jpg'), 'wb') as f:
      f.write(buf.getvalue())
  os.symlink(os.path.join(root, 'train'), os.path.join(root, 'val'))  # eval reads the same files


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(cfg, kind: str, batch: int, batches: int) -> dict:
  from nfnet_jax import data
  if kind == 'eval':
    def make():
      return data.build_eval_iter(cfg, batch, process_index=0, process_count=1)
  else:
    def make():
      return data.build_train_iter(cfg, batch, seed=0, process_index=0, process_count=1)
  it = make()
  next(it)                                    # build + warm up (not timed)
  n, wall0, cpu0 = 0, time.perf_counter(), cpu_seconds()
  while n < batches * batch:
    try:
      b = next(it)
    except StopIteration:                     # eval is finite: start over
      it = make()
      b = next(it)
    n += b['images'].shape[0]
  wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
  return dict(images=n, wall_s=round(wall, 3), cpu_s=round(cpu, 3),
              img_per_s=round(n / wall, 1), img_per_core_s=round(n / cpu, 1))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--images', type=int, default=256)
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--batches', type=int, default=6)
  ap.add_argument('--rate', type=float, default=None,
                  help='accelerator training rate (img/s) to size host cores for')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'input_pipeline.json'))
  args = ap.parse_args()

  from nfnet_jax import data
  from nfnet_jax.data._tf import tf
  root = tempfile.mkdtemp(prefix='nfnet_pipeline_bench_')
  t = time.time()
  make_jpegs(root, args.images)
  print(f'{args.images} JPEGs 500x375 in {time.time() - t:.1f} s at {root}')

  results = []
  for size in (192, 256):
    for kind in ('train', 'train_lite', 'eval'):
      cfg = data.default_config()
      cfg.source, cfg.folder = 'folder', root
      cfg.image_size = cfg.eval_size = size
      cfg.folder_verify = 'none'
      if kind == 'train_lite':
        cfg.mix.enabled = False
        cfg.randaugment.enabled = False
      r = measure(cfg, 'eval' if kind == 'eval' else 'train', args.batch, args.batches)
      r.update(transform=kind, size=size,
               decodes_per_image=2 if kind == 'train' else 1)
      results.append(r)
      print(f"{kind:10s} {size:3d}px  {r['img_per_core_s']:7.1f} img/s/core  "
            f"{r['img_per_s']:7.1f} img/s wall", flush=True)

  rates = {'F0_H200_5567': F0_RATE}
  if args.rate:
    rates['given'] = args.rate
  train192 = next(r for r in results if r['transform'] == 'train' and r['size'] == 192)
  cores = {k: round(v / train192['img_per_core_s'], 1) for k, v in rates.items()}
  env = dict(
      date=datetime.date.today().isoformat(), cpu=platform.processor() or platform.machine(),
      cpu_model=_cpu_model(), cores_visible=os.cpu_count(), python=platform.python_version(),
      tensorflow=tf.__version__, numpy=np.__version__, images=args.images,
      batch=args.batch, batches=args.batches)
  out = dict(env=env, results=results, cores_needed_train192=cores)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=2)

  print('\n| transform | px | img/s per core | img/s wall (all cores) | decodes/img |')
  print('|---|---|---|---|---|')
  for r in results:
    print(f"| {r['transform']} | {r['size']} | {r['img_per_core_s']} | {r['img_per_s']} | "
          f"{r['decodes_per_image']} |")
  for k, v in cores.items():
    print(f'\nHost cores for one accelerator at {rates[k]:,.0f} img/s (train, 192 px): {v}')
  print(f'(general: cores = rate / {train192["img_per_core_s"]})')
  print(f'wrote {args.out}')


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == '__main__':
  main()
