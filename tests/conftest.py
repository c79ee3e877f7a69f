"""Order of the suite over pytest-xdist workers.

pytest.ini runs `-n auto --dist loadfile --no-loadscope-reorder`: each test file goes
to one worker whole, so a module fixture that builds something expensive (trained
runs, a model's weights, a batch of CLI checks) is built once. The files are handed
out in the order of the collection, which this hook sets: the files with the most
slow tests first, so that no long file starts last while the other worker idles.
"""
from __future__ import annotations

import pytest


def _file(item: pytest.Item) -> str:
  return item.nodeid.split('::', 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
  del config
  slow: dict[str, int] = {}
  first: dict[str, int] = {}
  for i, item in enumerate(items):
    name = _file(item)
    first.setdefault(name, i)
    slow[name] = slow.get(name, 0) + (item.get_closest_marker('slow') is not None)
  order = {id(item): i for i, item in enumerate(items)}
  # Stable within a file: its tests keep their order (and their module fixtures'
  # lifetimes).
  items.sort(key=lambda item: (-slow[_file(item)], first[_file(item)], order[id(item)]))
