"""What every sampler run shares: resolving the probe against a model, the run's inputs (text,
seeded noise), the guidance step, and turning captured records into the contract's Dataset.

The teacher-forced pass (``sampling.extract``) and the block-by-block rollout
(``sampling.rollout``) both build on this module; neither imports the other's internals.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
import xarray as xr

import attn_harness
from attn_harness.core import frames
from attn_harness.core.errors import HarnessError
from attn_harness.core.metrics import default_query_frames
from attn_harness.core.probe import Probe
from attn_harness.core.schema import SCHEMA_VERSION, build_dataset
from attn_harness.model.models import LoadedModel
from attn_harness.model.prompts import Conditioning, resolve_conditioning
from attn_harness.sampling.samplers import sampler_attrs

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


def nearest_steps(wanted: Sequence[float], timesteps: Sequence[float]) -> list[int]:
    """For each wanted timestep value, the index of the nearest run timestep (ties: the earlier step)."""
    values = np.asarray(timesteps, dtype=np.float64)
    return sorted({int(np.argmin(np.abs(values - float(t)))) for t in wanted})


def capture_steps(probe: Probe, timesteps: Sequence[float]) -> list[int]:
    """The steps to capture: nearest to ``capture_timesteps`` when given, else ``capture_steps``."""
    if probe.capture_timesteps:
        return nearest_steps(probe.capture_timesteps, timesteps)
    return resolve_steps(probe.capture_steps, len(timesteps))


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


def frame_mask(probe: Probe, latent_frames: int) -> torch.Tensor | None:
    """The probe's self-attention mask as bool ``[query_frame, key_frame]`` (None: bidirectional)."""
    visible = frames.visible_mask(latent_frames, probe.mask, probe.block_size, probe.sink_frames, probe.window_frames)
    return None if visible is None else torch.from_numpy(visible)


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


@dataclass
class RunSetup:
    """One run's resolved inputs: model, geometry, layers, text, seeded noise and the noise generator
    (which keeps drawing after the initial noise, for the few-step sampler's re-noising)."""

    loaded: LoadedModel
    probe: Probe
    device: torch.device
    geo: dict[str, int]
    layers: list[int]
    text: Conditioning
    cond: torch.Tensor
    uncond: torch.Tensor | None
    noise: torch.Tensor
    generator: torch.Generator

    @property
    def branches(self) -> dict[str, torch.Tensor]:
        return {"cond": self.cond} | ({"uncond": self.uncond} if self.uncond is not None else {})


def prepare_run(loaded: LoadedModel, probe: Probe, text: Conditioning | None = None) -> RunSetup:
    """Resolve ``probe`` against ``loaded``: device, geometry, layers, text embeddings and noise.

    ``text``: the probe's embeddings when already encoded (a population encodes each prompt once).
    """
    device = resolve_device(probe.device)
    dtype = DTYPES[probe.dtype]
    if probe.branch == "uncond" and probe.guidance <= 1.0:
        raise HarnessError("branch 'uncond' needs guidance > 1 (without guidance there is no unconditional pass)")
    geo = probe_geometry(probe, loaded)
    layers = resolve_layers(probe.layers, len(loaded.transformer.blocks))
    text = conditioning(loaded, probe) if text is None else text
    shape = (1, loaded.config["in_channels"], geo["latent_frames"], geo["latent_height"], geo["latent_width"])
    generator = torch.Generator().manual_seed(probe.seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    return RunSetup(
        loaded=loaded,
        probe=probe,
        device=device,
        geo=geo,
        layers=layers,
        text=text,
        cond=text.prompt.to(device=device, dtype=dtype),
        uncond=text.negative.to(device=device, dtype=dtype) if text.negative is not None else None,
        noise=noise,
        generator=generator,
    )


def guided_velocity(
    forward: Callable[[str], torch.Tensor],
    guidance: float,
    branches: Sequence[str],
    on_branch: Callable[[str | None], None],
) -> torch.Tensor:
    """Classifier-free guidance, conditional pass first: v_u + g (v_c - v_u) (just v_c without ``uncond``).

    ``on_branch(name)`` runs before each pass (the caller switches capture on for its branch)
    and ``on_branch(None)`` after the last.
    """
    on_branch("cond")
    velocity = forward("cond")
    if "uncond" in branches:
        on_branch("uncond")
        velocity_uncond = forward("uncond")
        velocity = velocity_uncond + guidance * (velocity - velocity_uncond)
    on_branch(None)
    return velocity


def run_attrs(setup: RunSetup) -> dict:
    """The dataset attrs of one run (the data contract, docs/design.md)."""
    loaded, probe, geo = setup.loaded, setup.probe, setup.geo
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
        **setup.text.attrs(),
        "seed": probe.seed,
        "height": geo["height"],
        "width": geo["width"],
        "num_frames": geo["num_frames"],
        "latent_frames": geo["latent_frames"],
        "tokens_per_frame": geo["tokens_per_frame"],
        "temporal_stride": geo["temporal_stride"],
        "block_size": probe.block_size,
        "mask": probe.mask,
        **({"sink_frames": probe.sink_frames, "window_frames": probe.window_frames} if probe.mask == "sink-window" else {}),
        "mode": probe.mode,
        "dtype": probe.dtype,
        "device": str(setup.device),
        "branch": probe.branch,
        "guidance": probe.guidance,
        "shift": probe.shift,
        **sampler_attrs(probe),
        "harness_version": attn_harness.__version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def records_to_dataset(
    records: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
    *,
    metrics: Sequence[str],
    steps: Sequence[int],
    timesteps: Sequence[float],
    layers: Sequence[int],
    attrs: dict,
    text_records: Mapping[tuple[int, int], torch.Tensor] | None = None,
    text_content: Sequence[bool] | None = None,
    text_strings: Sequence[str] | None = None,
) -> xr.Dataset:
    """Captured ``(step, layer) -> {metric: [head, query_frame, key_frame]}`` as the contract's Dataset.

    ``text_records`` (``(step, layer) -> [head, query_frame, text_token]``) become ``text_mass``,
    with ``text_content`` (which text tokens carry the prompt, not padding) and ``text_strings``
    (the token strings, where known) as coordinates.
    The default query frames (the seed's "last block") are recorded in the attrs.
    """
    variables = {
        metric: np.stack([np.stack([records[(s, layer)][metric].numpy() for layer in layers]) for s in steps])
        for metric in metrics if metric != "text_mass"
    }
    text = None
    if text_records:
        text = np.stack([np.stack([text_records[(s, layer)].numpy() for layer in layers]) for s in steps])
    ds = build_dataset(variables, steps=steps, timesteps=timesteps, layers=layers, attrs=attrs,
                       text_mass=text, text_content=text_content, text_strings=text_strings)
    ds.attrs["query_frames"] = default_query_frames(ds)
    return ds


def token_strings(setup: RunSetup) -> list[str] | None:
    """The captured branch's token strings where the model's text encoder has a tokenizer (else None;
    also None when the embeddings come from a file, whose tokens are unknown)."""
    strings_of = getattr(setup.loaded.encode_prompt, "token_strings", None)
    if strings_of is None or setup.probe.prompt_embeds:
        return None
    return strings_of(setup.probe.prompt if setup.probe.branch == "cond" else setup.probe.negative_prompt)


def content_tokens(embedding: torch.Tensor) -> list[bool]:
    """Which text tokens carry the prompt: Wan's text pipeline zeroes the padding rows, so a row
    with any non-zero value is content (``embedding`` is ``[1, tokens, dim]``)."""
    return [bool(row) for row in (embedding[0] != 0).any(-1).tolist()]
