#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install this project on every
# worker, run the same training command on all workers (streaming their logs), and
# delete the TPU at the end (also on Ctrl-C or error).
#
#   launch/tpu_vm.sh --name=nfnet-f0 --zone=us-central2-b --accelerator-type=v4-32 \
#       --workdir=gs://my-bucket/nfnet/f0 -- --config=experiments/nfnet.py:F0
#
# Everything after `--` goes to `python -m nfnet_jax.train` on every worker (default:
# --config=experiments/nfnet.py:F0). The workdir must be visible to every worker (a
# gs:// bucket for a pod). Re-running the same command resumes from the workdir's last
# checkpoint; with --retries=N a preempted (spot) TPU is recreated and training
# resumed up to N times.
#
# Options (also as environment variables: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE,
# TPU_VERSION, WORKDIR):
#   --name=NAME               TPU name (default: nfnet-$USER-<time>)
#   --zone=ZONE               (default: us-central2-b)
#   --project=PROJECT         (default: gcloud's configured project)
#   --accelerator-type=TYPE   v4-8, v4-32, v5litepod-16, v6e-8, ... (default: v4-8)
#   --version=VERSION         TPU software version (default: tpu-ubuntu2204-base)
#   --spot                    create a spot (preemptible) TPU
#   --workdir=DIR             checkpoints, metrics, TensorBoard (required)
#   --mode=MODE               train | eval | train_and_eval (default: train)
#   --jax=SPEC                pip requirement for JAX on TPU (default: jax[tpu])
#   --retries=N               recreate and resume after a preemption, N times (default 0)
#   --keep                    do not delete the TPU at the end
#   --dry-run                 print the commands (one per line) instead of running them
set -euo pipefail

name="${TPU_NAME:-nfnet-${USER:-user}-$(date +%Y%m%d-%H%M%S)}"
zone="${ZONE:-us-central2-b}"
project="${PROJECT:-}"
accelerator="${ACCELERATOR_TYPE:-v4-8}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
workdir="${WORKDIR:-}"
mode=train
jax_spec='jax[tpu]'
spot=0 keep=0 dry=0 retries=0
train_args=()

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # usage, die, run

while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator-type=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --jax=*) jax_spec="${1#*=}" ;;
    --retries=*) retries="${1#*=}" ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) usage 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option $1 (training flags go after --; see --help)" ;;
  esac
  shift
done

[[ -n "$workdir" ]] || die "--workdir is required (a gs:// path that every worker can reach)"
[[ "$mode" =~ ^(train|eval|train_and_eval)$ ]] || die "--mode must be train, eval or train_and_eval"
[[ "$retries" =~ ^[0-9]+$ ]] || die "--retries must be a number"
if ((${#train_args[@]} == 0)); then train_args=(--config=experiments/nfnet.py:F0); fi
for a in "${train_args[@]}"; do
  [[ "$a" == --workdir=* || "$a" == --mode=* ]] && die "pass $a to tpu_vm.sh, not after --"
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

q() { printf '%q' "$1"; }  # Quote one word for the remote shell.

remote_dir='~/nfnet_jax'
install_cmd="set -e; rm -rf $remote_dir; mkdir -p $remote_dir; tar -xzf ~/nfnet_jax.tar.gz -C $remote_dir; cd $remote_dir; python3 -m venv ~/nfnet_venv; ~/nfnet_venv/bin/pip install -q --upgrade pip; ~/nfnet_venv/bin/pip install -q $(q "$jax_spec") -e ."
train_cmd="cd $remote_dir && ~/nfnet_venv/bin/python -m nfnet_jax.train --distributed --workdir=$(q "$workdir") --mode=$mode"
for a in "${train_args[@]}"; do train_cmd+=" $(q "$a")"; done
# Every worker prefixes its lines with its hostname, so the streamed logs stay readable.
train_cmd+=" 2>&1 | sed -u \"s/^/[\$(hostname)] /\""

tarball="${TMPDIR:-/tmp}/nfnet_jax-$name.tar.gz"

create() {
  local cmd=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
             --accelerator-type="$accelerator" --version="$version")
  ((spot)) && cmd+=(--spot)
  run "${cmd[@]}"
}

delete() {
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((keep)); then
    echo "tpu_vm.sh: keeping $name (delete: gcloud compute tpus tpu-vm delete $name --zone=$zone)" >&2
  else
    ((dry)) || echo "tpu_vm.sh: deleting $name" >&2
    delete || echo "tpu_vm.sh: could not delete $name; delete it by hand" >&2
  fi
  ((dry)) || rm -f "$tarball"
  exit "$rc"
}

preempted() {  # True when the TPU is gone or not READY (e.g. PREEMPTED).
  ((dry)) && return 1
  local state
  state="$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)"
  [[ "$state" != READY ]]
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The project's files as git tracks them (plus new, unignored ones): no venvs/workdirs.
run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=.venv --exclude=workdir .
attempt=0
while :; do
  create
  run gcloud compute tpus tpu-vm scp "$tarball" "$name":nfnet_jax.tar.gz "${where[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$install_cmd"
  rc=0
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$train_cmd" || rc=$?
  ((rc == 0)) && break
  if ((attempt < retries)) && preempted; then
    attempt=$((attempt + 1))
    echo "tpu_vm.sh: $name was preempted; recreating it and resuming (retry $attempt/$retries)" >&2
    delete || true
    continue
  fi
  exit "$rc"
done
