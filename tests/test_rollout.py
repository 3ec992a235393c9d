"""The block-by-block rollout: one block is the bidirectional pass; block b's rows are a
block-causal pass over [clean earlier blocks at timestep 0, block b's noisy latents]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_harness.core import frames
from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import blocks
from attn_harness.core.probe import Probe
from attn_harness.model.capture import Recorder, capture
from attn_harness.model.models import load_model
from attn_harness.sampling.extract import extract
from attn_harness.sampling.rollout import run_rollout

TOLERANCE = 2e-5  # float32 forward of a 4-layer model; the two routes batch the time embedding differently


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def _probe(**changes) -> Probe:
    base = Probe(height=32, width=32, sample_steps=3, capture_steps=("first", "last"), device="cpu", guidance=3.0)
    return base.replace(**changes)


def test_blocks_cover_the_clip_in_order_with_a_shorter_last_block():
    assert blocks(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert blocks(21, 3)[-1] == range(18, 21)


def test_rollout_with_one_block_equals_the_bidirectional_pass_bitwise(tiny):
    # 9 pixel frames -> 3 latent frames = one block of 3
    bidirectional = extract(tiny, _probe(num_frames=9), progress=False)
    rollout = extract(tiny, _probe(num_frames=9, mask="block-causal", mode="rollout"), progress=False)
    for metric in ("logits", "mass"):
        np.testing.assert_array_equal(rollout[metric].values, bidirectional[metric].values)
    assert rollout.attrs["mode"] == "rollout" and rollout.attrs["rollout_steps_per_block"] == 3


def test_rollout_rows_outside_the_visible_blocks_are_nan_logits_and_zero_mass(tiny):
    ds = extract(tiny, _probe(num_frames=21, mask="block-causal", mode="rollout"), progress=False)  # 6 frames, 2 blocks
    visible = frames.block_causal_mask(6, 3)
    assert np.isnan(ds.logits.values[..., ~visible]).all() and np.isfinite(ds.logits.values[..., visible]).all()
    assert (ds.mass.values[..., ~visible] == 0).all()
    np.testing.assert_allclose(ds.mass.sum("key_frame").values, 1.0, atol=1e-5)


def _teacher_forced_rows(tiny, context: torch.Tensor, block: torch.Tensor, timestep, context_timestep, cond, block_size):
    """Block-causal pass over [context, block] with per-token timesteps; stats of all rows."""
    x = torch.cat([context, block], dim=2)
    latent_frames, tpf = x.shape[2], (x.shape[3] // 2) * (x.shape[4] // 2)
    mask = torch.from_numpy(frames.block_causal_mask(latent_frames, block_size))
    recorder = Recorder(tokens_per_frame=tpf, mask=mask, active=True)
    per_token = torch.cat(
        [torch.full((context.shape[2] * tpf,), float(context_timestep)), torch.full((block.shape[2] * tpf,), float(timestep))]
    )
    with torch.inference_mode(), capture(tiny.transformer, [0, 3], recorder):
        tiny.transformer(hidden_states=x, timestep=per_token[None], encoder_hidden_states=cond, return_dict=False)
    return recorder.records


@pytest.mark.parametrize("context_at_timestep_zero", [True, False], ids=["clean-context", "noisy-context"])
def test_last_block_rows_equal_a_block_causal_pass_over_clean_context(tiny, context_at_timestep_zero):
    probe = _probe(num_frames=21, mask="block-causal", mode="rollout", guidance=1.0, capture_steps=(1,))
    noise = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = tiny.encode_prompt(probe.prompt)
    result = run_rollout(tiny, probe, layers=[0, 3], capture_steps=[1], noise=noise, cond=cond, uncond=None, trace=True)
    t = result.timesteps[1]
    records = _teacher_forced_rows(
        tiny, result.latents[:, :, :3], result.block_inputs[(1, 1)], t, 0.0 if context_at_timestep_zero else t, cond, 3
    )
    for layer in (0, 3):
        for metric in ("logits", "mass"):
            got = result.records[(1, layer)][metric][:, 3:6]
            want = records[(0, layer)][metric][0, :, 3:6]
            close = torch.allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE, equal_nan=True)
            assert close == context_at_timestep_zero, (layer, metric, float((got - want).nan_to_num().abs().max()))


def test_rollout_implies_the_block_causal_mask_and_refuses_bidirectional():
    assert Probe(mode="rollout").mask == "block-causal"
    with pytest.raises(HarnessError, match="rollout.*set it to block-causal or sink-window"):
        Probe(mode="rollout", mask="bidirectional")
