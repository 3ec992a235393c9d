"""Cross-attention capture: ``text_mass``, the share of each query frame's text attention on each
text token, exact against a float64 brute force, on the real diffusers architecture, through
extraction, storage and the ``text_share`` property.

Tolerance: text_mass is a softmax probability computed in float32 (the oracle in float64);
1e-5 absolute, as for the self-attention mass (observed ~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_harness.core import store
from attn_harness.core.checks import run_check
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.model.capture import Recorder, capture, text_stats
from attn_harness.model.models import build_tiny_random, load_model
from attn_harness.sampling.extract import extract
from tests.oracle import brute_force_text_mass, reference_cross_qk

ATOL = 1e-5
TPF = 16


@st.composite
def cross_cases(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    frames, per_frame = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    heads, dim, text = draw(st.integers(1, 4)), draw(st.sampled_from([2, 8, 16])), draw(st.integers(1, 20))
    sharpness = draw(st.sampled_from([0.1, 1.0, 4.0]))
    q = torch.randn(2, frames * per_frame, heads, dim, generator=gen) * sharpness
    k = torch.randn(2, text, heads, dim, generator=gen) * sharpness
    chunk = draw(st.integers(1, 3)) * per_frame
    return q, k, per_frame, chunk


@settings(max_examples=60, deadline=None)
@given(cross_cases())
def test_text_stats_equal_the_float64_brute_force_whatever_the_chunking(case):
    q, k, per_frame, chunk = case
    got = text_stats(q, k, per_frame, chunk_tokens=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_force_text_mass(q, k, per_frame), atol=ATOL, rtol=0)


def test_text_stats_rejects_mismatched_heads_and_partial_frames():
    with pytest.raises(ValueError, match="equal batch, heads"):
        text_stats(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 3, 8), 2)
    with pytest.raises(ValueError, match="not a multiple"):
        text_stats(torch.zeros(1, 5, 2, 8), torch.zeros(1, 3, 2, 8), 2)


@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 9, 8, 8, generator=gen), torch.tensor([600.0]), torch.randn(1, 16, 64, generator=gen)


def _run(model, latents, timestep, text):
    with torch.inference_mode():
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def test_text_capture_leaves_the_output_bitwise_identical_and_restores_attn2(model):
    inputs = _inputs()
    stock_processors = [block.attn2.processor for block in model.blocks]
    stock = _run(model, *inputs)
    recorder = Recorder(tokens_per_frame=TPF, metrics=("logits", "text_mass"), active=True)
    with capture(model, [1, 2], recorder):
        captured = _run(model, *inputs)
    assert torch.equal(captured, stock)
    assert [block.attn2.processor for block in model.blocks] == stock_processors
    assert sorted(recorder.text_records) == [(0, 1), (0, 2)]


def test_captured_text_mass_is_that_of_the_models_real_cross_attention(model):
    """Independent oracle: q/k of attn2 rebuilt in float64 from its inputs, full softmax over the text."""
    seen = {}

    def keep(layer):
        def hook(module, args):
            seen[layer] = (args[0].detach().clone(), args[1].detach().clone())  # (video tokens, text tokens)

        return hook

    handles = [model.blocks[layer].attn2.register_forward_pre_hook(keep(layer)) for layer in (0, 3)]
    recorder = Recorder(tokens_per_frame=TPF, metrics=("logits", "text_mass"), active=True)
    try:
        with capture(model, [0, 3], recorder):
            _run(model, *_inputs(seed=5))
    finally:
        for handle in handles:
            handle.remove()
    for layer in (0, 3):
        q, k = reference_cross_qk(model.blocks[layer].attn2, *seen[layer])
        torch.testing.assert_close(recorder.text_records[(0, layer)].double(), brute_force_text_mass(q, k, TPF),
                                   atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def text_ds():
    probe = Probe(metrics=("logits", "mass", "text_mass"), sample_steps=3, device="cpu", layers=(0, 2))
    return extract(load_model("tiny-trained"), probe, progress=False)


def test_extraction_holds_text_mass_per_query_frame_and_text_token_and_survives_storage(text_ds, tmp_path):
    assert text_ds["text_mass"].dims == ("step", "layer", "head", "query_frame", "text_token")
    assert text_ds.sizes["text_token"] == 16 and text_ds["text_content"].values.tolist() == [1] * 16
    np.testing.assert_allclose(text_ds["text_mass"].sum("text_token").values, 1.0, atol=1e-5)
    back = store.read_dataset(store.write_dataset(text_ds, tmp_path / "x.nc"))
    np.testing.assert_array_equal(back["text_mass"].values, text_ds["text_mass"].values)
    np.testing.assert_array_equal(back["text_content"].values, text_ds["text_content"].values)


def test_store_rejects_text_mass_whose_rows_do_not_sum_to_one(text_ds):
    broken = text_ds.copy(deep=True)
    broken["text_mass"][0, 0, 0, 2, 3] += 0.5
    with pytest.raises(HarnessError, match="text_mass over the text tokens does not sum to 1"):
        store.validate(broken)


def test_value_range_and_text_share_hold_and_fail_where_they_should(text_ds):
    assert run_check(text_ds, "value_range", {"metric": "text_mass", "min": 0, "max": 1}).status == "pass"
    assert run_check(text_ds, "value_range", {"metric": "text_mass", "max": 0.01}).status == "fail"
    assert run_check(text_ds, "text_share", {"min": 0.999}).status == "pass"  # every tiny token is content
    first_half = run_check(text_ds, "text_share", {"tokens": list(range(8)), "min": 0.99})
    assert first_half.status == "fail" and "share on text tokens" in first_half.message


def test_text_share_counts_only_content_tokens_so_mass_on_padding_fails_it(text_ds):
    padded = text_ds.assign_coords(text_content=("text_token", np.array([1] * 8 + [0] * 8, dtype=np.int8)))
    share = padded["text_mass"].where(padded["text_content"] == 1, 0.0).sum("text_token")
    assert float(share.max()) < 0.999  # some mass lands on the tokens now marked as padding
    assert run_check(padded, "text_share", {"min": 0.999}).status == "fail"
    assert run_check(padded, "text_share", {"min": float(share.min()) - 1e-6}).status == "pass"
