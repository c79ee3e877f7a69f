"""Per-step device time by op category and the top ops, from a jax.profiler trace."""
from __future__ import annotations

import glob
import os
import re
from typing import Any

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
