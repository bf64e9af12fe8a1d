#!/usr/bin/env bash
# One time-boxed GPU session's measurements, for a machine lent for a few minutes.
#
#   bash benchmarks/gpu_session.sh OUT_DIR DATA_ROOT [BUDGET_SECONDS] [WIDTH]
#
# DATA_ROOT holds the offline datasets' files in one folder (the GPU machine has no network and
# none of the dataset packages): the four Fashion-MNIST IDX files, mnist.pkl.gz and
# animal_data_version_3.gz / animal_label_version_3.gz; letters are rendered there (matplotlib's
# fonts). The package runs from src/ on PYTHONPATH under the machine's own python3 and torch.
#
# In order, each step time-boxed so the whole ends inside BUDGET_SECONDS (default 540):
#   0. a tiny demo of every method on the GPU; the session stops there if it fails;
#   1. `xbm demo --width WIDTH --device cuda` for seeds 0, 1, 2, and seed 0 of Piggyback, XBM
#      and XMA at XBM_LONG_EPOCHS (default 2) epochs, run at once on the one GPU (at batch 32 a
#      step is launch-bound, so the processes share it well); meanwhile the test suite runs on
#      the CPU cores under the machine's torch (CUDA tests included; 4 xdist workers with 4
#      threads each: unlimited threads per worker oversubscribed the 16 cores and never finished);
#   2. benchmarks/bench_methods.py --device cuda at widths 16 and WIDTH;
#   3. benchmarks/bench_simulate.py --device cuda with the compile, torch and triton backends.
# The demos use the current default backbone recipe (3 epochs, `affine-flip` + mixup 0.4). The
# width-64 figures in docs/benchmarks.md were made with the previous one; to repeat those, set
# XBM_DEMO_ARGS="--pretrain-epochs 1 --pretrain-augment none --pretrain-mixup 0".
# Everything lands in OUT_DIR/session.log and OUT_DIR/gpu.tgz (re-packed after each step, so a
# cut-off run still returns what finished).
set -u
mkdir -p "$1"
OUT=$(realpath "$1")
DATA=$(realpath "$2")
BUDGET=${3:-540}
WIDTH=${4:-64}
DEV=${XBM_GPU_DEVICE:-cuda}
T0=$(date +%s)
WORK=$(mktemp -d)
LOG="$OUT/session.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XBM_CACHE="$WORK/cache"
PY=${PYTHON:-python3}

left() { echo $((BUDGET - ($(date +%s) - T0))); }
# seconds a step may run so that RESERVE seconds of the budget stay for what follows (at least 5)
upto() { local t=$(($(left) - $1)); echo $((t > 5 ? t : 5)); }
say() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/gpu.tgz.tmp" -C "$WORK" --exclude=cache . && mv "$OUT/gpu.tgz.tmp" "$OUT/gpu.tgz"; }

say "env"
{ nvidia-smi 2>&1 | head -15
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nproc; } >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >>"$LOG"

say "letters (rendered once, before the concurrent demos read them)"
$PY -c "from xbm.data import load_dataset; load_dataset('letters', root='$DATA')" >>"$LOG" 2>&1

say "0. smoke: a tiny demo of every method on $DEV (stops the session early if it fails)"
printf 'pretrain_subset: 512\ntrain_subset: 64\ntest_subset: 64\nwidth: 8\n' >"$WORK/smoke.yaml"
if ! timeout 120 $PY -m xbm demo --config "$WORK/smoke.yaml" --device "$DEV" --data-root "$DATA" \
    --out "$WORK/smoke" --no-progress >"$WORK/smoke.log" 2>&1; then
  tail -30 "$WORK/smoke.log" >>"$LOG"; pack; say "smoke failed"; exit 3
fi

say "1. demos at width $WIDTH, seeds 0 1 2 (and seed 0 at ${XBM_LONG_EPOCHS:=2} epochs), on $DEV;"\
  "tests on the CPU meanwhile"
runs=(s0 s1 s2 long)
pids=()
for r in "${runs[@]}"; do
  if [ "$r" = long ]; then args=(--seed 0 --epochs "$XBM_LONG_EPOCHS" --methods piggyback,xbm,xma)
  else args=(--seed "${r#s}"); fi
  OMP_NUM_THREADS=3 timeout "$(upto 120)" $PY -m xbm demo --width "$WIDTH" --device "$DEV" \
    "${args[@]}" --data-root "$DATA" --out "$WORK/w$WIDTH$r" --no-progress ${XBM_DEMO_ARGS:-} \
    >"$WORK/w$WIDTH$r.log" 2>&1 &
  pids+=($!)
done
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
OMP_NUM_THREADS=4 timeout "$(upto 200)" $PY -m pytest -q -p no:cacheprovider $XDIST \
  >"$WORK/pytest.log" 2>&1
say "tests: $(tail -1 "$WORK/pytest.log")"
grep -E "^FAILED" "$WORK/pytest.log" >>"$LOG"
for i in "${!pids[@]}"; do
  r=${runs[$i]}
  wait "${pids[$i]}"; say "demo $r exit $?"
  grep -E "^ *(finetune|linear-probe|piggyback|xbm|xma|xma2) +[a-z-]+ +acc" \
    "$WORK/w$WIDTH$r.log" >>"$LOG" || tail -5 "$WORK/w$WIDTH$r.log" >>"$LOG"
done
pack

say "2. bench_methods on $DEV"
for w in 16 "$WIDTH"; do
  for b in 32 128; do
    timeout "$(($(left) > 120 ? 60 : 5))" $PY benchmarks/bench_methods.py --device "$DEV" \
      --width "$w" --batch "$b" --reps 30 --json "$WORK/bench_methods_w${w}_b$b.json" \
      >>"$WORK/bench_methods.log" 2>&1
  done
done
cat "$WORK/bench_methods.log" >>"$LOG"
pack

say "3. bench_simulate on $DEV"
if [ "$(left)" -gt 40 ]; then
  timeout "$(upto 20)" $PY benchmarks/bench_simulate.py --device "$DEV" --reps 5 \
    --backends torch,triton,compile --configs a,b,c --json "$WORK/bench_simulate.json" \
    >"$WORK/bench_simulate.log" 2>&1
  tail -25 "$WORK/bench_simulate.log" >>"$LOG"
fi
pack
say "done"
