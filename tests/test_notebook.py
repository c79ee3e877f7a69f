"""The demo notebook runs top to bottom, offline, on CPU, without a cell error.

Executed with nbclient in a kernel of *this* interpreter (a kernelspec written to a
temporary JUPYTER_PATH), so it needs only ipykernel in the test environment, not an
installed 'python3' kernelspec that might point at another Python. The notebook's own
cells assert its claims (e.g. the AGC run trains while plain SGD diverges).
"""
import json
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'nfnet_demo.ipynb'
KERNEL = 'nfnet-jax-test'


def _kernelspec(tmp_path, monkeypatch):
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'nfnet_jax test', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))


def test_notebook_is_clean_and_offline():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code), \
      'commit the notebook with outputs cleared'
  source = '\n'.join(c.source for c in code)
  assert "'google.colab' in sys.modules" in source      # installs only on Colab
  assert 'https://github.com/nfnet-jax/nfnet_jax' in source
  # Colab's own TensorFlow stays alone: the cell installs the package's core (no TF,
  # tests/test_extras.py) and nothing else.
  installs = [l for l in source.splitlines() if "'pip', 'install'" in l]
  assert installs == ["    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', "
                      "f'git+{REPO_URL}'],"]


@pytest.mark.slow
def test_demo_notebook_executes(tmp_path, monkeypatch):
  _kernelspec(tmp_path, monkeypatch)
  monkeypatch.delenv('NFNET_WEIGHTS', raising=False)   # the offline path: random weights
  # XLA as a reader's kernel has it: the suite's -O0 (tests/conftest.py) saves less
  # compile time here than it costs the full-size F0 cells in run time.
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=400, kernel_name=KERNEL, allow_errors=False,
      resources={'metadata': {'path': str(ROOT)}})
  start = time.time()
  client.execute()   # raises CellExecutionError on the first failing cell
  elapsed = time.time() - start
  print(f'notebook executed in {elapsed:.0f} s')
  outputs = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                      for o in c.outputs)
  assert 'RANDOM weights' in outputs
  assert 'without AGC the run diverged; with AGC it trained.' in outputs
  images = sum('image/png' in o.get('data', {}) for c in nb.cells
               if c.cell_type == 'code' for o in c.outputs)
  assert images >= 4, images   # cat, two SPP figures, loss curves
