"""`python -m nfnet_jax.models`: the table, --help and unknown names, as a user runs it."""
from __future__ import annotations

import subprocess
import sys

from nfnet_jax.models import registry


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'nfnet_jax.models', *args],
                        capture_output=True, text=True, timeout=300)


def test_help_prints_usage():
  r = _run('--help')
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('usage: python -m nfnet_jax.models')
  assert 'GMACs' in r.stdout and 'F0' in r.stdout  # what it prints; the model list
  assert 'Traceback' not in r.stdout + r.stderr


def test_unknown_name_is_one_line():
  r = _run('F0', 'F9')
  assert r.returncode == 2
  assert r.stdout == ''  # nothing computed, no partial table
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert "Unknown model 'F9'" in lines[0] and 'nf_regnet_b0' in lines[0]  # valid names
  assert 'Traceback' not in r.stderr
  r = _run('nf_resnet5')
  assert r.returncode == 2 and 'Did you mean nf_resnet50 ' in r.stderr


def test_wrong_case_suggests_the_registered_name():
  """'f0' is F0 in other case: the suggestion ignores case, the name stays exact."""
  r = _run('f0')
  assert r.returncode == 2 and r.stdout == ''
  assert r.stderr.strip() == (
      "python -m nfnet_jax.models: error: Unknown model 'f0'. Did you mean F0? "
      f'Valid: {", ".join(registry.names())}')


def test_table_row_for_a_small_model():
  """The row equals summarize() computed here (params, MACs) and the registry's sizes."""
  from nfnet_jax.models import summary
  name = 'nf_regnet_b0'
  r = _run(name)
  assert r.returncode == 0, r.stderr
  header, row = r.stdout.strip().splitlines()
  assert header.split() == ['model', 'params', '(M)', 'GMACs', '@test', 'train', 'px',
                            'test', 'px']
  params, macs = summary.summarize(name)
  facts = registry.info(name)
  assert row.split() == [name, f'{params / 1e6:.1f}', f'{macs / 1e9:.2f}',
                         str(facts['train_imsize']), str(facts['test_imsize'])]


def test_eca_nfnet_l0_counts_are_timms():
  """timm 1.0.31's eca_nfnet_l0: 24,143,924 parameters, 7,014,465,280 multiply-adds at
  its 288 px test size (its convs, ECA's Conv1d and the classifier, counted with forward
  hooks; tests/test_timm_parity.py recounts them where timm is installed)."""
  r = _run('eca_nfnet_l0')
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[1].split() == ['eca_nfnet_l0', '24.1', '7.01', '224', '288']
