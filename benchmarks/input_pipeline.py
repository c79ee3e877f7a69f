"""Input-pipeline throughput: images/s per host CPU core.

Generates ImageNet-sized JPEGs (default 256 images, 500x375, two classes) in a
temporary folder dataset and runs, through the real `nfnet_jax.data` pipeline
(file read, fused JPEG decode-and-crop, ...):

  train      Inception crop + flip + bicubic resize + MixUp/CutMix (2 decodes per
             output image) + RandAugment N=4 M=5 + normalise
  train_lite Inception crop + flip + resize + normalise (no mixing, no RandAugment)
  eval       resize to (S+32)^2, centre crop S, normalise

at 192 and 256 px, and the recipes of F0 (192 px, RandAugment M=5), F1 (224 px,
M=10) and F3 (320 px, M=15) four ways: augment_on 'host' (`augment` jitted on the
host's CPU, counted in the host's CPU time) or 'device' (the host stops after
decode/crop/flip/resize and emits uint8), each with the paper's pairing (2B decoded
-> B) and 'within_batch' (B decoded). The per-image cost of the jitted augmentation
(on this machine's JAX backend) is measured for today's `augment.augment` and the
former `apply_device_augment` (a copy in old_device_augment.py, for this comparison
only), beside an F0 forward+backward pass of the same batch
(--step-batch, 0 to skip). "img/s per core" = output images / process CPU-seconds
(user + sys): robust on a shared machine. Also printed: wall-clock img/s with all
cores, and the host cores one accelerator needs to sustain a given training rate
(by default F0's rate on one H200 as benchmarks/RESULTS.md gives it; pass --rate
for another).

  python benchmarks/input_pipeline.py [--images 256] [--batch 64] [--batches 6]
      [--recipe-batches 3] [--step-batch 8] [--no-basic] [--augment-only]
      [--json OUT.json]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top

# The rate the pipeline must feed: DeepMind's NFNet-F0 training step on one H200,
# images/s at 192 px (the faster of the two F0 rows in RESULTS.md). --rate adds another.
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
  # Build + warm up (not timed). The first batch also compiles the host
  # augmentation, and meanwhile tf.data fills its buffers (prefetch and parallel
  # map, several batches): drain them too, or their decodes would be counted free.
  for _ in range(1 if kind == 'eval' else 8):
    next(it)
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
  ap.add_argument('--recipe-batches', type=int, default=3,
                  help='timed batches per recipe row (F0/F1/F3 x host/device x pairing)')
  ap.add_argument('--step-batch', type=int, default=8,
                  help='batch of the device-augment / F0 forward+backward timing (0: skip)')
  ap.add_argument('--augment-only', action='store_true',
                  help='only the old/new augmentation and F0 step timings (no pipelines)')
  ap.add_argument('--no-basic', action='store_true',
                  help='skip the train/train_lite/eval rows at 192/256 px')
  report.add_output_args(ap, json_default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'input_pipeline.json'))
  args = ap.parse_args()

  from nfnet_jax import data
  from nfnet_jax.data._tf import tf
  load_start = list(os.getloadavg())
  root = tempfile.mkdtemp(prefix='nfnet_pipeline_bench_')
  t = time.time()
  make_jpegs(root, args.images)
  print(f'{args.images} JPEGs 500x375 in {time.time() - t:.1f} s at {root}')

  results = []
  for size in (() if args.no_basic or args.augment_only else (192, 256)):
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

  recipes = []
  for variant, size, magnitude in (() if args.augment_only else RECIPES):
    for augment_on in ('host', 'device'):
      for pairing in ('paper', 'within_batch'):
        cfg = recipe_config(root, size, magnitude, augment_on, pairing)
        r = measure(cfg, 'train', args.batch, args.recipe_batches)
        r.update(recipe=variant, size=size, magnitude=magnitude, augment_on=augment_on,
                 pairing=pairing, decodes_per_image=2 if pairing == 'paper' else 1)
        recipes.append(r)
        print(f"{variant} {size}px M={magnitude:g} {augment_on:6s} {pairing:12s} "
              f"{r['img_per_core_s']:7.1f} img/s/core", flush=True)
  for r in recipes:
    base = next(b for b in recipes if b['recipe'] == r['recipe'] and b['augment_on'] == 'host'
                and b['pairing'] == 'paper')
    r['vs_host_paper'] = round(r['img_per_core_s'] / base['img_per_core_s'], 2)

  device_cost = []
  if args.step_batch:
    for variant, size, magnitude in RECIPES:
      d = time_device_augment(size, magnitude, args.step_batch)
      device_cost.append(d)
      print(f"augment {variant} {size}px M={magnitude:g}: old apply_device_augment "
            f"{d['old_ms_per_image']:.2f} ms/image, new augment {d['new_ms_per_image']:.2f} "
            f"ms/image ({d['speedup']}x wall, {d['cpu_speedup']}x CPU time)", flush=True)
    step = time_f0_step(args.step_batch)
    f0 = next(d for d in device_cost if d['size'] == 192)
    step['device_augment_vs_step'] = round(f0['ms_per_image'] / step['ms_per_image'], 4)
    print(f"F0 forward+backward 192px: {step['ms_per_image']:.1f} ms/image; device "
          f"augmentation = {100 * step['device_augment_vs_step']:.2f}% of it", flush=True)
  else:
    step = None

  if args.augment_only:
    info = device.jax_device_info()
    report.write_json(args.json, dict(
        env=dict(date=report.now(), cpu_model=_cpu_model(), jax=info['jax'],
                 jax_backend=info['platform'], jax_device=info['device_kind']),
        device_augment=device_cost, f0_step=step))
    print(f'wrote {args.json}')
    return
  rates = {'F0_H200_5567': F0_RATE}
  if args.rate:
    rates['given'] = args.rate
  train192 = next((r for r in results if r['transform'] == 'train' and r['size'] == 192),
                  next(r for r in recipes if r['recipe'] == 'F0' and r['augment_on'] == 'host'
                       and r['pairing'] == 'paper'))
  cores = {k: round(v / train192['img_per_core_s'], 1) for k, v in rates.items()}
  cores_f0 = {f"{r['augment_on']}_{r['pairing']}": round(F0_RATE / r['img_per_core_s'], 1)
              for r in recipes if r['recipe'] == 'F0'}
  info = device.jax_device_info()
  env = dict(
      date=report.now(), cpu=platform.processor() or platform.machine(),
      cpu_model=_cpu_model(), cores_visible=os.cpu_count(), python=platform.python_version(),
      tensorflow=tf.__version__, numpy=np.__version__, images=args.images,
      batch=args.batch, batches=args.batches, recipe_batches=args.recipe_batches,
      jax=info['jax'], jax_backend=info['platform'], jax_device=info['device_kind'],
      loadavg_start=load_start, loadavg_end=list(os.getloadavg()))
  out = dict(env=env, results=results, cores_needed_train192=cores, recipes=recipes,
             cores_needed_F0_H200=cores_f0, device_augment=device_cost, f0_step=step)
  report.write_json(args.json, out)

  print('\n| transform | px | img/s per core | img/s wall (all cores) | decodes/img |')
  print('|---|---|---|---|---|')
  for r in results:
    print(f"| {r['transform']} | {r['size']} | {r['img_per_core_s']} | {r['img_per_s']} | "
          f"{r['decodes_per_image']} |")
  for k, v in cores.items():
    print(f'\nHost cores for one accelerator at {rates[k]:,.0f} img/s (train, 192 px): {v}')
  print(f'(general: cores = rate / {train192["img_per_core_s"]})')
  print('\n| recipe | px | M | augment_on | pairing | host img/s per core | vs host+paper '
        '| host cores for F0 on an H200 |')
  print('|---|---|---|---|---|---|---|---|')
  for r in recipes:
    print(f"| {r['recipe']} | {r['size']} | {r['magnitude']:g} | {r['augment_on']} | "
          f"{r['pairing']} | {r['img_per_core_s']} | {r['vs_host_paper']}x | "
          f"{round(F0_RATE / r['img_per_core_s'], 1)} |")
  print(f'wrote {args.json}')


RECIPES = (('F0', 192, 5.0), ('F1', 224, 10.0), ('F3', 320, 15.0))


def recipe_config(root: str, size: int, magnitude: float, augment_on: str, pairing: str):
  from nfnet_jax import data
  cfg = data.default_config()
  cfg.source, cfg.folder = 'folder', root
  cfg.image_size = size
  cfg.folder_verify = 'none'
  cfg.randaugment.magnitude = magnitude
  cfg.augment_on = augment_on
  cfg.mix.pairing = pairing
  return cfg


def augment_batch(size: int, batch: int, classes: int = 1000) -> dict:
  """A pipeline batch of `augment` (paper pairing, MixUp in the first half, CutMix
  in the second): random uint8 inputs, one-hot labels."""
  rng = np.random.default_rng(0)
  return dict(images=rng.integers(0, 256, (batch, 2, size, size, 3), dtype=np.uint8),
              labels=np.eye(classes, dtype=np.float32)[rng.integers(0, classes, (batch, 2))],
              aug_step=np.zeros([batch], np.int32), aug_row=np.arange(batch, dtype=np.int32),
              mix_mode=(np.arange(batch) >= batch // 2).astype(np.int32),
              mask=np.ones([batch], np.float32))


def time_device_augment(size: int, magnitude: float, batch: int, repeats: int = 5) -> dict:
  """ms per image of the jitted augmentation of one batch, on this machine's JAX
  backend: today's `augment.augment` and the former `apply_device_augment` (kept
  in benchmarks/old_device_augment.py for this comparison only; fed random
  parameters of the same shapes). The two take turns, call by call, so machine
  noise hits them alike; call i of the new one augments step i (its own draw of
  ops: its cost depends on them, the former's does not). Wall: median of the calls;
  CPU: median of the process CPU time (all threads) of the same calls."""
  import jax
  from nfnet_jax import data
  from nfnet_jax.data import augment
  import old_device_augment  # pylint: disable=g-import-not-at-top
  cfg = data.default_config()
  cfg.image_size, cfg.randaugment.magnitude, cfg.augment_on = size, magnitude, 'device'
  new_batch = augment_batch(size, batch)
  rng = np.random.default_rng(1)
  n = int(cfg.randaugment.num_layers)
  old_batch = dict(images=new_batch['images'], labels=new_batch['labels'],
                   mix_mode=new_batch['mix_mode'], mix_ratio=rng.random(batch, np.float32),
                   mix_box=np.tile(np.array([[size // 4, size // 2, size // 4, size // 2]],
                                            np.int32), (batch, 1)),
                   ra_ops=rng.integers(0, 16, (batch, n)).astype(np.int32),
                   ra_signs=np.where(rng.random((batch, n)) < 0.5, -1.0, 1.0).astype(np.float32),
                   ra_centres=rng.integers(0, size, (batch, n, 2)).astype(np.int32),
                   mask=new_batch['mask'])
  recipe = augment.Recipe.from_config(cfg)
  out = dict(size=size, magnitude=magnitude, batch=batch, backend=jax.default_backend(),
             calls=repeats)
  calls = {
      'old': (jax.jit(lambda b: old_device_augment.apply_device_augment(b, cfg)),
              [jax.device_put(old_batch)] * repeats),
      'new': (jax.jit(lambda b: augment.augment(b, recipe, 0)),
              [jax.device_put(dict(new_batch, aug_step=np.full([batch], i, np.int32)))
               for i in range(repeats)])}
  for name, (fn, batches) in calls.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(batches[0]))
    out[f'{name}_compile_s'] = round(time.perf_counter() - t, 1)
  wall = {name: [] for name in calls}
  cpu = {name: [] for name in calls}
  for i in range(repeats):
    for name, (fn, batches) in calls.items():
      t, c = time.perf_counter(), cpu_seconds()
      jax.block_until_ready(fn(batches[i]))
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(cpu_seconds() - c)
  for name in calls:
    out[f'{name}_ms_per_image'] = round(1000 * float(np.median(wall[name])) / batch, 3)
    # Process CPU time (all threads) per image: robust on a shared machine.
    out[f'{name}_cpu_ms_per_image'] = round(1000 * float(np.median(cpu[name])) / batch, 3)
  out['speedup'] = round(out['old_ms_per_image'] / out['new_ms_per_image'], 2)
  out['cpu_speedup'] = round(out['old_cpu_ms_per_image'] / out['new_cpu_ms_per_image'], 2)
  # The former name of the field, read by the step comparison below.
  out['ms_per_image'] = out['new_ms_per_image']
  return out


def time_f0_step(batch: int, repeats: int = 2) -> dict:
  """ms per image of NFNet-F0's forward + backward (float32, 192 px, 1000 classes)."""
  import haiku as hk
  import jax
  import jax.numpy as jnp
  from nfnet_jax import models

  def loss(x, y):
    logits = models.NFNet(1000, 'F0')(x, is_training=True)['logits']
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))
  f = hk.transform(loss)
  x = jnp.zeros([batch, 192, 192, 3], jnp.float32)
  y = jax.nn.one_hot(jnp.zeros([batch], jnp.int32), 1000)
  params = f.init(jax.random.PRNGKey(0), x, y)
  grad = jax.jit(jax.value_and_grad(lambda p, k: f.apply(p, k, x, y)))
  key = jax.random.PRNGKey(1)
  t = time.perf_counter()
  jax.block_until_ready(grad(params, key))
  compile_s = time.perf_counter() - t
  times = timing.time_calls(lambda: grad(params, key), jax.block_until_ready, repeats, 0,
                            pipelined=False)
  return dict(batch=batch, size=192, compile_s=round(compile_s, 1),
              ms_per_image=round(1000 * times['step_s_median'] / batch, 2),
              backend=jax.default_backend())


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
