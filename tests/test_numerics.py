"""The numerics policy: strict float32 inside an extraction, every setting restored after, and
attrs that say what decided the numbers (device, ISA, precision, attention kernel, threads)."""

from __future__ import annotations

import pytest
import torch

from attn_harness.core.probe import Probe
from attn_harness.model.numerics import POLICIES, numerics_policy, precision_settings
from attn_harness.sampling.extract import extract

CPU = torch.device("cpu")
QUICK = Probe(sample_steps=2, capture_steps=("first",), layers=(0,), device="cpu")
pytestmark = pytest.mark.numerics


@pytest.fixture
def loose_precision():
    """A user who allowed TF32 / bf16 matmuls before calling the harness (restored after the test)."""
    saved = precision_settings()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    yield
    for knob, value in saved.items():
        target = torch.backends
        for part in knob.split("."):
            target = getattr(target, part)
        target.fp32_precision = value


def test_float32_is_strict_inside_and_the_users_settings_come_back_after(loose_precision):
    before = precision_settings()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with numerics_policy("float32", CPU) as applied:
        assert set(precision_settings().values()) == {"ieee"}
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert precision_settings() == before and before["cuda.matmul"] == "tf32"
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert applied.attrs()["fp32_precision"].startswith("cuda.matmul=ieee cudnn.conv=ieee")


def test_settings_are_restored_when_the_extraction_fails(loose_precision):
    before = precision_settings()
    with pytest.raises(RuntimeError, match="boom"):
        with numerics_policy("float32", CPU):
            raise RuntimeError("boom")
    assert precision_settings() == before and not torch.are_deterministic_algorithms_enabled()


def test_bfloat16_keeps_the_configured_precision(loose_precision):
    before = precision_settings()
    with numerics_policy("bfloat16", CPU) as applied:
        assert precision_settings() == before
    assert POLICIES["bfloat16"].fp32_precision is None
    assert applied.attrs()["environment_class"] == "cpu-bfloat16"


def test_extraction_attrs_name_device_isa_precision_kernel_and_threads(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # a kernel-selecting variable is recorded when set
    ds = extract("tiny-random", QUICK, progress=False)
    attrs = ds.attrs
    assert attrs["environment_class"] == "cpu-float32"
    assert attrs["numerics_policy"].startswith("float32 strict")
    assert attrs["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert attrs["torch_threads"] == torch.get_num_threads()
    assert "MKL_CBWR=AUTO" in attrs["numerics_env"]
    assert attrs["device_name"] and attrs["deterministic_algorithms"] is True
    # the attention kernel that ran: the model's own SDPA calls and the capture's, both float32
    assert attrs["attention_backend"].startswith("diffusers native; torch SDPA: ")
    assert "(float32)" in attrs["attention_backend"] and "unknown" not in attrs["attention_backend"]


def test_the_policy_does_not_change_float32_results_on_cpu():
    """On CPU nothing runs TF32, so strict float32 must give the numbers it gave before."""
    with numerics_policy("float32", CPU):
        inside = extract("tiny-random", QUICK, progress=False)
    plain = extract("tiny-random", QUICK, progress=False)
    assert inside["logits"].equals(plain["logits"]) and inside["mass"].equals(plain["mass"])
