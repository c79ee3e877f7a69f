"""launch/*.sh: the commands they would run (--dry-run), parsed; the workers' install
step run in a sandbox of fake interpreters; retries through a fake gcloud; the local
--check_config of the training command, real and faked."""
import importlib.metadata
import os
from pathlib import Path
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]

# tpu_vm.sh runs the training command's --check_config here before creating anything.
# Tests about other steps give it this stand-in (a real check is ~3 s); it says OK and,
# when FAKE_CHECK_LOG is set, logs the emulated devices and its arguments.
_FAKE_CHECK = {}


@pytest.fixture(autouse=True, scope='session')
def _fake_check_python(tmp_path_factory):
  path = tmp_path_factory.mktemp('fake_check') / 'python'
  path.write_text('#!/bin/bash\n'
                  '[[ -n "${FAKE_CHECK_LOG:-}" ]] && echo "${XLA_FLAGS:-} | $*" >> "$FAKE_CHECK_LOG"\n'
                  'echo "Config OK: (fake check)"\n')
  path.chmod(0o755)
  _FAKE_CHECK['python'] = str(path)


def dry_run(script, *args, env=None, ok=True):
  out = subprocess.run(['bash', str(REPO / 'launch' / script), '--dry-run', *args],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'PATH': '/usr/bin:/bin',
                            'CHECK_PYTHON': _FAKE_CHECK['python'], **(env or {})})
  if ok:
    assert out.returncode == 0, out.stderr
  return out


def commands(out) -> list[list[str]]:
  return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def options(cmd: list[str]) -> dict[str, str]:
  """--key=value words of a command (flags without a value map to '')."""
  opts = {}
  for word in cmd:
    if word.startswith('--'):
      key, _, value = word[2:].partition('=')
      opts[key] = value
  return opts


def test_tpu_vm_creates_installs_trains_on_all_workers_and_deletes():
  out = dry_run('tpu_vm.sh', '--name=nf-test', '--zone=europe-west4-a', '--project=proj',
                '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot',
                '--workdir=gs://bucket/f1', '--mode=train_and_eval', '--',
                '--config=experiments/nfnet.py:F1', '--config.batch_size=1024')
  cmds = commands(out)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  verbs = [c[1:5] for c in gcloud]
  assert [v[3] for v in verbs] == ['create', 'scp', 'ssh', 'ssh', 'delete']
  assert all(v[:3] == ['compute', 'tpus', 'tpu-vm'] for v in verbs)
  create, scp, install, train, delete = gcloud
  assert create[5] == 'nf-test' and delete[5] == 'nf-test'
  o = options(create)
  assert o['accelerator-type'] == 'v4-32' and o['version'] == 'tpu-ubuntu2204-base'
  assert o['zone'] == 'europe-west4-a' and o['project'] == 'proj' and 'spot' in o
  assert options(scp)['worker'] == 'all' and scp[6] == 'nf-test:nfnet_jax.tar.gz'
  # Install on every worker: unpack the tarball, venv, pip install JAX for TPU + us
  # with the data extra (the TF input pipeline).
  o = options(install)
  assert o['worker'] == 'all'
  remote = o['command']
  assert 'tar -xzf ~/nfnet_jax.tar.gz' in remote and 'python3 -m venv' not in remote
  # The venv comes from lib.sh's ensure_venv (a Python that JAX supports), then JAX.
  steps = [step.strip() for step in remote.split(';')]
  venv = steps.index("ensure_venv ~/nfnet_venv ''")
  assert steps.index('source launch/lib.sh') < venv
  assert steps.index('~/nfnet_venv/bin/pip install -q jax\\[tpu\\] -e .\\[data\\]') > venv
  # The same training command on every worker.
  o = options(train)
  assert o['worker'] == 'all'
  remote = shlex.split(o['command'].split('|')[0].split('&&')[1])
  assert remote[1:3] == ['-m', 'nfnet_jax.train']
  ro = options(remote)
  assert ro['workdir'] == 'gs://bucket/f1' and ro['mode'] == 'train_and_eval'
  assert ro['config'] == 'experiments/nfnet.py:F1' and ro['config.batch_size'] == '1024'
  assert 'distributed' in ro  # jax.distributed.initialize() on every worker
  assert '--quiet' in delete and options(delete)['zone'] == 'europe-west4-a'


def test_tpu_vm_defaults_keep_and_errors():
  cmds = commands(dry_run('tpu_vm.sh', '--workdir=gs://b/w', '--keep'))
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  assert [c[4] for c in gcloud] == ['create', 'scp', 'ssh', 'ssh']  # --keep: no delete
  o = options(gcloud[0])
  assert o['accelerator-type'] == 'v4-8' and 'spot' not in o
  assert gcloud[0][5].startswith('nfnet-')
  assert 'experiments/nfnet.py:F0' in options(gcloud[3])['command']
  out = dry_run('tpu_vm.sh', ok=False)
  assert out.returncode == 2 and '--workdir is required' in out.stderr
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', '--', '--workdir=x', ok=False)
  assert out.returncode == 2 and 'pass --workdir=x to tpu_vm.sh' in out.stderr
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', '--acelerator-type=v4-8', ok=False)
  assert out.returncode == 2 and 'unknown option --acelerator-type' in out.stderr
  env = {'TPU_NAME': 'from-env', 'ACCELERATOR_TYPE': 'v5litepod-16', 'WORKDIR': 'gs://e'}
  create = [c for c in commands(dry_run('tpu_vm.sh', env=env)) if c[0] == 'gcloud'][0]
  assert create[5] == 'from-env' and options(create)['accelerator-type'] == 'v5litepod-16'


def test_gpu_script(sandbox):
  sandbox.python('python3', '3.12')  # new enough: used as is (a fake; see Sandbox)
  env = sandbox.env()
  out = dry_run('gpu.sh', '--workdir=/tmp/w', '--gpus=0,1', '--', '--config=experiments/'
                'quickstart.py', '--config.batch_size=256', env=env)
  lines = out.stdout.splitlines()
  env = dict(l[len('export '):].split('=', 1) for l in lines if l.startswith('export '))
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in shlex.split(env['XLA_FLAGS'])[0]
  assert shlex.split(env['CUDA_VISIBLE_DEVICES']) == ['0,1']
  assert float(env['XLA_PYTHON_CLIENT_MEM_FRACTION']) == 0.9
  cmd = shlex.split(lines[-1])
  assert cmd[1:3] == ['-m', 'nfnet_jax.train']
  o = options(cmd)
  assert o['workdir'] == '/tmp/w' and o['config.batch_size'] == '256'
  assert o['config'] == 'experiments/quickstart.py'
  out = dry_run('gpu.sh', '--install', '--workdir=/w', env=env)
  cmds = commands(out)
  assert ['python3', '-m', 'venv', '.venv'] in cmds
  assert any(c[:3] == ['.venv/bin/pip', 'install', '-q'] and 'jax[cuda12]' in c
             and c[-2:] == ['-e', '.[data]'] for c in cmds)
  assert cmds[-1][0].endswith('.venv/bin/python')
  out = dry_run('gpu.sh', ok=False)
  assert out.returncode == 2 and '--workdir is required' in out.stderr


def test_quickstart_script(sandbox):
  sandbox.python('python3', '3.12')
  cmds = commands(dry_run('quickstart.sh', '--fresh', '--', '--config.num_epochs=1',
                          env=sandbox.env()))
  assert cmds[0] == ['python3', '-m', 'venv', '.venv']
  assert ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.[test]'] in cmds
  assert ['rm', '-rf', 'workdir/quickstart'] in cmds
  assert cmds[-1] == ['.venv/bin/python', '-m', 'nfnet_jax.train',
                      '--config=experiments/quickstart.py', '--workdir=workdir/quickstart',
                      '--config.num_epochs=1']


@pytest.mark.parametrize('script', ['tpu_vm.sh', 'gpu.sh', 'quickstart.sh', 'gcsfuse.sh'])
def test_scripts_parse_and_have_help(script):
  path = REPO / 'launch' / script
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  out = subprocess.run(['bash', str(path), '--help'], capture_output=True, text=True)
  assert out.returncode == 0 and '--dry-run' in out.stdout
  assert os.access(path, os.X_OK)


# ---------------------------------------------------------------------------------
# A Python that JAX supports (launch/lib.sh's ensure_venv), in a sandbox of fakes
# ---------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, int]:
  major, minor = text.split('.')[:2]
  return int(major), int(minor)


def _lib_min_python() -> str:
  out = subprocess.run(['bash', '-c', 'source launch/lib.sh; echo "$NFNET_MIN_PYTHON"'],
                       cwd=REPO, capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_python_requires_is_what_the_minimum_jax_needs():
  ours = re.search(r"python_requires='>=(\d+\.\d+)'", (REPO / 'setup.py').read_text())
  assert ours, 'setup.py has no python_requires=">=X.Y"'
  ours = ours.group(1)
  jax_min = re.search(r'^jax>=([\d.]+)', (REPO / 'requirements.txt').read_text(), re.M).group(1)
  installed = importlib.metadata.version('jax')
  needs = re.fullmatch(r'>=\s*(\d+\.\d+)(\.\d+)?',
                       importlib.metadata.metadata('jax')['Requires-Python'].strip())
  assert needs, importlib.metadata.metadata('jax')['Requires-Python']
  needs = needs.group(1)
  if _version(installed) == _version(jax_min):  # the oldest allowed jax series
    assert _version(ours) == _version(needs), (ours, installed, needs)
  else:  # a newer jax can only need a newer Python, never an older one
    assert _version(installed) > _version(jax_min) and _version(ours) <= _version(needs)
  assert _lib_min_python() == ours  # the launchers refuse/provision against the same
  readme = (REPO / 'README.md').read_text()
  assert f'Python {ours}+' in readme
  assert not re.search(r'Python 3\.(\d+)\+', readme.replace(f'Python {ours}+', ''))


_TOOLS = ('bash', 'tar', 'gzip', 'rm', 'mkdir', 'cat', 'hostname', 'basename', 'dirname',
          'sed', 'chmod', 'cp', 'ln', 'env', 'sleep', 'date', 'mktemp', 'grep')


def _write(path: Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _fake_python(path: Path, tag: str, version: str, log: Path, pip_installs_uv: bool):
  """A bash stand-in for a CPython: answers the version probe, `-m site --user-base`,
  `-m venv DIR` (a venv whose python/pip are fakes tagged '<tag>-venv') and `-m pip`
  (which can install a fake uv into ~/.local/bin, or fails like a python3 without
  pip). Every call is logged as '<tag> <args>'."""
  uv = _fake_uv_text(log)
  _write(path, f"""#!/bin/bash
echo "{tag} $*" >> {log}
case "$1" in
  -c) echo {version} ;;
  --version) echo "Python {version}.12" ;;
  -m)
    case "$2" in
      site) echo "$HOME/.local" ;;
      venv)
        mkdir -p "$3/bin"
        printf '#!/bin/bash\\necho "{tag}-venv $*" >> {log}\\necho {version}\\n' > "$3/bin/python"
        printf '#!/bin/bash\\necho "{tag}-venv pip $*" >> {log}\\n' > "$3/bin/pip"
        chmod +x "$3/bin/python" "$3/bin/pip" ;;
      pip)
        {'true' if pip_installs_uv else 'echo "No module named pip" >&2; exit 1'}
        if [[ " $* " == *" uv "* ]]; then
          mkdir -p "$HOME/.local/bin"
          cat > "$HOME/.local/bin/uv" <<'UV'
{uv}UV
          chmod +x "$HOME/.local/bin/uv"
        fi ;;
    esac ;;
esac
""")


def _fake_uv_text(log: Path) -> str:
  """uv: `python install V` is logged; `venv ... --python V DIR` makes a venv of fakes
  tagged 'uv-V-venv'."""
  return f"""#!/bin/bash
echo "uv $*" >> {log}
if [[ "$1" == venv ]]; then
  args=("$@"); dir="${{args[-1]}}"; v=""
  for ((i = 0; i < $#; i++)); do [[ "${{args[i]}}" == --python ]] && v="${{args[i+1]}}"; done
  mkdir -p "$dir/bin"
  printf '#!/bin/bash\\necho "uv-%s-venv $*" >> {log}\\necho %s\\n' "$v" "$v" > "$dir/bin/python"
  printf '#!/bin/bash\\necho "uv-%s-venv pip $*" >> {log}\\n' "$v" > "$dir/bin/pip"
  chmod +x "$dir/bin/python" "$dir/bin/pip"
fi
"""


class Sandbox:
  """HOME, a PATH of fakes (no real python or uv) and the log of their calls."""

  def __init__(self, root: Path):
    self.home, self.bin, self.log = root / 'home', root / 'bin', root / 'calls.log'
    self.home.mkdir()
    self.bin.mkdir()
    self.log.touch()
    for tool in _TOOLS:
      if shutil.which(tool, path='/usr/bin:/bin'):
        (self.bin / tool).symlink_to(shutil.which(tool, path='/usr/bin:/bin'))

  def python(self, name: str, version: str, pip_installs_uv: bool = True):
    _fake_python(self.bin / name, name, version, self.log, pip_installs_uv)

  def uv_on_path(self):
    _write(self.bin / 'uv', _fake_uv_text(self.log))

  def env(self, **extra):
    return {'HOME': str(self.home), 'PATH': str(self.bin), 'TMPDIR': str(self.home),
            'CHECK_PYTHON': _FAKE_CHECK['python'], **extra}

  def calls(self) -> list[str]:
    return self.log.read_text().splitlines()


def _jax_installs(calls):
  """(tag, line) of every call that installs JAX."""
  return [(c.split()[0], c) for c in calls if ' install' in c and 'jax' in c]


def _worker_install_cmd(*args) -> str:
  out = dry_run('tpu_vm.sh', '--name=t', '--workdir=gs://b/w', *args)
  ssh = [c for c in commands(out) if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  return options(ssh[0])['command']


def _run_on_worker(sb: Sandbox, command: str):
  """What a TPU worker runs for the install step, here: the tarball of this checkout's
  launch/ (lib.sh) in HOME, the command through bash."""
  subprocess.run(['tar', '-czf', str(sb.home / 'nfnet_jax.tar.gz'), '-C', str(REPO), 'launch'],
                 check=True)
  return subprocess.run(['/bin/bash', '-c', command], env=sb.env(), cwd=sb.home,
                        capture_output=True, text=True, timeout=60)


@pytest.fixture
def sandbox(tmp_path):
  return Sandbox(tmp_path)


def test_worker_install_with_python_310_provisions_python_with_uv(sandbox):
  """The TPU images' python3 is 3.10: uv (installed by its pip) makes the venv on 3.12
  and JAX goes there; nothing JAX-related ever runs under 3.10."""
  sandbox.python('python3', '3.10')
  out = _run_on_worker(sandbox, _worker_install_cmd())
  assert out.returncode == 0, out.stderr
  calls = sandbox.calls()
  home = str(sandbox.home)
  assert 'python3 -m pip install --user -q uv' in calls
  assert 'uv python install 3.12' in calls
  assert f'uv venv --seed --python 3.12 {home}/nfnet_venv' in calls
  assert _jax_installs(calls) == [('uv-3.12-venv', 'uv-3.12-venv pip install -q jax[tpu] -e .[data]')]
  assert not any(c.startswith('python3 -m venv') for c in calls)
  said = [l for l in out.stderr.splitlines() if 'uv' in l]
  assert len(said) == 1 and 'Python 3.10' in said[0] and '3.11' in said[0], out.stderr


def test_worker_install_with_python_310_and_no_way_to_uv_stops_clearly(sandbox):
  sandbox.python('python3', '3.10', pip_installs_uv=False)
  out = _run_on_worker(sandbox, _worker_install_cmd())
  assert out.returncode != 0
  calls = sandbox.calls()
  assert _jax_installs(calls) == [] and not any('-m venv' in c for c in calls)
  # It said it would try uv, pip said why it could not, then one line says what to do.
  lines = out.stderr.strip().splitlines()
  assert 'installing uv' in lines[0] and 'No module named pip' in out.stderr
  assert 'Traceback' not in out.stderr
  assert lines[-1] == (f'tpu_vm.sh on {socket.gethostname()}: python3 is Python 3.10 and JAX '
                       'needs Python >= 3.11; uv could not be installed to provide one: '
                       'install Python >= 3.11 (or uv) and pass --python=PATH')


def test_worker_install_prefers_a_new_enough_python_on_path(sandbox):
  sandbox.python('python3', '3.10')
  sandbox.python('python3.11', '3.11')
  sandbox.uv_on_path()
  out = _run_on_worker(sandbox, _worker_install_cmd())
  assert out.returncode == 0, out.stderr
  calls = sandbox.calls()
  assert f'python3.11 -m venv {sandbox.home}/nfnet_venv' in calls
  assert not any(c.startswith('uv ') for c in calls)
  assert [t for t, _ in _jax_installs(calls)] == ['python3.11-venv']


def test_worker_install_uses_uv_on_path_and_refuses_an_old_python_given(sandbox):
  sandbox.python('python3', '3.10', pip_installs_uv=False)
  sandbox.uv_on_path()
  out = _run_on_worker(sandbox, _worker_install_cmd())
  assert out.returncode == 0, out.stderr
  assert [t for t, _ in _jax_installs(sandbox.calls())] == ['uv-3.12-venv']
  # --python names the workers' interpreter: used if new enough, else refused.
  sandbox.log.write_text('')
  shutil.rmtree(sandbox.home / 'nfnet_venv')  # a fresh worker
  sandbox.python('python3.10', '3.10')
  out = _run_on_worker(sandbox, _worker_install_cmd('--python=python3.10'))
  assert out.returncode != 0 and _jax_installs(sandbox.calls()) == []
  assert 'python3.10 is Python 3.10; JAX needs Python >= 3.11' in out.stderr


def test_gpu_and_quickstart_never_install_under_an_old_python(sandbox):
  """Locally (dry run): the same function, so the same choice, printed."""
  sandbox.python('python3', '3.10')
  home = sandbox.home
  for script, args in [('gpu.sh', ['--install', '--workdir=/w']), ('quickstart.sh', [])]:
    out = dry_run(script, *args, env=sandbox.env())
    cmds = commands(out)
    assert ['python3', '-m', 'pip', 'install', '--user', '-q', 'uv'] in cmds
    assert [f'{home}/.local/bin/uv', 'python', 'install', '3.12'] in cmds
    assert [f'{home}/.local/bin/uv', 'venv', '--seed', '--python', '3.12', '.venv'] in cmds
    assert not any(c[0] == 'python3' and 'jax' in ' '.join(c) for c in cmds)
    assert not any(c[:3] == ['python3', '-m', 'venv'] for c in cmds)
  # A given interpreter that is too old: one line, exit 1, nothing printed to run.
  sandbox.python('python3.10', '3.10')
  for script, args in [('gpu.sh', ['--install', '--workdir=/w']), ('gpu.sh', ['--workdir=/w']),
                       ('quickstart.sh', [])]:
    out = dry_run(script, *args, '--python=python3.10', env=sandbox.env(), ok=False)
    assert out.returncode == 1 and 'nfnet_jax.train' not in out.stdout
    assert out.stderr.strip() == (f'{script}: python3.10 is Python 3.10; JAX needs Python '
                                  '>= 3.11: install one (or uv) and pass --python=PATH')


# ---------------------------------------------------------------------------------
# tpu_vm.sh: software version and queued resources per TPU generation; retries
# ---------------------------------------------------------------------------------

_QR = ['gcloud', 'compute', 'tpus', 'queued-resources']
_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']


@pytest.mark.parametrize('accelerator,version,queued', [
    ('v4-32', 'tpu-ubuntu2204-base', False),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite', True),
    ('v5p-8', 'v2-alpha-tpuv5', True),
    ('v6e-8', 'v2-alpha-tpuv6e', True),
])
def test_tpu_vm_software_version_and_queued_resources_per_family(accelerator, version, queued):
  out = dry_run('tpu_vm.sh', '--name=nf', '--zone=us-east5-b', f'--accelerator-type={accelerator}',
                '--spot', '--workdir=gs://b/w')
  gcloud = [c for c in commands(out) if c[0] == 'gcloud']
  create = gcloud[0]
  o = options(create)
  assert o['accelerator-type'] == accelerator and 'spot' in o and o['zone'] == 'us-east5-b'
  if queued:
    assert [c[:5] for c in gcloud] == [_QR + ['create'], _QR + ['describe'], _VM + ['scp'],
                                       _VM + ['ssh'], _VM + ['ssh'], _QR + ['delete']]
    assert create[5] == 'nf' and o['node-id'] == 'nf' and o['runtime-version'] == version
    assert 'version' not in o
    describe, delete = gcloud[1], gcloud[-1]
    assert describe[5] == 'nf' and options(describe)['format'] == 'value(state.state)'
    assert delete[5] == 'nf' and {'force', 'async', 'quiet'} <= set(options(delete))
  else:
    assert [c[:5] for c in gcloud] == [_VM + ['create'], _VM + ['scp'], _VM + ['ssh'],
                                       _VM + ['ssh'], _VM + ['delete']]
    assert o['version'] == version and 'runtime-version' not in o
  assert all(c[5] == 'nf' or c[6] == 'nf:nfnet_jax.tar.gz' for c in gcloud)


def test_tpu_vm_version_and_queued_overrides():
  def create(*args):
    out = dry_run('tpu_vm.sh', '--name=nf', '--workdir=gs://b/w', *args)
    return [c for c in commands(out) if c[0] == 'gcloud'][0]
  c = create('--accelerator-type=v4-32', '--queued')
  assert c[:5] == _QR + ['create'] and options(c)['runtime-version'] == 'tpu-ubuntu2204-base'
  c = create('--accelerator-type=v6e-8', '--no-queued')
  assert c[:5] == _VM + ['create'] and options(c)['version'] == 'v2-alpha-tpuv6e'
  c = create('--accelerator-type=v5litepod-8', '--version=v2-alpha-tpuv5-lite-custom')
  assert options(c)['runtime-version'] == 'v2-alpha-tpuv5-lite-custom'
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', env={'TPU_VERSION': 'tpu-vm-base'})
  assert options(commands(out)[1])['version'] == 'tpu-vm-base'
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', '--accelerator-type=v9-8', ok=False)
  assert out.returncode == 2 and 'unknown accelerator type v9-8' in out.stderr
  assert '--version=' in out.stderr and out.stdout == ''



def _fake_gcloud(sb: Sandbox, train_fails: int, qr_states: str):
  """gcloud that logs every call (one shell-quoted line) and plays a preemption: the
  first `train_fails` training ssh calls fail and the TPU then describes as PREEMPTED;
  a queued resource describes as the next word of `qr_states` on each call (the last
  one repeats)."""
  _write(sb.bin / 'gcloud', f"""#!/bin/bash
printf '%q ' gcloud "$@" >> {sb.log}; echo >> {sb.log}
state={sb.home}/state; mkdir -p "$state"
case "$3 $4" in
  "tpu-vm ssh")
    if [[ "$*" == *nfnet_jax.train* ]]; then
      n=$(cat "$state/train" 2> /dev/null || echo 0); echo $((n + 1)) > "$state/train"
      ((n < {train_fails})) && exit 255
    fi ;;
  "tpu-vm describe") echo PREEMPTED ;;
  "queued-resources describe")
    states=({qr_states}); n=$(cat "$state/qr" 2> /dev/null || echo 0)
    echo $((n + 1)) > "$state/qr"; ((n < ${{#states[@]}})) || n=$((${{#states[@]}} - 1))
    echo "${{states[n]}}" ;;
esac
exit 0
""")


def _tpu_vm(sb: Sandbox, *args):
  return subprocess.run(['bash', str(REPO / 'launch' / 'tpu_vm.sh'), '--name=nf', '--zone=z',
                         '--workdir=gs://b/w', *args], capture_output=True, text=True,
                        timeout=60, env=sb.env(TPU_POLL_SECONDS='0'))


def _verbs(sb: Sandbox) -> list[str]:
  return [' '.join(shlex.split(l)[3:5]) for l in sb.calls()]


def test_tpu_vm_retries_recreate_a_queued_resource_the_same_way(sandbox):
  _fake_gcloud(sandbox, train_fails=1, qr_states='WAITING_FOR_RESOURCES PROVISIONING ACTIVE')
  out = _tpu_vm(sandbox, '--accelerator-type=v5litepod-16', '--spot', '--retries=2')
  assert out.returncode == 0, out.stderr
  qr, vm = 'queued-resources', 'tpu-vm'
  assert _verbs(sandbox) == (
      [f'{qr} create'] + [f'{qr} describe'] * 3 + [f'{vm} scp', f'{vm} ssh', f'{vm} ssh',
                                                    f'{vm} describe', f'{qr} delete'] +
      [f'{qr} create', f'{qr} describe', f'{vm} scp', f'{vm} ssh', f'{vm} ssh', f'{qr} delete'])
  calls = [shlex.split(l) for l in sandbox.calls()]
  creates = [c for c in calls if c[3:5] == ['queued-resources', 'create']]
  assert creates[0] == creates[1] and '--spot' in creates[0]
  assert options(creates[0])['runtime-version'] == 'v2-alpha-tpuv5-lite'
  deletes = [c for c in calls if c[3:5] == ['queued-resources', 'delete']]
  # Before recreating under the same name it waits for the deletion; at the end not.
  assert '--async' not in deletes[0] and '--async' in deletes[1]
  assert 'preempted; recreating it and resuming (retry 1/2)' in out.stderr
  assert 'queued resource nf: WAITING_FOR_RESOURCES' in out.stderr


def test_tpu_vm_retries_recreate_a_tpu_vm_and_give_up_after_n(sandbox):
  _fake_gcloud(sandbox, train_fails=5, qr_states='ACTIVE')
  out = _tpu_vm(sandbox, '--accelerator-type=v4-8', '--spot', '--retries=1')
  assert out.returncode == 255
  vm = ['tpu-vm create', 'tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh']
  # Preempted (describe) -> delete, recreate; the second failure is final: delete on exit.
  assert _verbs(sandbox) == vm + ['tpu-vm describe', 'tpu-vm delete'] + vm + ['tpu-vm delete']
  assert 'retry 1/1' in out.stderr and 'retry 2' not in out.stderr


def test_tpu_vm_queued_resource_that_fails_is_deleted(sandbox):
  _fake_gcloud(sandbox, train_fails=0, qr_states='WAITING_FOR_RESOURCES FAILED')
  out = _tpu_vm(sandbox, '--accelerator-type=v6e-8')
  assert out.returncode != 0
  assert _verbs(sandbox) == ['queued-resources create', 'queued-resources describe',
                             'queued-resources describe', 'queued-resources delete']
  assert 'queued resource nf is FAILED' in out.stderr


def test_tpu_vm_setup_runs_on_every_worker_after_the_install_each_attempt(sandbox):
  setup = 'bash launch/gcsfuse.sh my-bucket/tensorflow_datasets /mnt/tfds'
  out = dry_run('tpu_vm.sh', '--name=nf', '--workdir=gs://b/w', f'--setup={setup}')
  ssh = [c for c in commands(out) if c[:5] == _VM + ['ssh']]
  assert len(ssh) == 3 and all(options(c)['worker'] == 'all' for c in ssh)
  assert 'ensure_venv' in options(ssh[0])['command']
  assert options(ssh[1])['command'] == f'cd ~/nfnet_jax && {setup}'
  assert 'nfnet_jax.train' in options(ssh[2])['command']
  _fake_gcloud(sandbox, train_fails=1, qr_states='ACTIVE')
  out = _tpu_vm(sandbox, '--accelerator-type=v5litepod-8', '--retries=1', f'--setup={setup}')
  assert out.returncode == 0, out.stderr
  ssh = [shlex.split(l) for l in sandbox.calls() if shlex.split(l)[3:5] == ['tpu-vm', 'ssh']]
  assert [options(c)['command'].startswith('cd ~/nfnet_jax && bash launch/gcsfuse') for c in ssh] \
      == [False, True, False] * 2


def test_gcsfuse_installs_gcsfuse_once_and_mounts_read_only(sandbox):
  """Fakes for sudo/apt (logged, nothing installed on this machine), lsb_release,
  curl, mountpoint and gcsfuse."""
  log = sandbox.log
  _write(sandbox.bin / 'sudo', f"""#!/bin/bash
echo "sudo $*" >> {log}
[[ "$1" == tee ]] && cat > /dev/null
if [[ "$*" == "apt-get install"*gcsfuse* ]]; then
  printf '#!/bin/bash\\necho "gcsfuse $*" >> {log}\\n' > {sandbox.bin}/gcsfuse
  chmod +x {sandbox.bin}/gcsfuse
fi
""")
  _write(sandbox.bin / 'lsb_release', '#!/bin/bash\necho jammy\n')
  _write(sandbox.bin / 'curl', f'#!/bin/bash\necho "curl $*" >> {log}\n')
  _write(sandbox.bin / 'mountpoint', '#!/bin/bash\nexit 1\n')
  for tool in ('tee', 'id'):
    (sandbox.bin / tool).symlink_to(shutil.which(tool, path='/usr/bin:/bin'))
  mnt = sandbox.home / 'tfds'
  script = str(REPO / 'launch' / 'gcsfuse.sh')
  def mount(*args):
    return subprocess.run(['bash', script, *args], env=sandbox.env(), capture_output=True,
                          text=True, timeout=30)
  out = mount('gs://my-bucket/tensorflow_datasets/', str(mnt))
  assert out.returncode == 0, out.stderr
  calls = sandbox.calls()
  assert calls[0].startswith('sudo tee /etc/apt/sources.list.d/gcsfuse.list')
  assert 'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg' in calls
  assert calls[-3:] == ['sudo apt-get update -q', 'sudo apt-get install -y -q gcsfuse',
                        f'gcsfuse -o ro --implicit-dirs --only-dir tensorflow_datasets '
                        f'my-bucket {mnt}']
  assert mnt.is_dir()
  sandbox.log.write_text('')  # gcsfuse now there: no apt; a whole bucket: no --only-dir
  out = mount('my-bucket', str(mnt))
  assert out.returncode == 0
  assert sandbox.calls() == [f'gcsfuse -o ro --implicit-dirs my-bucket {mnt}']
  out = mount('my-bucket')
  assert out.returncode == 2 and 'usage: gcsfuse.sh BUCKET[/FOLDER] DIR' in out.stderr


def test_docs_first_run_commands_parse_and_do_what_the_doc_says():
  """docs/launch.md's pod commands, through the real flag parser (--dry-run)."""
  doc = (REPO / 'docs' / 'launch.md').read_text()
  blocks = re.findall(r'```bash\n(.*?)```', doc, re.S)
  runs = {}
  for block in blocks:
    for line in block.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      if words[:1] == ['launch/tpu_vm.sh']:
        words = words[:words.index('2>&1')] if '2>&1' in words else words
        runs[options(words)['accelerator-type']] = words[1:]
  assert {'v4-32', 'v5litepod-16'} <= set(runs)
  for accelerator, version, first in [('v4-32', 'tpu-ubuntu2204-base', _VM + ['create']),
                                      ('v5litepod-16', 'v2-alpha-tpuv5-lite', _QR + ['create'])]:
    args = runs[accelerator]
    gcloud = [c for c in commands(dry_run('tpu_vm.sh', *args)) if c[0] == 'gcloud']
    o = options(gcloud[0])
    assert gcloud[0][:5] == first and 'spot' in o
    assert o.get('version', o.get('runtime-version')) == version
    ssh = [options(c)['command'] for c in gcloud if c[:5] == _VM + ['ssh']]
    assert ssh[1] == 'cd ~/nfnet_jax && bash launch/gcsfuse.sh BUCKET/tensorflow_datasets /mnt/tfds'
    train = ssh[2]
    assert '--config.data.data_dir=/mnt/tfds' in train and '--distributed' in train


# ---------------------------------------------------------------------------------
# The training command checked here, and a workdir every worker reaches, before any
# TPU is created or training starts
# ---------------------------------------------------------------------------------

_TYPO = ['--', '--config=experiments/nfnet.py:F0', '--config.bach_size=8']


def _real_check_env(**extra):
  """The check runs with this test's interpreter on this checkout."""
  return {'CHECK_PYTHON': sys.executable, 'PYTHONPATH': str(REPO), **extra}


def test_tpu_vm_checks_the_training_command_here_before_creating_anything(sandbox):
  _fake_gcloud(sandbox, train_fails=0, qr_states='ACTIVE')
  out = subprocess.run(['bash', str(REPO / 'launch' / 'tpu_vm.sh'), '--name=nf', '--zone=z',
                        '--accelerator-type=v4-32', '--workdir=gs://b/w', *_TYPO],
                       capture_output=True, text=True, timeout=120,
                       env=sandbox.env(**_real_check_env()))
  assert out.returncode == 1
  assert sandbox.calls() == []  # no gcloud call: nothing created, nothing deleted
  assert out.stderr.count('\n') == 1, out.stderr
  assert out.stderr.startswith('tpu_vm.sh: the training command fails --check_config, '
                               'nothing was created: FATAL Flags parsing error: Unknown '
                               'config key config.bach_size')
  # The dry run (the plan) stops the same way; the check sees the slice's 16 chips.
  out = dry_run('tpu_vm.sh', '--accelerator-type=v4-32', '--workdir=gs://b/w', '--',
                '--config=experiments/nfnet.py:F0', '--config.batch_size=1000',
                env=_real_check_env(), ok=False)
  assert out.returncode == 1 and out.stdout == ''
  assert 'config.batch_size=1000 must be a positive multiple of the 16 devices' in out.stderr
  # No Python that can check: one line saying what to do; --no-check skips the check.
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', *_TYPO,
                env={'CHECK_PYTHON': '/nonexistent/python'}, ok=False)
  assert out.returncode == 1 and out.stdout == ''
  assert out.stderr == ('tpu_vm.sh: cannot check the training command: no Python '
                        '/nonexistent/python here; pass a Python with this project\'s '
                        'requirements (--check-python=PATH or --no-check)\n')
  out = dry_run('tpu_vm.sh', '--workdir=gs://b/w', '--no-check', *_TYPO,
                env={'CHECK_PYTHON': '/nonexistent/python'})
  assert [c[4] for c in commands(out) if c[0] == 'gcloud'][0] == 'create'


@pytest.mark.parametrize('accelerator,devices,hosts', [
    ('v2-8', 8, 1), ('v3-32', 32, 4), ('v4-8', 4, 1), ('v4-32', 16, 4), ('v5p-8', 4, 1),
    ('v5p-16', 8, 2), ('v5litepod-8', 8, 1), ('v5litepod-16', 16, 4), ('v6e-8', 8, 1),
    ('v6e-16', 16, 4),
])
def test_tpu_vm_workdir_every_worker_reaches_and_devices_checked(accelerator, devices, hosts,
                                                                  tmp_path):
  log = tmp_path / 'check.log'
  args = ['--name=nf', f'--accelerator-type={accelerator}']
  env = {'FAKE_CHECK_LOG': str(log)}
  out = dry_run('tpu_vm.sh', *args, '--workdir=./runs/f0', env=env, ok=False)
  if hosts > 1:
    assert out.returncode == 2 and out.stdout == '' and not log.exists()
    assert out.stderr == (f'tpu_vm.sh: --workdir=./runs/f0 is not a gs:// bucket, but the '
                          f'{hosts} hosts of a {accelerator} slice must all reach it (each '
                          'would write to its own disk): use gs://BUCKET/... (or '
                          '--shared-workdir if --setup mounts one shared filesystem on every '
                          'worker)\n')
    out = dry_run('tpu_vm.sh', *args, '--workdir=/mnt/shared/f0', '--shared-workdir', env=env)
  else:  # one host: its own disk works, and the script says what becomes of it
    assert out.returncode == 0, out.stderr
    assert 'is on the TPU VM\'s disk' in out.stderr and 'unless --keep' in out.stderr
    refused = dry_run('tpu_vm.sh', *args, '--workdir=./runs/f0', '--retries=2', ok=False)
    assert refused.returncode == 2 and refused.stdout == ''
    assert 'a preemption takes with it, so --retries could not resume' in refused.stderr
  assert [c[4] for c in commands(out) if c[0] == 'gcloud'][0] == 'create'
  # The check ran once, on as many emulated devices as the slice has (JAX's count).
  flags, _, argv = log.read_text().strip().partition(' | ')
  assert flags == f'--xla_force_host_platform_device_count={devices}'
  assert argv.split()[:2] == ['-m', 'nfnet_jax.train'] and '--check_config' in argv
  # Paths are the workers' (a bucket, a gcsfuse mount): only the values are checked here.
  assert '--nocheck_paths' in argv.split()
  out = dry_run('tpu_vm.sh', *args, '--workdir=gs://b/f0', '--retries=2')  # always fine
  assert 'TPU VM\'s disk' not in out.stderr


def test_tpu_vm_unknown_slice_needs_a_bucket():
  out = dry_run('tpu_vm.sh', '--accelerator-type=v9-8', '--version=v9-base',
                '--workdir=./w', ok=False)
  assert out.returncode == 2 and out.stdout == ''
  assert 'whether a v9-8 slice has several hosts is unknown here' in out.stderr
  out = dry_run('tpu_vm.sh', '--accelerator-type=v9-8', '--version=v9-base', '--workdir=gs://b')
  assert 'xla_force_host_platform_device_count' not in out.stderr
  out = dry_run('tpu_vm.sh', '--accelerator-type=v4-x', '--workdir=gs://b', ok=False)
  assert out.returncode == 2 and 'expected a number after the last -' in out.stderr


def test_gpu_checks_the_training_command_before_the_workdir_or_training(tmp_path, sandbox):
  workdir = tmp_path / 'run'
  out = subprocess.run(['bash', str(REPO / 'launch' / 'gpu.sh'), f'--workdir={workdir}',
                        f'--python={sys.executable}', *_TYPO], capture_output=True, text=True,
                       timeout=120, env={**os.environ, 'PATH': '/usr/bin:/bin',
                                         'PYTHONPATH': str(REPO)})
  assert out.returncode == 1 and not workdir.exists()
  assert out.stderr.count('\n') == 1, out.stderr
  assert out.stderr.startswith('gpu.sh: the training command fails --check_config, nothing '
                               'was created: FATAL Flags parsing error: Unknown config key '
                               'config.bach_size')
  # dry run: the same interpreter checks (here a fake, which logs its calls) ...
  sandbox.python('python3', '3.12')
  # (--python: a checkout with its own .venv would otherwise be preferred to python3.)
  out = dry_run('gpu.sh', '--python=python3', '--workdir=/w', '--mode=eval', '--',
                '--config=experiments/quickstart.py', env=sandbox.env())
  assert 'python3 -m nfnet_jax.train --check_config --workdir=/w --mode=eval --config=' \
         'experiments/quickstart.py' in sandbox.calls()
  assert 'gpu.sh: checked here: passed' in out.stderr
  # ... and with --install the check is planned after the install, before training.
  cmds = commands(dry_run('gpu.sh', '--install', '--workdir=/w', env=sandbox.env()))
  pip = max(i for i, c in enumerate(cmds) if c[0] == '.venv/bin/pip')
  check, train = cmds[pip + 1], cmds[pip + 2]
  assert check[0].endswith('.venv/bin/python') and check[1:4] == ['-m', 'nfnet_jax.train',
                                                                  '--check_config']
  assert train[1:3] == ['-m', 'nfnet_jax.train'] and '--check_config' not in train
  assert '--check_config' not in str(commands(dry_run('gpu.sh', '--install', '--no-check',
                                                      '--workdir=/w', env=sandbox.env())))
