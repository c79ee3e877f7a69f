"""Facts of the device a benchmark runs on: its kind, dense peak FLOP/s, memory.

  python benchmarks/device.py                      # this machine's JAX devices
  python benchmarks/device.py 'NVIDIA H200' bfloat16   # the peak MFU divides by
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Optional

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


def main(argv: list[str]) -> int:
  if len(argv) == 3:
    print(json.dumps(dict(device_kind=argv[1], dtype=argv[2],
                          peak_tflops=peak_tflops(argv[1], argv[2]))))
    return 0
  if len(argv) == 1:
    print(json.dumps(jax_device_info(), indent=1))
    return 0
  print(__doc__)
  return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
