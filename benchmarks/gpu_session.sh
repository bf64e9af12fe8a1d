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
#   1. `xbm demo --device cuda` at the device's default width (64 on CUDA; the flag is not
#      passed, so the default itself is what runs; since session 15 that replays each step
#      from a CUDA graph: XBM_DEMO_YAML with `cuda_graph: false` for the eager figures of
#      sessions 12-14) for seeds 0, 1, 2, and on the same three
#      backbones Piggyback, XBM, XMA and XMA2 at other rates ("hi": Piggyback 1e-3, XBM 2e-3,
#      XMA 0.6, XMA2's re-programmed weights 2e-3; "lo": 3e-4, 5e-4, 0.15 and 1e-3), all at once
#      on the one GPU (at batch 32 a step is launch-bound, so the processes share it well);
#      meanwhile the test suite runs on the CPU cores under the machine's torch (CUDA tests
#      included; 4 xdist workers with 1 thread each: unlimited threads per worker
#      oversubscribed the 16 cores and never finished);
#   2. benchmarks/bench_methods.py --device cuda --cuda-graph at (width, batch) (WIDTH, 32),
#      (WIDTH, 128) and (16, 32): every method's eager step and, captured as a CUDA graph, its
#      step without host overhead; a profile of Piggyback's and XBM's eager steps at (WIDTH, 32);
#   3. benchmarks/bench_simulate.py --device cuda with the compile, torch and triton backends,
#      when SIMULATE=1.
# XBM_DEMO_YAML names a file of extra demo fields for every demo (a tiny config dry-runs the
# script on a CPU: XBM_GPU_DEVICE=cpu PYTHON=.venv/bin/python).
# Everything lands in OUT_DIR/session.log and OUT_DIR/gpu.tgz (re-packed after each step, so a
# cut-off run still returns what finished).
GPU_LOG=session.log GPU_TGZ=gpu.tgz GPU_BUDGET=540
. "$(dirname "$0")/gpu_lib.sh" "$@"
WIDTH=${4:-64}

say "env"
{ nvidia-smi 2>&1 | head -15
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nproc; } >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >>"$LOG"

say "letters (rendered once, before the concurrent demos read them)"
$PY -c "import sys; from xbm.data import load_dataset; load_dataset('letters', root=sys.argv[1])" "$DATA" >>"$LOG" 2>&1

say "0. smoke: a tiny demo of every method on $DEV (stops the session early if it fails)"
printf 'pretrain_subset: 512\ntrain_subset: 64\ntest_subset: 64\nwidth: 8\n' >"$WORK/smoke.yaml"
# its own cache, so its backbone is not taken for a demo's below
if ! XBM_CACHE="$WORK/smoke_cache" timeout 120 $PY -m xbm demo --config "$WORK/smoke.yaml" --device "$DEV" --data-root "$DATA" \
    --out "$WORK/smoke" --no-progress >"$WORK/smoke.log" 2>&1; then
  tail -30 "$WORK/smoke.log" >>"$LOG"; pack; say "smoke failed"; exit 3
fi

say "1. demos on $DEV at the device's default width, seeds 0 1 2, and the same backbones with"\
  "other lrs; tests on the CPU meanwhile"
# Every demo gets this base config; XBM_DEMO_YAML (a file of demo fields) is prepended, e.g. a
# tiny one to dry-run the script on a CPU.
: >"$WORK/base.yaml"
[ -n "${XBM_DEMO_YAML:-}" ] && { cat "$XBM_DEMO_YAML"; echo; } >"$WORK/base.yaml"
# lr alternatives around the defaults (tuned at width 16 on the CPU): are the defaults still
# each method's best at the GPU's width and two epochs?
{ cat "$WORK/base.yaml"; printf 'method_configs:\n  piggyback: {lr: 1.0e-3}\n'
  printf '  xbm: {lr: 2.0e-3}\n  xma: {lr: 0.6}\n  xma2: {weight_lr: 2.0e-3}\n'; } >"$WORK/lr_hi.yaml"
{ cat "$WORK/base.yaml"; printf 'method_configs:\n  piggyback: {lr: 3.0e-4}\n'
  printf '  xbm: {lr: 5.0e-4}\n  xma: {lr: 0.15}\n  xma2: {weight_lr: 1.0e-3}\n'; } >"$WORK/lr_lo.yaml"
runs=(s0 s1 s2 hi0 hi1 hi2 lo0 lo1 lo2)
pids=()
for r in "${runs[@]}"; do
  seed=${r: -1}
  case $r in
    s*) args=(--config "$WORK/base.yaml") ;;
    hi*) args=(--config "$WORK/lr_hi.yaml" --methods piggyback,xbm,xma,xma2) ;;
    lo*) args=(--config "$WORK/lr_lo.yaml" --methods piggyback,xbm,xma,xma2) ;;
  esac
  (
    # the lr runs reuse the seed's backbone once the default run has cached it (written
    # atomically, so the file appears whole)
    if [ "${r:0:1}" != s ]; then
      until compgen -G "$XBM_CACHE/backbones/*-s$seed-*.safetensors" >/dev/null; do
        sleep 2; [ "$(left)" -lt 60 ] && exit 9
        # the default run of this seed (started first, pids[seed]) died before caching it
        kill -0 "${pids[$seed]}" 2>/dev/null || exit 8
      done
    fi
    OMP_NUM_THREADS=1 exec timeout "$(upto 120)" $PY -m xbm demo --device "$DEV" --seed "$seed" \
      "${args[@]}" --data-root "$DATA" --out "$WORK/demo_$r" --no-progress ${XBM_DEMO_ARGS:-}
  ) >"$WORK/demo_$r.log" 2>&1 &
  pids+=($!)
done
run_tests 4 180
report_tests
for i in "${!pids[@]}"; do
  r=${runs[$i]}
  wait "${pids[$i]}"; say "demo $r exit $?"
  if grep -q '^method ' "$WORK/demo_$r.log"; then
    sed -n '/^method /,/^results:/p' "$WORK/demo_$r.log" >>"$LOG"
  else tail -5 "$WORK/demo_$r.log" >>"$LOG"; fi
done
# mean new-task accuracy of each method in each run, one line per run
$PY - "$WORK" <<'PYEOF' >>"$LOG" 2>&1
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).glob("demo_*/results.json")):
    res = json.loads(d.read_text())
    acc: dict[str, list[float]] = {}
    for r in res["runs"]:
        if not r["base_task"]:
            acc.setdefault(r["method"], []).append(r["accuracy"])
    def flat(x):
        return [y for v in x.values() for y in (flat(v) if isinstance(v, dict) else [v])]
    checks = all(v is True for v in flat(res.get("checks", {})) if isinstance(v, bool))
    print(d.parent.name, f"width {res['config']['width']} {res['wall_seconds']:.0f} s |",
          " ".join(f"{m} {sum(v) / len(v):.2f}" for m, v in acc.items()),
          "| checks all true:", checks)
PYEOF
pack

say "2. bench_methods on $DEV, eager and as CUDA graphs"
for wb in "$WIDTH 32" "$WIDTH 128" "16 32"; do
  read -r w b <<<"$wb"
  timeout "$(($(left) > 100 ? 75 : 5))" $PY benchmarks/bench_methods.py --device "$DEV" \
    --width "$w" --batch "$b" --reps 30 $([ "$DEV" = cuda ] && echo --cuda-graph) \
    $([ "$w" = "$WIDTH" ] && [ "$b" = 32 ] && echo --profile piggyback,xbm) \
    --json "$WORK/bench_methods_w${w}_b$b.json" 2>&1 | grep -v "^USDT" >>"$WORK/bench_methods.log"
done
cat "$WORK/bench_methods.log" >>"$LOG"
pack

if [ "${SIMULATE:-0}" = 1 ]; then
  say "3. bench_simulate on $DEV"
  if [ "$(left)" -gt 40 ]; then
    timeout "$(upto 20)" $PY benchmarks/bench_simulate.py --device "$DEV" --reps 5 \
      --backends torch,triton,compile --configs a,b,c --json "$WORK/bench_simulate.json" \
      >"$WORK/bench_simulate.log" 2>&1
    tail -25 "$WORK/bench_simulate.log" >>"$LOG"
  fi
  pack
fi
say "done"
