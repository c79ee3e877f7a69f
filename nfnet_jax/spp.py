"""Signal-propagation plots (SPPs) of a registered model at initialisation.

Brock, De, Smith (2021), "Characterizing signal propagation to close the performance
gap in unnormalized ResNets": feed a batch of N(0, 1) inputs through the freshly
initialised network and plot, after the stem and after every residual block,

* the average channel squared mean, mean_c (mean_{n,h,w} x)^2  (the "mean shift"),
* the average channel variance,      mean_c var_{n,h,w}(x),
* the residual-branch variance,      mean_c var_{n,h,w}(f(x)) before the skip gain.

The numbers come from the model's own ``return_metrics=True`` outputs
(``avg_sq_mean_i``, ``avg_var_i``, ``res_avg_var_k``).

Command line (writes the PNG and a JSON of the numbers next to it, ``spp.json``;
refuses to replace existing ones unless ``--overwrite``)::

    python -m nfnet_jax.spp --model F0 --out spp.png
    python -m nfnet_jax.spp --model F0 --compare nf_resnet50 --out cmp.png
    python -m nfnet_jax.spp --model nf_resnet50 --compare-ws --out ws.png

What to expect with white N(0, 1) inputs (it is not "unit variance everywhere"):

* At init every skip gain is 0, so an identity block passes its input through
  unchanged: the stream variance is constant inside a stage, block to block.
* Transition blocks replace the stream by their shortcut. In NFNets the shortcut
  2x2-average-pools ``act(x) * beta`` before its 1x1 conv, and averaging four
  spatially *independent* values divides their variance by 4, so with white inputs
  the stream variance drops by about 4x at each strided stage (0.91 -> 0.22 ->
  0.044 -> 0.0065 for F0 at 64 px, batch 8). NF-ResNets use a strided 1x1 conv
  (subsampling, no averaging) and keep it near 1 (nf_resnet50 at 64 px: 0.99, 0.88,
  0.75, 0.56 in its four stages). Real images are spatially smooth and lose much
  less in the pooling.
* What is near 1 in NFNets is what sees a well-scaled input: the stem output (0.91
  for F0) and the residual branches of the first blocks (0.81, 0.72).
* Scaled WS makes every conv kernel zero-mean per output channel, so a mean in
  the activations (a ReLU/GELU output has a positive mean) is not passed on: the
  average channel squared mean stays small. ``scaled_ws=False`` (``--compare-ws``)
  swaps every ``WSConv2D`` for a plain conv with the same raw kernel (see
  :func:`plain_conv_interceptor`); then the mean shift builds up block after block,
  the failure mode of unnormalised ReLU ResNets the paper's SPPs exposed. That
  comparison is made with the skip gains set to 1 (``skip_gain=1``), since at their
  init value 0 the residual branches do not reach the stream at all.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax import layers
from nfnet_jax.models import registry

__all__ = ['init_params', 'signal_stats', 'plain_conv_interceptor', 'stage_of_block',
           'plot', 'save_json', 'main']

Stats = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# Fast initialisation (numpy), same distributions as the model's initialisers.
# ---------------------------------------------------------------------------
def _fans(shape: Sequence[int], fan_in_axes=None) -> tuple[float, float]:
  """Haiku's fan computation (haiku/_src/initializers.py `_compute_fans`)."""
  if len(shape) < 1:
    return 1.0, 1.0
  if len(shape) == 1:
    return float(shape[0]), float(shape[0])
  if len(shape) > 2 and fan_in_axes is not None:
    fan_in = math.prod(shape[i] for i in fan_in_axes)
    fan_out = math.prod(s for i, s in enumerate(shape) if i not in fan_in_axes)
    return float(fan_in), float(fan_out)
  receptive = math.prod(shape[:-2])
  return float(shape[-2] * receptive), float(shape[-1] * receptive)


def _truncated_normal(rng: np.random.Generator, shape, lower=-2.0, upper=2.0):
  """Standard normal restricted to [lower, upper] (rejection, float32)."""
  x = rng.standard_normal(shape, dtype=np.float32)
  bad = (x < lower) | (x > upper)
  while bad.any():
    x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
    bad = (x < lower) | (x > upper)
  return x


def _numpy_init(init: Any, shape, dtype, rng: np.random.Generator) -> Optional[np.ndarray]:
  """`init(shape, dtype)` drawn with numpy for Haiku's random initialisers; None if
  `init` is not one of them (the caller then calls it directly)."""
  shape = tuple(shape)
  if isinstance(init, hk.initializers.VarianceScaling):
    fan_in, fan_out = _fans(shape, init.fan_in_axes)
    n = {'fan_in': fan_in, 'fan_out': fan_out,
         'fan_avg': (fan_in + fan_out) / 2}[init.mode]
    scale = init.scale / max(1.0, n)
    if init.distribution == 'truncated_normal':
      x = _truncated_normal(rng, shape) * (math.sqrt(scale) / .87962566103423978)
    elif init.distribution == 'normal':
      x = rng.standard_normal(shape, dtype=np.float32) * math.sqrt(scale)
    else:
      lim = math.sqrt(3.0 * scale)
      x = rng.uniform(-lim, lim, shape).astype(np.float32)
  elif isinstance(init, hk.initializers.TruncatedNormal):
    lo, hi = float(np.asarray(init.lower)), float(np.asarray(init.upper))
    x = (_truncated_normal(rng, shape, lo, hi) * float(np.asarray(init.stddev))
         + float(np.asarray(init.mean)))
  elif isinstance(init, hk.initializers.RandomNormal):
    x = rng.standard_normal(shape, dtype=np.float32) * init.stddev + init.mean
  elif isinstance(init, hk.initializers.RandomUniform):
    x = rng.uniform(init.minval, init.maxval, shape)
  else:
    return None
  return np.asarray(x, dtype)


def _freeze(overrides: Mapping[str, Any]) -> tuple:
  """A hashable form of constructor overrides (lists become tuples)."""
  fix = lambda v: tuple(v) if isinstance(v, list) else v
  return tuple(sorted((k, fix(v)) for k, v in overrides.items()))


def init_params(name: str, num_classes: int = 1000, image_size: int = 64, seed: int = 0,
                **overrides) -> dict[str, dict[str, np.ndarray]]:
  """Initial parameters of `registry.create(name, num_classes, **overrides)`, fast.

  The same tree, and per leaf the same distribution, as the model's own ``init``, but
  drawn with numpy: the model is traced shape-only (``jax.eval_shape``, no XLA
  compilation of a 70M-parameter init, which takes minutes on a small CPU) while a
  ``hk.custom_creator`` records each parameter's initialiser. Haiku's random
  initialisers (VarianceScaling, TruncatedNormal, RandomNormal, RandomUniform) are
  sampled with ``np.random.default_rng(seed)``; deterministic ones (ones, zeros,
  constants) are called as they are. Values differ from ``init(PRNGKey(seed))``
  draw by draw, not in distribution.

  `image_size` only sizes the shape-only trace: the parameters of these fully
  convolutional models do not depend on it. The last two results are cached; the
  arrays returned are read-only numpy arrays (``apply`` takes them as they are).
  """
  cached = _init_params_cached(name, num_classes, image_size, seed, _freeze(overrides))
  return {m: dict(leaves) for m, leaves in cached.items()}


@functools.lru_cache(maxsize=2)
def _init_params_cached(name, num_classes, image_size, seed, frozen_overrides):
  overrides = dict(frozen_overrides)
  make = registry.module_fn(name, num_classes, **overrides)
  records: list[tuple[str, str, tuple, Any, Any]] = []

  def creator(next_creator, shape, dtype, init, context):
    records.append((context.module_name, context.name, tuple(shape), dtype, init))
    return next_creator(shape, dtype, init)

  def forward(images):
    with hk.custom_creator(creator):
      return make()(images, is_training=False)

  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(seed)
  params: dict[str, dict[str, np.ndarray]] = {}
  for module, leaf, shape, dtype, init in records:
    value = _numpy_init(init, shape, dtype, rng)
    if value is None:
      value = np.array(init(shape, dtype))
    value.flags.writeable = False
    params.setdefault(module, {})[leaf] = value
  # Same structure as the model's init (order included).
  return {m: {k: params[m][k] for k in leaves} for m, leaves in shapes.items()}


# ---------------------------------------------------------------------------
# Without Scaled WS.
# ---------------------------------------------------------------------------
def plain_conv_interceptor(next_f, args, kwargs, context):
  """A Haiku method interceptor: every ``WSConv2D`` computes a *plain* convolution.

  The kernel is the layer's own raw ``w`` (variance-scaling(1, fan_in, normal), i.e.
  He initialisation once the gamma of the scaled activation is counted) times its
  ``gain``, plus its ``bias``, with no standardisation: no mean subtraction, no
  rescaling to unit fan-in variance. Parameters, names and shapes are unchanged, so
  the same params tree applies with and without it. Use inside a transformed
  function: ``with hk.intercept_methods(plain_conv_interceptor): model(x)``.
  """
  mod = context.module
  if context.method_name != '__call__' or not isinstance(mod, layers.WSConv2D):
    return next_f(*args, **kwargs)
  x = args[0] if args else kwargs['x']
  p = mod.params(x.shape[-1])
  return mod.conv(x, p['w'] * p['gain'], p['bias'])


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------
def _depths(name: str, overrides: Mapping[str, Any]) -> list[int]:
  depths = overrides.get('depths') or registry.info(name)['depth']
  return [int(d) for d in depths]


def stage_of_block(name: str, **overrides) -> np.ndarray:
  """[L] int: the stage index of each residual block."""
  return np.repeat(np.arange(len(_depths(name, overrides))), _depths(name, overrides))


def signal_stats(name: str, image_size: int = 64, batch: int = 8, seed: int = 0,
                 skip_gain: Optional[float] = None, scaled_ws: bool = True,
                 params: Optional[Mapping[str, Any]] = None, num_classes: int = 1000,
                 **overrides) -> Stats:
  """Signal-propagation statistics of `name` at initialisation on N(0, 1) inputs.

  Args:
    name: a registered model ('F0', 'nf_resnet50', 'nf_regnet_b0', ...).
    image_size, batch: input shape [batch, image_size, image_size, 3].
    seed: seeds the parameters (see :func:`init_params`) and the inputs.
    skip_gain: None keeps every block's skip gain at its init value (0); a number
      sets all of them to it (1 shows what the residual branches add).
    scaled_ws: False replaces Scaled WS by plain convs (:func:`plain_conv_interceptor`).
    params: use these parameters instead of fresh ones (skip_gain still applies).
    num_classes: classifier size of the model (that of `params` if given).
    **overrides: model constructor overrides (width, depths, activation, ...).
  Returns:
    numpy float64 arrays ``avg_sq_mean`` [L+1] and ``avg_var`` [L+1] (index 0: stem
    output, k: output of block k-1), ``res_var`` [L] (residual branch of block k,
    before the skip gain), and ``stage`` [L] (int, stage of each block).
  """
  if params is None:
    params = init_params(name, num_classes, image_size, seed, **overrides)
  if skip_gain is not None:
    params = {m: {k: (np.full(np.shape(v), skip_gain, np.float32) if k == 'skip_gain'
                      else v) for k, v in leaves.items()}
              for m, leaves in params.items()}
  apply = _metrics_apply(name, num_classes, scaled_ws, _freeze(overrides))
  x = np.random.default_rng([seed, 1]).standard_normal(
      (batch, image_size, image_size, 3), dtype=np.float32)
  out = jax.device_get(apply(params, None, x))
  num_blocks = sum(1 for k in out if k.startswith('res_avg_var_'))
  stats = {
      'avg_sq_mean': np.array([out[f'avg_sq_mean_{i}'] for i in range(num_blocks + 1)],
                              np.float64),
      'avg_var': np.array([out[f'avg_var_{i}'] for i in range(num_blocks + 1)],
                          np.float64),
      'res_var': np.array([out[f'res_avg_var_{i}'] for i in range(num_blocks)],
                          np.float64),
  }
  stage = stage_of_block(name, **overrides)
  if len(stage) != num_blocks:  # A model whose depths we could not read.
    stage = np.zeros(num_blocks, np.int64)
  stats['stage'] = stage
  return stats


@functools.lru_cache(maxsize=8)
def _metrics_apply(name: str, num_classes: int, scaled_ws: bool, frozen_overrides: tuple):
  """Jitted `apply(params, rng, images)` -> outputs with metrics (cached, so curves
  with different skip gains or seeds share one compilation)."""
  make = registry.module_fn(name, num_classes, **dict(frozen_overrides))

  def forward(images):
    model = make()
    if scaled_ws:
      return model(images, is_training=False, return_metrics=True)
    with hk.intercept_methods(plain_conv_interceptor):
      return model(images, is_training=False, return_metrics=True)

  return jax.jit(hk.transform(forward).apply)


# ---------------------------------------------------------------------------
# Plotting and files.
# ---------------------------------------------------------------------------
def plot(curves: Mapping[str, Stats], title: str = '', path: Optional[str] = None):
  """Three panels (avg channel squared mean, avg channel variance, residual-branch
  variance) against block depth, one line per entry of `curves`; dotted vertical lines
  (in the colour of the curve they belong to) mark the output of the first block of
  each new stage. Saves to `path` if given.

  Returns the matplotlib Figure.
  """
  import matplotlib
  if path is not None and 'matplotlib.pyplot' not in sys.modules:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
  panels = [('avg_sq_mean', 'average channel squared mean', 0),
            ('avg_var', 'average channel variance', 0),
            ('res_var', 'residual-branch variance', 1)]
  colors = {}
  for ax, (key, label, first_block) in zip(axes, panels):
    for (name, s), marker in zip(curves.items(), 'osd^v<>'):
      y = np.asarray(s[key], np.float64)
      # x = depth in blocks: 0 is the stem output, k the output of block k-1; the
      # residual branch of block k sits at k + 1.
      x = np.arange(len(y)) + first_block
      (line,) = ax.plot(x, y, marker=marker, markersize=4, label=name)
      colors[name] = line.get_color()
    ax.set_yscale('log')
    ax.set_title(label)
    ax.set_xlabel('residual block (0 = stem output)')
    ax.grid(True, which='both', alpha=0.3)
  # Dotted lines at the output of each stage's first (transition) block, per curve.
  drawn = set()
  for name, s in curves.items():
    stage = np.asarray(s.get('stage', []))
    for k in np.flatnonzero(np.diff(stage)) + 1:
      if k in drawn:
        continue
      drawn.add(k)
      for ax in axes:
        ax.axvline(k + 1, color=colors[name], linestyle=':', linewidth=1, alpha=0.7)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  if path is not None:
    fig.savefig(path, dpi=90)
  return fig


def _jsonable(stats: Stats) -> dict[str, list]:
  return {k: np.asarray(v).tolist() for k, v in stats.items()}


def save_json(curves: Mapping[str, Stats], path: str, config: Mapping[str, Any]) -> None:
  """{"config": {...}, "curves": {label: {avg_sq_mean: [..], avg_var: [..],
  res_var: [..], stage: [..]}}}."""
  with open(path, 'w') as f:
    json.dump({'config': dict(config),
               'curves': {k: _jsonable(v) for k, v in curves.items()}}, f, indent=1)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, _, value = item.partition('=')
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
    if isinstance(out[key], list):
      out[key] = tuple(out[key])
  return out


def _require_matplotlib(parser: argparse.ArgumentParser) -> None:
  """Exits with one line if matplotlib is missing, before any model is built."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    parser.exit(1, f'{parser.prog}: error: plotting needs matplotlib, which is not '
                   'installed: pip install -e .[demo]  (or pip install matplotlib)\n')


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Stats]:
  """CLI entry point; returns the curves it plotted."""
  p = argparse.ArgumentParser(
      prog='python -m nfnet_jax.spp',
      description='Signal-propagation plots at initialisation (N(0,1) inputs).')
  p.add_argument('--model', default='F0', help='registered model name')
  p.add_argument('--out', default='spp.png', help='PNG path; the JSON goes next to it')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing PNG/JSON at --out (default: refuse, '
                      'before computing anything)')
  p.add_argument('--compare', default=None, help='a second model on the same axes')
  p.add_argument('--compare-ws', action='store_true',
                 help='compare --model with and without Scaled WS (plain convs); '
                      'uses --skip-gain, default 1 for this comparison')
  p.add_argument('--image-size', type=int, default=64)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--skip-gain', type=float, default=None,
                 help='set every skip gain to this value (default: init value 0)')
  p.add_argument('--override', action='append', default=[], metavar='KEY=JSON',
                 help='model constructor override, e.g. width=0.25 or depths=[1,1,1,1] '
                      '(applies to --model and --compare)')
  args = p.parse_args(argv)
  if args.compare and args.compare_ws:
    p.error('use either --compare MODEL or --compare-ws, not both')
  json_path = os.path.splitext(args.out)[0] + '.json'
  existing = [f for f in (args.out, json_path) if os.path.exists(f)]
  if existing and not args.overwrite:  # e.g. the plots committed under docs/
    verb = 'exists' if len(existing) == 1 else 'exist'
    p.exit(1, f'{p.prog}: error: {" and ".join(existing)} already {verb}; pass '
              '--overwrite to replace, or another --out\n')
  _require_matplotlib(p)
  overrides = _parse_overrides(args.override)
  common = dict(image_size=args.image_size, batch=args.batch, seed=args.seed, **overrides)
  skip_gain = args.skip_gain
  if args.compare_ws and skip_gain is None:
    skip_gain = 1.0
  sg = 'init (0)' if skip_gain is None else f'{skip_gain:g}'
  curves: dict[str, Stats] = {}
  if args.compare_ws:
    curves[f'{args.model} (Scaled WS)'] = signal_stats(args.model, skip_gain=skip_gain,
                                                       **common)
    curves[f'{args.model} (plain convs, no WS)'] = signal_stats(
        args.model, skip_gain=skip_gain, scaled_ws=False, **common)
  else:
    curves[args.model] = signal_stats(args.model, skip_gain=skip_gain, **common)
    if args.compare:
      curves[args.compare] = signal_stats(args.compare, skip_gain=skip_gain, **common)
  title = (f'Signal propagation at init: N(0,1) inputs {args.batch}x{args.image_size}px, '
           f'skip gain {sg}' + (f', overrides {overrides}' if overrides else ''))
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  # Each file is written beside its target and renamed over it: an interrupted run
  # leaves the previous plot and numbers whole.
  png_tmp, json_tmp = args.out + '.tmp.png', json_path + '.tmp'
  fig = plot(curves, title, png_tmp)
  import matplotlib.pyplot as plt
  plt.close(fig)
  config = dict(vars(args), skip_gain=skip_gain, overrides=overrides)
  config.pop('override')
  config.pop('overwrite')
  save_json(curves, json_tmp, config)
  os.replace(png_tmp, args.out)
  os.replace(json_tmp, json_path)
  for label, s in curves.items():
    print(f'{label}: avg_var {np.array2string(s["avg_var"], precision=3)}')
    print(f'{" " * len(label)}  avg_sq_mean '
          f'{np.array2string(s["avg_sq_mean"], precision=3)}')
    print(f'{" " * len(label)}  res_var {np.array2string(s["res_var"], precision=3)}')
  print(f'wrote {args.out} and {json_path}')
  return curves


if __name__ == '__main__':
  main()
