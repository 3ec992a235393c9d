"""Capture: exact frame statistics, and a processor that leaves the model's output alone.

Tolerances: the harness computes in float32, the oracle in float64. Logits are means of
dot products of size ~|q||k|, so float32 rounding gives a relative error ~1e-6 of that
scale; we allow 1e-5 of it. Mass is a probability in [0, 1] computed by a fused float32
softmax; we allow 1e-5 absolute (observed: ~1e-7).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import block_causal_mask
from attn_harness.model.capture import Recorder, capture, frame_stats
from attn_harness.model.models import build_tiny_random
from tests.oracle import brute_force_stats, reference_qk

MASS_ATOL = 1e-5


def assert_matches_oracle(q, k, tokens_per_frame, mask=None):
    got = frame_stats(q, k, tokens_per_frame, mask=mask)
    want = brute_force_stats(q, k, tokens_per_frame, mask)
    scale = (q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()).item() / q.shape[-1] ** 0.5
    logits_tol = 1e-5 * max(scale, 1.0)
    assert torch.equal(got["logits"].isnan(), want["logits"].isnan())
    torch.testing.assert_close(got["logits"].double().nan_to_num(), want["logits"].nan_to_num(), atol=logits_tol, rtol=0)
    torch.testing.assert_close(got["mass"].double(), want["mass"], atol=MASS_ATOL, rtol=0)
    assert got["logits"].dtype == got["mass"].dtype == torch.float32


@st.composite
def qk_cases(draw):
    batch = draw(st.integers(1, 2))
    frames = draw(st.integers(1, 6))
    per_frame = draw(st.integers(1, 7))
    heads = draw(st.integers(1, 16))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    sharpness = draw(st.sampled_from([0.1, 1.0, 4.0]))  # 4.0 on unit vectors of dim 16: near one-hot rows
    seed = draw(st.integers(0, 2**31 - 1))
    mask_kind = draw(st.sampled_from(["none", "block-causal", "random"]))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, frames * per_frame, heads, head_dim, generator=gen) * sharpness
    k = torch.randn(batch, frames * per_frame, heads, head_dim, generator=gen) * sharpness
    if mask_kind == "block-causal":
        mask = torch.from_numpy(block_causal_mask(frames, draw(st.integers(1, 3))))
    elif mask_kind == "random":
        mask = torch.rand(frames, frames, generator=gen) < 0.6
    else:
        mask = None
    return q, k, per_frame, mask


@settings(max_examples=60, deadline=None)
@given(qk_cases())
def test_frame_stats_equal_the_float64_brute_force(case):
    q, k, per_frame, mask = case
    assert_matches_oracle(q, k, per_frame, mask)


def test_sharply_peaked_attention_is_still_exact():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 5 * 3, 2, 8, generator=gen) * 6.0  # logits of order 100: one key takes nearly all mass
    k = torch.randn(1, 5 * 3, 2, 8, generator=gen) * 6.0
    assert_matches_oracle(q, k, 3)


def test_mass_rows_sum_to_one_and_masked_cells_are_nan_and_zero():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 9 * 4, 3, 8, generator=gen)
    mask = torch.from_numpy(block_causal_mask(9, 3))
    out = frame_stats(q, k, 4, mask=mask)
    torch.testing.assert_close(out["mass"].sum(-1), torch.ones(2, 3, 9), atol=1e-6, rtol=0)
    assert torch.all(out["mass"][..., ~mask] == 0)
    assert torch.all(out["logits"][..., ~mask].isnan())
    assert not torch.any(out["logits"][..., mask].isnan())


def test_chunked_queries_give_the_same_mass():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, 7 * 5, 2, 8, generator=gen)
    whole = frame_stats(q, k, 5, metrics=("mass",))["mass"]
    chunked = frame_stats(q, k, 5, metrics=("mass",), chunk_tokens=5)["mass"]
    torch.testing.assert_close(chunked, whole, atol=1e-7, rtol=0)


def test_more_key_frames_than_head_dim_is_still_exact():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 1, 11 * 2, 2, 4, generator=gen)  # 11 key frames, head dim 4
    assert_matches_oracle(q, k, 2)


def test_bfloat16_inputs_give_float32_statistics_of_the_same_values():
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 1, 4 * 3, 2, 8, generator=gen).to(torch.bfloat16))
    out = frame_stats(q, k, 3)
    assert out["logits"].dtype == torch.float32
    assert_matches_oracle(q, k, 3)  # the oracle sees the same bf16 values, upcast


def test_logits_only_skips_mass():
    q, k = torch.randn(2, 1, 6, 1, 4)
    assert set(frame_stats(q, k, 3, metrics=("logits",))) == {"logits"}


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "per_frame", "message"),
    [
        ((1, 6, 2, 4), (1, 6, 2, 4), 4, "not a multiple of tokens_per_frame"),
        ((1, 6, 2, 4), (1, 6, 2, 8), 3, "must both be"),
        ((6, 2, 4), (6, 2, 4), 3, "must both be"),
    ],
)
def test_bad_shapes_are_rejected_with_a_reason(q_shape, k_shape, per_frame, message):
    with pytest.raises(ValueError, match=message):
        frame_stats(torch.zeros(q_shape), torch.zeros(k_shape), per_frame)


def test_memory_stays_linear_in_tokens():
    """16,384 tokens: the score matrix of one head would be 1 GiB in float32; we stay far below."""
    script = textwrap.dedent(
        """
        import resource, torch
        from attn_harness.model.capture import frame_stats
        torch.set_num_threads(1)
        q = torch.randn(1, 16384, 1, 16); k = torch.randn(1, 16384, 1, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        frame_stats(q, k, 1024)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 128 * 1024, f"peak memory grew by {grown_kib / 1024:.0f} MiB; the full matrix is 1024 MiB"


# --- the processor on the real diffusers architecture ------------------------------------

TPF = 16  # tokens per latent frame of the tiny model at 64x64


@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


def model_inputs(seed: int = 0, frames: int = 9):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, 8, 8, generator=gen)
    text = torch.randn(1, 16, 64, generator=gen)
    return latents, torch.tensor([700.0]), text


def run(model, latents, timestep, text):
    with torch.inference_mode():
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def test_capture_leaves_the_output_bitwise_identical_and_restores_the_processors(model):
    inputs = model_inputs()
    stock_processors = [block.attn1.processor for block in model.blocks]
    stock = run(model, *inputs)
    recorder = Recorder(tokens_per_frame=TPF, active=True)
    with capture(model, range(4), recorder):
        captured = run(model, *inputs)
    assert torch.equal(captured, stock)
    assert [block.attn1.processor for block in model.blocks] == stock_processors
    assert torch.equal(run(model, *inputs), stock)
    assert sorted(recorder.records) == [(0, layer) for layer in range(4)]


def test_processors_are_restored_when_the_forward_fails(model):
    stock_processors = [block.attn1.processor for block in model.blocks]
    latents, timestep, text = model_inputs()
    with pytest.raises(RuntimeError):
        with capture(model, [1], Recorder(tokens_per_frame=TPF, active=True)):
            run(model, latents, timestep, text[..., :5])  # wrong text width
    assert [block.attn1.processor for block in model.blocks] == stock_processors


def test_captured_statistics_are_those_of_the_models_real_queries_and_keys(model):
    """Independent oracle: q/k rebuilt in float64 from the attention's inputs, RoPE as complex rotation."""
    inputs_seen = {}

    def keep_inputs(layer):
        def hook(module, args):
            inputs_seen[layer] = (args[0].detach().clone(), tuple(t.clone() for t in args[3]))

        return hook

    handles = [model.blocks[layer].attn1.register_forward_pre_hook(keep_inputs(layer)) for layer in (0, 3)]
    recorder = Recorder(tokens_per_frame=TPF, active=True)
    try:
        with capture(model, [0, 3], recorder):
            run(model, *model_inputs(seed=7))
    finally:
        for handle in handles:
            handle.remove()
    for layer in (0, 3):
        q, k = reference_qk(model.blocks[layer].attn1, *inputs_seen[layer])
        want = brute_force_stats(q, k, TPF)
        got = recorder.records[(0, layer)]
        torch.testing.assert_close(got["logits"].double(), want["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mass"].double(), want["mass"], atol=MASS_ATOL, rtol=0)


def masked_reference(model, mask, inputs):
    """The model with every attn1 given a token-level boolean mask: the textbook block-causal run."""
    token_mask = mask.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)

    class MaskedProcessor:
        def __init__(self, stock):
            self.stock = stock

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return self.stock(attn, hidden_states, None, token_mask, rotary_emb)

    stock = [block.attn1.processor for block in model.blocks]
    try:
        for block, processor in zip(model.blocks, stock):
            block.attn1.set_processor(MaskedProcessor(processor))
        return run(model, *inputs)
    finally:
        for block, processor in zip(model.blocks, stock):
            block.attn1.set_processor(processor)


def test_block_causal_mode_computes_what_a_masked_model_computes(model):
    mask = torch.from_numpy(block_causal_mask(9, 3))
    inputs = model_inputs(seed=3)
    recorder = Recorder(tokens_per_frame=TPF, mask=mask, active=True)
    with capture(model, [2], recorder):
        ours = run(model, *inputs)
    want = masked_reference(model, mask, inputs)
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(ours, run(model, *inputs), atol=1e-3)  # the mask changed the model
    assert torch.all(recorder.records[(0, 2)]["logits"][..., ~mask].isnan())


def test_block_causal_model_output_of_early_blocks_ignores_later_frames(model):
    """Causality of the whole network: changing frames 3-8 leaves frames 0-2 bitwise unchanged."""
    latents, timestep, text = model_inputs(seed=4)
    later_changed = latents.clone()
    later_changed[:, :, 3:] += 1.0
    mask = torch.from_numpy(block_causal_mask(9, 3))

    def causal_run(x):
        with capture(model, [], Recorder(tokens_per_frame=TPF, mask=mask)):
            return run(model, x, timestep, text)

    assert torch.equal(causal_run(latents)[:, :, :3], causal_run(later_changed)[:, :, :3])
    assert not torch.equal(run(model, latents, timestep, text)[:, :, :3], run(model, later_changed, timestep, text)[:, :, :3])


def test_capture_rejects_layers_the_model_does_not_have(model):
    with pytest.raises(HarnessError, match=r"out of range: this model has 4 layers \(0-3\)"):
        with capture(model, [4], Recorder(tokens_per_frame=TPF)):
            pass
