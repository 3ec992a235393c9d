#!/usr/bin/env bash
# Create .venv and install the harness with its test extras.
# On a machine without torch we install the pinned CPU wheel (torch==2.13.0) first, so the
# range in pyproject.toml is already met and pip never pulls a multi-GB CUDA build.
# A GPU user who already has a CUDA torch in the venv keeps it (set ATTN_TORCH to pin another).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${ATTN_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
