#!/usr/bin/env bash
# Check every CUDA path (bf16 autocast, stacked evaluation, device generators, resume, --compile,
# evaluate.py, the bench) with tiny real Fashion-MNIST runs; one line per check. See scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--data_path DIR] [--only NAME,...] [--keep DIR] [--list]
# Uses .venv (scripts/setup.sh) when present, else $PYTHON or python3. Exit: 0 ok, 1 failed, 2 no CUDA.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
