"""Autoregressive models as they run: the few-step sampler of distilled models, the sink + window
KV cache, capture by timestep value (docs/autoregressive.md).

Tolerance for rollout-vs-teacher-forced rows: 2e-5, as in tests/test_rollout.py (float32 forward
of a 4-layer model; the two routes batch the time embedding differently).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from attn_harness.core import frames
from attn_harness.core.checks import run_check
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.model.capture import Recorder, capture
from attn_harness.model.models import load_model
from attn_harness.sampling.extract import extract
from attn_harness.sampling.rollout import run_rollout
from attn_harness.sampling.samplers import FewStepSampler, UniPCSampler, few_step_timesteps, warp_timestep

TOLERANCE = 2e-5
FEW_STEPS = (1000.0, 750.0, 500.0, 250.0)


@pytest.fixture(scope="module")
def causal_model():
    return load_model("tiny-trained-causal")


def _probe(**changes) -> Probe:
    base = Probe(sample_steps=3, capture_steps=("first", "last"), device="cpu", guidance=3.0)
    return base.replace(**changes)


# --- the few-step sampler -------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_warped_timesteps_are_self_forcings_shifted_table_read_at_1000_minus_t(shift):
    """Self-Forcing's FlowMatchScheduler(shift, sigma_min=0, extra_one_step) with 1000 training steps,
    a 0 appended, indexed at 1000 - t (its warp_denoising_step)."""
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    table = torch.cat([shift * sigmas / (1 + (shift - 1) * sigmas) * 1000, torch.zeros(1, dtype=torch.float64)])
    for t in (1000, 750, 500, 250, 125, 1):
        assert warp_timestep(t, shift) == pytest.approx(float(table[1000 - t]), abs=1e-9)
    assert few_step_timesteps(Probe(denoising_timesteps=FEW_STEPS, warp_timesteps=False)) == list(FEW_STEPS)


def test_few_step_predicts_x0_then_renoises_with_fresh_seeded_noise_and_returns_x0_at_the_last_step():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 3, 2, 2, generator=gen), torch.randn(1, 4, 3, 2, 2, generator=gen)
    probe = Probe(denoising_timesteps=FEW_STEPS, warp_timesteps=False)
    sampler = FewStepSampler(probe, torch.device("cpu"), [torch.Generator().manual_seed(9)])
    velocity = eps - x0  # flow matching: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0
    x_t = 0.75 * x0 + 0.25 * eps
    torch.testing.assert_close(sampler.step(3, velocity, x_t), x0, atol=1e-6, rtol=0)
    x_1000 = eps
    fresh = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(sampler.step(0, velocity, x_1000), 0.25 * x0 + 0.75 * fresh, atol=1e-6, rtol=0)


def test_probe_validates_the_new_fields():
    with pytest.raises(HarnessError, match="descending"):
        Probe(denoising_timesteps=(250.0, 500.0))
    with pytest.raises(HarnessError, match="sink-window only"):
        Probe(mask="block-causal", sink_frames=3)
    with pytest.raises(HarnessError, match="block-causal or sink-window"):
        Probe(mode="rollout", mask="bidirectional")
    assert Probe(mode="rollout").mask == "block-causal"  # rollout implies a causal mask
    with pytest.raises(HarnessError, match="capture_timesteps"):
        Probe(capture_timesteps=(1200.0,))


# --- rollout under a sink + window cache ------------------------------------------------------


def test_ten_block_few_step_rollout_under_a_sink_window_cache(causal_model):
    probe = _probe(num_frames=1 + 29 * 4, mode="rollout", mask="sink-window", sink_frames=3, window_frames=6,
                   denoising_timesteps=FEW_STEPS, capture_steps=("first", "last"))
    started = time.perf_counter()
    ds = extract(causal_model, probe, progress=False)
    print(f"10 blocks x 4 steps with CFG: {time.perf_counter() - started:.2f} s")
    assert ds.sizes["query_frame"] == 30 and ds["query_block"].values.tolist() == [f // 3 for f in range(30)]
    visible = frames.sink_window_mask(30, 3, 3, 6)
    assert np.isnan(ds.logits.values[..., ~visible]).all() and np.isfinite(ds.logits.values[..., visible]).all()
    assert (ds.mass.values[..., ~visible] == 0).all()
    np.testing.assert_allclose(ds.mass.sum("key_frame").values, 1.0, atol=1e-5)
    np.testing.assert_allclose(ds["timestep"].values, [warp_timestep(1000, 3.0), warp_timestep(250, 3.0)])
    assert "at most 9 frames cached" in ds.attrs["rollout_context"]
    assert ds.attrs["sink_frames"] == 3 and ds.attrs["window_frames"] == 6
    assert run_check(ds, "causal", {}).status == "pass"
    assert run_check(ds, "causal", {"metric": "logits"}).status == "pass"
    assert run_check(ds, "row_stochastic", {}).status == "pass"


def test_causal_property_fails_when_an_evicted_frame_holds_mass(causal_model):
    probe = _probe(num_frames=1 + 11 * 4, mode="rollout", mask="sink-window", sink_frames=3, window_frames=3,
                   denoising_timesteps=(1000.0, 500.0))
    ds = extract(causal_model, probe, progress=False)
    leaked = ds.copy(deep=True)
    leaked["mass"].loc[dict(query_frame=10, key_frame=4)] = 0.01  # frame 4 is evicted for block 3 (frames 9-11)
    result = run_check(leaked, "causal", {})
    assert result.status == "fail" and "evicted from the cache" in result.message


def test_rollout_with_one_block_and_one_step_equals_the_teacher_forced_pass_on_that_block(causal_model):
    one = dict(num_frames=9, mask="sink-window", sink_frames=1, window_frames=1, denoising_timesteps=(1000.0,),
               capture_steps=(0,))
    rollout = extract(causal_model, _probe(mode="rollout", **one), progress=False)
    teacher_forced = extract(causal_model, _probe(**one), progress=False)
    for metric in ("logits", "mass"):
        np.testing.assert_allclose(rollout[metric].values, teacher_forced[metric].values, atol=TOLERANCE, rtol=0)


def _masked_pass_rows(model, context, block, timestep, cond, visible):
    """A masked teacher-forced pass over [clean context at timestep 0, block at ``timestep``]."""
    x = torch.cat([context, block], dim=2)
    tpf = (x.shape[3] // 2) * (x.shape[4] // 2)
    recorder = Recorder(tokens_per_frame=tpf, mask=torch.from_numpy(visible), active=True)
    per_token = torch.cat([torch.zeros(context.shape[2] * tpf), torch.full((block.shape[2] * tpf,), float(timestep))])
    with torch.inference_mode(), capture(model.transformer, [0, 3], recorder):
        model.transformer(hidden_states=x, timestep=per_token[None], encoder_hidden_states=cond, return_dict=False)
    return recorder.records


def test_last_block_rows_of_a_few_step_sink_window_rollout_equal_a_masked_pass_over_the_clean_past(causal_model):
    probe = _probe(num_frames=1 + 11 * 4, mode="rollout", mask="sink-window", sink_frames=3, window_frames=3,
                   denoising_timesteps=FEW_STEPS, guidance=1.0)
    noise = torch.randn(1, 16, 12, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = causal_model.encode_prompt(probe.prompt)
    result = run_rollout(causal_model, probe, layers=[0, 3], capture_steps=[2], noise=noise, cond=cond, uncond=None,
                         trace=True)
    assert result.peak_cached_frames == 6
    visible = frames.sink_window_mask(12, 3, 3, 3)
    records = _masked_pass_rows(causal_model, result.latents[:, :, :9], result.block_inputs[(3, 2)],
                                result.timesteps[2], cond, visible)
    for layer in (0, 3):
        for metric in ("logits", "mass"):
            got = result.records[(2, layer)][metric][:, 9:12]
            want = records[(0, layer)][metric][0, :, 9:12]
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE, equal_nan=True)


# --- capture by timestep value -----------------------------------------------------------------


def test_capture_timesteps_pick_the_nearest_steps_of_any_schedule(causal_model):
    few = _probe(num_frames=9, denoising_timesteps=FEW_STEPS, warp_timesteps=False, capture_timesteps=(999.0, 500.0),
                 mask="block-causal")
    ds = extract(causal_model, few, progress=False)
    assert ds["step"].values.tolist() == [0, 2] and ds["timestep"].values.tolist() == [1000.0, 500.0]
    probe = _probe(num_frames=9, sample_steps=6, capture_timesteps=(999.0, 500.0))
    schedule = UniPCSampler(probe, torch.device("cpu")).timesteps.numpy()
    unipc = extract(causal_model, probe, progress=False)
    assert unipc["step"].values.tolist() == [int(np.argmin(np.abs(schedule - t))) for t in (999.0, 500.0)]
    assert unipc["step"].values.tolist() != [0, 2]  # the same values pick other step indices on another schedule


# --- the teacher-forced pass under a sink + window mask ---------------------------------------


def test_teacher_forced_sink_window_pass_computes_what_a_token_masked_model_computes(causal_model):
    model = causal_model.transformer
    visible = torch.from_numpy(frames.sink_window_mask(12, 3, 3, 3))
    gen = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 16, 12, 8, 8, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 16, 64, generator=gen), return_dict=False)
    token_mask = visible.repeat_interleave(16, 0).repeat_interleave(16, 1)

    class TokenMasked:  # the textbook way: the stock processor with an N x N boolean mask
        def __init__(self, stock):
            self.stock = stock

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return self.stock(attn, hidden_states, None, token_mask, rotary_emb)

    stock = [block.attn1.processor for block in model.blocks]
    with torch.inference_mode():
        try:
            for block, processor in zip(model.blocks, stock):
                block.attn1.set_processor(TokenMasked(processor))
            want = model(**inputs)[0]
        finally:
            for block, processor in zip(model.blocks, stock):
                block.attn1.set_processor(processor)
        recorder = Recorder(tokens_per_frame=16, mask=visible, active=True)
        with capture(model, [1], recorder):
            got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
    stats = recorder.records[(0, 1)]
    assert stats["logits"][0][:, ~visible].isnan().all() and (stats["mass"][0][:, ~visible] == 0).all()
    assert not torch.allclose(got, model(**inputs)[0], atol=1e-3)  # the mask changes the output
