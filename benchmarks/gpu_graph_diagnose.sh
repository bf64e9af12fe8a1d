#!/usr/bin/env bash
# The GPU checks left open by session 14, in one short call (a few minutes on an H200):
#
#   bash benchmarks/gpu_graph_diagnose.sh OUT_DIR
#
# 1. benchmarks/graph_step_check.py: one graphed against one eager step per method (capturable
#    Adam on both sides: any difference is a capture fault), at the benchmark's default model and
#    at the toy configuration of the failed test (small_cnn, R=16, batch 16);
# 2. benchmarks/graph_probe.py: where a graphed XBM/XMA training run first differs, and whether
#    one stream for warm-up and capture, torch's stale-stream override, native ops instead of
#    _ColumnMask, or quantising outside it make the difference go away (then once more for XBM
#    with CUDA_LAUNCH_BLOCKING=1);
# 3. benchmarks/bench_methods.py --cuda-graph at (64, 32) and (16, 32): the eager XBM / Piggyback
#    ratio after XBM's boolean mask (session 14, not yet timed on a GPU) and the graphed steps.
# Without CUDA (XBM_GPU_DEVICE=cpu PYTHON=.venv/bin/python) it dry-runs: every step eager.
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_graph_diagnose.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(realpath "$1")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${XBM_GPU_DEVICE:-cuda}
T0=$(date +%s)
LOG="$OUT/diagnose.log"
say() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$LOG"; }

say "1. graph_step_check"
timeout 120 $PY benchmarks/graph_step_check.py --device "$DEV" >>"$LOG" 2>&1; say "exit $?"
timeout 120 $PY benchmarks/graph_step_check.py --device "$DEV" --model small_cnn --rows 16 \
  --batch 16 >>"$LOG" 2>&1; say "exit $?"
say "2. graph_probe"
timeout 240 $PY benchmarks/graph_probe.py --src src --out "$OUT/probe" >>"$LOG" 2>&1
say "exit $?"
CUDA_LAUNCH_BLOCKING=1 timeout 120 $PY benchmarks/graph_probe.py --src src --out "$OUT/probe_sync" \
  --methods xbm --variants as_test >>"$LOG" 2>&1
say "exit $?"
say "3. bench_methods"
GRAPH=""; [ "$DEV" = cuda ] && GRAPH=--cuda-graph
for wb in "64 32" "16 32"; do
  read -r w b <<<"$wb"
  timeout 120 $PY benchmarks/bench_methods.py --device "$DEV" --width "$w" --batch "$b" \
    --reps 30 --methods linear-probe,piggyback,xbm,xma $GRAPH \
    --json "$OUT/bench_methods_w${w}_b$b.json" >>"$LOG" 2>&1
  say "exit $?"
done
say "done"
