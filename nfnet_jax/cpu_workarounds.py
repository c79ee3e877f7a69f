"""The workarounds for XLA:CPU, behind one switch (docs/training.md, "CPU workarounds").

XLA:CPU compiles and runs some programs far slower than the accelerators do, so on a
CPU this package computes the same function another way:

- `unroll_loops`: gradient accumulation's micro-batch loop is unrolled
  (steps.accumulated_gradients). XLA:CPU runs the convolutions of a loop body many
  times slower than the same convolutions unrolled; elsewhere the loop keeps compile
  time independent of the number of micro-batches.
- `init_compiler_options`: the training state's initialisation is compiled at -O0
  (steps.Trainer). It runs once; LLVM's optimisation of its ~100 RNG kernels costs
  more (tens of seconds for an NFNet) than running them unoptimised.
- `split_grouped_convs`: `groups='auto'` runs a grouped convolution as one dense
  convolution per group (layers.conv2d). XLA:CPU runs grouped convolutions far slower
  than dense ones, while cuDNN and the TPU run them natively.
- the row-by-row RandAugment schedule (data.augment.augment): a loop over the rows
  that runs only the op each row picked, instead of every op family over the whole
  batch. XLA:CPU pays for the work of all families; accelerators run them wide.

Each changes how, never what, is computed (up to float reassociation of the split
convolutions). `enabled()` is the switch: on when JAX's default backend is the CPU;
the environment variable NFNET_JAX_CPU_WORKAROUNDS=0 turns them off (=1 on, whatever
the backend), for comparing against what an accelerator compiles.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

SWITCH = 'NFNET_JAX_CPU_WORKAROUNDS'


def enabled() -> bool:
  """Whether the CPU workarounds apply: NFNET_JAX_CPU_WORKAROUNDS ('0' or '1') when
  set, else whether JAX's default backend is the CPU."""
  value = os.environ.get(SWITCH, '')
  if value not in ('', '0', '1'):
    raise ValueError(f'{SWITCH}={value!r}: expected 0 (off) or 1 (on), or unset '
                     '(on for the CPU backend only)')
  return value == '1' if value else jax.default_backend() == 'cpu'


def unroll_loops() -> bool:
  """Whether the gradient-accumulation loop is unrolled."""
  return enabled()


def init_compiler_options() -> Optional[dict[str, Any]]:
  """XLA compiler options for the one-off initialisation (None: the defaults)."""
  return {'xla_backend_optimization_level': 0} if enabled() else None


def split_grouped_convs() -> bool:
  """Whether `groups='auto'` splits grouped convolutions into dense ones."""
  return enabled()
