#!/usr/bin/env bash
# The main job on a CPU: BACON on Fashion-MNIST, IPC 10, with the reduced budget of
# Code/configs/cpu_demo.yaml (the published configuration's shape, far fewer iterations
# and evaluation epochs). Extra flags are passed on, e.g. --seed 1, --device cuda or --compile.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cd Code
exec ../.venv/bin/python -u BACON_mnist.py --config configs/cpu_demo.yaml "$@"
