"""Fuzzing the checkpoint loader with mutations of valid parameter pickles.

The mutations (tests/pickle_mutations.py: byte flips, truncation, opcode splices,
length and memo edits) start from the valid pickles the other loader tests write,
with a fixed seed. NFNET_FUZZ_CASES (default 2000) cases run through the in-process
parser inside one subprocess, so that a crash fails the test instead of killing
pytest; NFNET_FUZZ_LOAD_CASES (default 50) run through `pretrained.read_checkpoint`,
the child-process path users get. NFNET_FUZZ_SEED changes the seed (default 0).

No case may crash, hang, raise anything but the loader's one-line refusals naming
the file, return an array whose bytes are not in the file, or grow the parser's peak
RSS by more than RSS_BOUND_MB.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pickle_mutations as fuzz

from nfnet_jax import pretrained

CASES = int(os.environ.get('NFNET_FUZZ_CASES', '2000'))
LOAD_CASES = int(os.environ.get('NFNET_FUZZ_LOAD_CASES', '50'))
SEED = int(os.environ.get('NFNET_FUZZ_SEED', '0'))
RSS_BOUND_MB = 200


def test_mutated_pickles_in_the_parser():
  script = Path(__file__).parent / 'pickle_mutations.py'
  r = subprocess.run([sys.executable, str(script), str(CASES), str(SEED)],
                     capture_output=True, text=True, timeout=60 + CASES // 10)
  assert r.returncode == 0, f'the fuzzing process died (rc {r.returncode}): {r.stderr}'
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  print(summary)
  assert summary['failures'] == [], summary
  assert summary['cases'] == CASES == summary['loaded'] + summary['refused']
  # The mutations reach both outcomes (not all refused at the first byte).
  assert summary['loaded'] > 0 and summary['refused'] > 0, summary
  assert summary['peak_growth_mb'] < RSS_BOUND_MB, summary


def test_mutated_pickles_through_read_checkpoint(tmp_path):
  seeds = fuzz.seed_pickles()
  rng = random.Random(SEED + 1)
  outcomes = {'loaded': 0, 'refused': 0, 'failure': 0}
  failures = []
  path = tmp_path / 'F0_haiku.npz'
  for i in range(LOAD_CASES):
    data = fuzz.mutate(rng, rng.choice(seeds), seeds)
    path.write_bytes(data)
    outcome, why = fuzz.check_case(data, str(path), lambda: pretrained.read_checkpoint(path))
    outcomes[outcome] += 1
    if why:
      failures.append((i, why, data[:100].hex()))
  print(outcomes)
  assert failures == []
  assert sum(outcomes.values()) == LOAD_CASES
