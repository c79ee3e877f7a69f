"""Scheduling of the suite over pytest-xdist workers (pytest.ini runs `-n auto
--dist loadgroup`).

Module fixtures that build something expensive (trained runs, a model's weights, a
batch of CLI checks) are built once per worker that runs a test using them: the tests
that share one are put in one xdist group, so they run in one worker and the fixture is
built once. Tests that share nothing are spread one by one.
"""
from __future__ import annotations

import pytest

# Module-scoped fixtures worth building once (a test using several of them joins their
# groups into one).
SHARED_FIXTURES = frozenset({
    'runs', 'device_runs',                       # test_train.py: trained CLI runs
    'bn_runs',                                   # test_bn_resnet.py
    'digits_run',                                # test_digits_folder.py
    'comparison',                                # test_benchmarks.py
    'results',                                   # test_docs_commands.py
    'b1_weights',                                # test_cli.py
    'f0_shapes', 'f0_params', 'timm_sd',         # test_pretrained.py
    'b0_params', 'timm_f0_file',                 # test_pretrained_safetensors.py
    'regnet_b0', 'resnet26',                     # test_nf_regnet.py, test_nf_resnet.py
    'small_folder', 'bw_folder', 'image',        # small data fixtures
})


def _groups(items: list[pytest.Item]) -> dict[str, str]:
  """nodeid -> group name, for the tests that use a shared fixture."""
  parent: dict[str, str] = {}

  def find(x: str) -> str:
    while parent.setdefault(x, x) != x:
      x = parent[x]
    return x

  used = {}
  for item in items:
    module = item.nodeid.split('::', 1)[0]
    names = sorted(f'{module}::{f}' for f in item.fixturenames if f in SHARED_FIXTURES)
    if names:
      used[item.nodeid] = names
      for other in names[1:]:
        parent[find(other)] = find(names[0])
  return {nodeid: find(names[0]) for nodeid, names in used.items()}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
  groups = _groups(items)
  for item in items:
    if item.nodeid in groups:
      item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
  # Each group's tests together, groups first (in file order), then the other slow
  # tests, then the rest: a long test started last would leave the other worker idle.
  first = {}
  for i, item in enumerate(items):
    first.setdefault(groups.get(item.nodeid), i)
  order = {item.nodeid: i for i, item in enumerate(items)}

  def key(item: pytest.Item) -> tuple[int, int, int]:
    if item.nodeid in groups:
      return 0, first[groups[item.nodeid]], order[item.nodeid]
    return 1 + (item.get_closest_marker('slow') is None), 0, order[item.nodeid]

  items.sort(key=key)
