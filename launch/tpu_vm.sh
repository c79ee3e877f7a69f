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
# resumed up to N times. See docs/launch.md for a first run on a pod.
#
# The TPU software version follows the accelerator type (Google's images for JAX):
# v2/v3/v4 tpu-ubuntu2204-base, v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
# v6e v2-alpha-tpuv6e. v5litepod, v5p and v6e are requested as queued resources
# (`gcloud compute tpus queued-resources create`, waiting until ACTIVE), as Google
# recommends for them; others with `tpu-vm create` unless --queued. These images run
# Ubuntu 22.04 with Python 3.10, older than JAX supports: each worker builds its venv
# on python3.12/3.11 if present, else on a Python that uv installs (launch/lib.sh).
#
# Options (also as environment variables: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE,
# TPU_VERSION, WORKDIR):
#   --name=NAME               TPU name (default: nfnet-$USER-<time>)
#   --zone=ZONE               (default: us-central2-b)
#   --project=PROJECT         (default: gcloud's configured project)
#   --accelerator-type=TYPE   v4-8, v4-32, v5litepod-16, v5p-8, v6e-8, ... (default: v4-8)
#   --version=VERSION         TPU software version (default: by accelerator type, above)
#   --queued / --no-queued    create through queued resources or `tpu-vm create`
#                             (default: queued for v5litepod, v5p, v6e)
#   --spot                    create a spot (preemptible) TPU
#   --workdir=DIR             checkpoints, metrics, TensorBoard (required)
#   --mode=MODE               train | eval | train_and_eval (default: train)
#   --python=PATH             interpreter on the workers for the venv (default: see above)
#   --jax=SPEC                pip requirement for JAX on TPU (default: jax[tpu])
#   --setup=CMD               shell command run on every worker after the install, in the
#                             checkout (e.g. mount the dataset: launch/gcsfuse.sh, see
#                             docs/launch.md); again after every recreation
#   --retries=N               recreate and resume after a preemption, N times (default 0)
#   --keep                    do not delete the TPU at the end
#   --dry-run                 print the commands (one per line) instead of running them
set -euo pipefail

name="${TPU_NAME:-nfnet-${USER:-user}-$(date +%Y%m%d-%H%M%S)}"
zone="${ZONE:-us-central2-b}"
project="${PROJECT:-}"
accelerator="${ACCELERATOR_TYPE:-v4-8}"
version="${TPU_VERSION:-}"
workdir="${WORKDIR:-}"
mode=train
jax_spec='jax[tpu]'
python="" setup=""
queued="" spot=0 keep=0 dry=0 retries=0
poll_s="${TPU_POLL_SECONDS:-30}"  # seconds between state checks of a queued resource
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
    --queued) queued=1 ;;
    --no-queued) queued=0 ;;
    --workdir=*) workdir="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --jax=*) jax_spec="${1#*=}" ;;
    --setup=*) setup="${1#*=}" ;;
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

# Google's TPU software version for JAX, and whether capacity comes through queued
# resources, by TPU generation.
case "$accelerator" in
  v2-*|v3-*|v4-*) default_version=tpu-ubuntu2204-base default_queued=0 ;;
  v5litepod-*) default_version=v2-alpha-tpuv5-lite default_queued=1 ;;
  v5p-*) default_version=v2-alpha-tpuv5 default_queued=1 ;;
  v6e-*) default_version=v2-alpha-tpuv6e default_queued=1 ;;
  *) [[ -n "$version" ]] || die "unknown accelerator type $accelerator (v2-*, v3-*, v4-*, v5litepod-*, v5p-*, v6e-*); pass --version=SOFTWARE_VERSION for others"
     default_version="" default_queued=0 ;;
esac
version="${version:-$default_version}"
queued="${queued:-$default_queued}"

repo="$(cd "$(dirname "$0")/.." && pwd)"
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

q() { printf '%q' "$1"; }  # Quote one word for the remote shell.

# On every worker: unpack the checkout, build the venv on a Python that JAX supports
# (ensure_venv from the copied launch/lib.sh; never with the image's Python 3.10), then
# install JAX for TPU and this project into it.
# shellcheck disable=SC2088  # ~ is expanded by the worker's shell
remote_dir='~/nfnet_jax'
install_cmd="set -e; rm -rf $remote_dir; mkdir -p $remote_dir; tar -xzf ~/nfnet_jax.tar.gz -C $remote_dir; cd $remote_dir; source launch/lib.sh; launcher=\"tpu_vm.sh on \$(hostname)\"; ensure_venv ~/nfnet_venv $(q "$python"); ~/nfnet_venv/bin/pip install -q --upgrade pip; ~/nfnet_venv/bin/pip install -q $(q "$jax_spec") -e ."
train_cmd="cd $remote_dir && ~/nfnet_venv/bin/python -m nfnet_jax.train --distributed --workdir=$(q "$workdir") --mode=$mode"
for a in "${train_args[@]}"; do train_cmd+=" $(q "$a")"; done
# Every worker prefixes its lines with its hostname, so the streamed logs stay readable.
train_cmd+=" 2>&1 | sed -u \"s/^/[\$(hostname)] /\""

tarball="${TMPDIR:-/tmp}/nfnet_jax-$name.tar.gz"

# Queued resource (and its TPU node) share the name.
qr=(gcloud compute tpus queued-resources)

create() {
  local cmd
  if ((queued)); then
    cmd=("${qr[@]}" create "$name" --node-id="$name" "${where[@]}"
         --accelerator-type="$accelerator" --runtime-version="$version")
  else
    cmd=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
         --accelerator-type="$accelerator" --version="$version")
  fi
  ((spot)) && cmd+=(--spot)
  run "${cmd[@]}"
  if ((queued)); then wait_active; fi
}

# Waits until the queued resource is ACTIVE (its TPU is then up); fails on FAILED or
# SUSPENDED. Capacity can take minutes to hours; each change of state is reported.
wait_active() {
  local cmd=("${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
  local state last=""
  if ((dry)); then run "${cmd[@]}"; return 0; fi
  while :; do
    state="$("${cmd[@]}" 2> /dev/null || true)"
    if [[ "$state" != "$last" ]]; then
      echo "tpu_vm.sh: queued resource $name: ${state:-(no state yet)}" >&2
      last="$state"
    fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDING|SUSPENDED)
        echo "tpu_vm.sh: queued resource $name is $state (details: gcloud compute tpus queued-resources describe $name --zone=$zone)" >&2
        return 1 ;;
    esac
    sleep "$poll_s"
  done
}

# $1 = wait: return only once the TPU is gone (before recreating it under the same
# name); otherwise the queued resource is deleted in the background (--async).
delete() {
  if ((queued)); then
    local cmd=("${qr[@]}" delete "$name" "${where[@]}" --force --quiet)
    [[ "${1:-}" == wait ]] || cmd+=(--async)
    run "${cmd[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((keep)); then
    if ((queued)); then
      echo "tpu_vm.sh: keeping $name (delete: gcloud compute tpus queued-resources delete $name --zone=$zone --force)" >&2
    else
      echo "tpu_vm.sh: keeping $name (delete: gcloud compute tpus tpu-vm delete $name --zone=$zone)" >&2
    fi
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
  if [[ -n "$setup" ]]; then
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="cd $remote_dir && $setup"
  fi
  rc=0
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$train_cmd" || rc=$?
  ((rc == 0)) && break
  if ((attempt < retries)) && preempted; then
    attempt=$((attempt + 1))
    echo "tpu_vm.sh: $name was preempted; recreating it and resuming (retry $attempt/$retries)" >&2
    delete wait || true
    continue
  fi
  exit "$rc"
done
