"""Peak RSS and outcome of `pretrained.load` on the hostile files of the loader tests.

Writes each crafted file (built by the opcode helpers of tests/test_pretrained_limits.py,
and the hostile safetensors headers of tests/test_pretrained_safetensors.py, `st-*`,
their large data sections sparse) at full size, loads it in a fresh process and prints one JSON row per file: the exit
status (139 = SIGSEGV), what `load` returned or raised, and the peak RSS of the loading
process and of its children (the pickle parser runs in one), in MB.

  python benchmarks/loader_attacks.py [--out DIR] [--only NAME,...] [--time N]

Each load gets a 120 s wall-clock limit (a FIFO blocks a reader forever). `--time N`
also times `read_checkpoint` N times on an honest released-style F0 file (random
weights, 285 MB). The loads run the `nfnet_jax` on PYTHONPATH (this checkout if
unset), so the same command measures another version of the code.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
import test_pretrained_limits as crafted  # pylint: disable=g-import-not-at-top
import test_pretrained_safetensors as st  # pylint: disable=g-import-not-at-top

_LOAD = r'''
import json, resource, sys
from nfnet_jax import pretrained
path, model = sys.argv[1], sys.argv[2] or None
out = {}
try:
  got = pretrained.load(path, model=model)
  arrays = [a for leaves in got.values() for a in leaves.values()]
  out['returned'] = [[list(a.shape), str(a.dtype), int((a.view('u1') != 0).sum())]
                     for a in arrays][:3]
except BaseException as e:
  out['error'] = f'{type(e).__name__}: {str(e)[:160]}'
out['peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out['children_peak_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
'''


def attacks(directory: Path) -> dict[str, tuple[Path, str]]:
  """name -> (path, model) of each crafted file, written on first use."""
  files = {
      'oob-64KiB': (lambda: crafted.dtype_rebuilt_after_check(2**16), ''),
      'oob-16MiB-F0': (lambda: crafted.dtype_rebuilt_after_check(2**24), 'F0'),
      'deep-key-300k': (lambda: crafted.deep_key(300_000, 'leaf-key'), ''),
      'deep-frozenset-300k': (lambda: crafted.deep_key(300_000, 'frozenset'), ''),
      'bytearray-64MB-x1000': (lambda: crafted.bytearray_copies(64 * 10**6, 1000), ''),
  }
  out = {}
  for name, (make, model) in files.items():
    path = directory / f'{name}.npz'
    out[name] = (path, model, make)
  fifo = directory / 'fifo.npz'
  out['fifo'] = (fifo, '', None)
  for case in ('100gb_tensor_in_a_100gb_file', '1gb_tensor_in_a_1gb_file_for_a_model',
               'overlapping_tensors', 'header_over_the_cap', 'dtype_the_model_cannot_use'):
    header, data, header_len, data_size, model, _, _ = st.HOSTILE[case]
    path = directory / f'st-{case}.safetensors'
    out[f'st-{case}'] = (path, model, lambda p=path, h=header, d=data, n=header_len,
                         z=data_size: st.raw_file(p, h, d, n, z))
  path = directory / 'st-100k-empty-tensors.safetensors'
  out['st-100k-empty-tensors'] = (path, '', lambda p=path: st.raw_file(
      p, {f'm{i}/w': st.tensor('F32', [0], 0, 0) for i in range(100_000)}))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None, help='where to write the files (a temp dir)')
  parser.add_argument('--only', default='', help='comma-separated names to run')
  parser.add_argument('--time', type=int, default=0,
                      help='time this many reads of an honest F0 file')
  args = parser.parse_args()
  directory = Path(args.out or tempfile.mkdtemp(prefix='loader_attacks_'))
  only = set(filter(None, args.only.split(',')))
  for name, (path, model, make) in attacks(directory).items():
    if only and name not in only:
      continue
    if make is None:
      if not path.exists():
        os.mkfifo(path)
    else:
      made = make()  # the file's bytes, or the path of a file it wrote (sparse)
      if isinstance(made, bytes):
        path.write_bytes(made)
    # A shell's fork gives the loader a fresh peak RSS (Linux carries it across exec).
    cmd = ['/bin/sh', '-c', '"$@"; exit $?', 'sh', sys.executable, '-c', _LOAD, str(path),
           model]
    env = dict(os.environ, PYTHONPATH=os.environ.get('PYTHONPATH') or str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
      stdout, stderr = proc.communicate(timeout=120)
      row = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
          'error': stderr.strip().splitlines()[-1:] or ''}
      row['rc'] = proc.returncode
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # the shell and the loader it forked
      proc.communicate()
      row = {'rc': None, 'error': 'still blocked after 120 s (killed)'}
    row.update(name=name, file_mb=round(path.stat().st_size / 1e6, 3), model=model,
               disk_mb=round(path.stat().st_blocks * 512 / 1e6, 3))
    print(json.dumps(row), flush=True)
    if make is not None:
      path.unlink()
  if args.time:
    time_f0(directory, args.time)




def time_f0(directory: Path, reads: int) -> None:
  """Seconds per `read_checkpoint` of an honest released-style F0 pickle."""
  import time  # pylint: disable=g-import-not-at-top

  import test_pretrained as released  # pylint: disable=g-import-not-at-top
  from nfnet_jax import pretrained  # pylint: disable=g-import-not-at-top
  path = directory / 'F0_haiku.npz'
  released.write_released(released.random_params(pretrained.model_shapes('F0')), path)
  seconds = []
  for _ in range(reads):
    start = time.perf_counter()
    pretrained.read_checkpoint(path)
    seconds.append(round(time.perf_counter() - start, 3))
  print(json.dumps({'name': 'honest-F0-read', 'file_mb': round(path.stat().st_size / 1e6, 1),
                    'seconds': seconds, 'median_s': sorted(seconds)[len(seconds) // 2],
                    'loader': pretrained.__file__}), flush=True)
  path.unlink()


if __name__ == '__main__':
  main()
