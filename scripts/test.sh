#!/usr/bin/env bash
# The test suite (its measured time: README.md, docs/benchmarks.md). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
