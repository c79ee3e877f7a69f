"""Helpers shared by the model-family tests (imported by tests/test_*.py) and by
benchmarks/step_memory.py (`saved_residuals`).

Parameters for forward passes are drawn in numpy from the shapes that `jax.eval_shape`
gives (WS convs standardise their kernels, so any N(0, 1/fan_in) draw is an honest
init); running Haiku's initialisers eagerly costs a compile per parameter shape on CPU.
"""
import contextlib
import io
import math
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.models import base, registry

ALPHA = 0.2
# Tests compile whole networks on 2 CPU cores: LLVM's optimisation passes would take
# longer than the few forward passes they speed up.
JIT = dict(compiler_options={'xla_backend_optimization_level': 0})


def trace(name, size=64, batch=2, num_classes=1000, interceptor=None, **overrides):
  """(param shapes, output shapes) of a registered model, by eval_shape only."""
  make = registry.module_fn(name, num_classes, **overrides)
  outs = {}

  def fwd(x):
    if interceptor is None:
      out = make()(x, is_training=False)
    else:
      with hk.intercept_methods(interceptor):
        out = make()(x, is_training=False)
    outs.update({k: (v.shape, v.dtype) for k, v in out.items()})

  shapes = jax.eval_shape(hk.transform(fwd).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
  return shapes, outs


def count(shapes):
  return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes))


def make_params(shapes, skip_gain=1.0, seed=0):
  """Concrete params: kernels N(0, 1/fan_in), gains 1, biases 0, skip gains given.

  Classifiers get random weights too (NF-RegNet's real init is zeros, which would
  make every logit 0 and the forward tests vacuous)."""
  rng = np.random.default_rng(seed)

  def make(module, name, v):
    if name == 'gain':
      return np.ones(v.shape, np.float32)
    if name in ('bias', 'b'):
      return np.zeros(v.shape, np.float32)
    if name == 'skip_gain':
      return np.full(v.shape, skip_gain, np.float32)
    return (rng.standard_normal(v.shape) / math.sqrt(math.prod(v.shape[:-1]))).astype(
        np.float32)

  return hk.data_structures.map(make, shapes)


def expected_curve(depths, alpha=ALPHA):
  """(expected input std, expected output std) per block, derived independently from
  docs/models.md: grow after each block, reset to 1 by each stage's first block."""
  e_in, e_out, s = [], [], 1.0
  for d in depths:
    for i in range(d):
      e_in.append(s)
      s = 1.0 if i == 0 else s
      s = (s * s + alpha * alpha) ** 0.5
      e_out.append(s)
  return e_in, e_out


def probe_model(name, replicate_strided, batch=8, size=64):
  """Real forward passes of `name` (float32, stochastic depth off). One compiled
  program serves every test: the model's forward with metrics, where a traced switch
  `inject` replaces each block's input by given noise / beta (block-by-block tests)
  or leaves it alone.

  Returns (param shapes, run(params, x, inject=False) -> (outputs, per-block output
  variances), images x [batch, size, size, 3], the betas seen in the last run, the
  stride of each block). `replicate_strided`: the noise for strided blocks is
  2x2-replicated, the signal an average-pooled shortcut is designed for (white noise
  would lose 3/4 of its variance in the pool); else white noise everywhere.
  """
  make = registry.module_fn(name, 10, stochdepth_rate=0.0)
  is_block = lambda ctx: (isinstance(ctx.module, base.NFResidualBlock)  # noqa: E731
                          and ctx.method_name == '__call__')
  blocks_in, betas = [], []

  def record(next_f, args, kwargs, ctx):
    if is_block(ctx):
      blocks_in.append((args[0].shape, ctx.module.stride))
    return next_f(*args, **kwargs)

  def probe(x, noises, inject):
    it, block_vars = iter(noises), []
    betas.clear()

    def icpt(next_f, args, kwargs, ctx):
      if not is_block(ctx):
        return next_f(*args, **kwargs)
      betas.append(ctx.module.beta)
      z = jnp.where(inject, (next(it) / ctx.module.beta).astype(args[0].dtype), args[0])
      out, res_var = next_f(z, *args[1:], **kwargs)
      block_vars.append(jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2),
                                         ddof=1)))  # unbiased: few samples at 2x2
      return out, res_var

    with hk.intercept_methods(icpt):
      out = make()(x, is_training=False, return_metrics=True)
    return out, block_vars

  x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
  with hk.intercept_methods(record):
    shapes = jax.eval_shape(hk.transform(lambda x: make()(x, is_training=False)).init,
                            jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(2)
  noises = []
  for (n, h, w, c), stride in blocks_in:
    if replicate_strided and stride > 1:
      z = rng.standard_normal((n, h // stride, w // stride, c)).astype(np.float32)
      noises.append(np.repeat(np.repeat(z, stride, 1), stride, 2))
    else:
      noises.append(rng.standard_normal((n, h, w, c)).astype(np.float32))
  f = jax.jit(hk.transform(probe).apply, **JIT)
  run = lambda params, x, inject=False: f(params, None, x, noises, inject)  # noqa: E731
  return shapes, run, x, betas, [s for _, s in blocks_in]


# Bytes per element of the dtypes print_saved_residuals names.
_ITEMSIZE = {'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 'u8': 1, 'i8': 1, 'u32': 4,
             'i32': 4, 'bool': 1}


def saved_residuals(net: hk.Transformed, params, x) -> list[tuple[int, str]]:
  """[(bytes, why)] of the batch-sized arrays JAX's autodiff keeps for the backward
  pass of sum(logits) in training mode: `jax.ad_checkpoint.print_saved_residuals`,
  parsed. What a remat policy saves is visible here (XLA:CPU's own buffers are not a
  guide: it merges recomputation back into the forward pass). `x` [N, H, W, 3] (an
  array or a ShapeDtypeStruct): N must differ from every parameter's leading
  dimension."""
  f = lambda p, x: net.apply(p, jax.random.PRNGKey(0), x, True)['logits'].sum()
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
  out = []
  for line in buf.getvalue().splitlines():
    m = re.match(r'(\w+)\[([\d,]*)\] (.*)', line.strip())
    if not m:
      raise ValueError(f'unexpected print_saved_residuals line: {line!r}')
    shape = tuple(int(d) for d in m.group(2).split(',') if d)
    if shape and shape[0] == x.shape[0]:
      out.append((_ITEMSIZE[m.group(1)] * math.prod(shape), m.group(3)))
  return out
