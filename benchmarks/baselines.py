"""Benchmark-only baselines and compile helpers.

- :func:`naive_model`: the "plain" baseline of `train_step.py` -- what a
  straightforward mixed-precision port does (jmp/`hk.mixed_precision`-style): every
  float32 parameter is cast to the compute dtype each time it is read, and weight
  standardisation then runs in the compute dtype on the rounded weights, with one
  XLA grouped conv on every backend. In float32 it is exactly the reference model.
- :data:`XLA_PRESETS` and :func:`compile_step`: `jit(...).lower(...).compile()` with
  XLA options that are dropped (and reported) when this XLA build does not know them,
  instead of aborting.

  python benchmarks/baselines.py compare --width 0.125 --depths 1,1,1,1 --out cmp.npz
  python benchmarks/baselines.py xla-presets --json presets.json
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Optional

if __name__ == '__main__':  # run as a script: the package from this checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import haiku as hk  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nfnet_jax import layers  # noqa: E402
from nfnet_jax.models import registry  # noqa: E402

# XLA option sets tried by the benchmarks (compile options, i.e. DebugOptions fields;
# unknown ones are dropped by `compile_step`). Defaults of XLA are tuned already, so
# the optimised step uses none; these are experiments measured side by side.
XLA_PRESETS: dict[str, dict[str, Any]] = {
    'none': {},
    # cuDNN graph fusions of convolutions with their elementwise neighbours
    # (bias, GELU, gamma/beta scaling) instead of separate XLA loop fusions.
    'conv_fusion': {'xla_gpu_experimental_enable_conv_fusion': True},
    # cuDNN runtime-compiled conv + bias + activation fusion (older mechanism).
    'runtime_fusion': {'xla_gpu_use_runtime_fusion': True},
    # Exhaustive conv/GEMM autotuning (level 4 is XLA's default already).
    'autotune4': {'xla_gpu_autotune_level': 4},
}


def _naive_ws_conv(next_f, args, kwargs, context):
  """Method interceptor: WSConv2D as a naive port writes it (statistics in the
  compute dtype, one XLA grouped conv)."""
  mod = context.module
  if not (isinstance(mod, layers.WSConv2D) and context.method_name == '__call__'):
    return next_f(*args, **kwargs)
  x = args[0] if args else kwargs['x']
  p = mod.params(x.shape[-1])  # already cast to the compute dtype by the getter
  kernel = layers.standardize_weight(p['w'], p['gain'], mod.eps, mod.eps_mode,
                                     dtype=x.dtype)
  with layers.grouped_conv_impl('lax'):
    return mod.conv(x, kernel, p['bias'])


def naive_model(name: str, num_classes: int = 1000, compute_dtype: Any = jnp.bfloat16,
                **overrides) -> hk.Transformed:
  """The "plain" baseline: params cast to `compute_dtype` on read, WS in that dtype.

  Same parameters and names as `models.create(name, num_classes, **overrides)`;
  with compute_dtype float32 it computes the same function.
  """
  make = registry.module_fn(name, num_classes, **overrides)
  cdt = jnp.dtype(compute_dtype)

  def cast_getter(next_getter, value, context):
    del context
    value = next_getter(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(cdt)
    return value

  def forward(images, is_training: bool, return_metrics: bool = False):
    with hk.custom_getter(cast_getter), hk.intercept_methods(_naive_ws_conv):
      return make()(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform(forward)


def compile_step(jitted: Callable, args: tuple, options: Optional[Mapping[str, Any]] = None,
                 log: Callable[[str], None] = print):
  """Lowers and compiles `jitted(*args)` with XLA compile options.

  Options this XLA does not know ('No such compile option') are dropped one by one
  and reported through `log`; any other compile error propagates. Returns
  (compiled, options actually used).
  """
  opts = dict(options or {})
  lowered = jitted.lower(*args)
  while True:
    try:
      return (lowered.compile(opts) if opts else lowered.compile()), opts
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e)
      bad = [k for k in opts if k in msg and 'No such compile option' in msg]
      if not bad:
        raise
      for k in bad:
        log(f'XLA option {k!r} unknown to this XLA build; dropped')
        opts.pop(k)


# ---------------------------------------------------------------------------
# Command line: checks of the baseline and of the XLA presets on this machine.
# ---------------------------------------------------------------------------
def _logits_and_grads(net: hk.Transformed, params, images, cotangent, dtype):
  """Training-mode logits and d(sum(logits * cotangent))/dparams (fixed RNG)."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def f(p):
    def loss(p):
      logits = net.apply(p, jax.random.PRNGKey(2), images.astype(dtype), True)['logits']
      return jnp.sum(logits * cotangent), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return logits, grads

  return f(params)


def compare(args) -> dict[str, Any]:
  """Logits [B, classes] and grads of naive_model and models.create per dtype, as
  flat float32 arrays named '<dtype>/<naive|reference>/logits' and
  '<dtype>/<naive|reference>/grads/<module>/<param>' (same params, inputs, RNG)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnet_jax import models  # pylint: disable=g-import-not-at-top
  kw = _overrides(args)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.image, args.image, 3),
                        jnp.float32)
  ct = jax.random.normal(jax.random.PRNGKey(3), (args.batch, args.num_classes), jnp.float32)
  ref = models.create(args.model, args.num_classes, **kw)
  params = ref.init(jax.random.PRNGKey(0), x, True)
  out = {}
  for name in args.dtype.split(','):
    dtype = jnp.dtype(name)
    for which, net in (('naive', naive_model(args.model, args.num_classes, dtype, **kw)),
                       ('reference', ref)):
      logits, grads = _logits_and_grads(net, params, x, ct, dtype)
      out[f'{name}/{which}/logits'] = np.asarray(logits, np.float32)
      for mod, leaves in grads.items():
        for k, g in leaves.items():
          out[f'{name}/{which}/grads/{mod}/{k}'] = np.asarray(g)
  return out


def parse_option(kv: str) -> tuple[str, Any]:
  """'key=value' -> (key, bool / int / str value), as XLA compile options take them."""
  k, _, v = kv.partition('=')
  val: Any = v
  if v.lower() in ('true', 'false'):
    val = v.lower() == 'true'
  else:
    try:
      val = int(v)
    except ValueError:
      pass
  return k.strip().lstrip('-'), val


def check_presets(extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Compiles 2 tanh(x) with each preset (and `extra` as 'custom'):
  {preset: {asked, used, log, value}}."""
  import jax  # pylint: disable=g-import-not-at-top
  jitted = jax.jit(lambda x: jnp.tanh(x) * 2)
  x = jnp.ones(3)
  out = {}
  presets = dict(XLA_PRESETS, **({'custom': dict(extra)} if extra else {}))
  for name, preset in presets.items():
    logs = []
    compiled, used = compile_step(jitted, (x,), preset, log=logs.append)
    out[name] = dict(asked=preset, used=used, log=logs,
                     value=[float(v) for v in compiled(x)])
  return out


def _overrides(args) -> dict[str, Any]:
  kw: dict[str, Any] = {}
  for k in ('width', 'group_size', 'stochdepth_rate', 'drop_rate'):
    if getattr(args, k) is not None:
      kw[k] = getattr(args, k)
  if args.depths:
    kw['depths'] = tuple(int(d) for d in args.depths.split(','))
  return kw


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description='Checks of the benchmark baselines.')
  sub = p.add_subparsers(dest='cmd', required=True)
  c = sub.add_parser('compare', help='naive_model vs models.create: logits and grads '
                     'to an .npz')
  c.add_argument('--model', default='F0')
  c.add_argument('--num-classes', type=int, default=10)
  c.add_argument('--batch', type=int, default=4)
  c.add_argument('--image', type=int, default=32)
  c.add_argument('--dtype', default='float32,bfloat16', help='comma-separated')
  c.add_argument('--width', type=float, default=None)
  c.add_argument('--depths', default=None, help='e.g. 1,1,1,1')
  c.add_argument('--group-size', type=int, default=None)
  c.add_argument('--stochdepth-rate', type=float, default=None)
  c.add_argument('--drop-rate', type=float, default=None)
  c.add_argument('--out', required=True, help='.npz to write')
  x = sub.add_parser('xla-presets', help='which options of each XLA_PRESETS entry this '
                     'XLA build knows (JSON)')
  x.add_argument('--json', required=True)
  x.add_argument('--opt', action='append', default=[],
                 help="key=value: also try these options together as preset 'custom'")
  args = p.parse_args(argv)
  for s in (args.dtype.split(',') if args.cmd == 'compare' else ()):
    if s not in ('float32', 'bfloat16'):
      p.error(f'--dtype: {s!r} is not float32 or bfloat16')
  if args.cmd == 'compare':
    import numpy as np  # pylint: disable=g-import-not-at-top
    arrays = compare(args)
    tmp = args.out + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)
    print(f'{len(arrays)} arrays -> {args.out}')
  else:
    res = check_presets(dict(parse_option(kv) for kv in args.opt))
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(res, f, indent=1)
    for name, r in res.items():
      print(f'{name:<16} used {r["used"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
