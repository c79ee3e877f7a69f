"""Output of the benchmarks: JSON records, RESULTS.md rows, the summary table, and
the arguments every script shares.

Importing it also puts the repository root on sys.path, so that the scripts
(`python benchmarks/<script>.py`) import this checkout's nfnet_jax.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Iterable, Optional

from device import GIB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
RESULTS_MD = os.path.join(ROOT, 'benchmarks', 'RESULTS.md')


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def add_output_args(p: argparse.ArgumentParser, json_default: Optional[str] = None,
                    results_md: bool = False) -> None:
  """--json (alias --out) for the records; --results-md and --notes for scripts that
  append RESULTS.md rows."""
  p.add_argument('--json', '--out', dest='json', default=json_default,
                 help='JSON file for the records' + (f' (default {json_default})'
                                                     if json_default else ''))
  if results_md:
    p.add_argument('--results-md', default=RESULTS_MD,
                   help="markdown table to append rows to ('' = none)")
    p.add_argument('--notes', default='')


def write_json(path: Optional[str], records: Any) -> None:
  """Writes `records` (JSON-able; non-JSON values as str) to `path` (None: no-op)."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:  # a crash mid-write keeps the old file
    json.dump(records, f, indent=1, default=str)
  os.replace(tmp, path)


_MD_HEADER = ('| date | device | jax | kind | variant | config | compile s | ms/step (median) '
              '| img/s | peak GiB | TFLOP/s | MFU | notes |\n'
              '|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n')


def fmt(v, spec: str, none: str = '–') -> str:
  return none if v is None else format(v, spec)


def md_row(r: dict[str, Any]) -> str:
  cfg = f'{r.get("model")} b{r.get("batch")} {r.get("image")}px {r.get("dtype")}'
  if r.get('model_kwargs'):
    cfg += ' ' + ','.join(f'{k}={v}' for k, v in r['model_kwargs'].items())
  peak = r.get('peak_bytes')
  peak_s = fmt(peak and peak / GIB, '.2f')
  if peak is None and r.get('peak_bytes_estimate'):
    peak_s = f'~{r["peak_bytes_estimate"] / GIB:.2f} (XLA est.)'
  ms = r.get('step_s_median')
  tf = r.get('tflops')
  return (f'| {r.get("date")} | {r.get("device_kind")} x{r.get("device_count")} '
          f'| {r.get("jax")} | {r.get("kind")} | {r.get("variant")} | {cfg} '
          f'| {fmt(r.get("compile_s"), ".1f")} | {fmt(ms and 1e3 * ms, ".2f")} '
          f'| {fmt(r.get("images_per_s"), ",.0f")} | {peak_s} '
          f'| {fmt(tf, ".1f" if (tf or 0) >= 1 else ".3f")} | {fmt(r.get("mfu") and 100 * r["mfu"], ".1f", "–")}'
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
        f'{fmt(ratio, "6.2f", "     –")} {fmt(peak and peak / GIB, "8.2f", "       –")} '
        f'{fmt(r.get("mfu") and 100 * r["mfu"], "5.1f", "    –")}{"%" if r.get("mfu") else " "} '
        f'{fmt(r.get("compile_s"), "8.1f", "       –")}  ok')
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
