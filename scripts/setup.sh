#!/usr/bin/env bash
# Set up a virtual environment in .venv with diffusekit installed (editable).
#   bash scripts/setup.sh          library + runtime dependencies
#   bash scripts/setup.sh --test   also the test oracles (diffusers, transformers), test assets, the server's test
#                                  clients and Debian's chromium (apt) for the web page test
#   bash scripts/setup.sh --train  also Fashion-MNIST (Debian package dataset-fashion-mnist) for `diffusekit train`
#                                  and `diffusekit eval`; combine with --test freely
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch requirement pulls several GB of CUDA wheels
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e .
if [[ " $* " == *" --test "* ]]; then
  $PIP install -r requirements-test.txt
  # only the CLIP vocabulary file is needed from open-clip-torch; its torchvision dependency would not import
  $PIP install --no-deps -r requirements-test-nodeps.txt
  # the web page test of `diffusekit serve` runs a real headless Chromium (Debian's package, no download)
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
  fi
fi
if [[ " $* " == *" --train "* ]]; then
  # the CLIP vocabulary file for `diffusekit train text-to-image` (open-clip-torch, data file only)
  $PIP install --no-deps -r requirements-test-nodeps.txt
  if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    # the idx files land in /usr/share/datasets/fashion-mnist (diffusekit.training.data looks there)
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    command -v apt-get >/dev/null || { echo "--train needs apt-get (Debian/Ubuntu); else set DIFFUSEKIT_FASHION_MNIST to a folder with the idx files" >&2; exit 1; }
    $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
  fi
fi
