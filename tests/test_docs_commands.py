"""Every `python -m nfnet_jax.train ...` command that README.md, docs/*.md and the
experiments' docstrings show passes `--check_config` as written, through the real
entry point (absl flags, ml_collections config overrides, model keywords,
`configs.validate_config` and `configs.check_run`; nothing is built or trained), or
fails in one line for what this machine lacks: ImageNet, the released weights, a
trained workdir.

The commands are read from the files when the test runs. Placeholders are filled in
the way a reader would: `...` as a config is experiments/quickstart.py, `...` or a
/path/to/... elsewhere is a temporary folder of images in class folders (or an empty
file, for *.npz); every --workdir is a temporary directory. A synopsis
(`--config=<experiment file>[:arg] ... [--mode=...]`: angle brackets or bracketed
optional flags) is not a command and is left out."""
from __future__ import annotations

import ast
import concurrent.futures
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = 'nfnet_jax.train'


def _sources() -> list[tuple[str, str]]:
  """(name, text) of README.md, docs/*.md and the experiments' docstrings."""
  out = [('README.md', (REPO / 'README.md').read_text())]
  out += [(f'docs/{p.name}', p.read_text()) for p in sorted((REPO / 'docs').glob('*.md'))]
  for p in sorted((REPO / 'experiments').glob('*.py')):
    doc = ast.get_docstring(ast.parse(p.read_text())) or ''
    out.append((f'experiments/{p.name}', doc))
  return out


def extract_commands(text: str) -> list[str]:
  """The `python -m nfnet_jax.train` command lines of `text`, continuation lines
  (trailing backslash) joined, shell comments dropped."""
  lines = text.splitlines()
  commands, i = [], 0
  while i < len(lines):
    line = lines[i]
    m = re.search(r'python3? -m ' + re.escape(ENTRY) + r'(\s|$)', line)
    if not m:
      i += 1
      continue
    parts = [line[m.start():]]
    while parts[-1].rstrip().endswith('\\') and i + 1 < len(lines):
      parts[-1] = parts[-1].rstrip()[:-1]
      i += 1
      parts.append(lines[i])
    command = ' '.join(p.strip() for p in parts)
    command = command.split('`')[0]  # inline code in prose ends at the backtick
    commands.append(command)
    i += 1
  return commands


def is_synopsis(command: str) -> bool:
  return '<' in command or re.search(r'\s\[--', command) is not None


def all_commands() -> list[tuple[str, str]]:
  return [(name, c) for name, text in _sources() for c in extract_commands(text)
          if not is_synopsis(c)]


def write_image_folder(root: Path) -> None:
  """root/CLASS/*.png: two classes of ten 8x8 images."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for name in ('cats', 'dogs'):
    (root / name).mkdir(parents=True)
    for i in range(10):
      Image.fromarray(np.full([8, 8, 3], 20 * i, np.uint8)).save(root / name / f'{i}.png')


def fill_placeholders(command: str, tmp: Path) -> list[str]:
  """argv after `-m nfnet_jax.train`, with placeholders made real."""
  argv = shlex.split(command, comments=True)
  assert argv[:3] in (['python', '-m', ENTRY], ['python3', '-m', ENTRY]), argv
  out = []
  for k, arg in enumerate(argv[3:]):
    name, eq, value = arg.partition('=')
    if name == '--workdir':
      arg = f'--workdir={tmp / "w"}'
    elif eq and ('...' in value or value.startswith('/path/to')):
      if name == '--config':
        value = 'experiments/quickstart.py' + value.split('...', 1)[1]
      elif value.endswith('.npz'):
        value = str(tmp / f'weights{k}.npz')
        Path(value).write_bytes(b'')
      else:
        value = str(tmp / f'dir{k}')
        write_image_folder(Path(value))
      arg = f'{name}={value}'
    out.append(arg)
  return out


COMMANDS = all_commands()


def test_the_docs_have_commands():
  """The extraction finds the README's commands (so a format change cannot make the
  parse test below pass vacuously)."""
  names = {name for name, _ in COMMANDS}
  assert 'README.md' in names
  joined = '\n'.join(c for _, c in COMMANDS)
  for needle in ('--config.data.folder=', '--config.init_from=', '--mode=eval',
                 '--config.data.data_dir=', 'experiments/nfnet.py:F6,sam'):
    assert needle in joined, needle
  assert len(COMMANDS) >= 6


def test_extraction_joins_continuations_and_drops_comments():
  text = ('Run:\n\n```bash\npython -m nfnet_jax.train --config=a.py --workdir=/w \\\n'
          '    --config.batch_size=64   # a comment\n```\nprose `python -m '
          'nfnet_jax.train --config=b.py` more\n')
  cmds = extract_commands(text)
  assert cmds == ['python -m nfnet_jax.train --config=a.py --workdir=/w '
                  '--config.batch_size=64   # a comment',
                  'python -m nfnet_jax.train --config=b.py']
  assert shlex.split(cmds[0], comments=True)[-1] == '--config.batch_size=64'
  assert is_synopsis('python -m nfnet_jax.train --config=<file>[:arg] --workdir=DIR')
  assert is_synopsis('python -m nfnet_jax.train --config=F --workdir=D [--mode=...]')
  assert not is_synopsis(cmds[0])


def _check(command: str, tmp: Path) -> subprocess.CompletedProcess:
  argv = fill_placeholders(command, tmp)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', HF_HUB_OFFLINE='1',  # no download
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  if not any(a.startswith('--workdir') for a in argv):
    argv.append(f'--workdir={tmp / "w"}')
  return subprocess.run([sys.executable, '-m', ENTRY, *argv, '--check_config'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Every command's --check_config run, a few at a time (each is mostly imports).
  A command that several files show (the same arguments, spacing and comments aside)
  is run once."""
  argvs = [tuple(shlex.split(c, comments=True)) for _, c in COMMANDS]
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {argv: pool.submit(_check, shlex.join(argv), tmp_path_factory.mktemp('cmd'))
               for argv in dict.fromkeys(argvs)}
    return [futures[argv].result() for argv in argvs]


# What a documented command may lack on a test machine, as its one-line refusal says
# it: ImageNet, released weights, Hub weights (offline, not in the cache), a workdir
# that was trained in (for --mode=eval).
MISSING_HERE = ("TFDS dataset 'imagenet2012' is not prepared", 'No such checkpoint',
                'could not download or find in the cache', 'nothing to evaluate')


@pytest.mark.slow  # ~4 s of imports per command, 4 at a time.
@pytest.mark.parametrize('index', range(len(COMMANDS)),
                         ids=[f'{n}:{i}' for i, (n, _) in enumerate(COMMANDS)])
def test_documented_command_checks(index, results):
  source, command = COMMANDS[index]
  out = results[index]
  if out.returncode == 0:
    assert out.stdout.startswith('Config OK: '), out.stdout
    return
  assert out.returncode == 1 and 'Traceback' not in out.stderr, (
      f'{source}: {command}\n{out.stderr[-3000:]}')
  fatal = [l for l in out.stderr.splitlines() if l.startswith('FATAL')]
  assert len(fatal) == 1 and any(m in fatal[0] for m in MISSING_HERE), (
      f'{source}: {command}\n{out.stderr[-3000:]}')
