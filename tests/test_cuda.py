"""On a CUDA device (skipped elsewhere; run by scripts/gpu_ci.sh): float32 extractions are strict
(no TF32 anywhere, PyTorch's defaults restored after), the committed CPU baselines hold under the
default spec's cross-environment tolerance, and a real change still fails them there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attn_harness.core import store
from attn_harness.core.spec import load_specs
from attn_harness.model.models import load_model
from attn_harness.pytest.baseline import compare, layer_slice
from attn_harness.sampling.extract import extract
from tests.test_baseline_sensitivity import LAYER, scale_query

ROOT = Path(__file__).resolve().parents[1]
SPEC = next(s for s in load_specs(ROOT / "specs" / "tiny_default.yaml") if s.name == "tiny-default")
PROBE = SPEC.probe.replace(device="cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.numerics]


@pytest.fixture(scope="module")
def on_cuda():
    return extract("tiny-trained", PROBE, progress=False)


def test_float32_on_cuda_runs_without_tf32_and_restores_the_defaults(on_cuda):
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    attrs = extract("tiny-random", PROBE.replace(sample_steps=1, capture_steps=("first",)), progress=False).attrs
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    assert attrs["environment_class"] == "cuda-float32"
    assert "cuda.matmul=ieee cudnn.conv=ieee" in attrs["fp32_precision"]
    assert torch.cuda.get_device_name(0) in attrs["device_name"] and attrs["cuda_version"]
    assert "torch SDPA: " in attrs["attention_backend"] and "(float32)" in attrs["attention_backend"]


def test_committed_cpu_baselines_hold_on_cuda_under_the_cross_environment_tolerance(on_cuda):
    for layer in range(4):
        baseline = store.read_dataset(ROOT / SPEC.baseline_path(layer))
        assert compare(baseline, layer_slice(on_cuda, layer), SPEC.baseline.cross_env) == [], layer


def test_a_scaled_query_head_still_fails_on_cuda():
    loaded = load_model("tiny-trained", device=torch.device("cuda"))
    scale_query(loaded.transformer, LAYER, head=1, factor=1.01)
    changed = extract(loaded, PROBE, progress=False)
    baseline = store.read_dataset(ROOT / SPEC.baseline_path(LAYER))
    assert any(line.startswith("logits:") for line in compare(baseline, layer_slice(changed, LAYER), SPEC.baseline.cross_env))
