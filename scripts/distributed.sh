#!/usr/bin/env bash
# Data-parallel xbm over N processes on this machine (one per GPU, or gloo on CPU).
#
#   bash scripts/distributed.sh N demo --out runs/demo_ddp
#   bash scripts/distributed.sh N adapt --dataset mnist --method xbm
#
# Each rank trains on every N-th batch of the same seeded order and the task gradients are
# averaged (src/xbm/train/distributed.py); rank 0 pretrains, prints and writes files. The
# per-process batch size stays --batch-size, so the effective batch is N times larger and a
# task takes 1/N of the steps; learning rates are not rescaled. PYTHON picks the interpreter.
# Relative paths in ARGS (--out, --bundle, folder:PATH, --config) are read from the directory
# you run it in, as with `xbm` itself.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N=${1:?usage: bash scripts/distributed.sh N COMMAND [ARGS...]}
shift
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$N" -m xbm "$@"
