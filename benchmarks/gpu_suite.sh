#!/usr/bin/env bash
# Every GPU measurement of the project in one run on one GPU, < 6 minutes.
#
#   bash benchmarks/gpu_suite.sh           # on the device machine, from the repo root
#   SMALL=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/suite BUDGET=6000 SCALE=20 \
#       bash benchmarks/gpu_suite.sh       # CPU smoke test: tiny model, same code paths
#
# Installs the pure-python wheels carried in .whl/ (dm-haiku, jmp, ml_collections,
# PyYAML, tabulate; tensorboard from .whl/alt/ only if the machine's does not import),
# then runs, each part under `timeout` and a global budget (BUDGET s, default 345):
#   1 train_f0      ours optimised + ours plain, F0 b256 192px bf16 (+3-step profile)
#   2 timm_train    timm dm_nfnet_f0 eager, same setting
#   3 eval_f0       inference F0 b256 256px bf16: ours jit, ours folded WS
#   4 timm_eval     timm eager inference, same setting
#   5 quickstart    50 steps of `python -m nfnet_jax.train` (quickstart:numpy, no lr
#                   warmup so that 50 steps move the loss), loss falls?
#   6 micro         grouped-conv / WS / RNG-mask microbenchmarks      (if time remains)
#   7 remat         optimised + remat saving conv outputs only (memory) (if time remains)
#   8 conv_fusion   optimised + XLA cuDNN conv fusions               (if time remains)
#   9 split         optimised + grouped convs as dense per-group convs (if time remains)
#  10 f1            F1 b128 224px: ours optimised, timm eager          (if time remains)
# PARTS=a,b,... runs only those parts, in the order above (e.g. the experiments
# after a first run: PARTS=remat,micro,conv_fusion,split).
# Every part writes JSON into $OUT; the summary table is printed last.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
PY=${PY:-python3}
SMALL=${SMALL:-0}
BUDGET=${BUDGET:-345}
SCALE=${SCALE:-1}   # multiplies every part's time limits (SMALL=1 on a slow CPU: ~20)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONUNBUFFERED=1
# Persistent cache: conv autotuning results of the first compile are reused by the
# later variants (same conv shapes), which shortens their compile times.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

log() { echo "[suite +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tail -n 3; then :; fi
  for w in .whl/*.whl; do  # any wheel that did not go in (all-or-nothing pip): one by one
    n=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
    ls -d /tmp/site/"$n"* /tmp/site/"$(basename "$w" | cut -d- -f1)"* >/dev/null 2>&1 || \
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site "$w" 2>&1 | tail -n 2
  done
  export PYTHONPATH=/tmp/site:$PWD
  if ! $PY -c "import tensorboard.compat.proto.event_pb2" >/dev/null 2>&1; then
    for w in .whl/alt/tensorboard-2.21*.whl .whl/alt/tensorboard-2.20*.whl; do
      [ -f "$w" ] || continue
      rm -rf /tmp/site_tb
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
          --target /tmp/site_tb "$w" >/dev/null 2>&1
      if PYTHONPATH=/tmp/site_tb:$PYTHONPATH $PY -c \
          "import tensorboard.compat.proto.event_pb2" >/dev/null 2>&1; then
        export PYTHONPATH=/tmp/site_tb:$PYTHONPATH
        log "tensorboard protos from $w"
        break
      fi
    done
  fi
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  timeout 60 $PY -c "import sys, jax, haiku, optax, ml_collections; print(sys.version.split()[0], 'jax', jax.__version__, 'haiku', haiku.__version__, 'optax', optax.__version__); print(jax.devices())" 2>&1 | tail -n 4
  $PY -c "import tensorboard.compat.proto.event_pb2; print('tensorboard protos ok')" 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
log "setup done"

PARTS=${PARTS:-all}
# part NAME NEED_S LIMIT_S CMD...: run CMD under timeout if at least NEED_S remain.
part() {
  local name=$1 need=$(( $2 * SCALE )) limit=$(( $3 * SCALE ))
  shift 3
  if [ "$PARTS" != all ] && [[ ",$PARTS," != *",$name,"* ]]; then
    return 0
  fi
  local l
  l=$(left)
  if [ "$l" -lt "$need" ]; then
    log "SKIP $name (${l}s left, needs ${need}s)"
    echo "$name: skipped (${l}s left)" >> "$OUT/parts.txt"
    return 0
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  log "START $name (limit ${limit}s)"
  local t=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  grep -E "^\[|^---|Error|error|Traceback" "$OUT/$name.log" | grep -v "^\[micro\]" | tail -n 12
  log "END $name rc=$rc (${dt}s)"
  echo "$name: rc=$rc ${dt}s" >> "$OUT/parts.txt"
}

RES="--results-md $OUT/RESULTS_rows.md"
if [ "$SMALL" = 1 ]; then
  TINY="--width 0.125 --group-size 16 --depths 1,1,2,1"
  TRAIN="--model F0 $TINY --batch 8 --image 64 --dtype float32 --steps 3 --warmup 1"
  EVAL="--model F0 $TINY --batch 8 --image 64 --dtype float32 --steps 3 --warmup 1"
  MICRO="--model F0 $TINY --batch 8 --image 64 --dtype float32 --steps 3"
  F1="--model F0 $TINY --batch 4 --image 64 --dtype float32 --steps 2 --warmup 1"
  QS_STEPS=20; QS_LOG=5; PROF=1
else
  TRAIN="--model F0 --batch 256 --image 192 --dtype bfloat16 --steps 15 --warmup 3"
  EVAL="--model F0 --batch 256 --image 256 --dtype bfloat16 --steps 20 --warmup 3"
  MICRO="--model F0 --batch 256 --image 192 --dtype bfloat16 --steps 10"
  F1="--model F1 --batch 128 --image 224 --dtype bfloat16 --steps 10 --warmup 2"
  QS_STEPS=50; QS_LOG=10; PROF=3
fi

part train_f0 60 170 $PY benchmarks/train_step.py $TRAIN --variant optimised,plain \
    --profile $PROF --json "$OUT/train_f0.json" $RES
part timm_train 30 75 $PY benchmarks/train_step.py $TRAIN --variant timm \
    --json "$OUT/timm_train_f0.json" $RES
part eval_f0 30 70 $PY benchmarks/eval_step.py $EVAL --variant ours,folded \
    --json "$OUT/eval_f0.json" $RES
part timm_eval 20 45 $PY benchmarks/eval_step.py $EVAL --variant timm \
    --json "$OUT/timm_eval_f0.json" $RES

rm -rf /tmp/qs
QS_T=$(date +%s)
part quickstart 35 110 $PY -m nfnet_jax.train --config=experiments/quickstart.py:numpy \
    --workdir=/tmp/qs --config.total_steps=$QS_STEPS --config.log_every=$QS_LOG \
    --config.warmup_epochs=0
if [ -f /tmp/qs/metrics.jsonl ]; then
  cp /tmp/qs/metrics.jsonl "$OUT/quickstart_metrics.jsonl"
  $PY benchmarks/quickstart_check.py /tmp/qs "$OUT/quickstart.json" \
      $(( $(date +%s) - QS_T ))
fi

part micro 45 60 $PY benchmarks/train_step.py $MICRO --micro --json "$OUT/micro.json"
part remat 80 120 $PY benchmarks/train_step.py $TRAIN --variant remat \
    --json "$OUT/train_f0_remat.json" $RES
part conv_fusion 80 120 $PY benchmarks/train_step.py $TRAIN --variant optimised \
    --xla-preset conv_fusion --json "$OUT/train_f0_conv_fusion.json" $RES
part split 80 120 $PY benchmarks/train_step.py $TRAIN --variant split \
    --json "$OUT/train_f0_split.json" $RES
part f1 100 120 $PY benchmarks/train_step.py $F1 --variant optimised \
    --json "$OUT/train_f1.json" $RES
part timm_f1 40 60 $PY benchmarks/train_step.py $F1 --variant timm \
    --json "$OUT/timm_train_f1.json" $RES

log "all parts done"
echo "=== parts ==="
cat "$OUT/parts.txt" 2>/dev/null
echo "=== summary ($(date -u)) ==="
$PY benchmarks/summarize.py "$OUT"/*.json
