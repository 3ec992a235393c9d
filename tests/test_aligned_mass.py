"""aligned_mass: the probability a query sends to the key at its own spatial position in each frame.

Tolerance: each probability is exp(score - row logsumexp) in float32. The score's rounding
error is ~1e-7 of |q||k|/sqrt(d) and exp turns it into the same relative error of a value in
[0, 1], so we allow 1e-5 of max(|q||k|/sqrt(d), 1) absolute (observed ~1e-7).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings

from attn_harness.model.capture import frame_stats
from tests.oracle import brute_force_stats
from tests.test_capture import qk_cases


def assert_aligned_matches_oracle(q, k, tokens_per_frame, mask=None):
    got = frame_stats(q, k, tokens_per_frame, mask=mask, metrics=("logits", "mass", "aligned_mass"))
    want = brute_force_stats(q, k, tokens_per_frame, mask)
    scale = (q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()).item() / q.shape[-1] ** 0.5
    assert got["aligned_mass"].dtype == torch.float32
    torch.testing.assert_close(got["aligned_mass"].double(), want["aligned_mass"], atol=1e-5 * max(scale, 1.0), rtol=0)


@settings(max_examples=60, deadline=None)
@given(qk_cases())
def test_aligned_mass_equals_the_float64_brute_force(case):
    q, k, per_frame, mask = case
    assert_aligned_matches_oracle(q, k, per_frame, mask)


def test_aligned_mass_is_part_of_mass_and_zero_where_masked():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6 * 5, 3, 8, generator=gen), torch.randn(2, 6 * 5, 3, 8, generator=gen)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    got = frame_stats(q, k, 5, mask=mask, metrics=("mass", "aligned_mass"))
    assert bool((got["aligned_mass"] <= got["mass"] + 1e-7).all())
    assert bool((got["aligned_mass"][..., ~mask] == 0).all())


def test_a_head_that_looks_only_at_its_own_position_has_aligned_mass_equal_to_mass():
    # keys equal to the queries and far apart per position: every query attends to its own
    # position, spread evenly over the frames (all frames share the same key vectors)
    positions, frames, dim = 4, 3, 16
    basis = torch.eye(dim)[:positions] * 12.0
    q = basis.repeat(frames, 1)[None, :, None, :]
    got = frame_stats(q, q.clone(), positions, metrics=("mass", "aligned_mass"))
    torch.testing.assert_close(got["aligned_mass"], got["mass"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["mass"], torch.full_like(got["mass"], 1 / frames), atol=1e-6, rtol=0)


def test_bfloat16_queries_give_float32_aligned_mass_of_the_same_values():
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4 * 6, 2, 8, generator=gen), torch.randn(1, 4 * 6, 2, 8, generator=gen)
    q16, k16 = q.bfloat16(), k.bfloat16()
    got = frame_stats(q16, k16, 6, metrics=("aligned_mass",))["aligned_mass"]
    want = brute_force_stats(q16.float(), k16.float(), 6)["aligned_mass"]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
