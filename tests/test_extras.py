"""What each requirements file declares is what the code imports: every third-party
import of the package, the notebook and the tests is declared (core, or the extra
of the path that imports it), every declared package is imported. And the core
install alone trains: a Python that cannot import anything outside the core
requirements' dependency closure runs the quickstart, and names the `[data]` extra in
one line when a config needs it."""
from __future__ import annotations

import ast
import collections
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement
import pytest

REPO = Path(__file__).resolve().parent.parent

# Declared without an import of their own, and why.
NOT_IMPORTED = {
    # tensorflow_datasets imports it to prepare a dataset without declaring it.
    'importlib-resources': 'requirements-data.txt',
    'pytest-xdist': 'requirements-test.txt',  # a pytest plugin (-n)
    'ipykernel': 'requirements-test.txt',     # the kernel that nbclient starts
}


def _norm(dist: str) -> str:
  """A distribution's name as pip compares them: 'ml_dtypes' == 'ml-dtypes'."""
  return re.sub(r'[-_.]+', '-', dist).lower()


def _requirement_lines(name: str) -> list[str]:
  """The requirement lines of `name`, with those of the files it includes (-r)."""
  out = []
  for line in (REPO / name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if line.startswith('-r'):
      out += _requirement_lines(line[2:].strip())
    elif line:
      out.append(line)
  return out


def _requirement_names(name: str) -> set[str]:
  return {_norm(Requirement(line).name) for line in _requirement_lines(name)}


def _imported_modules(source: str) -> set[str]:
  """Top-level names of the absolute imports in `source`."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return names


def _skipped_without(source: str) -> set[str]:
  """Top-level names of the modules `source` asks `pytest.importorskip` for."""
  return {node.args[0].value.split('.')[0] for node in ast.walk(ast.parse(source))
          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
          node.func.attr == 'importorskip' and node.args and
          isinstance(node.args[0], ast.Constant)}


def _notebook_source(path: Path) -> str:
  """The code cells of a notebook, without shell (!) and magic (%) lines."""
  lines = [l for cell in json.loads(path.read_text())['cells']
           if cell['cell_type'] == 'code' for l in ''.join(cell['source']).splitlines()]
  return '\n'.join(l for l in lines if not l.lstrip().startswith(('!', '%')))


def _distributions(sources: list[str], local: set[str]) -> dict[str, set[str]]:
  """{distribution: modules of it} imported by `sources`, stdlib and `local` aside."""
  dists = importlib.metadata.packages_distributions()
  out = collections.defaultdict(set)
  for module in set().union(*map(_imported_modules, sources)):
    if module in sys.stdlib_module_names or module in local:
      continue
    assert module in dists, f'{module} is imported but not installed here'
    for dist in dists[module]:
      out[_norm(dist)].add(module)
  return out


def _own_names(name: str) -> set[str]:
  """The distributions `name` declares itself (not through -r)."""
  lines = [l.split('#')[0].strip() for l in (REPO / name).read_text().splitlines()]
  return {_norm(Requirement(l).name) for l in lines if l and not l.startswith('-r')}


def test_every_import_is_declared_and_every_declared_package_is_imported():
  local = {'nfnet_jax', 'experiments'} | {p.stem for p in (REPO / 'tests').glob('*.py')}
  package = _distributions(
      [p.read_text() for p in (REPO / 'nfnet_jax').rglob('*.py')] +
      [_notebook_source(p) for p in (REPO / 'notebooks').glob('*.ipynb')], local)
  test_sources = [p.read_text() for p in (REPO / 'tests').glob('*.py')]
  tests = _distributions(test_sources, local)
  # Modules a test skips without (timm and torch: never declared) count as imported
  # where they are installed and declared (nbformat for the notebook test).
  dists = importlib.metadata.packages_distributions()
  skipped = {_norm(d) for m in set().union(*map(_skipped_without, test_sources))
             for d in dists.get(m, [])}
  extras = {'requirements.txt', 'requirements-data.txt', 'requirements-demo.txt',
            'requirements-hub.txt'}
  for imported, files in ((package, extras), (tests, extras | {'requirements-test.txt'})):
    declared = set().union(*map(_own_names, files))
    # Several distributions may share a top-level name ('google'): one declared will do.
    modules = set().union(*imported.values())
    undeclared = {m for m in modules
                  if not any(m in imported[d] for d in declared if d in imported)}
    assert not undeclared, f'imported, declared in none of {sorted(files)}: {undeclared}'
  assert _requirement_names('requirements-test.txt') == set().union(
      *map(_own_names, extras | {'requirements-test.txt'}))  # [test] has every extra
  for name in sorted(extras | {'requirements-test.txt'}):
    imported = set(tests) | skipped if name == 'requirements-test.txt' else package
    unused = {d for d in _own_names(name) if d not in imported
              and NOT_IMPORTED.get(d) != name}
    assert not unused, f'{name} declares {sorted(unused)}, which nothing imports'


# ---------------------------------------------------------------------------
# The core install, simulated: only the core requirements' closure can be imported.
# ---------------------------------------------------------------------------
def _core_closure() -> set[str]:
  """The distributions `pip install nfnet_jax` installs: requirements.txt and what
  each requires in turn (environment markers and requested extras evaluated)."""
  todo = [Requirement(line) for line in _requirement_lines('requirements.txt')]
  seen: set[tuple[str, frozenset[str]]] = set()
  while todo:
    req = todo.pop()
    key = (_norm(req.name), frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      requires = importlib.metadata.requires(req.name) or []
    except importlib.metadata.PackageNotFoundError:  # Not installed: cannot be imported.
      continue
    for line in requires:
      dep = Requirement(line)
      if dep.marker is None or any(dep.marker.evaluate({'extra': extra})
                                   for extra in req.extras | {''}):
        todo.append(dep)
  return {name for name, _ in seen}


def _core_only_env(tmp_path: Path) -> dict[str, str]:
  """An environment whose Pythons find no module of an installed distribution outside
  the core closure: a sitecustomize.py (run at startup, from PYTHONPATH) wraps every
  import finder so that it finds nothing under those top-level names, as if they were
  not installed (importlib.util.find_spec returns None, `import` raises
  ModuleNotFoundError)."""
  closure = _core_closure() | {'nfnet-jax'}
  hidden = sorted(module for module, dists
                  in importlib.metadata.packages_distributions().items()
                  if not any(_norm(d) in closure for d in dists))
  assert {'tensorflow', 'tensorflow_datasets', 'tensorboard'} <= set(hidden)
  site = tmp_path / 'core_only'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(textwrap.dedent(f'''\
      import sys

      HIDDEN = frozenset({hidden!r})


      class CoreOnly:
        def __init__(self, finder):
          self.finder = finder

        def find_spec(self, name, path=None, target=None):
          if name.partition('.')[0] in HIDDEN:
            return None
          return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
          return getattr(self.finder, attr)


      sys.meta_path[:] = [CoreOnly(finder) for finder in sys.meta_path]
      '''))
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS='--xla_backend_optimization_level=0',
              PYTHONPATH=os.pathsep.join([str(site), str(REPO),
                                          os.environ.get('PYTHONPATH', '')]))


def _python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
def test_core_install_loads_weights_and_trains_on_offline_data(tmp_path):
  """The README's library imports and the quickstart's TF-free path, 20 steps (a
  smaller model and batch than the quickstart's, without its eval: the point is what
  gets imported), with a checkpoint and metrics at the end."""
  env = _core_only_env(tmp_path)
  imports = _python(env, '-c', textwrap.dedent('''\
      from nfnet_jax import agc, models, optim, pretrained
      try:
        import tensorflow
      except ModuleNotFoundError as e:
        print(e)
      '''))
  assert imports.returncode == 0, imports.stderr[-3000:]
  assert imports.stdout == "No module named 'tensorflow'\n"
  workdir = tmp_path / 'quickstart'
  run = _python(env, '-m', 'nfnet_jax.train', '--config=experiments/quickstart.py:numpy',
                f'--workdir={workdir}', '--config.total_steps=20',
                '--config.batch_size=16', '--config.model_kwargs.depths=(1,1)',
                '--config.data.offline.num_eval=0')
  assert run.returncode == 0, run.stderr[-4000:]
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 20 and 'train/loss' in rows[-1]
  assert (workdir / 'checkpoints' / '20').is_dir()
  assert list(workdir.glob('events.out.tfevents.*'))


def test_core_install_names_the_data_extra_in_one_line(tmp_path):
  """The TF input pipeline, the tfds source and dataset preparation, without the
  data extra: one line each, naming it, and nothing created."""
  env = _core_only_env(tmp_path)
  extra = "needs the data extra (tensorflow is not installed): pip install 'nfnet_jax[data]'"
  for flags, what in (([], 'data.use_tf=True (the TF input pipeline; data.use_tf=False '
                            'is the numpy one)'),
                      (['--config.data.source=tfds'], "data.source='tfds'")):
    done = _python(env, '-m', 'nfnet_jax.train', '--config=experiments/quickstart.py',
                   f'--workdir={tmp_path / "w"}', *flags)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f'FATAL Config error: {what} {extra}'), done.stderr[-3000:]
  assert not (tmp_path / 'w').exists()
  done = _python(env, '-m', 'nfnet_jax.data.prepare', '--name=mnist')
  assert (done.returncode, done.stderr) == (1, (
      f'python -m nfnet_jax.data.prepare: error: Preparing a TFDS dataset {extra}\n'))
