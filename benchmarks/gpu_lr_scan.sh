#!/usr/bin/env bash
# Is XMA under Piggyback at the GPU default only because of its learning rate? One short call:
#
#   bash benchmarks/gpu_lr_scan.sh OUT_DIR DATA_ROOT [BUDGET_SECONDS]
#
# DATA_ROOT as for benchmarks/gpu_session.sh. In order, each step time-boxed:
#   1. `xbm demo --device cuda --methods piggyback,xbm,xma` at the GPU default (width 64, two
#      adaption epochs, CUDA graphs) for seeds 0, 1, 2 at once, pretraining included: the
#      baseline, and a check that the GPU default still gives session 15's figures;
#   2. on those cached backbones, one method per run with one setting changed through a YAML
#      `method_configs` (the VARIANTS list below), every seed, nine runs at a time: Piggyback's
#      and XMA's learning rates on both sides of their defaults, and XMA's up-shift levels.
# Results: OUT_DIR/lr_scan.log (one line per run: mean new-task accuracy, per task, checks) and
# OUT_DIR/lr_scan.tgz (every results.json and log).
# Dry run on a CPU: XBM_GPU_DEVICE=cpu PYTHON=.venv/bin/python XBM_EXTRA="--width 8 --epochs 1
# --train-subset 64 --test-subset 64 --pretrain-epochs 1 --pretrain-subset 256" (no graphs there).
GPU_LOG=lr_scan.log GPU_TGZ=lr_scan.tgz GPU_BUDGET=420
. "$(dirname "$0")/gpu_lib.sh" "$@"
read -r -a EXTRA <<<"${XBM_EXTRA:-}"
summary() {
  $PY - "$WORK" "$1" <<'PYEOF' >>"$LOG" 2>&1
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).glob(sys.argv[2] + "/results.json")):
    res = json.loads(d.read_text())
    checks = all(v for c in res["checks"].values() for v in c.values())
    for m, s in res["summary"].items():
        per = " / ".join(f"{a:.2f}" for a in s["new_task_accuracies"].values())
        print(f"{d.parent.name:<22} {m:<10} {s['mean_new_task_accuracy']:.2f} ({per}) "
              f"train {s['train_seconds']:.1f} s, width {res['config']['width']}, "
              f"backbone {res['backbone']['content_hash']}, checks {checks}")
PYEOF
}
# name|method|YAML (method_configs)
VARIANTS=(
  "pb_lr3e-4|piggyback|method_configs: {piggyback: {lr: 3.0e-4}}"
  "pb_lr1e-3|piggyback|method_configs: {piggyback: {lr: 1.0e-3}}"
  "xma_lr0.15|xma|method_configs: {xma: {lr: 0.15}}"
  "xma_lr0.6|xma|method_configs: {xma: {lr: 0.6}}"
  "xma_lr1.0|xma|method_configs: {xma: {lr: 1.0}}"
  "xma_up|xma|method_configs: {xma: {levels: [0, 0.25, 0.5, 1, 2]}}"
)

say "env: $($PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else '-')")"
$PY -c "import sys; from xbm.data import load_dataset; load_dataset('letters', root=sys.argv[1])" "$DATA" >>"$LOG" 2>&1

say "1. defaults: Piggyback, XBM, XMA, seeds 0 1 2 at once"
pids=()
for s in 0 1 2; do
  (OMP_NUM_THREADS=4 timeout "$(upto 150)" $PY -m xbm demo --device "$DEV" --seed "$s" \
    --methods piggyback,xbm,xma "${EXTRA[@]}" --data-root "$DATA" --out "$WORK/default_s$s" \
    --no-progress >"$WORK/default_s$s.log" 2>&1) &
  pids+=($!)
done
for i in 0 1 2; do wait "${pids[$i]}"; say "default_s$i exit $?"; done
summary "default_s*"
pack

say "2. variants, one method each, on the cached backbones"
jobs=()
for v in "${VARIANTS[@]}"; do
  IFS='|' read -r name method yaml <<<"$v"
  printf '%s\n' "$yaml" >"$WORK/$name.yaml"
  for s in 0 1 2; do jobs+=("$name|$method|$s"); done
done
run_one() {
  IFS='|' read -r name method s <<<"$1"
  OMP_NUM_THREADS=1 timeout "$(upto 10)" $PY -m xbm demo --device "$DEV" --seed "$s" \
    --methods "$method" --config "$WORK/$name.yaml" "${EXTRA[@]}" --data-root "$DATA" \
    --out "$WORK/${name}_s$s" --no-progress >"$WORK/${name}_s$s.log" 2>&1
  say "${name}_s$s exit $?"
}
i=0
while [ $i -lt ${#jobs[@]} ] && [ "$(left)" -gt 30 ]; do
  for j in $(seq $i $((i + 8))); do
    [ $j -lt ${#jobs[@]} ] && run_one "${jobs[$j]}" &
  done
  wait
  i=$((i + 9))
done
summary "*_lr*_s*"
summary "xma_up_s*"
pack
say "done"
