#!/usr/bin/env bash
# GPU runner check, offline: on a CUDA machine whose Python has a CUDA build of PyTorch, with the
# wheels of `bash benchmarks/fetch_wheels.sh` carried in .whl/ (made once on a machine with network).
# Installs the harness into a throwaway venv layered over that Python (its torch is used as is),
# then runs, each with a time limit:
#   tests       the test suite (CPU-pinned tests plus the `cuda`-marked ones)
#   specs       `pytest specs/` on CUDA: the cuda-float32 environment class against the committed
#               cpu-float32 baselines under the specs' cross-environment tolerance
#   drift-*     CPU vs CUDA drift of each default spec (the figures docs/numerics.md lacks)
#   gpu-check   benchmarks/gpu_check.sh: the full Wan2.1-T2V-1.3B shape, bf16, with and without capture
# and prints one summary line per stage. Designed to finish in under 5 minutes on one H200 (about 3 expected;
# the stage limits, 6 min 15 s in all, only bite on a hang).
# Logs, results.json, the report and gpu.json go to $OUT (default /tmp/gpu-ci). Exit 0 when all pass.
#   PYTHON=/path/to/cuda/python bash scripts/gpu_ci.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUTDIR=${OUT:-/tmp/gpu-ci}
VENV=${GPU_CI_VENV:-/tmp/gpu-ci-venv}
WORKERS=${WORKERS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
mkdir -p "$OUTDIR"
started=$SECONDS
summary=()
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run it with a limit, log to $OUTDIR/NAME.log, record the verdict
    local name=$1 limit=$2 start=$SECONDS rc verdict
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in 0) verdict=PASS ;; 124|137) verdict="TIMEOUT(${limit}s)" ;; *) verdict="FAIL(rc=$rc)" ;; esac
    [[ $rc == 0 ]] || failed=1
    summary+=("$(printf '%-14s %-14s %4ss  %s' "$verdict" "$name" $((SECONDS - start)) "$(grep -v '^\s*$' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-150)")")
    return $rc
}

setup() {
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || return 1
    compgen -G "$WHEELS/diffusers-*.whl" > /dev/null || { echo "no wheels in $WHEELS/: run benchmarks/fetch_wheels.sh with network and carry $WHEELS/"; return 2; }
    local torch_site purelib
    torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    rm -rf "$VENV" && "$PY" -m venv "$VENV" || return 1
    purelib=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$torch_site" > "$purelib/cuda-torch.pth"  # the CUDA torch (and what it came with), not reinstalled
    "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" -e . pytest-xdist pytest-timeout hypothesis || return 1
    "$VENV/bin/python" -c "import attn_harness, torch, diffusers; print('attn_harness ready: torch', torch.__version__, 'diffusers', diffusers.__version__)"
}

export -f setup
export PY WHEELS VENV
if stage setup 60 bash -c setup; then
    BIN="$VENV/bin"
    stage tests 120 "$BIN/python" -m pytest -q -p no:cacheprovider -n "$WORKERS" --timeout 120 tests
    stage specs 45 "$BIN/python" -m pytest -q -p no:cacheprovider --timeout 40 --attn-cache "$OUTDIR/cache" \
        --attn-report "$OUTDIR/report" --attn-results "$OUTDIR/results" specs
    for name in tiny-default tiny-default-causal; do
        stage "drift-$name" 30 "$BIN/attn-harness" drift --spec specs/tiny_default.yaml --name "$name" \
            --base-env ATTN_DEVICE=cpu --env ATTN_DEVICE=cuda
    done
    stage gpu-check 90 env PYTHON="$BIN/python" bash benchmarks/gpu_check.sh --json "$OUTDIR/gpu.json"
fi

echo "==================== gpu_ci summary ($((SECONDS - started)) s, logs in $OUTDIR) ===================="
printf '%s\n' "${summary[@]}"
for name in tiny-default tiny-default-causal; do
    [[ -f "$OUTDIR/drift-$name.log" ]] && { echo "--- CPU vs CUDA drift, $name"; grep -E "max (abs|rel) diff|^[a-z]+:" "$OUTDIR/drift-$name.log"; }
done
[[ $failed == 0 ]] && echo "gpu_ci: all stages passed" || echo "gpu_ci: FAILED (see the logs above)"
exit $failed
