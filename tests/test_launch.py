"""launch/*.sh: the commands they would run (--dry-run), parsed."""
import os
from pathlib import Path
import shlex
import subprocess

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(script, *args, env=None, ok=True):
  out = subprocess.run(['bash', str(REPO / 'launch' / script), '--dry-run', *args],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'PATH': '/usr/bin:/bin', **(env or {})})
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
  # Install on every worker: unpack the tarball, venv, pip install JAX for TPU + us.
  o = options(install)
  assert o['worker'] == 'all'
  remote = o['command']
  assert 'tar -xzf ~/nfnet_jax.tar.gz' in remote and 'python3 -m venv' in remote
  assert 'pip install -q jax\\[tpu\\] -e .' in remote
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


def test_gpu_script():
  out = dry_run('gpu.sh', '--workdir=/tmp/w', '--gpus=0,1', '--', '--config=experiments/'
                'quickstart.py', '--config.batch_size=256')
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
  out = dry_run('gpu.sh', '--install', '--workdir=/w')
  cmds = commands(out)
  assert ['python3', '-m', 'venv', '.venv'] in cmds
  assert any(c[:3] == ['.venv/bin/pip', 'install', '-q'] and 'jax[cuda12]' in c
             and '-e' in c for c in cmds)
  assert cmds[-1][0].endswith('.venv/bin/python')
  out = dry_run('gpu.sh', ok=False)
  assert out.returncode == 2 and '--workdir is required' in out.stderr


def test_quickstart_script():
  cmds = commands(dry_run('quickstart.sh', '--fresh', '--', '--config.num_epochs=1'))
  assert cmds[0] == ['python3', '-m', 'venv', '.venv']
  assert ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.[test]'] in cmds
  assert ['rm', '-rf', 'workdir/quickstart'] in cmds
  assert cmds[-1] == ['.venv/bin/python', '-m', 'nfnet_jax.train',
                      '--config=experiments/quickstart.py', '--workdir=workdir/quickstart',
                      '--config.num_epochs=1']


@pytest.mark.parametrize('script', ['tpu_vm.sh', 'gpu.sh', 'quickstart.sh'])
def test_scripts_parse_and_have_help(script):
  path = REPO / 'launch' / script
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  out = subprocess.run(['bash', str(path), '--help'], capture_output=True, text=True)
  assert out.returncode == 0 and '--dry-run' in out.stdout
  assert os.access(path, os.X_OK)
