#!/usr/bin/env bash
# One short GPU check for a machine lent for a few minutes (session 20):
#
#   bash benchmarks/gpu_check.sh OUT_DIR DATA_ROOT [BUDGET_SECONDS]
#
# DATA_ROOT holds the offline datasets' files in one folder, as for gpu_session.sh. The package
# runs from src/ on PYTHONPATH under the machine's own python3 and torch.
#   1. `xbm demo --device cuda --seed 0` at the GPU default (width 64, two adaption epochs, CUDA
#      graphs; every method, pretraining included), to compare with the figures recorded for
#      seed 0 in earlier GPU sessions (the same backbone hash and accuracies are expected);
#      meanwhile the whole test suite on the machine's torch (CUDA tests included);
#   2. benchmarks/bench_methods.py on an ImageNet-scale step (resnet50, 3x224x224, batch 32),
#      where the GPU is compute-bound rather than launch-bound: every method eagerly, in fp32
#      and under bf16 autocast;
#   3. the same benchmark at session 15's row (resnet18_cifar width 64, batch 32, eager and as
#      CUDA graphs), to see the step ratios unchanged;
#   4. `xbm simulate` end to end on the device (a tiny small_cnn backbone and XBM task), which
#      no GPU session had run: its calibration batches come from CPU loaders.
# Everything lands in OUT_DIR/check.log and OUT_DIR/gpu.tgz (re-packed after each step).
# A dry run on a CPU: XBM_GPU_DEVICE=cpu XBM_DRY=1 PYTHON=.venv/bin/python (tiny sizes).
# Session 20 ran it twice: as it stands, then (after the Python-API fixes) with
# RN50_EXTRA="--cuda-graph --profile piggyback+bf16,xbm+bf16".
GPU_LOG=check.log GPU_TGZ=gpu.tgz GPU_BUDGET=420
. "$(dirname "$0")/gpu_lib.sh" "$@"
DRY=${XBM_DRY:-0}

say "env"
{ nvidia-smi 2>&1 | head -15
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
  nproc; git log --oneline -1; } >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >>"$LOG"

say "1. demo seed 0 on $DEV (GPU default), tests meanwhile"
demo_args=()
if [ "$DRY" = 1 ]; then
  printf 'pretrain_subset: 512\ntrain_subset: 64\ntest_subset: 64\nwidth: 8\n' >"$WORK/dry.yaml"
  demo_args=(--config "$WORK/dry.yaml")
fi
OMP_NUM_THREADS=4 timeout "$(upto 150)" $PY -m xbm demo --device "$DEV" --seed 0 \
  "${demo_args[@]}" --data-root "$DATA" --out "$WORK/demo" --no-progress \
  >"$WORK/demo.log" 2>&1 &
demo_pid=$!
if [ "$DRY" = 1 ]; then
  echo "dry run: tests skipped" >"$WORK/pytest.log"
else
  run_tests 8 160
fi
report_tests
wait "$demo_pid"; say "demo exit $?"
if grep -q '^method ' "$WORK/demo.log"; then
  grep -E "backbone|hash" "$WORK/demo.log" | head -5 >>"$LOG"
  sed -n '/^method /,/^results:/p' "$WORK/demo.log" >>"$LOG"
else tail -8 "$WORK/demo.log" >>"$LOG"; fi
pack

say "2. bench_methods on $DEV: resnet50, 3x224x224, batch 32, eager fp32 and bf16"
if [ "$DRY" = 1 ]; then big=(--width 8 --size 32 --batch 4 --reps 2); else
  big=(--width 64 --size 224 --batch 32 --reps 20); fi
# RN50_EXTRA: more bench_methods flags, e.g. "--cuda-graph --profile piggyback+bf16,xbm+bf16"
timeout "$(upto 90)" $PY benchmarks/bench_methods.py --device "$DEV" --model resnet50 \
  --in-channels 3 "${big[@]}" --bf16 ${RN50_EXTRA:-} --json "$WORK/bench_rn50.json" 2>&1 \
  | grep -v "^USDT" >"$WORK/bench_rn50.log"
cat "$WORK/bench_rn50.log" >>"$LOG"
pack

say "3. bench_methods on $DEV: resnet18_cifar width 64, batch 32 (session 15's row)"
graph=()
[ "$DEV" = cuda ] && graph=(--cuda-graph)
if [ "$DRY" = 1 ]; then small=(--width 8 --reps 2); else small=(--width 64 --reps 30); fi
timeout "$(upto 60)" $PY benchmarks/bench_methods.py --device "$DEV" "${small[@]}" --batch 32 \
  --methods linear-probe,piggyback,xbm,xma "${graph[@]}" --json "$WORK/bench_w64.json" 2>&1 \
  | grep -v "^USDT" >"$WORK/bench_w64.log"
cat "$WORK/bench_w64.log" >>"$LOG"
pack

say "4. xbm simulate on $DEV (session 25: calibration batches moved to the model's device)"
sim=(--device "$DEV" --data-root "$DATA" --no-progress)
{ timeout "$(upto 40)" $PY -m xbm pretrain --model small_cnn --width 4 --epochs 1 \
    --train-subset 512 --out "$WORK/sim_bb.safetensors" --force "${sim[@]}" &&
  timeout "$(upto 25)" $PY -m xbm adapt --dataset mnist --method xbm --train-subset 256 \
    --test-subset 128 --epochs 1 --backbone "$WORK/sim_bb.safetensors" \
    --out "$WORK/sim.safetensors" "${sim[@]}" &&
  timeout "$(upto 5)" $PY -m xbm simulate --bundle "$WORK/sim.safetensors" \
    --backbone "$WORK/sim_bb.safetensors" --adc-bits 4,8 --test-subset 128 "${sim[@]}"
  echo "simulate chain exit $?"; } >"$WORK/simulate.log" 2>&1
tail -12 "$WORK/simulate.log" >>"$LOG"
pack
say "done"
