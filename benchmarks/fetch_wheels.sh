#!/usr/bin/env bash
# Download diffusers, pytest and their dependencies as Python $PY_VERSION (default 3.12) / x86_64 wheels into
# $DEST (default .whl/, gitignored),
# for machines that have PyTorch but no network (benchmarks/gpu_check.sh and scripts/gpu_ci.sh install
# them offline), plus the harness's other dependencies and test tools for scripts/gpu_ci.sh.
# Run once on a machine with network access, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIFFUSERS=$("$PY" -c "import diffusers; print(diffusers.__version__)")
ACCELERATE=$("$PY" -c "import accelerate; print(accelerate.__version__)")  # attn_harness.model.models imports it
PYTEST=$("$PY" -c "import pytest; print(pytest.__version__)")  # GPU_TESTS=1 bash benchmarks/gpu_check.sh runs tests/test_kernels.py -m gpu
DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p "$DEST"
"$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    "diffusers==${DIFFUSERS}" "accelerate==${ACCELERATE}" "pytest==${PYTEST}"
# scripts/gpu_ci.sh installs the harness itself offline: its other dependencies, the test tools
# and the build backend (no playwright or transformers: the browser and umT5 tests skip there).
"$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    $("$PY" -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(' '.join(repr(d) for d in deps if not d.startswith(('torch', 'diffusers', 'accelerate'))))" | tr -d "'") \
    "pytest-xdist>=3.5" "pytest-timeout>=2.3,<3" "hypothesis>=6.100" "setuptools>=68" wheel
# PyTorch already brings these (and their versions must stay the ones it was installed with).
cd "$DEST"
rm -f torch-*.whl nvidia_*.whl triton-*.whl filelock-*.whl typing_extensions-*.whl \
      fsspec-*.whl jinja2-*.whl markupsafe-*.whl sympy-*.whl mpmath-*.whl networkx-*.whl
du -sh . && ls
