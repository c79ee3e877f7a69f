"""The package's shape: imports inside `nfnet_jax` form no cycle."""

import ast
import pathlib
from typing import Dict, List, Set

import nfnet_jax

PACKAGE_DIR = pathlib.Path(nfnet_jax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = ('nfnet_jax',) + path.relative_to(PACKAGE_DIR).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> Dict[str, Set[str]]:
  """Maps each module of the package to the package modules it imports.

  Every import statement counts, module-level or inside a function: a
  function-local import that would close a cycle is a cycle deferred, not gone.
  """
  paths = {_module_name(p): p for p in PACKAGE_DIR.rglob('*.py')}
  graph = {name: set() for name in paths}
  for name, path in paths.items():
    is_package = path.name == '__init__.py'
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets: List[str] = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # Relative: resolve against this module's package.
          base = name.split('.')
          base = base[:len(base) - node.level + (1 if is_package else 0)]
          source = '.'.join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ''
        # `from a import b` imports the submodule a.b when there is one.
        targets = [f'{source}.{alias.name}'
                   if f'{source}.{alias.name}' in paths else source
                   for alias in node.names]
      for target in targets:
        # `import a.b.c` runs a.b.c; pick the longest package module named.
        while target and target not in paths:
          target = target.rpartition('.')[0]
        if target and target != name:
          graph[name].add(target)
  return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """One cycle per strongly connected component of more than one module."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on_stack: Set[str] = set()
  components: List[List[str]] = []

  def visit(node: str) -> None:  # Tarjan's algorithm.
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph[node]):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_graph_sees_the_package_imports():
  # Guards the walk itself: an empty graph would find no cycle either.
  graph = _import_graph()
  assert 'nfnet_jax.models.nfnet' in graph['nfnet_jax.models']
  assert 'nfnet_jax.agc' in graph['nfnet_jax.optim']


def test_no_import_cycle_inside_the_package():
  cycles = _cycles(_import_graph())
  assert not cycles, 'import cycles inside nfnet_jax: ' + '; '.join(
      ' <-> '.join(c) for c in cycles)
