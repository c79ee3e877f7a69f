"""Does the loss of a short training run fall? Reads WORKDIR/metrics.jsonl.

  python benchmarks/quickstart_check.py WORKDIR OUT.json [WALL_S]

Writes one 'e2e' record to OUT.json; exit status 0 when the loss fell.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from report import now, write_json


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
  if len(argv) not in (3, 4):
    print(__doc__)
    return 2
  try:
    wall = float(argv[3]) if len(argv) > 3 else None
  except ValueError:
    print(f'quickstart_check.py: WALL_S must be a number of seconds, not {argv[3]!r}')
    return 2
  return quickstart_check(argv[1], argv[2], wall)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
