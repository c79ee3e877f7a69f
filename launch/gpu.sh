#!/usr/bin/env bash
# Train on one host with all of its GPUs (one process; the step is data-parallel
# over every visible GPU).
#
#   launch/gpu.sh --workdir=/ckpt/f0 -- --config=experiments/nfnet.py:F0 --config.batch_size=1024
#
# Everything after `--` goes to `python -m nfnet_jax.train` (default:
# --config=experiments/nfnet.py:F0). The global batch must divide by the number of
# GPUs. Before the workdir is created or training starts, the command's --check_config
# runs with the same interpreter (with --install, right after the install, which is what
# provides one): a mistake in it stops the script with one line. Re-running the same
# command resumes from the workdir's last checkpoint; Ctrl-C or SIGTERM saves a
# checkpoint first. The log also goes to WORKDIR/train.log.
#
# Options:
#   --workdir=DIR       checkpoints, metrics, TensorBoard, train.log (required)
#   --mode=MODE         train | eval | train_and_eval (default: train)
#   --gpus=LIST         CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)
#   --python=PATH       interpreter (also $PYTHON) that trains (default: .venv/bin/python
#                       if present, else python3); with --install, the one that creates
#                       .venv (default: python3 if it is >= 3.11, else python3.12/3.11,
#                       else a Python 3.12 that uv installs; see launch/lib.sh)
#   --install           first create .venv and install this project with JAX for CUDA
#   --jax=SPEC          pip requirement for JAX with CUDA (default: jax[cuda12])
#   --mem-fraction=F    share of GPU memory JAX takes at start (default: 0.9)
#   --no-check          skip the --check_config run before training
#   --dry-run           print the environment and commands instead of running them
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
workdir="" mode=train gpus="" python="${PYTHON:-}" install=0 dry=0 mem_fraction=0.9 check=1
jax_spec='jax[cuda12]'
train_args=()

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # usage, die, run, ensure_venv, python_ok, check_training

while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --gpus=*) gpus="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --install) install=1 ;;
    --jax=*) jax_spec="${1#*=}" ;;
    --mem-fraction=*) mem_fraction="${1#*=}" ;;
    --no-check) check=0 ;;
    --dry-run) dry=1 ;;
    -h|--help) usage 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option $1 (training flags go after --; see --help)" ;;
  esac
  shift
done
[[ -n "$workdir" ]] || die "--workdir is required"
[[ "$mode" =~ ^(train|eval|train_and_eval)$ ]] || die "--mode must be train, eval or train_and_eval"
if ((${#train_args[@]} == 0)); then train_args=(--config=experiments/nfnet.py:F0); fi

# With --install, $python only builds .venv, which then trains.
venv_python="$python"
if ((install)) || [[ -z "$python" && -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
elif [[ -z "$python" ]]; then python=python3; fi

# XLA: overlap the gradient all-reduce with the backward pass. JAX preallocates
# this share of each GPU's memory. The input pipeline's TensorFlow never sees a GPU
# (nfnet_jax.data hides them from it) and logs only errors.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
[[ -n "$gpus" ]] && export CUDA_VISIBLE_DEVICES="$gpus"
if ((dry)); then
  for v in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION TF_CPP_MIN_LOG_LEVEL CUDA_VISIBLE_DEVICES; do
    [[ -n "${!v:-}" ]] && echo "export $v=$(printf '%q' "${!v}")"
  done
fi

cd "$repo"
if ((install)); then
  ensure_venv .venv "$venv_python" || exit 1
  run .venv/bin/pip install -q --upgrade pip
  run .venv/bin/pip install -q "$jax_spec" -e ".[data]"
fi
# A too-old interpreter fails here with one line, not in the middle of an import.
((install)) || python_ok "$python" || exit 1
# The training command's --check_config (it creates nothing, so it also runs in dry-run
# mode, except when --install has only printed the venv that would run it).
if ((check)); then
  if ((install && dry)); then
    run "$python" -m nfnet_jax.train --check_config --workdir="$workdir" --mode="$mode" "${train_args[@]}"
  else
    ((install)) && check_stopped="training was not started (.venv stays)"
    check_hint="--python=PATH or --no-check" check_training "$repo" "$python" "" \
        --workdir="$workdir" --mode="$mode" "${train_args[@]}" || exit 1
  fi
fi
if ((!dry)) && command -v nvidia-smi > /dev/null; then
  echo "gpu.sh: $(nvidia-smi -L | grep -c '^GPU') GPU(s) on this host${gpus:+, using $gpus}" >&2
fi
cmd=("$python" -m nfnet_jax.train --workdir="$workdir" --mode="$mode" "${train_args[@]}")
if ((dry)); then
  run "${cmd[@]}"
  exit 0
fi
mkdir -p "$workdir" 2> /dev/null || true
# exec keeps signals going straight to Python (checkpoint on SIGTERM / Ctrl-C); the
# log is tee'd by a process substitution.
if [[ "$workdir" == *://* ]]; then exec "${cmd[@]}"; fi
exec "${cmd[@]}" > >(tee -a "$workdir/train.log") 2>&1
