"""Timing of a step and the throughput figures derived from it.

  python benchmarks/timing.py DEVICE_KIND DTYPE BATCH STEP_S MACS_PER_IMAGE
      # the images/s, TFLOP/s and MFU a train record of that step time gets
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable, Optional

from device import peak_tflops


def time_calls(step: Callable[[], Any], sync: Callable[[Any], Any], steps: int,
               warmup: int, pipelined: bool = True) -> dict[str, Any]:
  """Median of `steps` synchronised calls (after `warmup`), and (`pipelined`) the
  mean of `steps` more calls issued back to back with one sync at the end.

  `step()` runs one step and returns something `sync` blocks on.
  """
  times = time_interleaved({'step': step}, sync, steps, warmup)['step']
  out = dict(step_s_median=statistics.median(times), step_s_min=min(times),
             step_s_max=max(times), steps=steps, warmup=warmup)
  if pipelined:
    t = time.perf_counter()
    last = None
    for _ in range(steps):
      last = step()
    sync(last)
    out['step_s_pipelined'] = (time.perf_counter() - t) / steps
  return out


def time_interleaved(calls: dict[str, Callable[[], Any]], sync: Callable[[Any], Any],
                     steps: int, warmup: int = 0) -> dict[str, list[float]]:
  """Seconds of each of `steps` synchronised calls per name, the names taking turns
  (after `warmup` calls of each) so that machine noise hits them alike."""
  for _ in range(warmup):
    for call in calls.values():
      sync(call())
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(steps):
    for name, call in calls.items():
      t = time.perf_counter()
      sync(call())
      times[name].append(time.perf_counter() - t)
  return times


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


def main(argv: list[str]) -> int:
  if len(argv) != 6:
    print(__doc__)
    return 1
  kind, dtype, batch, step_s, macs = argv[1:]
  try:
    fields = throughput_fields(int(batch), float(step_s), int(macs), kind, dtype)
  except ValueError as e:
    print(f'timing.py: BATCH and MACS_PER_IMAGE are integers, STEP_S a number: {e}')
    return 2
  print(json.dumps(fields))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
