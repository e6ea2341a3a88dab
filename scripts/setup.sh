#!/usr/bin/env bash
# Prepare everything the demo and the tests need; safe to run again (it skips what is done).
#   - a virtual environment in .venv with requirements-dev.txt installed
#   - Fashion-MNIST from the Debian package dataset-fashion-mnist (offline), when apt is usable
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing requirements (torch is large: a few minutes the first time)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    echo "$wanted" > "$stamp"
fi

FASHION=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
        || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision"
fi
