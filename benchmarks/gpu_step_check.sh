#!/usr/bin/env bash
# A short GPU check of the training-step benchmark alone (no demos): the test suite on the GPU
# machine first (CUDA tests included), then benchmarks/bench_methods.py on CUDA at widths 16 and
# 64, batches 32 and 128, with op counts, and a profile of Piggyback's and XBM's steps.
#
#   bash benchmarks/gpu_step_check.sh OUT_DIR
set -u -o pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_step_check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(realpath "$1")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${XBM_GPU_DEVICE:-cuda}
T0=$(date +%s)
say() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/step_check.log"; }
say "tests"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
OMP_NUM_THREADS=1 timeout 110 $PY -m pytest -q -p no:cacheprovider $XDIST >"$OUT/pytest.log" 2>&1
say "tests: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" >>"$OUT/step_check.log"
for w in 16 64; do
  for b in 32 128; do
    say "bench_methods width $w batch $b"
    timeout 60 $PY benchmarks/bench_methods.py --device "$DEV" --width "$w" --batch "$b" \
      --reps 40 --count-ops --json "$OUT/bench_methods_w${w}_b$b.json" \
      $([ "$w" = 64 ] && [ "$b" = 32 ] && echo --profile piggyback,xbm) 2>&1 \
      | grep -v "^USDT" >>"$OUT/step_check.log"
    say "exit ${PIPESTATUS[0]}"
  done
done
say "done"
