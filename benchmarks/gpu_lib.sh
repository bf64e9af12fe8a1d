# Shared set-up of the GPU session scripts (benchmarks/gpu_*.sh), sourced after they set
#   GPU_LOG     the log's file name in OUT_DIR (e.g. check.log),
#   GPU_TGZ     the archive's file name in OUT_DIR (e.g. gpu.tgz),
#   GPU_BUDGET  the default budget in seconds,
# with the script's own arguments: OUT_DIR DATA_DIR [BUDGET]. It defines OUT, DATA, BUDGET, DEV
# (XBM_GPU_DEVICE, default cuda), T0, WORK (a fresh folder whose cache/ is XBM_CACHE), LOG, PY
# (PYTHON, default python3), and left / upto / say / pack.
set -u
if [ $# -lt 2 ] || [ "${1#-}" != "$1" ] || [ "${2:-x}" != "${2#-}" ]; then
  echo "usage: bash $0 OUT_DIR DATA_ROOT [BUDGET_SECONDS]" >&2
  exit 2
fi
if [ ! -d "$2" ]; then
  echo "$0: DATA_ROOT $2 is not a folder" >&2
  exit 2
fi
BUDGET=${3:-$GPU_BUDGET}
case $BUDGET in
  ''|*[!0-9]*) echo "$0: BUDGET_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2
               exit 2 ;;
esac
mkdir -p "$1"
OUT=$(realpath "$1")
DATA=$(realpath "$2")
DEV=${XBM_GPU_DEVICE:-cuda}
T0=$(date +%s)
WORK=$(mktemp -d)
LOG="$OUT/$GPU_LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XBM_CACHE="$WORK/cache"
PY=${PYTHON:-python3}

# seconds of the budget left
left() { echo $((BUDGET - ($(date +%s) - T0))); }
# seconds a step may run so that RESERVE seconds of the budget stay for what follows (at least 5)
upto() { local t=$(($(left) - $1)); echo $((t > 5 ? t : 5)); }
say() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$LOG"; }
# re-pack what finished, so that a cut-off run still returns it (caches left out)
pack() {
  tar -czf "$OUT/$GPU_TGZ.tmp" -C "$WORK" --exclude=cache --exclude=smoke_cache . \
    && mv "$OUT/$GPU_TGZ.tmp" "$OUT/$GPU_TGZ"
}
# the test suite under the machine's torch, one thread per worker: WORKERS pytest-xdist workers
# where xdist is installed, RESERVE seconds of the budget kept; output in WORK/pytest.log
run_tests() {
  local xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n $1"
  OMP_NUM_THREADS=1 timeout "$(upto "$2")" $PY -m pytest -q -p no:cacheprovider $xdist \
    >"$WORK/pytest.log" 2>&1
}
# the suite's last line and its failures, into the log
report_tests() {
  say "tests: $(tail -1 "$WORK/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$WORK/pytest.log" >>"$LOG"
}
