#!/usr/bin/env bash
# The test suite (8-9 minutes on 2 CPU cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
