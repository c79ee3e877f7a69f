"""Shared pieces of the benchmarks: device facts, peak FLOP/s, timing, memory,
profile breakdowns, JSON / RESULTS.md output and the summary table.

  python benchmarks/common.py summarize OUT/*.json      # the table gpu_suite.sh prints
  python benchmarks/common.py quickstart-check WORKDIR OUT.json [WALL_S]
  python benchmarks/common.py throughput DEVICE_KIND DTYPE BATCH STEP_S MACS_PER_IMAGE
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Dense peak TFLOP/s by device kind substring, for bf16 (and tf32 where f32 matmuls
# use it), checked in order. NVIDIA datasheets (SXM parts; PCIe where named).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100 NVL', {'bfloat16': 835.0, 'float32': 418.0}),
    ('GH200', {'bfloat16': 989.0, 'float32': 494.5}),
    ('H200', {'bfloat16': 989.0, 'float32': 494.5}),
    ('H100', {'bfloat16': 989.0, 'float32': 494.5}),
    ('H800', {'bfloat16': 989.0, 'float32': 494.5}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('L40S', {'bfloat16': 362.0, 'float32': 183.0}),
    ('TPU v4', {'bfloat16': 275.0}),
    ('TPU v5 lite', {'bfloat16': 197.0}),
    ('TPU v5e', {'bfloat16': 197.0}),
    ('TPU v5p', {'bfloat16': 459.0}),
    ('TPU v6', {'bfloat16': 918.0}),
]

GIB = 1024 ** 3


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """Dense peak TFLOP/s of the chip for `dtype`, None if unknown (e.g. CPUs)."""
  for key, table in PEAK_TFLOPS:
    if key.lower() in (device_kind or '').lower():
      return table.get(dtype)
  return None


def jax_device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  kind = d.device_kind
  if d.platform == 'cpu':
    kind = f'CPU {platform.machine()} ({os.cpu_count()} cores)'
  return dict(platform=d.platform, device_kind=kind, device_count=jax.device_count(),
              jax=jax.__version__, jaxlib=getattr(jaxlib, '__version__', '?'),
              host=platform.node(), python=platform.python_version())


def jax_peak_memory() -> Optional[int]:
  """peak_bytes_in_use of device 0 since the process started (None on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def compiled_memory(compiled) -> Optional[dict[str, int]]:
  """XLA's static memory analysis of a compiled step (bytes), if available."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {}
  for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes'):
    v = getattr(m, k, None)
    if v is not None:
      out[k] = int(v)
  if {'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes'} <= set(out):
    out['estimated_peak_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                                   + out['temp_size_in_bytes']
                                   - out.get('alias_size_in_bytes', 0))
  return out


def time_calls(step: Callable[[], Any], sync: Callable[[Any], Any], steps: int,
               warmup: int) -> dict[str, Any]:
  """Median of `steps` synchronised calls (after `warmup`), and the pipelined mean.

  `step()` runs one step and returns something `sync` blocks on.
  """
  for _ in range(warmup):
    sync(step())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  out = None
  for _ in range(steps):
    out = step()
  sync(out)
  pipelined = (time.perf_counter() - t) / steps
  return dict(step_s_median=statistics.median(times), step_s_min=min(times),
              step_s_max=max(times), step_s_pipelined=pipelined, steps=steps,
              warmup=warmup)


def throughput_fields(batch: int, step_s: float, macs_per_image: Optional[int],
                      device_kind: str, dtype: str, forward_only: bool = False
                      ) -> dict[str, Any]:
  """images/s, model TFLOP/s (2 FLOPs per MAC, x3 for a train step) and MFU."""
  mult = 1 if forward_only else 3
  out: dict[str, Any] = dict(images_per_s=batch / step_s)
  if macs_per_image:
    flops = mult * 2 * macs_per_image * batch
    out['model_flops_per_step'] = flops
    out['tflops'] = flops / step_s / 1e12
    peak = peak_tflops(device_kind, dtype)
    out['peak_tflops'] = peak
    out['mfu'] = out['tflops'] / peak if peak else None
  return out


# ---------------------------------------------------------------------------
# Profiles.
# ---------------------------------------------------------------------------
_CATEGORIES = [
    ('conv wgrad', ('bw-filter', 'wgrad', 'dgrad_filter', 'backward_filter')),
    ('conv dgrad', ('bw-input', 'dgrad', 'backward_data', 'backward_input')),
    ('conv fwd', ('cudnn-conv', 'convolution', 'conv_general', 'conv2d', 'fprop',
                  'implicit_gemm', 'cudnn$conv', 'conv-bias', 'conv_fusion')),
    ('gemm', ('gemm', 'cublas', 'dot', 'sm90_xmma', 'cutlass', 'triton_gemm')),
    ('reduction', ('reduce', 'reduction')),
    ('rng', ('rng', 'threefry', 'philox')),
    ('copy/transpose', ('copy', 'transpose', 'memcpy', 'memset')),
    ('elementwise/loop', ('loop_', 'fusion', 'broadcast', 'convert')),
]


def _category(name: str) -> str:
  n = name.lower()
  for cat, keys in _CATEGORIES:
    if any(k in n for k in keys):
      return cat
  return 'other'


def profile_breakdown(trace_dir: str, steps: int, top: int = 25) -> dict[str, Any]:
  """Per-step device time by op category and the top ops, from a jax.profiler trace.

  GPU: kernels on the device plane's stream lines (named by their HLO op when the
  trace has it). CPU: XLA thunks on the runtime threads. Robust to missing pieces:
  returns {'error': ...} instead of raising.
  """
  try:
    from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
    files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))
    if not files:
      return {'error': f'no xplane.pb under {trace_dir}'}
    pdata = ProfileData.from_file(files[-1])
    events = []  # (name, hlo_op, duration_ns)
    device_planes = [p for p in pdata.planes if p.name.startswith('/device:')]
    if device_planes:
      for plane in device_planes:
        for line in plane.lines:
          lname = line.name or ''
          if lname in ('XLA Modules', 'Steps', 'XLA TraceMe', 'Framework Ops',
                       'Framework Name Scope', 'Source code', 'XLA Ops', 'Launch Stats'):
            continue
          for ev in line.events:
            hlo = ''
            try:
              for k, v in ev.stats:
                if k in ('hlo_op', 'long_name') and not hlo:
                  hlo = str(v)
            except Exception:  # pylint: disable=broad-except
              pass
            events.append((ev.name, hlo, float(ev.duration_ns)))
      source = 'device'
    else:
      for plane in pdata.planes:
        for line in plane.lines:
          if not (line.name or '').startswith('tf_XLA'):
            continue
          for ev in line.events:
            if ev.name.startswith(('ThreadpoolListener', 'end:', 'ThunkExecutor')):
              continue
            events.append((ev.name, '', float(ev.duration_ns)))
      source = 'host threads (CPU)'
    if not events:
      return {'error': 'trace has no kernel events', 'source': source}
    total = sum(d for _, _, d in events)
    by_cat: dict[str, float] = {}
    by_op: dict[str, list] = {}
    for name, hlo, dur in events:
      key = hlo or name
      cat = _category(f'{hlo} {name}')
      by_cat[cat] = by_cat.get(cat, 0.0) + dur
      base = re.sub(r'[._]\d+$', '', key)[:90]
      rec = by_op.setdefault(base, [0.0, 0, cat])
      rec[0] += dur
      rec[1] += 1
    per = max(steps, 1)
    cats = {k: dict(ms_per_step=v / per / 1e6, share=v / total)
            for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    ops = [dict(op=k, ms_per_step=v[0] / per / 1e6, calls_per_step=v[1] / per,
                category=v[2], share=v[0] / total)
           for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]]
    return dict(source=source, steps=steps, kernels_per_step=len(events) / per,
                busy_ms_per_step=total / per / 1e6, categories=cats, top_ops=ops)
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {e}'}


def print_profile(prof: dict[str, Any], label: str = '') -> None:
  if 'error' in prof:
    print(f'[profile {label}] {prof["error"]}')
    return
  print(f'[profile {label}] {prof["source"]}: {prof["kernels_per_step"]:.0f} kernels/step, '
        f'{prof["busy_ms_per_step"]:.2f} ms busy/step')
  for k, v in prof['categories'].items():
    print(f'  {k:<18} {v["ms_per_step"]:8.2f} ms/step  {100 * v["share"]:5.1f}%')
  for op in prof['top_ops'][:15]:
    print(f'    {op["ms_per_step"]:7.3f} ms x{op["calls_per_step"]:<5.0f} '
          f'[{op["category"]}] {op["op"]}')


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------
def write_json(path: Optional[str], records: list[dict[str, Any]]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(records, f, indent=1, default=str)


_MD_HEADER = ('| date | device | jax | kind | variant | config | compile s | ms/step (median) '
              '| img/s | peak GiB | TFLOP/s | MFU | notes |\n'
              '|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n')


def _fmt(v, spec: str, none: str = '–') -> str:
  return none if v is None else format(v, spec)


def md_row(r: dict[str, Any]) -> str:
  cfg = f'{r.get("model")} b{r.get("batch")} {r.get("image")}px {r.get("dtype")}'
  if r.get('model_kwargs'):
    cfg += ' ' + ','.join(f'{k}={v}' for k, v in r['model_kwargs'].items())
  peak = r.get('peak_bytes')
  peak_s = _fmt(peak and peak / GIB, '.2f')
  if peak is None and r.get('peak_bytes_estimate'):
    peak_s = f'~{r["peak_bytes_estimate"] / GIB:.2f} (XLA est.)'
  ms = r.get('step_s_median')
  tf = r.get('tflops')
  return (f'| {r.get("date")} | {r.get("device_kind")} x{r.get("device_count")} '
          f'| {r.get("jax")} | {r.get("kind")} | {r.get("variant")} | {cfg} '
          f'| {_fmt(r.get("compile_s"), ".1f")} | {_fmt(ms and 1e3 * ms, ".2f")} '
          f'| {_fmt(r.get("images_per_s"), ",.0f")} | {peak_s} '
          f'| {_fmt(tf, ".1f" if (tf or 0) >= 1 else ".3f")} | {_fmt(r.get("mfu") and 100 * r["mfu"], ".1f", "–")}'
          f'{"%" if r.get("mfu") else ""} | {r.get("notes", "")} |')


def append_results_md(path: Optional[str], records: Iterable[dict[str, Any]]) -> None:
  """Appends one row per successful record to a markdown table (header if new)."""
  if not path:
    return
  rows = [md_row(r) for r in records if r.get('status') == 'ok']
  if not rows:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, 'a', encoding='utf-8') as f:
    if new:
      f.write('# Benchmark results\n\nAppended by benchmarks/train_step.py and '
              'benchmarks/eval_step.py; one row per measured variant.\n\n' + _MD_HEADER)
    f.write('\n'.join(rows) + '\n')


def summary_table(records: list[dict[str, Any]]) -> str:
  """Short fixed-width table of all records, with ratios to timm eager per kind."""
  order = {'train': 0, 'eval': 1}
  records = sorted(records, key=lambda r: (order.get(r.get('kind'), 2), str(r.get('model'))))
  lines = [f'{"kind":<6} {"variant":<28} {"config":<26} {"ms/step":>9} {"img/s":>9} '
           f'{"xtimm":>6} {"peak GiB":>8} {"MFU":>6} {"compile":>8}  status']
  base = {}
  for r in records:
    if r.get('status') == 'ok' and r.get('variant') == 'timm eager':
      base[(r.get('kind'), r.get('model'), r.get('batch'), r.get('image'))] = r['images_per_s']
  for r in records:
    dt = {'bfloat16': 'bf16', 'float32': 'f32'}.get(r.get('dtype'), r.get('dtype'))
    cfg = f'{r.get("model")} b{r.get("batch")} {r.get("image")}px {dt}'
    if r.get('status') != 'ok':
      lines.append(f'{str(r.get("kind")):<6} {str(r.get("variant")):<28} {cfg:<26} '
                   f'{"":>9} {"":>9} {"":>6} {"":>8} {"":>6} {"":>8}  '
                   f'{r.get("status")}: {str(r.get("error", ""))[:60]}')
      continue
    b = base.get((r.get('kind'), r.get('model'), r.get('batch'), r.get('image')))
    ratio = r['images_per_s'] / b if b else None
    peak = r.get('peak_bytes')
    lines.append(
        f'{r.get("kind"):<6} {r.get("variant"):<28} {cfg:<26} '
        f'{1e3 * r["step_s_median"]:9.2f} {r["images_per_s"]:9,.0f} '
        f'{_fmt(ratio, "6.2f", "     –")} {_fmt(peak and peak / GIB, "8.2f", "       –")} '
        f'{_fmt(r.get("mfu") and 100 * r["mfu"], "5.1f", "    –")}{"%" if r.get("mfu") else " "} '
        f'{_fmt(r.get("compile_s"), "8.1f", "       –")}  ok')
  return '\n'.join(lines)


def load_records(paths: Iterable[str]) -> list[dict[str, Any]]:
  records = []
  for p in paths:
    try:
      with open(p, encoding='utf-8') as f:
        data = json.load(f)
    except Exception as e:  # pylint: disable=broad-except
      print(f'(skipping {p}: {e})')
      continue
    if isinstance(data, dict):
      data = [data]
    records.extend(r for r in data if isinstance(r, dict) and 'variant' in r)
  return records


def quickstart_check(workdir: str, out_json: str, wall_s: Optional[float] = None) -> int:
  """Reads workdir/metrics.jsonl of a short training run: does the loss fall?"""
  rec: dict[str, Any] = dict(kind='e2e', variant='train.py quickstart:numpy',
                             date=now(), wall_s=wall_s)
  path = os.path.join(workdir, 'metrics.jsonl')
  try:
    with open(path, encoding='utf-8') as f:
      rows = [json.loads(l) for l in f if l.strip()]
  except OSError as e:
    rec.update(status='error', error=f'no metrics: {e}')
    write_json(out_json, [rec])
    print(f'quickstart: {rec["error"]}')
    return 1
  train = [r for r in rows if 'train/loss' in r]
  evals = [r for r in rows if any(k.startswith('eval/') for k in r)]
  if len(train) < 2:
    rec.update(status='error', error=f'{len(train)} train log lines in {path}')
  else:
    first, last = train[0], train[-1]
    falls = last['train/loss'] < first['train/loss']
    rec.update(status='ok' if falls else 'error', loss_first=first['train/loss'],
               loss_last=last['train/loss'], step_first=first['step'],
               step_last=last['step'], loss_falls=falls,
               images_per_s_last=last.get('train/images_per_sec'),
               losses=[(r['step'], r['train/loss']) for r in train])
    if not falls:
      rec['error'] = 'loss did not fall'
  if evals:
    rec['eval'] = {k: v for k, v in evals[-1].items() if k != 'step'}
  write_json(out_json, [rec])
  print(f'quickstart: {rec["status"]}: loss '
        f'{rec.get("loss_first", float("nan")):.4f} (step {rec.get("step_first")}) -> '
        f'{rec.get("loss_last", float("nan")):.4f} (step {rec.get("step_last")})'
        + (f', eval top-1 {rec["eval"].get("eval/raw_top1")}' if evals else ''))
  return 0 if rec['status'] == 'ok' else 1


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and argv[1] == 'summarize':
    records = load_records(argv[2:])
    print(summary_table([r for r in records if r.get('kind') in ('train', 'eval')]))
    for r in records:  # ratios measured in one run
      if r.get('variant') == 'ours plain' and r.get('status') == 'ok':
        for o in records:
          if (o.get('status') == 'ok' and o.get('variant', '').startswith('ours optimised')
              and (o.get('model'), o.get('batch'), o.get('image')) ==
              (r.get('model'), r.get('batch'), r.get('image'))):
            print(f'{o["variant"]} vs ours plain: x{o["images_per_s"] / r["images_per_s"]:.3f}'
                  f' img/s; first-step loss {o.get("loss_first")} vs {r.get("loss_first")}')
    for r in records:
      if isinstance(r.get('profile'), dict):
        print_profile(r['profile'], f'{r["variant"]} {r.get("model")} b{r.get("batch")}')
    micro = [r for r in records if r.get('kind') == 'micro']
    if micro:
      print('micro-benchmarks (ms, median):')
      for r in micro:
        ms = r.get('step_s_median')
        print(f'  {r["variant"]:<60} {("%.3f" % (1e3 * ms)) if ms else r.get("error")}')
    for r in records:
      if r.get('kind') == 'e2e':
        print(f'e2e {r["variant"]}: {r.get("status")} loss {r.get("loss_first")} -> '
              f'{r.get("loss_last")} (steps {r.get("step_first")}..{r.get("step_last")}), '
              f'wall {r.get("wall_s")} s {r.get("error", "")}')
    return 0
  if len(argv) == 7 and argv[1] == 'throughput':  # the arithmetic of a train record
    print(json.dumps(throughput_fields(int(argv[4]), float(argv[5]), int(argv[6]),
                                       argv[2], argv[3])))
    return 0
  if len(argv) >= 4 and argv[1] == 'quickstart-check':
    wall = float(argv[4]) if len(argv) > 4 else None
    return quickstart_check(argv[2], argv[3], wall)
  print(__doc__)
  return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
