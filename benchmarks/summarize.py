"""The table of all benchmark records in JSON files (what gpu_suite.sh prints).

  python benchmarks/summarize.py OUT/*.json
"""
from __future__ import annotations

import sys

from profiles import print_profile
from report import load_records, summary_table


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__)
    return 2
  records = load_records(argv[1:])
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


if __name__ == '__main__':
  sys.exit(main(sys.argv))
