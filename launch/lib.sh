# Shared by the launch scripts (sourced, not run): usage, errors, dry-run commands.
# Each script sets `dry` (0/1) before calling `run`.

# Prints the calling script's header comment (its help) and exits with $1 (default 0).
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

# One-line error naming the script; exit status 2 (bad usage).
die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Prints the command (shell-quoted, one line) in dry-run mode, else runs it.
run() {
  if ((dry)); then
    local out=() a
    for a in "$@"; do out+=("$(printf '%q' "$a")"); done
    echo "${out[*]}"
  else
    "$@"
  fi
}
