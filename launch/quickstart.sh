#!/usr/bin/env bash
# From a fresh machine (Python 3.11+ with venv, or an older python3 with pip, through
# which uv is installed to provide Python 3.12; see launch/lib.sh): create .venv,
# install this project with its test extras, train the quickstart (a small NFNet on
# the built-in offline dataset; minutes on 2 CPU cores) and print its final top-1.
#
#   bash launch/quickstart.sh                 # then: .venv/bin/python -m pytest -q tests
#
# Options:
#   --workdir=DIR   where checkpoints and metrics go (default: workdir/quickstart);
#                   re-running resumes there, so a finished run just re-evaluates
#   --fresh         delete the workdir first (train from scratch)
#   --python=PATH   interpreter (also $PYTHON) that creates .venv (default: python3 if
#                   it is >= 3.11, else python3.12/3.11, else one that uv installs)
#   --dry-run       print the commands instead of running them
# Anything after `--` goes to `python -m nfnet_jax.train` (e.g. --config.num_epochs=2).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
workdir="workdir/quickstart" fresh=0 dry=0 python="${PYTHON:-}"
train_args=()

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # usage, die, run, ensure_venv
while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --fresh) fresh=1 ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry=1 ;;
    -h|--help) usage 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option $1" ;;
  esac
  shift
done

cd "$repo"
# Creates .venv on a Python that JAX supports, or checks the one already there.
ensure_venv .venv "$python" || exit 1
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -e '.[test]'
((fresh)) && run rm -rf "$workdir"
log="${TMPDIR:-/tmp}/nfnet_quickstart.$$.log"
cmd=(.venv/bin/python -m nfnet_jax.train --config=experiments/quickstart.py
     --workdir="$workdir" "${train_args[@]}")
if ((dry)); then
  run "${cmd[@]}"
  exit 0
fi
start=$(date +%s)
"${cmd[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
final="$(grep '^Final top-1' "$log" | tail -1 || true)"
rm -f "$log"
((status == 0)) || die "training failed (exit $status)"
echo
echo "quickstart: ${final:-no Final top-1 line} [$(($(date +%s) - start)) s; workdir $workdir]"
