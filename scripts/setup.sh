#!/usr/bin/env bash
# Set up a virtual environment in .venv with diffusekit installed (editable).
#   bash scripts/setup.sh          library + runtime dependencies
#   bash scripts/setup.sh --test   also the test oracles (diffusers, transformers) and test assets
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch requirement pulls several GB of CUDA wheels
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e .
if [ "${1:-}" = "--test" ]; then
  $PIP install -r requirements-test.txt
  # only the CLIP vocabulary file is needed from open-clip-torch; its torchvision dependency would not import
  $PIP install --no-deps -r requirements-test-nodeps.txt
fi
