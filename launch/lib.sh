# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): usage, errors, dry-run commands, and
# a virtualenv on a Python that JAX supports. tpu_vm.sh also sources it on every TPU
# worker (from the copied checkout) to build the workers' venv.
# Each script sets `dry` (0/1) before calling `run` (unset counts as 0).

# The oldest Python the pinned JAX supports: jax>=0.10 (requirements.txt) requires
# Python >= 3.11, and setup.py's python_requires says the same (tests/test_launch.py
# checks both against jax's metadata). Ubuntu 22.04, the base of Google's TPU images,
# ships Python 3.10.
NFNET_MIN_PYTHON=3.11
# The Python that uv installs when the machine has none new enough: inside the range
# the project supports (3.11-3.12), and one that does not hold back newer JAX releases.
NFNET_UV_PYTHON=3.12

# Prints the calling script's header comment (its help) and exits with $1 (default 0).
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

# One-line error naming the script; exit status 2 (bad usage).
die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Prints the command (shell-quoted, one line) in dry-run mode, else runs it.
run() {
  if ((${dry:-0})); then
    local out=() a
    for a in "$@"; do out+=("$(printf '%q' "$a")"); done
    echo "${out[*]}"
  else
    "$@"
  fi
}

# python_version PYTHON: prints "MAJOR.MINOR" of that interpreter; fails if it cannot run.
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null
}

# version_at_least A B: true when version A (MAJOR.MINOR) >= B.
version_at_least() {
  local a_major="${1%%.*}" a_minor="${1#*.}" b_major="${2%%.*}" b_minor="${2#*.}"
  ((a_major > b_major || (a_major == b_major && a_minor >= b_minor)))
}

# python_ok PYTHON: true when that interpreter runs and is new enough for JAX; else
# one line on stderr names the version found and what to do.
python_ok() {
  local who="${launcher:-$(basename "$0")}" v
  if ! v="$(python_version "$1")"; then
    echo "$who: cannot run the Python given ($1); install Python >= $NFNET_MIN_PYTHON (or uv) and pass --python=PATH" >&2
    return 1
  fi
  if ! version_at_least "$v" "$NFNET_MIN_PYTHON"; then
    echo "$who: $1 is Python $v; JAX needs Python >= $NFNET_MIN_PYTHON: install one (or uv) and pass --python=PATH" >&2
    return 1
  fi
}

# ensure_venv DIR [PYTHON]: creates the virtualenv DIR (with pip) on a Python that JAX
# supports, before anything is installed into it.
#   PYTHON given (a path or command): that interpreter, refused if too old.
#   else: python3 if new enough, else python3.12 / python3.11 from PATH, else uv
#   (from PATH, or installed with the old python3's pip: `pip install --user uv`, the
#   standalone uv on PyPI) creates DIR on a Python $NFNET_UV_PYTHON that it downloads;
#   one line on stderr says so.
# An existing DIR is kept when its Python is new enough and refused otherwise. Nothing is
# ever installed with a too-old interpreter except uv itself. Messages go to stderr,
# prefixed with $launcher (default: the script's name); returns 1 after a one-line
# message when no suitable Python can be had. In dry-run mode (dry=1) it prints the
# commands instead (it still asks the interpreters for their versions).
ensure_venv() {
  local dir="$1" want="${2:-}" who="${launcher:-$(basename "$0")}" v c uv base found
  local min="$NFNET_MIN_PYTHON" todo="install Python >= $NFNET_MIN_PYTHON (or uv) and pass --python=PATH"
  if [[ -x "$dir/bin/python" ]] && ! ((${dry:-0})); then
    v="$(python_version "$dir/bin/python")" || v=unknown
    if [[ "$v" != unknown ]] && version_at_least "$v" "$min"; then return 0; fi
    echo "$who: $dir has Python $v; JAX needs Python >= $min: remove it (rm -rf $dir) and run again" >&2
    return 1
  fi
  if [[ -n "$want" ]]; then
    python_ok "$want" || return 1
    run "$want" -m venv "$dir" || return 1
    return 0
  fi
  for c in python3 python3.12 python3.11; do
    if command -v "$c" > /dev/null && v="$(python_version "$c")" && version_at_least "$v" "$min"; then
      run "$c" -m venv "$dir" || return 1
      return 0
    fi
  done
  # No new-enough Python on PATH: uv downloads one (a standalone CPython build).
  if v="$(python_version python3)"; then found="python3 is Python $v"; else found="no python3"; fi
  uv="$(command -v uv || true)"
  if [[ -z "$uv" ]]; then
    base="$(python3 -m site --user-base 2> /dev/null)" || base=""
    if [[ -n "$base" && -x "$base/bin/uv" ]]; then
      uv="$base/bin/uv"
      echo "$who: $found, JAX needs >= $min: creating $dir on Python $NFNET_UV_PYTHON with uv ($uv)" >&2
    elif [[ -n "$base" ]]; then
      echo "$who: $found, JAX needs >= $min: installing uv (pip install --user uv) to create $dir on Python $NFNET_UV_PYTHON" >&2
      if run python3 -m pip install --user -q uv && { ((${dry:-0})) || [[ -x "$base/bin/uv" ]]; }; then
        uv="$base/bin/uv"
      fi
    fi
    if [[ -z "$uv" ]]; then
      echo "$who: $found and JAX needs Python >= $min; uv could not be installed to provide one: $todo" >&2
      return 1
    fi
  else
    echo "$who: $found, JAX needs >= $min: creating $dir on Python $NFNET_UV_PYTHON with uv ($uv)" >&2
  fi
  if ! run "$uv" python install "$NFNET_UV_PYTHON" || \
      ! run "$uv" venv --seed --python "$NFNET_UV_PYTHON" "$dir"; then
    echo "$who: uv could not install Python $NFNET_UV_PYTHON into $dir: $todo" >&2
    return 1
  fi
}

# check_training DIR PYTHON DEVICES [TRAIN_ARGS...]: runs the training command's
# `PYTHON -m nfnet_jax.train --check_config TRAIN_ARGS` in the checkout DIR, here, before
# anything is created or installed. It only parses and validates (it builds, compiles
# and reads nothing), so it runs in dry-run mode too. DEVICES, when given, is how many
# devices the run will have: the check then runs on that many emulated CPU devices
# (JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count), so that e.g. a batch
# that does not divide over a pod's chips is refused here. On success one line on stderr
# repeats the check's summary. Otherwise one line on stderr, status 1: the check's own
# FATAL line (the command is wrong), or why the check could not run (no Python with this
# project's requirements: pass another one, or skip the check; $check_hint says how).
# $check_stopped overrides what the FATAL line's prefix says was held back.
check_training() {
  local dir="$1" py="$2" devices="$3" who="${launcher:-$(basename "$0")}" out rc=0 line fatal="" ok="" last=""
  local hint="${check_hint:---check-python=PATH or --no-check}"
  shift 3
  local envs=()
  [[ "$py" == */* && "$py" != /* ]] && py="$PWD/$py"  # the check runs from $dir
  [[ -n "$devices" ]] && envs=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  if ! command -v "$py" > /dev/null; then
    echo "$who: cannot check the training command: no Python $py here; pass a Python with this project's requirements ($hint)" >&2
    return 1
  fi
  out="$(cd "$dir" && env ${envs[@]+"${envs[@]}"} "$py" -m nfnet_jax.train --check_config "$@" 2>&1)" || rc=$?
  while IFS= read -r line; do
    [[ "$line" == "FATAL "* ]] && fatal="$line"
    [[ "$line" == "Config OK:"* ]] && ok="$line"
    [[ -n "${line// }" ]] && last="$line"
  done <<< "$out"
  if ((rc == 0)); then
    echo "$who: checked here${devices:+ on $devices emulated devices}: ${ok:-passed}" >&2
    return 0
  fi
  if [[ -n "$fatal" ]]; then
    echo "$who: the training command fails --check_config, ${check_stopped:-nothing was created}: $fatal" >&2
  else
    echo "$who: cannot check the training command with $py (${last:-exit status $rc}); pass a Python with this project's requirements ($hint)" >&2
  fi
  return 1
}
