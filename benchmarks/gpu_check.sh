#!/usr/bin/env bash
# GPU check (issue 5, item 5). Installs nothing from the network: diffusers and its dependencies
# come as wheels from .whl/ (make them with benchmarks/fetch_wheels.sh), installed into $SITE
# only when this Python cannot import diffusers. Arguments go to benchmarks/gpu_check.py:
#   bash benchmarks/gpu_check.sh                      # full Wan2.1-T2V-1.3B shape on CUDA, bf16, 2 steps
#   bash benchmarks/gpu_check.sh --shape tiny --device cpu   # the same code path, CPU-sized
#   GPU_TESTS=1 bash benchmarks/gpu_check.sh --json gpu.json  # CUDA kernel tests, then the check with
#                                                 # the Triton kernels section (per layer, whole model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
if [[ -n "${FORCE_WHEELS:-}" ]] || ! "$PY" -c "import diffusers" 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu_check: this Python has no diffusers and $WHEELS/ holds no wheels;" \
             "run benchmarks/fetch_wheels.sh on a machine with network and carry $WHEELS/ along" >&2
        exit 2
    fi
    if "$PY" -c "import numpy" 2>/dev/null; then  # keep the numpy PyTorch was installed with
        wheels=($(printf '%s\n' "${wheels[@]}" | grep -v '/numpy-'))
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${GPU_TESTS:-}" ]]; then  # the CUDA tests of the Triton mass kernels first (needs pytest)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py || echo "gpu_check: CUDA kernel tests failed (see above)" >&2
fi
exec "$PY" -m benchmarks.gpu_check "$@"
