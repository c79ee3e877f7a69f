#!/usr/bin/env bash
# Mount a Cloud Storage bucket, or one folder of it, read-only at DIR with Cloud Storage
# FUSE (gcsfuse), installing gcsfuse from Google's apt repository first if it is missing
# (Ubuntu/Debian; the TPU VM images do not ship it). Meant for tpu_vm.sh --setup: the
# input pipeline reads the prepared ArrayRecord files by random access through the file
# system, and ArrayRecord cannot open gs:// paths itself.
#
#   launch/gcsfuse.sh my-bucket/tensorflow_datasets /mnt/tfds
#   # then train with --config.data.data_dir=/mnt/tfds
#
# Does nothing if DIR is already a mount point. DIR is created (with sudo if needed)
# and owned by the current user.
#
# Options:
#   --dry-run    print the commands instead of running them
set -euo pipefail

dry=0
pos=()
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # usage, die, run
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1" ;;
    *) pos+=("$1") ;;
  esac
  shift
done
((${#pos[@]} == 2)) || die "usage: gcsfuse.sh BUCKET[/FOLDER] DIR (see --help)"
src="${pos[0]#gs://}" dir="${pos[1]}"
bucket="${src%%/*}" folder=""
[[ "$src" == */* ]] && folder="${src#*/}"
folder="${folder%/}"
[[ -n "$bucket" ]] || die "no bucket in ${pos[0]}"

if mountpoint -q "$dir" 2> /dev/null; then
  echo "gcsfuse.sh: $dir is already mounted" >&2
  exit 0
fi

if ! command -v gcsfuse > /dev/null; then
  # Google's apt repository for gcsfuse (one per distribution codename).
  repo_line="deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"
  if ((dry)); then
    echo "echo $(printf '%q' "$repo_line") | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
    echo "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc"
  else
    echo "$repo_line" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  fi
  run sudo apt-get update -q
  run sudo apt-get install -y -q gcsfuse
  ((dry)) || command -v gcsfuse > /dev/null || die "gcsfuse is still missing after apt-get install"
fi

if ((dry)); then
  run mkdir -p "$dir"
elif ! mkdir -p "$dir" 2> /dev/null || [[ ! -w "$dir" ]]; then
  run sudo mkdir -p "$dir"
  run sudo chown "$(id -u):$(id -g)" "$dir"
fi
opts=(-o ro --implicit-dirs)
[[ -n "$folder" ]] && opts+=(--only-dir "$folder")
run gcsfuse "${opts[@]}" "$bucket" "$dir"
