"""Sampler run with capture hooks -> one ``xarray.Dataset`` (docs/design.md, "Data contract").

Wan's text-to-video sampling on latents: flow matching with diffusers' UniPC multistep
scheduler (or the few-step sampler of distilled models), classifier-free guidance with the
conditional forward first, seeded noise. The capture records the self-attention (and, if
asked, the text cross-attention) of the chosen layers at the chosen denoising steps, on the
conditional branch by default. ``mode: rollout`` hands over to ``sampling.rollout``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
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
    RunSetup,
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
    if probe.is_population:
        return extract_population(loaded, probe, progress=progress)
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
    denoise(transformer, sampler, setup.noise.clone(), setup.branches, recorder, probe, steps, setup.layers, progress)
    return _sample_dataset(setup, recorder, steps, timesteps, index=0)


def denoise(transformer, sampler, latents: torch.Tensor, branches: dict[str, torch.Tensor], recorder: Recorder,
            probe: Probe, steps: Sequence[int], layers: Sequence[int], progress: bool | None) -> None:
    """The sampling loop over a batch of latents, capturing on ``probe.branch`` at ``steps``."""
    dtype = DTYPES[probe.dtype]
    show = sys.stderr.isatty() if progress is None else progress
    with torch.inference_mode(), capture(transformer, layers, recorder):
        for step, timestep in enumerate(tqdm(sampler.timesteps, desc="denoising", unit="step", disable=not show)):
            wanted = step in steps
            recorder.step = step
            model_input = latents.to(dtype)
            t = timestep.expand(latents.shape[0])

            def forward(branch: str) -> torch.Tensor:
                return transformer(hidden_states=model_input, timestep=t, encoder_hidden_states=branches[branch],
                                   return_dict=False)[0]

            def on_branch(branch: str | None) -> None:
                recorder.active = wanted and branch == probe.branch

            velocity = guided_velocity(forward, probe.guidance, list(branches), on_branch)
            latents = sampler.step(step, velocity, latents)


def _sample_dataset(setup: RunSetup, recorder: Recorder, steps: Sequence[int], timesteps: torch.Tensor, index: int) -> xr.Dataset:
    """Sample ``index`` of the batch the recorder captured, as the contract's Dataset."""
    probe = setup.probe
    return records_to_dataset(
        {key: {metric: value[index] for metric, value in stats.items()} for key, stats in recorder.records.items()},
        metrics=recorder.frame_metrics,
        steps=steps,
        timesteps=[float(timesteps[s]) for s in steps],
        layers=setup.layers,
        attrs=run_attrs(setup),
        text_records={key: value[index] for key, value in recorder.text_records.items()},
        text_content=content_tokens(setup.cond if probe.branch == "cond" else setup.uncond),
        text_strings=token_strings(setup) if TEXT_METRIC in probe.metrics else None,
    )


def extract_population(loaded: LoadedModel, probe: Probe, progress: bool | None = None) -> xr.Dataset:
    """Every (prompt, seed) sample of ``probe``, ``sample_batch`` at a time through the model, stacked
    along ``sample``. Each sample is set up as a single run of its prompt and its noise seed."""
    samples = probe.samples()
    datasets: list[xr.Dataset] = []
    for start in range(0, len(samples), probe.sample_batch):
        batch = samples[start : start + probe.sample_batch]
        setups = [
            prepare_run(loaded, probe.replace(prompt=prompt, seed=probe.noise_seed(prompt, seed), prompts=(), seeds=()))
            for prompt, seed in batch
        ]
        first = setups[0]
        recorder = Recorder(tokens_per_frame=first.geo["tokens_per_frame"], metrics=tuple(probe.metrics),
                            mask=frame_mask(probe, first.geo["latent_frames"]))
        sampler = make_sampler(probe, first.device, first.generator)
        steps = capture_steps(probe, sampler.timesteps.tolist())
        branches = {name: torch.cat([setup.branches[name] for setup in setups]) for name in first.branches}
        denoise(loaded.transformer, sampler, torch.cat([setup.noise for setup in setups]), branches, recorder, probe, steps,
                first.layers, progress)
        datasets += [_sample_dataset(setup, recorder, steps, sampler.timesteps, index) for index, setup in enumerate(setups)]
    return stack_samples(datasets, samples)


# Attrs that differ between the samples of a population; the stacked dataset lists them per sample.
SAMPLE_ATTRS = ("prompt", "seed", "prompt_embedding_fingerprint", "negative_prompt_embedding_fingerprint", "created")


def stack_samples(datasets: Sequence[xr.Dataset], samples: Sequence[tuple[str, int]]) -> xr.Dataset:
    """One dataset per (prompt, seed) -> one with a leading ``sample`` dim and ``prompt``/``seed`` coords."""
    stacked = xr.concat([ds.drop_attrs() for ds in datasets], dim="sample")
    stacked = stacked.assign_coords(
        sample=np.arange(len(samples), dtype=np.int64),
        prompt=("sample", np.asarray([prompt for prompt, _ in samples], dtype=object)),
        seed=("sample", np.asarray([seed for _, seed in samples], dtype=np.int64)),
    )
    for name in stacked.data_vars:
        stacked[name].attrs = dict(datasets[0][name].attrs)
    stacked.attrs = {key: value for key, value in datasets[0].attrs.items() if key not in SAMPLE_ATTRS}
    stacked.attrs.update({
        "prompt": [prompt for prompt, _ in samples],
        "seed": [seed for _, seed in samples],
        "prompt_embedding_fingerprint": [ds.attrs["prompt_embedding_fingerprint"] for ds in datasets],
        "created": datasets[-1].attrs["created"],
    })
    return stacked
