#!/usr/bin/env bash
# XMA2's graphed adaption checked on a GPU in one short call (session 15, call 3: 96 s on an H200):
#
#   bash benchmarks/gpu_xma2_graph.sh OUT_DIR DATA_ROOT
#
# 1. tests/test_cuda_graph.py (every graph-safe method, XMA2 included: graphed equals eager on
#    capturable Adam bit for bit); 2. `xbm demo --device cuda --methods xma2` for seeds 0, 1, 2
#    at once (4 CPU threads each); 3. bench_methods.py --cuda-graph at width 64, batch 32.
# DATA_ROOT as for benchmarks/gpu_session.sh. Results in OUT_DIR/log.
set -u
if [ $# -lt 2 ] || [ "${1#-}" != "$1" ] || [ "${2:-x}" != "${2#-}" ]; then
  echo "usage: bash benchmarks/gpu_xma2_graph.sh OUT_DIR DATA_ROOT" >&2
  exit 2
fi
mkdir -p "$1"
D=$(realpath "$1")
DATA=$(realpath "$2")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XBM_CACHE=${XBM_CACHE:-$(mktemp -d)}
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$D/log"; }
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py >"$D/pytest.log" 2>&1
say "tests: $(tail -1 "$D/pytest.log")"
grep -E '^(FAILED|E )' "$D/pytest.log" | head -20 | tee -a "$D/log"
for s in 0 1 2; do
  OMP_NUM_THREADS=4 timeout 220 $PY -m xbm demo --device cuda --seed "$s" --methods xma2 \
    --data-root "$DATA" --out "$D/s$s" --no-progress >"$D/s$s.log" 2>&1 &
done
wait
say "demos done"
grep -h '^xma2 ' "$D"/s*.log | tee -a "$D/log"
timeout 120 $PY benchmarks/bench_methods.py --device cuda --width 64 --batch 32 --reps 30 \
  --methods linear-probe,piggyback,xbm,xma2 --cuda-graph --json "$D/bench.json" >"$D/bench.log" 2>&1
say "bench exit $?"
tail -9 "$D/bench.log" | tee -a "$D/log"
