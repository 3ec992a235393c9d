"""Extraction: a sampler run on the real architecture gives a Dataset per the data contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_harness.core import schema
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.store import validate
from attn_harness.model.models import load_model
from attn_harness.sampling.extract import extract
from attn_harness.sampling.run import resolve_steps
from tests.oracle import brute_force_stats, reference_qk

QUICK = Probe(sample_steps=4)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def default_ds(tiny):
    return extract(tiny, QUICK, progress=False)


def test_dataset_follows_the_contract(default_ds):
    validate(default_ds)
    assert default_ds["logits"].dims == schema.DIMS
    assert dict(default_ds.sizes) == {"step": 3, "layer": 4, "head": 4, "query_frame": 9, "key_frame": 9}
    assert list(default_ds["step"].values) == [0, 2, 3]  # first, mid, last of 4 steps
    assert set(schema.REQUIRED_ATTRS) <= set(default_ds.attrs)
    assert default_ds.attrs["tokens_per_frame"] == 16 and default_ds.attrs["latent_frames"] == 9
    assert np.all(np.diff(default_ds["timestep"].values) < 0)  # denoising runs from noise (t high) down


def test_mass_rows_sum_to_one(default_ds):
    np.testing.assert_allclose(default_ds["mass"].sum("key_frame"), 1.0, atol=1e-5)


def test_extracted_logits_and_mass_equal_the_brute_force_of_the_real_forward(tiny):
    """Pre-hooks see each attn1's real inputs during sampling; the float64 oracle redoes the rest."""
    calls = []
    handles = [
        block.attn1.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args[0].clone(), args[3])))
        for i, block in enumerate(tiny.transformer.blocks)
    ]
    try:
        ds = extract(tiny, Probe(sample_steps=2, capture_steps=("first",)), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    first_conditional_pass = calls[:4]  # step 0, conditional branch first
    for layer, hidden, rotary in first_conditional_pass:
        q, k = reference_qk(tiny.transformer.blocks[layer].attn1, hidden, rotary)
        want = brute_force_stats(q, k, 16)
        got = ds.sel(step=0, layer=layer)
        np.testing.assert_allclose(got["logits"].values, want["logits"][0].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got["mass"].values, want["mass"][0].numpy(), atol=1e-5)


def test_extraction_is_deterministic_and_seeded(tiny, default_ds):
    again = extract(tiny, QUICK, progress=False)
    assert np.array_equal(again["logits"].values, default_ds["logits"].values)
    other_seed = extract(tiny, QUICK.replace(seed=1), progress=False)
    assert not np.allclose(other_seed["logits"].sel(step=3).values, default_ds["logits"].sel(step=3).values)


def test_uncond_branch_differs_from_cond(tiny, default_ds):
    uncond = extract(tiny, QUICK.replace(branch="uncond"), progress=False)
    assert uncond.attrs["branch"] == "uncond"
    assert not np.allclose(uncond["logits"].values, default_ds["logits"].values)


def test_block_causal_extraction_masks_the_upper_blocks(tiny):
    ds = extract(tiny, QUICK.replace(mask="block-causal", layers=(1,), metrics=("logits", "mass")), progress=False)
    validate(ds)
    logits = ds["logits"].sel(layer=1)
    assert bool(logits.sel(query_frame=2, key_frame=3).isnull().all())
    assert bool(logits.sel(query_frame=3, key_frame=5).notnull().all())
    assert float(ds["mass"].sel(query_frame=0, key_frame=8).max()) == 0.0


def test_geometry_flags_change_the_frame_count(tiny):
    ds = extract(tiny, Probe(sample_steps=1, num_frames=21, height=32, width=48, layers=(0,)), progress=False)
    assert ds.sizes["query_frame"] == 6 and ds.attrs["tokens_per_frame"] == 6


def test_progress_bar_is_shown_when_asked(tiny, capsys):
    extract(tiny, Probe(sample_steps=2, layers=(0,), capture_steps=("first",)), progress=True)
    assert "denoising" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (Probe(layers=(4,)), r"layer\(s\) \[4\] out of range: this model has 4 layers"),
        (Probe(num_frames=30), "num_pixel_frames must be 1 \\+ k\\*4"),
        (Probe(height=70), "multiple of"),
        (Probe(guidance=1.0, branch="uncond"), "needs guidance > 1"),
    ],
)
def test_bad_probes_fail_with_one_clear_message(tiny, probe, message):
    with pytest.raises(HarnessError, match=message):
        extract(tiny, probe, progress=False)


def test_probe_validates_its_own_fields():
    with pytest.raises(HarnessError, match="mask: expected one of"):
        Probe(mask="causal")
    with pytest.raises(HarnessError, match="metrics: must include 'logits'"):
        Probe(metrics=("mass",))
    with pytest.raises(HarnessError, match="capture_steps: step 3 is out of range"):
        Probe(sample_steps=3, capture_steps=(3,))


def test_named_steps_resolve_to_indices():
    assert resolve_steps(("first", "mid", "last"), 50) == [0, 25, 49]
    assert resolve_steps(("last", 0, "first"), 1) == [0]
    with pytest.raises(HarnessError, match="not first, mid, last or an integer"):
        resolve_steps(("middle",), 10)


def _bf16_attention_runs() -> bool:
    """PyTorch 2.13's CPU bfloat16 SDPA fails ("pack_vnni2 is only supported when avx512 is
    supported") when ATEN_CPU_CAPABILITY forces the ISA below AVX-512 on an AVX-512 host."""
    q = torch.zeros(1, 4, 144, 32, dtype=torch.bfloat16)  # the tiny model's shape: the fused kernel
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _bf16_attention_runs(),
                    reason="CPU bfloat16 SDPA is broken in PyTorch under this forced ATEN_CPU_CAPABILITY")
def test_bfloat16_keeps_diffusers_float32_modules(tiny):
    bf16 = load_model("tiny-random", dtype=torch.bfloat16).transformer
    assert bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].scale_shift_table.dtype == torch.float32
    assert bf16.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    ds = extract("tiny-random", Probe(sample_steps=2, dtype="bfloat16", layers=(0,)), progress=False)
    assert ds["logits"].dtype == np.float32 and ds.attrs["dtype"] == "bfloat16"
    np.testing.assert_allclose(ds["mass"].sum("key_frame"), 1.0, atol=1e-5)
