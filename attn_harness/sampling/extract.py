"""Sampler run with capture hooks -> one ``xarray.Dataset`` (DESIGN.md section 4).

Wan's text-to-video sampling on latents: flow matching with diffusers' UniPC multistep
scheduler, classifier-free guidance with the conditional forward first, seeded noise. The
capture records the self-attention of the chosen layers at the chosen denoising steps, on
the conditional branch by default.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Mapping, Sequence

import diffusers
import numpy as np
import torch
import xarray as xr
from diffusers import UniPCMultistepScheduler
from tqdm.auto import tqdm

import attn_harness
from attn_harness.core import frames
from attn_harness.model.capture import Recorder, capture
from attn_harness.core.errors import HarnessError
from attn_harness.core.metrics import default_query_frames
from attn_harness.model.models import LoadedModel, load_model
from attn_harness.model.numerics import numerics_policy
from attn_harness.core.probe import Probe
from attn_harness.model.prompts import Conditioning, resolve_conditioning
from attn_harness.core.schema import METRICS, SCHEMA_VERSION, build_dataset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_ENV = "ATTN_DEVICE"


def resolve_device(device: str) -> torch.device:
    """``auto`` is ``$ATTN_DEVICE`` if set (the test suite pins ``cpu``), else CUDA when present;
    an explicit CUDA device without CUDA is an error."""
    if device == "auto":
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise HarnessError(f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {device!r} requested but no CUDA device is available: use --device cpu")
    return resolved


def resolve_steps(spec: Sequence[int | str], sample_steps: int) -> list[int]:
    """``first``/``mid``/``last`` and integers -> sorted unique step indices within range."""
    named = {"first": 0, "mid": sample_steps // 2, "last": sample_steps - 1}
    steps = set()
    for item in spec:
        if isinstance(item, str) and item in named:
            steps.add(named[item])
            continue
        try:
            step = int(item)
        except (TypeError, ValueError):
            raise HarnessError(f"capture step {item!r} is not first, mid, last or an integer") from None
        if not 0 <= step < sample_steps:
            raise HarnessError(f"capture step {step} is out of range: sampling runs steps 0-{sample_steps - 1}")
        steps.add(step)
    if not steps:
        raise HarnessError("no capture steps given")
    return sorted(steps)


def resolve_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    layers = sorted(set(int(layer) for layer in spec))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise HarnessError(f"layer(s) {bad} out of range: this model has {num_layers} layers (0-{num_layers - 1})")
    if not layers:
        raise HarnessError("no layers given")
    return layers


def probe_geometry(probe: Probe, loaded: LoadedModel) -> dict[str, int]:
    geometry = loaded.geometry
    num_frames = probe.num_frames or geometry.num_frames
    height = probe.height or geometry.height
    width = probe.width or geometry.width
    try:
        latent_frames = frames.num_latent_frames(num_frames, geometry.temporal_stride)
        per_frame = frames.tokens_per_frame(height, width, geometry.spatial_stride, tuple(loaded.config["patch_size"][1:]))
    except ValueError as err:
        raise HarnessError(str(err)) from err
    return {
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "latent_frames": latent_frames,
        "tokens_per_frame": per_frame,
        "latent_height": height // geometry.spatial_stride,
        "latent_width": width // geometry.spatial_stride,
        "temporal_stride": geometry.temporal_stride,
    }


def make_scheduler(probe: Probe) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=probe.shift,
        num_train_timesteps=1000,
    )


def conditioning(loaded: LoadedModel, probe: Probe) -> Conditioning:
    """The run's text embeddings: ``probe.prompt_embeds`` if given, else the model's encoder."""
    return resolve_conditioning(
        loaded.encode_prompt,
        loaded.prompt_encoder,
        prompt=probe.prompt,
        negative_prompt=probe.negative_prompt,
        prompt_embeds=probe.prompt_embeds,
        text_dim=loaded.config["text_dim"],
        use_cfg=probe.guidance > 1.0,
    )


def run_attrs(loaded: LoadedModel, probe: Probe, geo: dict[str, int], device: torch.device, text: Conditioning) -> dict:
    """The dataset attrs of one run (DESIGN.md section 4)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "extract",
        "model_id": loaded.model_id,
        "checkpoint_path": loaded.checkpoint_path,
        "checkpoint_fingerprint": loaded.fingerprint,
        "checkpoint_layout": loaded.layout,
        "model_architecture": loaded.architecture,
        "model_config": loaded.config,
        "prompt": probe.prompt,
        "negative_prompt": probe.negative_prompt,
        **text.attrs(),
        "seed": probe.seed,
        "height": geo["height"],
        "width": geo["width"],
        "num_frames": geo["num_frames"],
        "latent_frames": geo["latent_frames"],
        "tokens_per_frame": geo["tokens_per_frame"],
        "temporal_stride": geo["temporal_stride"],
        "block_size": probe.block_size,
        "mask": probe.mask,
        "mode": probe.mode,
        "dtype": probe.dtype,
        "device": str(device),
        "branch": probe.branch,
        "guidance": probe.guidance,
        "shift": probe.shift,
        "sample_steps": probe.sample_steps,
        "scheduler": "UniPCMultistepScheduler(flow_prediction, use_flow_sigmas)",
        "harness_version": attn_harness.__version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
    dtype = DTYPES[probe.dtype]
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device, base_model=base_model)
    if probe.mode == "rollout":
        from attn_harness.sampling.rollout import extract_rollout

        return extract_rollout(loaded, probe, progress=progress)
    transformer = loaded.transformer
    geo = probe_geometry(probe, loaded)
    layers = resolve_layers(probe.layers, len(transformer.blocks))
    capture_steps = resolve_steps(probe.capture_steps, probe.sample_steps)
    if probe.branch == "uncond" and probe.guidance <= 1.0:
        raise HarnessError("branch 'uncond' needs guidance > 1 (without guidance there is no unconditional pass)")

    mask = None
    if probe.mask == "block-causal":
        mask = torch.from_numpy(frames.block_causal_mask(geo["latent_frames"], probe.block_size))
    recorder = Recorder(tokens_per_frame=geo["tokens_per_frame"], metrics=tuple(m for m in METRICS if m in probe.metrics), mask=mask)

    text = conditioning(loaded, probe)
    cond = text.prompt.to(device=device, dtype=dtype)
    uncond = text.negative.to(device=device, dtype=dtype) if text.negative is not None else None
    shape = (1, loaded.config["in_channels"], geo["latent_frames"], geo["latent_height"], geo["latent_width"])
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(probe.seed), dtype=torch.float32).to(device)

    scheduler = make_scheduler(probe)
    scheduler.set_timesteps(probe.sample_steps, device=device)
    timesteps = scheduler.timesteps
    use_cfg = probe.guidance > 1.0
    show = sys.stderr.isatty() if progress is None else progress

    with torch.inference_mode(), capture(transformer, layers, recorder):
        for step, timestep in enumerate(tqdm(timesteps, desc="denoising", unit="step", disable=not show)):
            wanted = step in capture_steps
            recorder.step = step
            model_input = latents.to(dtype)
            t = timestep.expand(1)
            recorder.active = wanted and probe.branch == "cond"
            velocity = transformer(hidden_states=model_input, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            if use_cfg:
                recorder.active = wanted and probe.branch == "uncond"
                velocity_uncond = transformer(
                    hidden_states=model_input, timestep=t, encoder_hidden_states=uncond, return_dict=False
                )[0]
                velocity = velocity_uncond + probe.guidance * (velocity - velocity_uncond)
            recorder.active = False
            latents = scheduler.step(velocity.float(), timestep, latents, return_dict=False)[0]

    batch0 = {key: {metric: value[0] for metric, value in stats.items()} for key, stats in recorder.records.items()}
    return records_to_dataset(
        batch0,
        metrics=recorder.metrics,
        steps=capture_steps,
        timesteps=[float(timesteps[s]) for s in capture_steps],
        layers=layers,
        attrs=run_attrs(loaded, probe, geo, device, text),
    )


def records_to_dataset(
    records: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
    *,
    metrics: Sequence[str],
    steps: Sequence[int],
    timesteps: Sequence[float],
    layers: Sequence[int],
    attrs: dict,
) -> xr.Dataset:
    """Captured ``(step, layer) -> {metric: [head, query_frame, key_frame]}`` as the contract's Dataset.

    The default query frames (the seed's "last block") are recorded in the attrs.
    """
    variables = {
        metric: np.stack([np.stack([records[(s, layer)][metric].numpy() for layer in layers]) for s in steps])
        for metric in metrics
    }
    ds = build_dataset(variables, steps=steps, timesteps=timesteps, layers=layers, attrs=attrs)
    ds.attrs["query_frames"] = default_query_frames(ds)
    return ds
