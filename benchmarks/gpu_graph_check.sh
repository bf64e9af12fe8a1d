#!/usr/bin/env bash
# CUDA-graph adaption (`train_task(cuda_graph=True)`, `xbm demo --cuda-graph`) checked on a GPU
# in one short call:
#
#   bash benchmarks/gpu_graph_check.sh OUT_DIR DATA_ROOT [BUDGET_SECONDS]
#
# DATA_ROOT as for benchmarks/gpu_session.sh. In order, each step time-boxed:
#   1. tests/test_cuda_graph.py on the GPU (graphed training against eager training with the
#      same capturable Adam, bit for bit);
#   2. `xbm demo --device cuda --cuda-graph` for seeds 0, 1, 2 at once (4 CPU threads each),
#      every method (XMA2 eagerly until its PE selection), pretraining included;
#   3. alone on the machine, on seed 0's cached backbone: the demo's Piggyback, XBM and XMA
#      eagerly, then with --cuda-graph (train seconds side by side).
# The whole suite is not run here (session 14 ran it on this kind of machine; beside the demos
# its workers starved their pretraining of CPU).
# GRAPH_FLAG= (empty) dry-runs it on a CPU with XBM_GPU_DEVICE=cpu PYTHON=.venv/bin/python.
GPU_LOG=graph_check.log GPU_TGZ=graph.tgz GPU_BUDGET=330
. "$(dirname "$0")/gpu_lib.sh" "$@"
GRAPH=${GRAPH_FLAG---cuda-graph}
CFG=(); [ -n "${XBM_DEMO_YAML:-}" ] && CFG=(--config "$XBM_DEMO_YAML")
summary() {
  $PY - "$WORK" "$1" <<'PYEOF' >>"$LOG" 2>&1
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).glob(sys.argv[2] + "/results.json")):
    res = json.loads(d.read_text())
    acc, secs, graph = {}, {}, {}
    for r in res["runs"]:
        if not r["base_task"]:
            acc.setdefault(r["method"], []).append(r["accuracy"])
            secs[r["method"]] = secs.get(r["method"], 0) + r["train_seconds"]
            graph.setdefault(r["method"], set()).add(r.get("cuda_graph"))
    checks = all(v for c in res["checks"].values() for v in c.values())
    print(d.parent.name, f"width {res['config']['width']} wall {res['wall_seconds']:.0f} s |",
          " ".join(f"{m} {sum(v) / len(v):.2f} ({secs[m]:.1f} s{' graph' if True in graph[m] else ''})"
                   for m, v in acc.items()), "| checks all true:", checks)
PYEOF
}

say "env: $($PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else '-')")"
$PY -c "import sys; from xbm.data import load_dataset; load_dataset('letters', root=sys.argv[1])" "$DATA" >>"$LOG" 2>&1

say "1. tests/test_cuda_graph.py on $DEV"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py >"$WORK/pytest_graph.log" 2>&1
say "graph tests: $(tail -1 "$WORK/pytest_graph.log")"
grep -E "^(FAILED|ERROR|E )" "$WORK/pytest_graph.log" | head -30 >>"$LOG"
say "2. demos with $GRAPH, seeds 0 1 2 at once"
pids=()
for s in 0 1 2; do
  (OMP_NUM_THREADS=4 timeout "$(upto 110)" $PY -m xbm demo --device "$DEV" $GRAPH --seed "$s" \
    "${CFG[@]}" --data-root "$DATA" --out "$WORK/graph_s$s" \
    --no-progress >"$WORK/graph_s$s.log" 2>&1) &
  pids+=($!)
done
for i in 0 1 2; do wait "${pids[$i]}"; say "demo graph_s$i exit $?"; done
tail -3 "$WORK/graph_s0.log" >>"$LOG"
summary "graph_s*"
pack

say "3. seed 0 alone: Piggyback, XBM, XMA eager, then $GRAPH"
for mode in eager graph; do
  flag=""; [ "$mode" = graph ] && flag=$GRAPH
  timeout "$(upto $([ "$mode" = eager ] && echo 70 || echo 10))" $PY -m xbm demo --device "$DEV" $flag --seed 0 --methods piggyback,xbm,xma \
    "${CFG[@]}" --data-root "$DATA" --out "$WORK/alone_$mode" \
    --no-progress >"$WORK/alone_$mode.log" 2>&1
  say "alone $mode exit $?"
done
summary "alone_*"
pack
say "done"
