#!/usr/bin/env bash
# Create .venv and install the toolkit with its test extra. Idempotent.
# On machines that keep a CPU build of torch 2.13.0 on disk (our 2-core dev/CI boxes), that build
# is installed first so pip does not pull a multi-GB CUDA build; elsewhere pip installs the usual
# torch for the platform. Set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        .venv/bin/pip install -q "$TORCH_SPEC"
    elif ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
        .venv/bin/pip install -q torch==2.13.0   # the CPU build on this machine's disk
    fi
fi
.venv/bin/pip install -q -e ".[test]"
