r"""Inference benchmark at test resolution: our NFNet vs timm's, images/s.

  python benchmarks/eval_step.py --model F0 --batch 256 --image 256 --dtype bfloat16 \
      --variant ours,folded --json /tmp/eval.json
  python benchmarks/eval_step.py --variant timm --json /tmp/eval_timm.json
  # CPU, small:
  python benchmarks/eval_step.py --width 0.125 --group-size 16 --depths 1,1,2,1 \
      --batch 8 --image 64 --dtype float32 --steps 3 --variant ours,folded

Variants:
  ours    models.create(...).apply(params, None, images.astype(dtype), False) under
          jit, batch sharded over all devices: weight standardisation (float32, one
          cast per kernel) runs inside every call, as in the eval step of training.
  folded  nfnet_jax.inference.fold_params once (standardised kernels stored in the
          compute dtype), then inference.folded_model: the convs read them directly.
  timm    timm dm_nfnet_f<k>.eval(), torch.inference_mode, bf16 autocast,
          channels_last (torch.compile with --torch-compile).
Reported as in train_step.py, with model TFLOP/s = 2 x forward MACs x batch / time.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device  # noqa: E402  pylint: disable=g-import-not-at-top
import report  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top
from train_step import TIMM_NAMES, model_overrides, timm_skip_reason  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='F0')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image', type=int, default=None, help='default: model test res.')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--variant', default='ours,folded,timm')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--width', type=float, default=None)
  p.add_argument('--depths', default=None)
  p.add_argument('--group-size', type=int, default=None)
  p.add_argument('--torch-compile', action='store_true')
  report.add_output_args(p, results_md=True)
  args = p.parse_args(argv)
  args.variants = [s.strip() for s in args.variant.split(',') if s.strip()]
  for s in args.variants:
    if s not in ('ours', 'folded', 'timm'):
      p.error(f'unknown variant {s!r}')
  return args


def base_record(args, variant: str) -> dict[str, Any]:
  return dict(kind='eval', variant=variant, model=args.model, batch=args.batch,
              image=args.image, dtype=args.dtype, model_kwargs=model_overrides(args),
              date=report.now(), notes=args.notes)


def run_jax(args, variant: str, first: bool, info: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from nfnet_jax import inference, models  # pylint: disable=g-import-not-at-top

  rec = base_record(args, f'ours {"folded WS" if variant == "folded" else "jit"}')
  rec.update(info)
  kw = model_overrides(args)
  cdt = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  net = models.create(args.model, args.num_classes, **kw)
  nparams, macs = models.summarize(args.model, args.num_classes, args.image, **kw)
  rec['params'], rec['macs_per_image'] = nparams, macs
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  params = jax.jit(lambda r, x: net.init(r, x, False), out_shardings=rep)(
      jax.random.PRNGKey(0), jnp.zeros((1, args.image, args.image, 3), jnp.float32))
  images = jax.device_put(jax.random.normal(
      jax.random.PRNGKey(1), (args.batch, args.image, args.image, 3), jnp.float32), data)

  if variant == 'folded':
    folded_net = inference.folded_model(args.model, args.num_classes, **kw)
    t = time.perf_counter()
    params = jax.block_until_ready(jax.jit(
        lambda p: inference.fold_params(p, cdt), out_shardings=rep)(params))
    rec['fold_s'] = time.perf_counter() - t
    fn = lambda p, x: folded_net.apply(p, None, x.astype(cdt), False)['logits']
  else:
    fn = lambda p, x: net.apply(p, None, x.astype(cdt), False)['logits']
  jitted = jax.jit(fn, out_shardings=data)
  t = time.perf_counter()
  compiled = jitted.lower(params, images).compile()
  rec['compile_s'] = time.perf_counter() - t
  rec['compiled_memory'] = device.compiled_memory(compiled)
  times = timing.time_calls(lambda: compiled(params, images), jax.block_until_ready,
                             args.steps, args.warmup)
  rec.update(times)
  rec.update(timing.throughput_fields(args.batch, times['step_s_median'], macs,
                                      info['device_kind'], args.dtype, forward_only=True))
  peak = device.jax_peak_memory()
  rec['peak_bytes_process'] = peak
  rec['peak_bytes'] = peak if first else None
  if not first and rec['compiled_memory']:
    rec['peak_bytes_estimate'] = rec['compiled_memory'].get('estimated_peak_bytes')
  logits = jax.device_get(compiled(params, images))
  rec['logits_abs_mean'] = float(abs(logits).mean())
  rec['status'] = 'ok'
  del compiled, params, images
  gc.collect()
  return rec


def run_timm(args, info: dict[str, Any]) -> dict[str, Any]:
  rec = base_record(args, 'timm compile' if args.torch_compile else 'timm eager')
  why = timm_skip_reason(args)
  if why:
    rec.update(status='skipped', error=why)
    return rec
  import torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  from nfnet_jax.models import summary  # pylint: disable=g-import-not-at-top
  props = torch.cuda.get_device_properties(0)
  rec.update(platform='gpu', device_kind=props.name, device_count=1,
             jax=info.get('jax', '-'), torch=torch.__version__, timm=timm.__version__)
  torch.backends.cudnn.benchmark = True
  dev = torch.device('cuda')
  net = timm.create_model(TIMM_NAMES[args.model], pretrained=False,
                          num_classes=args.num_classes)
  net = net.to(dev).to(memory_format=torch.channels_last).eval()
  if args.torch_compile:
    net = torch.compile(net)
  x = torch.randn(args.batch, 3, args.image, args.image, device=dev)
  x = x.contiguous(memory_format=torch.channels_last)
  amp = args.dtype == 'bfloat16'

  def one():
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
      return net(x)

  sync = lambda _: torch.cuda.synchronize()
  t = time.perf_counter()
  sync(one())
  rec['compile_s'] = time.perf_counter() - t
  times = timing.time_calls(one, sync, args.steps, args.warmup)
  rec.update(times)
  _, macs = summary.summarize(args.model, args.num_classes, args.image)
  rec['macs_per_image'] = macs
  rec.update(timing.throughput_fields(args.batch, times['step_s_median'], macs,
                                      props.name, args.dtype, forward_only=True))
  rec['peak_bytes'] = int(torch.cuda.max_memory_allocated())
  rec['status'] = 'ok'
  return rec


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from nfnet_jax.models import registry  # pylint: disable=g-import-not-at-top
  if args.image is None:
    args.image = registry.info(args.model)['test_imsize']
  jax_variants = [v for v in args.variants if v != 'timm']
  if jax_variants:
    info = device.jax_device_info()
    print(f'JAX {info["jax"]} on {info["device_count"]} x {info["device_kind"]}', flush=True)
  else:
    info = dict(jax=jax.__version__)
  records, first = [], True
  for v in args.variants:
    print(f'--- eval {v} ---', flush=True)
    try:
      if v == 'timm':
        rec = run_timm(args, info)
      else:
        rec = run_jax(args, v, first, info)
        first = False
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      rec = base_record(args, v)
      rec.update(info)
      rec.update(status='error', error=f'{type(e).__name__}: {e}'[:500])
    records.append(rec)
    if rec.get('status') == 'ok':
      print(f'[{rec["variant"]}] compile {rec["compile_s"]:.1f}s, '
            f'{1e3 * rec["step_s_median"]:.2f} ms/batch, {rec["images_per_s"]:,.0f} img/s',
            flush=True)
    else:
      print(f'[{v}] {rec.get("status")}: {rec.get("error")}', flush=True)
    report.write_json(args.json, records)
  report.append_results_md(args.results_md, records)
  print(report.summary_table(records))
  return 0 if all(r.get('status') in ('ok', 'skipped') for r in records) else 1


if __name__ == '__main__':
  sys.exit(main())
