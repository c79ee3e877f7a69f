r"""Train-step benchmark: our NFNet step (optimised and plain) and timm's, side by side.

  python benchmarks/train_step.py --model F0 --batch 256 --image 192 --dtype bfloat16 \
      --steps 15 --variant both --json /tmp/train.json
  python benchmarks/train_step.py --variant timm --json /tmp/timm.json      # PyTorch
  python benchmarks/train_step.py --micro --json /tmp/micro.json            # layer costs
  # CPU, small:
  python benchmarks/train_step.py --model F0 --width 0.125 --group-size 16 \
      --depths 1,1,2,1 --batch 8 --image 64 --dtype float32 --steps 3 --variant both

Variants (comma-separated, or 'both' = optimised,plain; 'all' = both,timm):
  optimised  the real step: nfnet_jax.steps.make_train_step under Trainer's
             jit(shard_map) over all devices, state donated; layers compute in the
             image dtype with float32 master weights, WS in float32 and one cast
             of each kernel per step. --xla-preset/--xla-opt add XLA options.
  plain      the same make_train_step + shard_map with a naive mixed-precision model
             (baselines.naive_model: params cast to bf16 when read, WS in bf16
             via an f32 round trip per kernel) and no buffer donation.
  split      optimised with grouped convs forced to one dense conv per group (what
             "optimised" does on CPU already; on GPU/TPU it runs XLA grouped convs).
  remat      optimised with the network under remat saving only conv outputs
             (models.create(remat='convs')): elementwise work recomputed in the
             backward pass, no conv recomputed; for the peak-memory target.
  timm       timm dm_nfnet_f<k>, PyTorch eager (or --torch-compile), bf16 autocast,
             channels_last, SGD+Nesterov, timm.utils.adaptive_clip_grad(0.01).

Reported: compile time (jit lower+compile; for torch the first step), median step
time over --steps synchronised steps (and the pipelined mean), images/s, peak device
memory (XLA_PYTHON_CLIENT_PREALLOCATE=false, peak_bytes_in_use; for torch
max_memory_allocated), model TFLOP/s = 3 x 2 x forward MACs (models.summarize at
the bench resolution) x batch / step time, and MFU against the chip's dense peak.
The runtime peak is per process: only the first JAX variant of a run gets a clean
one; later ones report XLA's static estimate (compiled_memory).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import profiles  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top

TIMM_NAMES = {f'F{k}': f'dm_nfnet_f{k}' for k in range(7)}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='F0')
  p.add_argument('--batch', type=int, default=256, help='global batch')
  p.add_argument('--image', type=int, default=None, help='default: model train res.')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--steps', type=int, default=15)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--variant', default='both')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--width', type=float, default=None, help='model width multiplier')
  p.add_argument('--depths', default=None, help='e.g. 1,1,2,1')
  p.add_argument('--group-size', type=int, default=None)
  p.add_argument('--xla-preset', default='none',
                 help='XLA option set for optimised/split (baselines.XLA_PRESETS)')
  p.add_argument('--xla-opt', action='append', default=[],
                 help='extra XLA compile option key=value (repeatable)')
  p.add_argument('--profile', type=int, default=0,
                 help='trace N steps of the first JAX variant; print a breakdown')
  p.add_argument('--torch-compile', action='store_true', help='timm under torch.compile')
  p.add_argument('--micro', action='store_true', help='layer microbenchmarks instead')
  report.add_output_args(p, results_md=True)
  args = p.parse_args(argv)
  v = args.variant
  v = {'both': 'optimised,plain', 'all': 'optimised,plain,timm'}.get(v, v)
  args.variants = [s.strip() for s in v.split(',') if s.strip()]
  for s in args.variants:
    if s not in ('optimised', 'plain', 'split', 'remat', 'timm'):
      p.error(f'unknown variant {s!r}')
  return args


def timm_skip_reason(args) -> Optional[str]:
  """Why the timm baseline cannot run here (None: it can)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except
    return f'torch/timm not importable ({type(e).__name__}: {e})'
  if not torch.cuda.is_available():
    return 'no CUDA device for torch'
  if model_overrides(args) or args.model not in TIMM_NAMES:
    return 'timm has only the paper models (no width/depth overrides)'
  return None


def model_overrides(args) -> dict[str, Any]:
  kw: dict[str, Any] = {}
  if args.width is not None:
    kw['width'] = args.width
  if args.depths:
    kw['depths'] = tuple(int(x) for x in args.depths.split(','))
  if args.group_size is not None:
    kw['group_size'] = args.group_size
  return kw


def parse_xla_opts(args) -> dict[str, Any]:
  import baselines  # pylint: disable=g-import-not-at-top
  if args.xla_preset not in baselines.XLA_PRESETS:
    raise SystemExit(f'--xla-preset must be one of {sorted(baselines.XLA_PRESETS)}')
  opts = dict(baselines.XLA_PRESETS[args.xla_preset])
  opts.update(baselines.parse_option(kv) for kv in args.xla_opt)
  return opts


def base_record(args, kind: str, variant: str) -> dict[str, Any]:
  return dict(kind=kind, variant=variant, model=args.model, batch=args.batch,
              image=args.image, dtype=args.dtype, model_kwargs=model_overrides(args),
              date=report.now(), notes=args.notes)


# ---------------------------------------------------------------------------
# JAX variants.
# ---------------------------------------------------------------------------
def make_config(args):
  from nfnet_jax import configs  # pylint: disable=g-import-not-at-top
  c = configs.base_config()
  c.model = args.model
  kw = c.model_kwargs.to_dict()
  kw.update(model_overrides(args))
  c.model_kwargs = kw
  c.batch_size = args.batch
  c.compute_dtype = args.dtype
  c.optimizer.agc_clipping = 0.01
  return c


def build_train_steps(config, real_model, tx, schedule, image_size: int,
                      plain_model=None, model=None) -> dict[str, Any]:
  """The train step as nfnet_jax.train wires it, whichever revision of its API.

  Returns {trainer, step, extra, init}: `step(state, batch, *extra)` is Trainer's
  jitted (donating) step for `model` (default: real_model), or, with `plain_model`,
  the same make_train_step under the same jit(shard_map) with no donation. `init()`
  gives a fresh replicated state of `real_model` (same values for every variant).
  """
  import inspect  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from nfnet_jax import steps  # pylint: disable=g-import-not-at-top

  def make_trainer(m):
    if 'image_size' in inspect.signature(steps.Trainer.__init__).parameters:
      return steps.Trainer(config, m, tx, schedule, image_size)
    return steps.Trainer(config, m, tx, schedule)

  trainer = make_trainer(real_model if plain_model is not None else (model or real_model))
  nargs = len(inspect.signature(steps.make_train_step(config, real_model, tx, schedule))
              .parameters)
  extra = ()
  if nargs == 3:  # (state, batch, host flags) -> (state, metrics, control)
    extra = (trainer.host_flags(np.zeros([2], np.int32)),)
  if plain_model is not None:
    specs = ((P(), P(steps.AXIS), P(steps.AXIS)), (P(), P(), P())) if nargs == 3 else (
        (P(), P(steps.AXIS)), (P(), P()))
    step = jax.jit(jax.shard_map(
        steps.make_train_step(config, plain_model, tx, schedule), mesh=trainer.mesh,
        in_specs=specs[0], out_specs=specs[1], check_vma=False))
  else:
    step = trainer.train_step  # jit(shard_map(make_train_step)), donate_argnums=(0,)
  if hasattr(trainer, 'init_state'):
    init = trainer.init_state
  else:
    init = lambda: trainer.replicate(steps.init_state(config, real_model, tx, image_size))
  return dict(trainer=trainer, step=step, extra=extra, init=init)


def run_jax_variant(args, variant: str, first: bool, info: dict[str, Any],
                    save=None) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import baselines  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models, optim, train  # pylint: disable=g-import-not-at-top

  config = make_config(args)
  kw = config.model_kwargs.to_dict()
  cdt = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  xla_opts = parse_xla_opts(args) if variant != 'plain' else {}
  label = {'optimised': 'ours optimised', 'plain': 'ours plain',
           'split': 'ours optimised+split-groups',
           'remat': 'ours optimised+remat-convs'}[variant]
  if xla_opts and variant != 'plain':
    label += f'+{args.xla_preset}' if args.xla_preset != 'none' else '+xla-opts'
  rec = base_record(args, 'train', label)
  rec.update(info)
  real = train.create_model(config, args.num_classes)
  if variant == 'plain':
    model = baselines.naive_model(config.model, args.num_classes, cdt, **kw)
  elif variant == 'split':
    model = models.create(config.model, args.num_classes, groups='split', **kw)
  elif variant == 'remat':
    model = models.create(config.model, args.num_classes, remat='convs', **kw)
  else:
    model = real
  tx, schedule = optim.build_optimizer(config.optimizer, 10_000, 0, args.batch)
  steps = build_train_steps(config, real, tx, schedule, args.image,
                            plain_model=model if variant == 'plain' else None,
                            model=model)
  step, trainer = steps['step'], steps['trainer']
  rec['donation'] = variant != 'plain'

  params, macs = models.summarize(args.model, args.num_classes, args.image, **kw)
  rec['params'], rec['macs_per_image'] = params, macs

  state = steps['init']()
  k1, k2 = jax.random.split(jax.random.PRNGKey(1234))
  images = jax.random.normal(k1, (args.batch, args.image, args.image, 3), jnp.float32)
  labels = jax.nn.one_hot(jax.random.randint(k2, (args.batch,), 0, args.num_classes),
                          args.num_classes)
  batch = jax.device_put(dict(images=images, labels=labels,
                              mask=jnp.ones((args.batch,), jnp.float32)),
                         trainer.data_sharding)
  extra = steps['extra']
  jax.block_until_ready((state, batch, extra))

  t = time.perf_counter()
  compiled, used = baselines.compile_step(step, (state, batch) + extra, xla_opts,
                                     log=lambda m: print(f'[{label}] {m}', flush=True))
  rec['compile_s'] = time.perf_counter() - t
  rec['xla_options'] = used
  if used != xla_opts:
    dropped = sorted(set(xla_opts) - set(used))
    rec['notes'] = (rec['notes'] + f' XLA options unknown, dropped: {dropped}').strip()
  rec['compiled_memory'] = device.compiled_memory(compiled)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rec['xla_flops_per_step'] = float(cost.get('flops', 0.0)) if cost else None
  except Exception:  # pylint: disable=broad-except
    rec['xla_flops_per_step'] = None

  holder = {'state': state}
  losses = []
  del state

  def one():
    out = compiled(holder['state'], batch, *extra)
    holder['state'], m = out[0], out[1]
    losses.append(m['loss'])
    return out

  times = timing.time_calls(one, jax.block_until_ready, args.steps, args.warmup)
  rec.update(times)
  rec.update(timing.throughput_fields(args.batch, times['step_s_median'], macs,
                                      info['device_kind'], args.dtype))
  peak = device.jax_peak_memory()
  rec['peak_bytes_process'] = peak
  rec['peak_bytes'] = peak if first else None
  if not first and rec['compiled_memory']:
    rec['peak_bytes_estimate'] = rec['compiled_memory'].get('estimated_peak_bytes')
  ls = [float(x) for x in jax.device_get(losses)]
  rec['loss_first'], rec['loss_last'] = ls[0], ls[-1]
  rec['all_finite'] = bool(all(map(lambda v: v == v and abs(v) != float('inf'), ls)))

  rec['status'] = 'ok'
  if args.profile and first:
    if save is not None:
      save(rec)  # the measurement survives a profiler failure
    try:
      with tempfile.TemporaryDirectory() as d:
        jax.block_until_ready(holder['state'])
        with jax.profiler.trace(d):
          for _ in range(args.profile):
            jax.block_until_ready(one())
        rec['profile'] = profiles.profile_breakdown(d, args.profile)
    except Exception as e:  # pylint: disable=broad-except
      rec['profile'] = {'error': f'{type(e).__name__}: {e}'[:300]}
    profiles.print_profile(rec['profile'], label)
  del holder, compiled, trainer
  gc.collect()
  return rec


# ---------------------------------------------------------------------------
# timm / PyTorch.
# ---------------------------------------------------------------------------
def run_timm(args, info_jax: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  label = 'timm compile' if args.torch_compile else 'timm eager'
  rec = base_record(args, 'train', label)
  why = timm_skip_reason(args)
  if why:
    rec.update(status='skipped', error=why)
    return rec
  import torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  from timm.utils import adaptive_clip_grad  # pylint: disable=g-import-not-at-top
  from nfnet_jax.models import registry, summary  # pylint: disable=g-import-not-at-top
  dev = torch.device('cuda')
  props = torch.cuda.get_device_properties(0)
  rec.update(platform='gpu', device_kind=props.name, device_count=1,
             jax=(info_jax or {}).get('jax', '-'), torch=torch.__version__,
             timm=timm.__version__)
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  drop = registry.info(args.model)['drop_rate']
  net = timm.create_model(TIMM_NAMES[args.model], pretrained=False,
                          num_classes=args.num_classes, drop_rate=drop,
                          drop_path_rate=0.25)
  net = net.to(dev).to(memory_format=torch.channels_last).train()
  if args.torch_compile:
    net = torch.compile(net)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=2e-5)
  crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  g = torch.Generator(device=dev).manual_seed(0)
  x = torch.randn(args.batch, 3, args.image, args.image, device=dev, generator=g)
  x = x.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, args.num_classes, (args.batch,), device=dev, generator=g)
  amp = args.dtype == 'bfloat16'
  losses = []

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
      loss = crit(net(x), y)
    loss.backward()
    adaptive_clip_grad(net.parameters(), clip_factor=0.01, eps=1e-3)
    opt.step()
    losses.append(loss.detach())
    return loss

  sync = lambda _: torch.cuda.synchronize()
  t = time.perf_counter()
  sync(one())
  rec['compile_s'] = time.perf_counter() - t  # first step: cudnn autotune (+ compile)
  times = timing.time_calls(one, sync, args.steps, args.warmup)
  rec.update(times)
  _, macs = summary.summarize(args.model, args.num_classes, args.image)
  rec['macs_per_image'] = macs
  rec.update(timing.throughput_fields(args.batch, times['step_s_median'], macs,
                                      props.name, args.dtype))
  rec['peak_bytes'] = int(torch.cuda.max_memory_allocated())
  rec['peak_reserved_bytes'] = int(torch.cuda.max_memory_reserved())
  ls = [float(v) for v in losses]
  rec['loss_first'], rec['loss_last'] = ls[0], ls[-1]
  rec['recipe'] = (f'drop_rate={drop}, drop_path_rate=0.25, SGD nesterov 0.9 wd 2e-5 '
                   'on all params, AGC 0.01 on all params, no EMA')
  rec['status'] = 'ok'
  return rec


# ---------------------------------------------------------------------------
# Micro-benchmarks: grouped convs, WS, RNG masks.
# ---------------------------------------------------------------------------
def run_micro(args, info: dict[str, Any], save=None) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnet_jax import layers, models  # pylint: disable=g-import-not-at-top

  cdt = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  b = args.batch
  recs = []
  steps = max(args.steps, 5)

  def bench(name: str, fn, *xs, note: str = ''):
    rec = base_record(args, 'micro', name)
    rec.update(info)
    try:
      jf = jax.jit(fn)
      t = time.perf_counter()
      compiled = jf.lower(*xs).compile()
      rec['compile_s'] = time.perf_counter() - t
      times = timing.time_calls(lambda: compiled(*xs), jax.block_until_ready, steps, 2)
      rec.update(times)
      rec['images_per_s'] = b / times['step_s_median']
      rec['status'] = 'ok'
    except Exception as e:  # pylint: disable=broad-except
      rec.update(status='error', error=f'{type(e).__name__}: {e}'[:300])
    rec['notes'] = note
    recs.append(rec)
    if save is not None:
      save(recs)  # a timeout part-way keeps what was measured
    ms = rec.get('step_s_median')
    print(f'[micro] {name:<44} {("%.3f ms" % (1e3 * ms)) if ms else rec.get("error")}',
          flush=True)

  key = jax.random.PRNGKey(0)
  kw = make_config(args).model_kwargs.to_dict()

  # 1. Dropout / stochastic-depth masks: per-example threefry (ours) vs rbg keys.
  width = 2 * int(1536 * (kw.get('width') or 1.0))
  nblocks = sum(kw.get('depths') or models.info(args.model)['depth'])

  def masks(key):
    out = []
    for i in range(nblocks):
      out.append(layers.per_example_uniform(jax.random.fold_in(key, i), b))
    out.append(layers.per_example_uniform(jax.random.fold_in(key, 999), b, (width,)))
    return out

  bench(f'RNG masks threefry per-example ({nblocks}x[B] + [B,{width}])', masks,
        jax.random.PRNGKey(0))
  bench(f'RNG masks rbg per-example ({nblocks}x[B] + [B,{width}])', masks,
        jax.random.key(0, impl='rbg'))

  # 2. Weight standardisation of all conv kernels of the model, fwd + bwd.
  net = models.create(args.model, args.num_classes, **kw)
  shapes_tree = jax.eval_shape(lambda r, x: net.init(r, x, True), key,
                               jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  ws = {m: v for m, v in shapes_tree.items() if set(v) == {'w', 'gain', 'bias'}
        and len(v['w'].shape) == 4}
  ws_params = {m: dict(w=jax.random.normal(key, v['w'].shape, jnp.float32) * 0.05,
                       gain=jnp.ones(v['gain'].shape, jnp.float32)) for m, v in ws.items()}

  def ws_ours(p):
    return {m: layers.standardize_weight(v['w'], v['gain']).astype(cdt) for m, v in p.items()}

  def ws_naive(p):
    out = {}
    for m, v in p.items():
      w = v['w'].astype(cdt)
      fan_in = w.shape[0] * w.shape[1] * w.shape[2]
      mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
      scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, jnp.asarray(1e-4, cdt)))
      scale = scale * v['gain'].astype(cdt)
      out[m] = w * scale - mean * scale
    return out

  for impl, f in (('f32 stats, one cast (ours)', ws_ours),
                  (f'{jnp.dtype(cdt).name} stats (naive)', ws_naive)):
    def ws_fwd_bwd(p, f=f):
      out, vjp = jax.vjp(f, p)
      return vjp(jax.tree.map(jnp.ones_like, out))
    bench(f'WS all {len(ws)} kernels fwd+bwd [{impl}]', ws_fwd_bwd, ws_params)

  # 3. Grouped 3x3 convs of F0 (group width 128): forward + both gradients.
  scale = args.image / 192
  shapes = [('stage3 12px 768ch G6', int(12 * scale), 768, 6, True),
            ('stage2 24px 256ch G2', int(24 * scale), 256, 2, False),
            ('stage4 6px 768ch G6', max(int(6 * scale), 1), 768, 6, False)]
  if model_overrides(args):
    shapes = [('small 8px 32ch G2', 8, 32, 2, True)]
  for name, hw, ch, g, fwd_too in shapes:
    x = jax.random.normal(key, (b, hw, hw, ch), cdt)
    k = jax.random.normal(key, (3, 3, ch // g, ch), cdt) * 0.05
    ct = jax.random.normal(key, (b, hw, hw, ch), cdt)

    def lax_conv(x, k, g=g):
      return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=(
          'NHWC', 'HWIO', 'NHWC'), feature_group_count=g)

    def split_conv(x, k, g=g):
      with layers.grouped_conv_impl('split'):
        return layers.conv2d(x, k, 1, 'SAME', g)

    for impl, conv in (('lax', lax_conv), ('split', split_conv)):
      def fwd_bwd(x, k, ct, conv=conv):
        out, vjp = jax.vjp(conv, x, k)
        return vjp(ct * jnp.ones_like(out))
      bench(f'gconv {name} fwd+bwd [{impl}]', fwd_bwd, x, k, ct)
      if fwd_too:
        bench(f'gconv {name} fwd [{impl}]', conv, x, k)

  # 4. Host cost of a call by argument count: a donated elementwise update of a
  # params-momentum-EMA-shaped state, as 3 x (leaves) buffers vs 3 flat buffers.
  # The same bytes move; the difference is per-buffer dispatch/allocation work,
  # which a synchronised step cannot hide.
  leaves = [jnp.full(v.shape, 0.01, jnp.float32) for v in jax.tree.leaves(shapes_tree)]
  tree_state = [leaves, [x + 0 for x in leaves], [x + 0 for x in leaves]]
  flat_state = [jnp.concatenate([x.ravel() for x in t]) for t in tree_state]
  for impl, state in (('pytree', tree_state), ('flat', flat_state)):
    n = len(jax.tree.leaves(state))
    upd = jax.jit(lambda s: jax.tree.map(lambda x: x * 0.999 + 1e-4, s), donate_argnums=0)
    holder = {'s': upd(state)}
    del state

    def call():
      holder['s'] = upd(holder['s'])
      return holder['s']

    rec = base_record(args, 'micro', f'state update, {n} buffers [{impl}]')
    rec.update(info)
    times = timing.time_calls(call, jax.block_until_ready, max(steps, 20), 3)
    rec.update(times, status='ok')
    recs.append(rec)
    if save is not None:
      save(recs)
    print(f'[micro] {rec["variant"]:<44} {1e3 * times["step_s_median"]:.3f} ms '
          f'(pipelined {1e3 * times.get("step_s_pipelined", float("nan")):.3f})', flush=True)
  return recs


# ---------------------------------------------------------------------------
def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from nfnet_jax.models import registry  # pylint: disable=g-import-not-at-top
  if args.image is None:
    args.image = registry.info(args.model)['train_imsize']
  jax_variants = [v for v in args.variants if v != 'timm']
  info = {}
  if jax_variants or args.micro:
    info = device.jax_device_info()
    print(f'JAX {info["jax"]} on {info["device_count"]} x {info["device_kind"]} '
          f'({info["platform"]})', flush=True)
  else:
    info = dict(jax=jax.__version__)
  records = []
  if args.micro:
    records = run_micro(args, info, save=lambda r: report.write_json(args.json, r))
  else:
    for i, v in enumerate(args.variants):
      print(f'--- {v} ---', flush=True)
      try:
        if v == 'timm':
          rec = run_timm(args, info)
        else:
          rec = run_jax_variant(
              args, v, first=(i == 0 or args.variants[0] == 'timm' and i == 1), info=info,
              save=lambda r: report.write_json(args.json, records + [r]))
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        rec = base_record(args, 'train', v)
        rec.update(info)
        rec.update(status='error', error=f'{type(e).__name__}: {e}'[:500])
      records.append(rec)
      if rec.get('status') == 'ok':
        print(f'[{rec["variant"]}] compile {rec.get("compile_s", 0):.1f}s, '
              f'{1e3 * rec["step_s_median"]:.2f} ms/step median '
              f'({1e3 * rec["step_s_pipelined"]:.2f} pipelined), '
              f'{rec["images_per_s"]:,.0f} img/s, peak '
              f'{(rec.get("peak_bytes") or rec.get("peak_bytes_estimate") or 0) / device.GIB:.2f}'
              f' GiB, loss {rec.get("loss_first"):.4f} -> {rec.get("loss_last"):.4f}',
              flush=True)
      else:
        print(f'[{v}] {rec.get("status")}: {rec.get("error")}', flush=True)
      report.write_json(args.json, records)  # after each variant: survives a crash
    report.append_results_md(args.results_md, records)
  report.write_json(args.json, records)
  if not args.micro:
    print(report.summary_table(records))
  return 0 if all(r.get('status') in ('ok', 'skipped') for r in records) else 1


if __name__ == '__main__':
  sys.exit(main())
