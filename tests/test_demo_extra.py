"""The `[demo]` extra installs what the notebook and `python -m nfnet_jax.spp` import
beyond the core requirements (read from their own import statements)."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _requirement_names(name: str) -> set[str]:
  out = set()
  for line in (REPO / name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if line.startswith('-r'):
      out |= _requirement_names(line[2:].strip())
    elif line:
      out.add(re.split(r'[<>=!~\[; ]', line)[0].lower().replace('_', '-'))
  return out


def _imported_modules(source: str) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return names


def test_demo_extra_covers_the_notebook_and_spp_imports():
  notebook = json.loads((REPO / 'notebooks' / 'nfnet_demo.ipynb').read_text())
  modules = set()
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      lines = ''.join(cell['source']).splitlines()
      modules |= _imported_modules('\n'.join(l for l in lines if not l.lstrip().startswith(
          ('!', '%'))))
  modules |= _imported_modules((REPO / 'nfnet_jax' / 'spp.py').read_text())
  third_party = {m for m in modules if m not in sys.stdlib_module_names and m != 'nfnet_jax'}
  dists = importlib.metadata.packages_distributions()
  needed = {d.lower().replace('_', '-') for m in third_party for d in dists.get(m, [m])}
  core = _requirement_names('requirements.txt')
  demo = _requirement_names('requirements-demo.txt')
  assert {'matplotlib', 'flax', 'scikit-image'} <= needed  # the reader finds them
  assert needed - core <= demo, needed - core - demo
  assert demo <= _requirement_names('requirements-test.txt')  # [test] includes [demo]
