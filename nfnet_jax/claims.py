r"""The papers' comparisons as sweeps of ordinary training runs.

  python -m nfnet_jax.claims --claim nf_vs_bn --out /tmp/claims
  python -m nfnet_jax.claims --claim batch_size_agc --out /tmp/claims --scale imagenet \
      --seeds 0,1,2

Each run of a sweep is `python -m nfnet_jax.train --config=experiments/claims.py:<scale>
--workdir=<out>/<claim>/<run> --config.<key>=<value> ...` in a subprocess started in
the working directory (the recipe file is `--config`, by default
`experiments/claims.py` of the working directory, as in the train commands), with its
own workdir: re-running the same command skips the runs that finished (their
`claims_run.json` exists) and resumes the others from their last checkpoint. The
claim's results go to `<out>/<claim>.json` (every run: its settings, status, held-out
top-1 of the raw and EMA weights, last training loss, throughput) and
`<out>/<claim>.png`.

Claims (Brock, De, Smith 2021; Brock, De, Smith, Simonyan 2021):

- nf_vs_bn: NF-ResNets match batch-normalized ResNets of the same depth under the same
  recipe (held-out top-1 of nf_resnetD vs bn_resnetD, and of the post-activation
  bn_resnetD with zero-initialised branches).
- batch_size_agc: without clipping NF-ResNets degrade or diverge as the batch grows (lr
  = 0.1 * batch / 256, same epochs); AGC lets them scale like the BN baseline.
- clip_threshold: the best AGC clipping threshold shrinks as the batch grows.
- cost: training step time of an NFNet vs a BN-ResNet (and an EfficientNet, which this
  package does not have; the JSON says so instead of a number).

A run that stops on non-finite losses is recorded as 'diverged' (its top-1 as
chance); any other failure as 'failed', and the command exits with status 1 after the
sweep. Nothing here imports JAX: the runs do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Optional, Sequence

# The recipe every run of a scale starts from, relative to the working directory
# (the repository root in the documented commands), as train's --config is.
DEFAULT_CONFIG = 'experiments/claims.py'
SCALES = ('tiny', 'cpu', 'imagenet')
RESULT_FILE = 'claims_run.json'
DEFAULT_OUT = Path('runs/claims')  # Relative to the working directory.
EFFICIENTNET_NOTE = (
    'not measured: this package has no EfficientNet, and the only reference '
    'implementation (timm) needs PyTorch, which is not a dependency of nfnet_jax; '
    'the paper reports EfficientNet-B7 at 8.7x the training latency of NFNet-F1 at '
    'equal top-1 (TPUv3).')


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a sweep: a name (its workdir) and its config overrides."""
  name: str
  overrides: dict[str, Any]
  labels: dict[str, Any]  # What the claim's table/plot groups by (arm, x, seed).
  variant: str = ''       # experiments/claims.py's second argument ('F0': an NFNet).


@dataclasses.dataclass(frozen=True)
class Claim:
  name: str
  paper: str              # The paper's statement, in our words.
  runs: Callable[[str, Sequence[int]], list[RunSpec]]
  summarize: Callable[[list[dict]], dict]
  plot: Callable[[Any, list[dict]], None]
  measures_time: bool = False  # Runs one at a time, without XLA's -O0 CPU shortcut.


def _scale_grid(scale: str, tiny, cpu, imagenet):
  return {'tiny': tiny, 'cpu': cpu, 'imagenet': imagenet}[scale]


def _max_micro_batch(scale: str) -> int:
  """Largest per-step micro-batch a device of this scale holds (else accumulate)."""
  return _scale_grid(scale, 16, 256, 1024)


def _batch_overrides(scale: str, batch: int) -> dict[str, Any]:
  accum = max(1, batch // _max_micro_batch(scale))
  return {'batch_size': batch, 'grad_accum_steps': accum}


# ---------------------------------------------------------------------------
# The claims.
# ---------------------------------------------------------------------------
def _nf_vs_bn_runs(scale: str, seeds: Sequence[int]) -> list[RunSpec]:
  """nf_resnetD vs bn_resnetD (pre-activation, DeepMind's baseline) and, as a
  control, bn_v1 (post-activation BN-ResNet whose residual branches start at zero,
  as the NF-ResNet's do; at 'cpu' scale depth 26 only, none at 'tiny')."""
  depths = _scale_grid(scale, [26], [26, 50], [50, 101, 152])
  v1_depths = _scale_grid(scale, [], [26], [50, 101, 152])
  runs = []
  for depth in depths:
    for arm in ('nf', 'bn', 'bn_v1'):
      if arm == 'bn_v1' and depth not in v1_depths:
        continue
      for seed in seeds:
        model = f'{arm[:2]}_resnet{depth}'
        runs.append(RunSpec(f'{model}{arm[2:]}_s{seed}', {'model': model, 'seed': seed},
                            dict(arm=arm, x=depth, seed=seed),
                            variant='v1' if arm == 'bn_v1' else ''))
  return runs


def _batch_size_agc_runs(scale: str, seeds: Sequence[int]) -> list[RunSpec]:
  batches = _scale_grid(scale, [16, 32], [128, 512, 2048], [256, 1024, 2048, 4096])
  clip = _scale_grid(scale, 0.04, 0.04, 0.01)
  depth = _scale_grid(scale, 26, 26, 50)
  arms = {'nf_no_clip': (f'nf_resnet{depth}', 0.0),
          'nf_agc': (f'nf_resnet{depth}', clip),
          'bn': (f'bn_resnet{depth}', 0.0)}
  runs = []
  for batch in batches:
    for arm, (model, clipping) in arms.items():
      for seed in seeds:
        runs.append(RunSpec(
            f'{arm}_b{batch}_s{seed}',
            {'model': model, 'seed': seed, 'optimizer.agc_clipping': clipping,
             **_batch_overrides(scale, batch)},
            dict(arm=arm, x=batch, seed=seed, clipping=clipping)))
  return runs


def _clip_threshold_runs(scale: str, seeds: Sequence[int]) -> list[RunSpec]:
  batches = _scale_grid(scale, [16, 32], [128, 2048], [1024, 4096])
  clips = _scale_grid(scale, [0.01, 0.16], [0.01, 0.04, 0.16],
                      [0.01, 0.02, 0.04, 0.08, 0.16])
  depth = _scale_grid(scale, 26, 26, 50)
  runs = []
  for batch in batches:
    for clip in clips:
      for seed in seeds:
        runs.append(RunSpec(
            f'b{batch}_clip{clip:g}_s{seed}',
            {'model': f'nf_resnet{depth}', 'seed': seed,
             'optimizer.agc_clipping': clip, **_batch_overrides(scale, batch)},
            dict(arm=f'batch {batch}', x=clip, seed=seed, batch=batch)))
  return runs


def _cost_runs(scale: str, seeds: Sequence[int]) -> list[RunSpec]:
  """A short run per model; throughput from the train loop's own img/s log, which
  leaves out the first step (compilation). NFNet-F0 at 192 px vs BN-ResNet-50 at 224
  px at ImageNet scale (each model's training resolution)."""
  del seeds
  steps = _scale_grid(scale, 4, 24, 200)
  log = _scale_grid(scale, 2, 8, 50)
  common = {'total_steps': steps, 'log_every': log, 'checkpoint_every_steps': 0}
  if scale == 'imagenet':
    common['batch_size'] = 256
  else:
    common['data.offline.num_eval'] = 0
  runs = [RunSpec('cost_F0', dict(common, seed=0), dict(arm='F0', x='F0', seed=0),
                  variant='F0')]
  for model in _scale_grid(scale, ['bn_resnet26'], ['bn_resnet26', 'nf_resnet26'],
                           ['bn_resnet50', 'nf_resnet50']):
    runs.append(RunSpec(f'cost_{model}', dict(common, model=model, seed=0),
                        dict(arm=model, x=model, seed=0)))
  return runs


def _by_arm_x(rows: list[dict], key: str = 'top1') -> dict[str, dict[str, dict]]:
  """{arm: {x: {mean, std, n, values}}} of `key` over seeds (diverged runs count as
  chance; failed runs are left out)."""
  out: dict[str, dict[str, dict]] = {}
  for r in rows:
    if r['status'] == 'failed' or r.get(key) is None:
      continue
    vals = out.setdefault(r['arm'], {}).setdefault(str(r['x']), dict(values=[]))['values']
    vals.append(r[key])
  for arm in out.values():
    for cell in arm.values():
      v = cell['values']
      cell.update(mean=statistics.fmean(v), n=len(v),
                  std=statistics.stdev(v) if len(v) > 1 else 0.0)
  return out


def _summarize_nf_vs_bn(rows):
  table = _by_arm_x(rows)
  gaps: dict[str, dict[str, float]] = {'bn': {}, 'bn_v1': {}}
  for base, by_x in gaps.items():
    for x in table.get('nf', {}):
      if x in table.get(base, {}):
        by_x[x] = table['nf'][x]['mean'] - table[base][x]['mean']
  return dict(top1=table, nf_minus_bn=gaps['bn'], nf_minus_bn_v1=gaps['bn_v1'])


def _summarize_batch(rows):
  table = _by_arm_x(rows)
  diverged = sorted({(r['arm'], r['x']) for r in rows if r['status'] == 'diverged'})
  return dict(top1=table, diverged=[dict(arm=a, batch=x) for a, x in diverged])


def _summarize_clip(rows):
  table = _by_arm_x(rows)
  best = {}
  for arm, cells in table.items():
    clip, cell = max(cells.items(), key=lambda kv: kv[1]['mean'])
    best[arm] = dict(clipping=float(clip), top1=cell['mean'])
  return dict(top1=table, best_clipping=best)


def _summarize_cost(rows):
  out = {}
  for r in rows:
    ips = r.get('images_per_sec')
    out[r['arm']] = dict(images_per_sec=ips, batch_size=r.get('batch_size'),
                         step_ms=(1000.0 * r['batch_size'] / ips) if ips else None)
  out['efficientnet'] = dict(images_per_sec=None, step_ms=None, note=EFFICIENTNET_NOTE)
  return dict(throughput=out)


# ---------------------------------------------------------------------------
# Plots (matplotlib, Agg).
# ---------------------------------------------------------------------------
def _line_plot(ax, table: dict, xlabel: str, log2: bool = False, logx: bool = False,
               chance: Optional[float] = None):
  for arm, cells in table.items():
    xs = sorted(cells, key=float)
    ax.errorbar([float(x) for x in xs], [100 * cells[x]['mean'] for x in xs],
                yerr=[100 * cells[x]['std'] for x in xs], marker='o', capsize=3,
                label=arm)
  if log2:
    ax.set_xscale('log', base=2)
  if logx:
    ax.set_xscale('log')
  if chance is not None:
    ax.axhline(100 * chance, color='grey', linestyle=':', linewidth=1, label='chance')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('held-out top-1 (%)')
  ax.grid(alpha=0.3)
  ax.legend()


def _plot_nf_vs_bn(ax, rows):
  _line_plot(ax, _summarize_nf_vs_bn(rows)['top1'], 'depth',
             chance=rows[0].get('chance') if rows else None)
  ax.set_title('NF-ResNet vs BN-ResNet')


def _plot_batch(ax, rows):
  _line_plot(ax, _summarize_batch(rows)['top1'], 'batch size (lr = base_lr * B / 256)',
             log2=True, chance=rows[0].get('chance') if rows else None)
  for r in rows:
    if r['status'] == 'diverged':
      ax.plot([r['x']], [100 * r['top1']], 'kx', markersize=10)
  ax.set_title('Batch size with and without AGC (x: diverged)')


def _plot_clip(ax, rows):
  _line_plot(ax, _summarize_clip(rows)['top1'], 'AGC clipping threshold', logx=True,
             chance=rows[0].get('chance') if rows else None)
  ax.set_title('Clipping threshold per batch size (NF-ResNet)')


def _plot_cost(ax, rows):
  names = [r['arm'] for r in rows]
  ms = [(1000.0 * r['batch_size'] / r['images_per_sec']) if r.get('images_per_sec')
        else 0.0 for r in rows]
  ax.bar(names, ms)
  ax.set_ylabel('ms per training step')
  ax.set_title('Training step time (EfficientNet: not available, see JSON)')


CLAIMS: dict[str, Claim] = {c.name: c for c in (
    Claim('nf_vs_bn',
          'NF-ResNets match or beat batch-normalized ResNets of the same depth '
          'trained with the same recipe (ImageNet, depths 50-288).',
          _nf_vs_bn_runs, _summarize_nf_vs_bn, _plot_nf_vs_bn),
    Claim('batch_size_agc',
          'Without clipping, NF-ResNets become unstable as the batch size (and with it '
          'the learning rate, 0.1 * B / 256) grows; with AGC they train at batch 4096 '
          'and match the BN-ResNet, which also scales.',
          _batch_size_agc_runs, _summarize_batch, _plot_batch),
    Claim('clip_threshold',
          'The best AGC clipping threshold is smaller at larger batch sizes.',
          _clip_threshold_runs, _summarize_clip, _plot_clip),
    Claim('cost',
          'NFNets are much cheaper to train than EfficientNets of the same accuracy '
          '(F1 8.7x faster than EfficientNet-B7) and cost about as much per step as '
          'BN-ResNets.',
          _cost_runs, _summarize_cost, _plot_cost, measures_time=True),
)}


# ---------------------------------------------------------------------------
# Running and collecting.
# ---------------------------------------------------------------------------
def command(spec: RunSpec, scale: str, workdir: Path,
            config: str = DEFAULT_CONFIG) -> list[str]:
  """The train command of one run (argv); `config` is the recipe file's path."""
  arg = f'{scale},{spec.variant}' if spec.variant else scale
  return [sys.executable, '-m', 'nfnet_jax.train', f'--config={config}:{arg}',
          f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in spec.overrides.items()]]


def read_metrics(workdir: Path) -> dict[str, Any]:
  """Final eval and last train records of a run's metrics.jsonl."""
  out: dict[str, Any] = {}
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return out
  ips = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # A line cut by a kill: the run wrote the rest again.
      continue
    if 'eval/raw_top1' in rec:
      out.update(top1=rec['eval/raw_top1'], ema_top1=rec['eval/ema_top1'],
                 eval_loss=rec['eval/raw_loss'], eval_step=rec['step'])
    if 'train/loss' in rec:
      out.update(train_loss=rec['train/loss'], train_step=rec['step'])
      if math.isfinite(rec.get('train/images_per_sec', float('nan'))):
        ips.append(rec['train/images_per_sec'])
  if ips:
    out['images_per_sec'] = ips[-1]  # The last interval: compilation long gone.
  return out


# The settings the claims vary; a run that sets only these is identified by them.
_RUN_KEYS = ('model', 'seed', 'batch_size', 'grad_accum_steps', 'optimizer.agc_clipping')


def run_key(argv: Sequence[str]) -> Optional[str]:
  """What a train command trains, as a string: its config argument plus the claims'
  settings, the scale's defaults filled in where a claim leaves them out (every claim
  sets the model); None when it sets anything else (such a run is never shared
  between claims)."""
  arg = next((a for a in argv if a.startswith('--config=')), None)
  if arg is None:
    return None
  scale, _, variant = arg.partition(':')[2].partition(',')
  overrides = {}
  for a in argv:
    if a.startswith('--config.'):
      k, _, v = a[len('--config.'):].partition('=')
      overrides[k] = v
  if set(overrides) - set(_RUN_KEYS) or scale not in SCALES:
    return None
  full = {'batch_size': _default_batch(scale), 'grad_accum_steps': 1,
          'optimizer.agc_clipping': 0.0, 'seed': 0, **overrides}
  full['optimizer.agc_clipping'] = float(full['optimizer.agc_clipping'])
  for k in ('seed', 'batch_size', 'grad_accum_steps'):
    full[k] = int(full[k])
  return json.dumps(dict(full, scale=scale, variant=variant), sort_keys=True)


def _finished_twin(cmd: Sequence[str], out: Path, workdir: Path) -> Optional[Path]:
  """The result file of a finished run of another claim under `out` that trains
  exactly what `cmd` trains (same run_key), if any."""
  key = run_key(cmd)
  if key is None:
    return None
  for path in sorted(out.glob(f'*/*/{RESULT_FILE}')):
    if path.parent == workdir:
      continue
    try:
      row = json.loads(path.read_text())
    except ValueError:
      continue
    if row.get('status') in ('ok', 'diverged') and \
        run_key(row.get('command', '').split()) == key:
      return path
  return None


def run_one(spec: RunSpec, scale: str, claim_dir: Path, env: dict[str, str],
            chance: float, config: str = DEFAULT_CONFIG) -> dict[str, Any]:
  """Runs (or resumes, or skips when finished) one run; returns its row. A run that
  another claim under the same output directory already finished with the same
  settings is not trained again: its row is reused (`reused_from`)."""
  workdir = claim_dir / spec.name
  result = workdir / RESULT_FILE
  if result.exists():
    try:
      return json.loads(result.read_text())
    except ValueError:
      pass  # Cut short while written: run again (it resumes from its checkpoint).
  cmd = command(spec, scale, workdir, config)
  head = {'name': spec.name, **spec.overrides, **spec.labels}
  batch = {'batch_size': spec.overrides.get('batch_size', _default_batch(scale))}
  workdir.mkdir(parents=True, exist_ok=True)
  twin = _finished_twin(cmd, claim_dir.parent, workdir)
  if twin is not None:
    old = json.loads(twin.read_text())
    keep = ('status', 'rc', 'seconds', 'chance', 'top1', 'ema_top1', 'eval_loss',
            'eval_step', 'train_loss', 'train_step', 'images_per_sec')
    row = {**head, **{k: old[k] for k in keep if k in old}, 'command': old['command'],
           'reused_from': str(twin.parent.relative_to(claim_dir.parent)), **batch}
    _write_json(result, row)
    return row
  start = time.time()
  with open(workdir / 'train.log', 'a', encoding='utf-8') as log:
    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                        check=False).returncode
  text = (workdir / 'train.log').read_text(errors='replace')
  if rc == 0:
    status = 'ok'
  elif 'NonFiniteError' in text or 'consecutive non-finite' in text:
    status = 'diverged'
  elif rc in (-2, 130):  # Ctrl-C: stop the sweep, resume later.
    raise KeyboardInterrupt
  else:
    status = 'failed'
  row = {**head, 'status': status, 'rc': rc, 'seconds': round(time.time() - start, 1),
         'chance': chance, 'command': ' '.join(cmd[1:]), **read_metrics(workdir), **batch}
  if status == 'diverged':
    row['top1'] = row['ema_top1'] = chance
  if status != 'failed':  # Failed runs are retried by the next invocation.
    _write_json(result, row)
  return row


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def _default_batch(scale: str) -> int:
  return _scale_grid(scale, 16, 128, 1024)


def _num_classes(scale: str) -> int:
  """Classes of the scale's data (experiments/claims.py; a test keeps them equal)."""
  return _scale_grid(scale, 5, 10, 1000)


def run_claim(name: str, out: Path, scale: str, seeds: Sequence[int],
              log: Callable[[str], None] = print,
              config: str = DEFAULT_CONFIG) -> dict[str, Any]:
  """Runs the sweep of claim `name` from the recipe file `config`; writes
  <out>/<name>.json and .png."""
  claim = CLAIMS[name]
  specs = claim.runs(scale, seeds)
  claim_dir = out / name
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if scale != 'imagenet':
    # Runs of one sweep share compiled programs (seeds differ only in values).
    env.setdefault('JAX_COMPILATION_CACHE_DIR', str(out / 'xla_cache'))
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    if scale == 'tiny' and not claim.measures_time:
      # Plumbing runs: compiling costs more than running; -O0 halves it (and makes
      # the programs several times slower, which only pays for a few steps).
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          ' --xla_backend_optimization_level=0').strip()
  chance = 1.0 / _num_classes(scale)
  rows = []
  for i, spec in enumerate(specs):
    log(f'[{name} {i + 1}/{len(specs)}] {spec.name}')
    row = dict(run_one(spec, scale, claim_dir, env, chance, config), chance=chance)
    if row['status'] == 'diverged':  # Scored at chance (as of this version's data).
      row['top1'] = row['ema_top1'] = chance
    log(f'  {row["status"]}: top-1 {row.get("top1")}, {row["seconds"]} s')
    rows.append(row)
    # After every run, so an interrupted sweep leaves what it has (complete: false).
    report = _write_report(claim, rows, out, scale, seeds, chance, len(specs))
  return report


def _write_report(claim: Claim, rows: list[dict], out: Path, scale: str,
                  seeds: Sequence[int], chance: float, num_runs: int) -> dict[str, Any]:
  report = dict(claim=claim.name, scale=scale, seeds=list(seeds), paper=claim.paper,
                config=f'experiments/claims.py:{scale}', chance=chance,
                complete=len(rows) == num_runs, runs_done=len(rows), runs_planned=num_runs,
                summary=claim.summarize(rows), runs=rows)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / f'{claim.name}.json', report)
  _write_plot(claim, rows, out / f'{claim.name}.png')
  return report


def _write_plot(claim: Claim, rows: list[dict], path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  claim.plot(ax, rows)
  fig.tight_layout()
  fig.savefig(path.with_suffix('.tmp.png'), dpi=100)
  plt.close(fig)
  os.replace(path.with_suffix('.tmp.png'), path)


def listing(scale: str, seeds: Sequence[int]) -> str:
  """What `python -m nfnet_jax.claims` without --claim prints: each claim, its number
  of training runs at `scale`, the paper's statement, and how to run one."""
  lines = [f'The papers\' claims as sweeps of training runs (--scale {scale}, '
           f'--seeds {",".join(map(str, seeds))});',
           'docs/claims.md has the method and the verdicts.', '']
  for claim in CLAIMS.values():
    n = len(claim.runs(scale, seeds))
    lines += [textwrap.fill(f'{claim.name:<16}{n} run(s): {claim.paper}', width=88,
                            initial_indent='  ', subsequent_indent=' ' * 18)]
  lines += ['', 'Run one (results in <out>/<claim>.json and .png; re-running resumes):',
            f'  python -m nfnet_jax.claims --claim nf_vs_bn [--out {DEFAULT_OUT}] '
            '[--scale cpu] [--seeds 0,1,2]',
            'Print its training commands without running them: add --dry_run.']
  return '\n'.join(lines)


def _seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'--seeds={text!r}: expected integers like 0,1,2')
  if not seeds or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f'--seeds={text!r}: expected distinct integers')
  return seeds


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m nfnet_jax.claims',
      description='Runs a paper claim as a sweep of training runs; writes '
                  '<out>/<claim>.json and <out>/<claim>.png. Re-running resumes.')
  parser.add_argument('--claim', choices=[*CLAIMS, 'all'],
                      help='the claim to run, or all; without it, the claims are listed '
                           'and nothing runs')
  parser.add_argument('--out', default=DEFAULT_OUT, type=Path,
                      help=f'output directory (default: {DEFAULT_OUT})')
  parser.add_argument('--scale', default='cpu', choices=SCALES)
  parser.add_argument('--seeds', default='0', type=_seeds,
                      help='comma-separated seeds (default 0)')
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='the runs\' recipe file, as train\'s --config takes it '
                           f'(default: {DEFAULT_CONFIG}, from the repository root)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the train commands and exit')
  args = parser.parse_args(argv)
  if args.claim is None:
    print(listing(args.scale, args.seeds))
    return 0
  names = list(CLAIMS) if args.claim == 'all' else [args.claim]
  if args.dry_run:
    for name in names:
      for spec in CLAIMS[name].runs(args.scale, args.seeds):
        print(' '.join(command(spec, args.scale, args.out / name / spec.name,
                               args.config)))
    return 0
  if not os.path.isfile(args.config):
    parser.error(f'--config={args.config}: no such file; run from the repository '
                 'root or pass --config=PATH/experiments/claims.py')
  failed = []
  for name in names:
    report = run_claim(name, args.out, args.scale, args.seeds, config=args.config)
    failed += [r['name'] for r in report['runs'] if r['status'] == 'failed']
    print(f'{name}: wrote {args.out / (name + ".json")} and {args.out / (name + ".png")}')
  if failed:
    print(f'{len(failed)} run(s) failed (see their train.log; re-run to retry): '
          f'{", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
