"""The Triton mass kernels against the float64 oracle, run on CPU by Triton's interpreter.

Not collected by a plain ``pytest tests``: ``tests/test_kernels.py`` runs this file in a
subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when kernels are defined, so it cannot
be switched on for some tests of one process only).

Tolerance: the kernels compute each probability as ``2^((s - m) c - log2 l)`` in float32 from
float32 scores, as any fused attention kernel does; the oracle in float64 from the same input
values. The score error is ~ head_dim x 2^-24 x |q||k|, which moves a probability by that
much relative; with the largest scores drawn here (|s| / sqrt(d) up to ~100) that stays
below 1e-5 absolute on the mass (observed: <= 2e-7; same bound as ``frame_stats`` on CPU).
Shapes are small because the interpreter runs every program in Python.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_harness.core.frames import block_causal_mask
from attn_harness.model.capture import mask_groups
from attn_harness.model.kernels.mass import TileConfig, frame_mass
from tests.oracle import brute_force_stats

if not triton.knobs.runtime.interpret:
    pytest.skip("run through tests/test_kernels.py (needs TRITON_INTERPRET=1 before Triton is imported)", allow_module_level=True)

MASS_ATOL = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle_lse(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, mask: torch.Tensor | None) -> torch.Tensor:
    """float64 row logsumexp of the scaled scores over each row's allowed keys, as float32 ``[b, h, n]``."""
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        token_mask = mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
        scores = scores.masked_fill(~token_mask, float("-inf"))
    return scores.logsumexp(-1).float()


def kernel_mass(q, k, tokens_per_frame, mask=None, *, with_lse=False, block_n=16):
    lse = oracle_lse(q, k, tokens_per_frame, mask) if with_lse else None
    groups = mask_groups(mask, q.shape[1] // tokens_per_frame)
    return frame_mass(q, k, tokens_per_frame, groups, lse=lse, config=TileConfig(block_n=block_n))


def assert_matches_oracle(q, k, tokens_per_frame, mask=None, **kwargs):
    got = kernel_mass(q, k, tokens_per_frame, mask, **kwargs)
    want = brute_force_stats(q, k, tokens_per_frame, mask)["mass"]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=MASS_ATOL, rtol=0)


@st.composite
def cases(draw):
    frames = draw(st.integers(1, 5))
    per_frame = draw(st.sampled_from([1, 3, 7, 16, 21, 40]))  # below, at and above a 16- or 32-key tile
    heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 16, 24]))
    dtype = draw(st.sampled_from(DTYPES))
    sharpness = draw(st.sampled_from([0.1, 1.0, 4.0]))
    mask_kind = draw(st.sampled_from(["none", "block-causal", "random"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.integers(1, 2)), frames * per_frame, heads, head_dim)
    q = (torch.randn(shape, generator=gen) * sharpness).to(dtype)
    k = (torch.randn(shape, generator=gen) * sharpness).to(dtype)
    if mask_kind == "block-causal":
        mask = torch.from_numpy(block_causal_mask(frames, draw(st.integers(1, 3))))
    elif mask_kind == "random":
        mask = torch.rand(frames, frames, generator=gen) < 0.6
    else:
        mask = None
    return q, k, per_frame, mask


@settings(max_examples=12, deadline=None)
@given(cases(), st.booleans(), st.sampled_from([16, 32]))
def test_mass_equals_the_float64_brute_force(case, with_lse, block_n):
    q, k, per_frame, mask = case
    assert_matches_oracle(q, k, per_frame, mask, with_lse=with_lse, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharply_peaked_rows_sum_to_one(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 1, 4 * 20, 2, 16, generator=gen) * 3.0).to(dtype)  # scores ~ +-100: near one-hot rows
    mass = kernel_mass(q, k, 20)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2, 4), atol=1e-6, rtol=0)
    assert_matches_oracle(q, k, 20)


def test_one_frame_is_one_full_row():
    q, k = torch.randn(2, 1, 37, 1, 8)
    torch.testing.assert_close(kernel_mass(q, k, 37), torch.ones(1, 1, 1, 1), atol=1e-6, rtol=0)


def test_frames_of_one_token_and_many_key_frames():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 1, 12, 1, 8, generator=gen)  # 12 frames: 12 key frames of one key (in a 16-wide tile) each
    assert_matches_oracle(q, k, 1)


def test_query_frames_without_allowed_keys_get_zero_mass_and_others_their_keys_only():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, 4 * 5, 2, 8, generator=gen)
    mask = torch.tensor([[False, False, False, False], [True, False, True, False], [True, True, True, True],
                         [False, False, False, True]])
    mass = kernel_mass(q, k, 5, mask)
    assert torch.all(mass[..., 0, :] == 0)
    assert torch.all(mass[..., ~mask] == 0)
    assert_matches_oracle(q, k, 5, mask)  # row 1 has two separate key runs: their row sums are combined
    assert_matches_oracle(q, k, 5, mask, with_lse=True)


def test_a_wrong_logsumexp_gives_a_wrong_mass():
    """The given lse is used as is: shifting it by log 2 halves every probability."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 1, 3 * 8, 1, 16, generator=gen)
    lse = oracle_lse(q, k, 8, None) + math.log(2.0)
    mass = frame_mass(q, k, 8, mask_groups(None, 3), lse=lse)
    torch.testing.assert_close(mass.sum(-1), torch.full((1, 1, 3), 0.5), atol=1e-6, rtol=0)
