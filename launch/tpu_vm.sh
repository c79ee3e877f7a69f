#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install this project on every
# worker, run the same training command on all workers (streaming their logs), and
# delete the TPU at the end (also on Ctrl-C or error).
#
#   launch/tpu_vm.sh --name=nfnet-f0 --zone=us-central2-b --accelerator-type=v4-32 \
#       --workdir=gs://my-bucket/nfnet/f0 -- --config=experiments/nfnet.py:F0
#
# Everything after `--` goes to `python -m nfnet_jax.train` on every worker (default:
# --config=experiments/nfnet.py:F0). Before anything is created, that command's
# --check_config runs here (with --check-python), on as many emulated devices as the
# slice has chips: a mistake in it stops the script with one line. The workdir must be
# visible to every worker: a slice of several hosts (by its accelerator type, below)
# needs a gs:// bucket, and so does --retries. Re-running the same command resumes from
# the workdir's last checkpoint; with --retries=N a preempted (spot) TPU is recreated
# and training resumed up to N times. See docs/launch.md for a first run on a pod.
#
# Hosts and devices follow the accelerator type: v2, v3, v4 and v5p count TensorCores
# (2 per chip) on hosts of 4 chips (v4-32: 16 chips, 4 hosts); v5litepod and v6e count
# chips, all on one host up to 8 (v6e-8), on hosts of 4 above (v5litepod-16: 4 hosts).
# JAX sees one device per chip (per TensorCore on v2 and v3).
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
#   --workdir=DIR             checkpoints, metrics, TensorBoard (required): gs://... for
#                             a multi-host slice or --retries
#   --shared-workdir          accept a workdir that is not gs:// on a multi-host slice:
#                             a filesystem that --setup mounts on every worker
#   --check-python=PATH       local interpreter that runs --check_config (also
#                             $CHECK_PYTHON; default: .venv/bin/python if present, else
#                             python3)
#   --no-check                skip the local --check_config
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
shared_workdir=0 check=1 check_python="${CHECK_PYTHON:-}"
poll_s="${TPU_POLL_SECONDS:-30}"  # seconds between state checks of a queued resource
train_args=()

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # usage, die, run, check_training

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
    --shared-workdir) shared_workdir=1 ;;
    --check-python=*) check_python="${1#*=}" ;;
    --no-check) check=0 ;;
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

# Devices (as JAX counts them) and hosts of the slice, from the type's number (header
# comment); both empty for a type this script does not know.
devices="" hosts=""
count="${accelerator##*-}"
case "$accelerator" in
  v2-*|v3-*|v4-*|v5p-*|v5litepod-*|v6e-*)
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "accelerator type $accelerator: expected a number after the last -, e.g. v4-32" ;;
esac
case "$accelerator" in
  v2-*|v3-*) devices=$count hosts=$(((count + 7) / 8)) ;;
  v4-*|v5p-*) devices=$(((count + 1) / 2)) hosts=$(((count + 7) / 8)) ;;
  v5litepod-*|v6e-*) devices=$count; if ((count <= 8)); then hosts=1; else hosts=$(((count + 3) / 4)); fi ;;
esac

# Every worker must reach the workdir: the hosts of a slice each write their part of a
# checkpoint, and a recreated TPU (--retries) starts with an empty disk.
if [[ "$workdir" != gs://* ]] && ((!shared_workdir)); then
  if [[ -z "$hosts" ]]; then
    die "--workdir=$workdir is not a gs:// bucket, and whether a $accelerator slice has several hosts is unknown here: use gs://BUCKET/... (or --shared-workdir if --setup mounts one shared filesystem on every worker)"
  elif ((hosts > 1)); then
    die "--workdir=$workdir is not a gs:// bucket, but the $hosts hosts of a $accelerator slice must all reach it (each would write to its own disk): use gs://BUCKET/... (or --shared-workdir if --setup mounts one shared filesystem on every worker)"
  elif ((retries > 0)); then
    die "--workdir=$workdir is on the TPU VM's own disk, which a preemption takes with it, so --retries could not resume: use gs://BUCKET/..."
  fi
  echo "tpu_vm.sh: note: --workdir=$workdir is on the TPU VM's disk (relative paths: under ~/nfnet_jax), deleted with the TPU unless --keep; a gs:// bucket outlives it" >&2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"

# The training command, checked here before anything is created (also with --dry-run).
# Its values only (--nocheck_paths): the data, the weights and the workdir are where the
# workers see them (a bucket, a gcsfuse mount), not on this machine.
if ((check)); then
  if [[ -z "$check_python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then check_python="$repo/.venv/bin/python"; else check_python=python3; fi
  fi
  check_training "$repo" "$check_python" "$devices" --nocheck_paths --workdir="$workdir" --mode="$mode" \
      "${train_args[@]}" || exit 1
fi
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

q() { printf '%q' "$1"; }  # Quote one word for the remote shell.

# On every worker: unpack the checkout, build the venv on a Python that JAX supports
# (ensure_venv from the copied launch/lib.sh; never with the image's Python 3.10), then
# install JAX for TPU and this project into it.
# shellcheck disable=SC2088  # ~ is expanded by the worker's shell
remote_dir='~/nfnet_jax'
install_cmd="set -e; rm -rf $remote_dir; mkdir -p $remote_dir; tar -xzf ~/nfnet_jax.tar.gz -C $remote_dir; cd $remote_dir; source launch/lib.sh; launcher=\"tpu_vm.sh on \$(hostname)\"; ensure_venv ~/nfnet_venv $(q "$python"); ~/nfnet_venv/bin/pip install -q --upgrade pip; ~/nfnet_venv/bin/pip install -q $(q "$jax_spec") -e $(q ".[data]")"
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
