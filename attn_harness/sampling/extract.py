"""Sampler run with capture hooks -> one ``xarray.Dataset`` (docs/design.md, "Data contract").

Wan's text-to-video sampling on latents: flow matching with diffusers' UniPC multistep
scheduler (or the few-step sampler of distilled models), classifier-free guidance with the
conditional forward first, seeded noise. The capture records the self-attention (and, if
asked, the text cross-attention) of the chosen layers at the chosen denoising steps, on the
conditional branch by default. ``mode: rollout`` hands over to ``sampling.rollout``.
"""

from __future__ import annotations

import sys

import torch
import xarray as xr
from tqdm.auto import tqdm

from attn_harness.core.probe import Probe
from attn_harness.model.capture import TEXT_METRIC, Recorder, capture
from attn_harness.model.models import LoadedModel, load_model
from attn_harness.model.numerics import numerics_policy
from attn_harness.sampling.rollout import extract_rollout
from attn_harness.sampling.run import (
    DTYPES,
    capture_steps,
    content_tokens,
    frame_mask,
    guided_velocity,
    prepare_run,
    records_to_dataset,
    resolve_device,
    run_attrs,
    token_strings,
)
from attn_harness.sampling.samplers import make_sampler


def extract(
    model: str | LoadedModel,
    probe: Probe = Probe(),
    *,
    progress: bool | None = None,
    base_model: str | None = None,
) -> xr.Dataset:
    """Run the sampler on ``model`` with capture as ``probe`` says and return the Dataset.

    ``base_model`` (a model dir) gives a training checkpoint file its architecture and text encoder.
    The run is under the dtype's numerics policy, recorded in the attrs (``attn_harness.model.numerics``).
    """
    device = resolve_device(probe.device)
    with numerics_policy(probe.dtype, device) as applied:
        ds = _extract(model, probe, device, progress=progress, base_model=base_model)
    ds.attrs.update(applied.attrs())
    return ds


def _extract(model: str | LoadedModel, probe: Probe, device: torch.device, *, progress: bool | None,
             base_model: str | None) -> xr.Dataset:
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=DTYPES[probe.dtype], device=device, base_model=base_model)
    if probe.mode == "rollout":
        return extract_rollout(loaded, probe, progress=progress)
    setup = prepare_run(loaded, probe)
    transformer = loaded.transformer
    recorder = Recorder(
        tokens_per_frame=setup.geo["tokens_per_frame"],
        metrics=tuple(probe.metrics),
        mask=frame_mask(probe, setup.geo["latent_frames"]),
    )
    sampler = make_sampler(probe, setup.device, setup.generator)
    timesteps = sampler.timesteps
    steps = capture_steps(probe, timesteps.tolist())
    dtype = DTYPES[probe.dtype]
    latents = setup.noise.clone()
    show = sys.stderr.isatty() if progress is None else progress

    with torch.inference_mode(), capture(transformer, setup.layers, recorder):
        for step, timestep in enumerate(tqdm(timesteps, desc="denoising", unit="step", disable=not show)):
            wanted = step in steps
            recorder.step = step
            model_input = latents.to(dtype)
            t = timestep.expand(1)

            def forward(branch: str) -> torch.Tensor:
                return transformer(hidden_states=model_input, timestep=t, encoder_hidden_states=setup.branches[branch],
                                   return_dict=False)[0]

            def on_branch(branch: str | None) -> None:
                recorder.active = wanted and branch == probe.branch

            velocity = guided_velocity(forward, probe.guidance, list(setup.branches), on_branch)
            latents = sampler.step(step, velocity, latents)

    batch0 = {key: {metric: value[0] for metric, value in stats.items()} for key, stats in recorder.records.items()}
    return records_to_dataset(
        batch0,
        metrics=recorder.frame_metrics,
        steps=steps,
        timesteps=[float(timesteps[s]) for s in steps],
        layers=setup.layers,
        attrs=run_attrs(setup),
        text_records={key: value[0] for key, value in recorder.text_records.items()},
        text_content=content_tokens(setup.cond if probe.branch == "cond" else setup.uncond),
        text_strings=token_strings(setup) if TEXT_METRIC in probe.metrics else None,
    )
