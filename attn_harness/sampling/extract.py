"""Sampler run with capture hooks -> one ``xarray.Dataset`` (docs/design.md, "Data contract").

Wan's text-to-video sampling on latents: flow matching with diffusers' UniPC multistep
scheduler (or the few-step sampler of distilled models), classifier-free guidance with the
conditional forward first, seeded noise. The capture records the self-attention (and, if
asked, the text cross-attention) of the chosen layers at the chosen denoising steps, on the
conditional branch by default. ``mode: rollout`` hands over to ``sampling.rollout``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from attn_harness.core.probe import Probe
from attn_harness.model.capture import FRAME_METRICS, TEXT_METRIC, Recorder, capture
from attn_harness.model.models import LoadedModel, load_model
from attn_harness.model.numerics import numerics_policy
from attn_harness.model.prompts import Conditioning
from attn_harness.sampling.rollout import extract_rollout
from attn_harness.sampling.run import (
    DTYPES,
    RunSetup,
    capture_steps,
    conditioning,
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

Key = tuple[int, int]  # (step, layer)
Records = Mapping[Key, Mapping[str, torch.Tensor]]


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
    loaded = (model if isinstance(model, LoadedModel)
              else load_model(model, dtype=DTYPES[probe.dtype], device=device, base_model=base_model))
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
    return _sample_dataset(setup, recorder.records, recorder.text_records, steps, timesteps, index=0)


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


def _sample_dataset(setup: RunSetup, records: Records, text_records: Mapping[Key, torch.Tensor], steps: Sequence[int],
                    timesteps: torch.Tensor, index: int) -> xr.Dataset:
    """Sample ``index`` of the batch the records hold (``(step, layer) -> [batch, ...]``), as the contract's Dataset."""
    probe = setup.probe
    return records_to_dataset(
        {key: {metric: value[index] for metric, value in stats.items()} for key, stats in records.items()},
        metrics=[metric for metric in probe.metrics if metric in FRAME_METRICS],
        steps=steps,
        timesteps=[float(timesteps[s]) for s in steps],
        layers=setup.layers,
        attrs=run_attrs(setup),
        text_records={key: value[index] for key, value in text_records.items()},
        text_content=content_tokens(setup.cond if probe.branch == "cond" else setup.uncond),
        text_strings=token_strings(setup) if TEXT_METRIC in probe.metrics else None,
    )


def extract_population(loaded: LoadedModel, probe: Probe, progress: bool | None = None) -> xr.Dataset:
    """Every (prompt, seed) sample of ``probe`` as one dataset with a leading ``sample`` dim.

    Each sample is set up as a single run of its prompt and its noise seed (each prompt encoded
    once); ``sample_batch`` samples at a time go through the model. The statistics of all batches
    are concatenated as tensors and become one dataset: per-sample datasets stacked by xarray
    cost as much as the extraction itself.
    """
    setups = _sample_setups(loaded, probe)
    frame_parts: dict[Key, dict[str, list[torch.Tensor]]] = {}
    text_parts: dict[Key, list[torch.Tensor]] = {}
    for start in range(0, len(setups), probe.sample_batch):
        batch = setups[start : start + probe.sample_batch]
        recorder = Recorder(tokens_per_frame=batch[0].geo["tokens_per_frame"], metrics=tuple(probe.metrics),
                            mask=frame_mask(probe, batch[0].geo["latent_frames"]))
        sampler = make_sampler(probe, batch[0].device, [setup.generator for setup in batch])
        steps = capture_steps(probe, sampler.timesteps.tolist())
        branches = {name: torch.cat([setup.branches[name] for setup in batch]) for name in batch[0].branches}
        denoise(loaded.transformer, sampler, torch.cat([setup.noise for setup in batch]), branches, recorder, probe, steps,
                batch[0].layers, progress)
        for key, stats in recorder.records.items():
            for metric, value in stats.items():
                frame_parts.setdefault(key, {}).setdefault(metric, []).append(value)
        for key, value in recorder.text_records.items():
            text_parts.setdefault(key, []).append(value)
    records = {key: {metric: torch.cat(values) for metric, values in stats.items()} for key, stats in frame_parts.items()}
    text_records = {key: torch.cat(values) for key, values in text_parts.items()}
    template = _sample_dataset(setups[0], records, text_records, steps, sampler.timesteps, index=0)
    layers = setups[0].layers
    arrays = {metric: _stacked({key: stats[metric] for key, stats in records.items()}, steps, layers)
              for metric in recorder.frame_metrics}
    if text_records:
        arrays[TEXT_METRIC] = _stacked(text_records, steps, layers)
    fingerprints = [setup.text.attrs()["prompt_embedding_fingerprint"] for setup in setups]
    return population_dataset(template, arrays, probe.samples(), fingerprints, _text_coords(setups, template))


def _stacked(by_key: Mapping[Key, torch.Tensor], steps: Sequence[int], layers: Sequence[int]) -> np.ndarray:
    """``(step, layer) -> [sample, ...]`` as one array ``[sample, step, layer, ...]``."""
    return np.stack([np.stack([by_key[(s, layer)].numpy() for layer in layers], axis=1) for s in steps], axis=1)


def _text_coords(setups: Sequence[RunSetup], template: xr.Dataset) -> dict[str, np.ndarray]:
    """Each sample's ``text_content`` and ``text_token_string`` (they follow its prompt), ``[sample, text_token]``."""
    if TEXT_METRIC not in template.data_vars:
        return {}
    branch = setups[0].probe.branch
    content = [content_tokens(setup.cond if branch == "cond" else setup.uncond) for setup in setups]
    coords = {"text_content": np.asarray(content, dtype=np.int8)}
    if "text_token_string" in template.coords:
        coords["text_token_string"] = np.asarray([token_strings(setup) for setup in setups], dtype=str)
    return coords


def _sample_setups(loaded: LoadedModel, probe: Probe) -> list[RunSetup]:
    """Each sample as the single run of its prompt with its noise seed; each prompt is encoded once."""
    texts: dict[str, Conditioning] = {}
    setups = []
    for prompt, seed in probe.samples():
        single = probe.replace(prompt=prompt, seed=probe.noise_seed(prompt, seed), prompts=(), seeds=())
        if prompt not in texts:
            texts[prompt] = conditioning(loaded, single)
        setups.append(prepare_run(loaded, single, text=texts[prompt]))
    return setups


# Attrs that differ between the samples of a population; the stacked dataset lists them per sample.
SAMPLE_ATTRS = ("prompt", "seed", "prompt_embedding_fingerprint", "negative_prompt_embedding_fingerprint", "created")


def population_dataset(template: xr.Dataset, arrays: Mapping[str, np.ndarray], samples: Sequence[tuple[str, int]],
                       fingerprints: Sequence[str], per_sample: Mapping[str, np.ndarray] | None = None) -> xr.Dataset:
    """One sample's dataset as ``template`` (coords, variable and run attrs) with ``arrays``, ``[sample, ...]``
    per variable, as its data: a leading ``sample`` dim with ``prompt``/``seed`` coords, per-sample attrs as lists.
    ``per_sample``: coords that differ between samples (the text tokens' ``text_content``), ``[sample, ...]``."""
    data_vars = {name: (("sample", *template[name].dims), arrays[name], template[name].attrs) for name in template.data_vars}
    coords = {
        "sample": np.arange(len(samples), dtype=np.int64),
        "prompt": ("sample", np.asarray([prompt for prompt, _ in samples], dtype=object)),
        "seed": ("sample", np.asarray([seed for _, seed in samples], dtype=np.int64)),
        **{name: coord.variable for name, coord in template.coords.items()},
        **{name: (("sample", *template[name].dims), values) for name, values in (per_sample or {}).items()},
    }
    stacked = xr.Dataset(data_vars, coords=coords)
    stacked.attrs = {key: value for key, value in template.attrs.items() if key not in SAMPLE_ATTRS}
    stacked.attrs.update({
        "prompt": [prompt for prompt, _ in samples],
        "seed": [seed for _, seed in samples],
        "prompt_embedding_fingerprint": list(fingerprints),
        "created": template.attrs["created"],
    })
    return stacked


# Coords that follow a sample's prompt: stacked along ``sample`` when samples are.
SAMPLE_COORD_NAMES = ("text_content", "text_token_string")


def stack_samples(datasets: Sequence[xr.Dataset], samples: Sequence[tuple[str, int]]) -> xr.Dataset:
    """One dataset per (prompt, seed) -> one with a leading ``sample`` dim and ``prompt``/``seed`` coords."""
    arrays = {name: np.stack([ds[name].values for ds in datasets]) for name in datasets[0].data_vars}
    per_sample = {name: np.stack([ds[name].values for ds in datasets])
                  for name in SAMPLE_COORD_NAMES if name in datasets[0].coords}
    return population_dataset(datasets[0], arrays, samples, [ds.attrs["prompt_embedding_fingerprint"] for ds in datasets],
                              per_sample)
