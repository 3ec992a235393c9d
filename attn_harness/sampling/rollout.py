"""Chunk-by-chunk autoregressive rollout with a KV cache, captured per block.

Autoregressive Wan derivatives (Self-Forcing, CausVid) sample a video block by block: blocks
of ``block_size`` latent frames, each denoised over its own steps while attending to a KV
cache of the earlier blocks; once a block is clean it is run once more at timestep 0 and its
keys/values are appended to the cache. This module runs that loop on any Wan transformer and
records, for each block's queries at chosen denoising steps, the frame statistics over all
keys it sees (the cached clean blocks + its own block).

How its numbers relate to the teacher-forced pass (``mode: teacher-forced``, ``mask:
block-causal``): the visibility is the same (row block b sees key frames of blocks 0..b; other
cells are NaN logits / 0 mass), but the inputs differ. Teacher-forced, every frame sits at the
same noise level and the context is the sample's own noisy trajectory. In the rollout, block
b's row at step s equals a block-causal pass over [clean generated blocks 0..b-1 at timestep 0,
block b's noisy latents at step s's timestep] (per-token timesteps), restricted to block b's
queries; ``tests/test_rollout.py`` checks exactly that. So the last block's rows are the seed's
"last block" figure as the sampler sees it at inference time. With one block the rollout *is*
the bidirectional pass on that block.

Step semantics: dataset step s = the s-th denoising step of each block; every block runs the
same schedule (the probe's UniPC flow sampler with ``sample_steps`` steps), so the ``timestep``
coordinate holds for every block's rows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import xarray as xr
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, _get_qkv_projections
from tqdm.auto import tqdm

from attn_harness.core import frames
from attn_harness.model.capture import apply_rotary, frame_stats, processors_installed
from attn_harness.core.errors import HarnessError
from attn_harness.sampling.extract import (
    DTYPES,
    conditioning,
    make_scheduler,
    probe_geometry,
    records_to_dataset,
    resolve_device,
    resolve_layers,
    resolve_steps,
    run_attrs,
)
from attn_harness.model.models import LoadedModel
from attn_harness.core.probe import Probe
from attn_harness.core.schema import METRICS

CONTEXT_TIMESTEP = 0.0  # clean blocks are re-encoded noise-free, as Self-Forcing / CausVid do


@dataclass
class RolloutState:
    """What the processors share: the current block, the KV caches, and the captured rows."""

    tokens_per_frame: int
    latent_frames: int
    metrics: tuple[str, ...]
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE of the whole clip
    block: range = range(0)
    branch: str = "cond"
    step: int = 0
    recording: bool = False
    writing: bool = False
    cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    records: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def block_rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = slice(self.block.start * self.tokens_per_frame, self.block.stop * self.tokens_per_frame)
        return self.rotary[0][:, tokens], self.rotary[1][:, tokens]

    def record(self, layer: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """Stats of the block's queries over all keys, written into the block's rows of a full grid."""
        context = keys.shape[1] - query.shape[1]
        padded = torch.cat([query.new_zeros(query.shape[0], context, *query.shape[2:]), query], dim=1)
        seen = self.block.stop
        mask = torch.zeros(seen, seen, dtype=torch.bool)
        mask[self.block.start :, :] = True
        stats = frame_stats(padded, keys, self.tokens_per_frame, mask=mask, metrics=self.metrics)
        entry = self.records.setdefault((self.step, layer), self._empty(query.shape[2]))
        rows = slice(self.block.start, self.block.stop)
        for name, value in stats.items():
            entry[name][:, rows, :seen] = value[0, :, rows].detach().cpu()

    def _empty(self, heads: int) -> dict[str, torch.Tensor]:
        shape = (heads, self.latent_frames, self.latent_frames)
        fill = {"logits": float("nan"), "mass": 0.0}
        return {name: torch.full(shape, fill[name]) for name in self.metrics}


class RolloutProcessor:
    """Self-attention of one Wan block under the rollout: the current block's queries attend to
    [cached clean keys of earlier blocks, own keys]; stock math otherwise (as ``WanAttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, state: RolloutState, *, capture: bool) -> None:
        self.layer, self.state, self.capture = layer, state, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise HarnessError("RolloutProcessor is for self-attention (attn1) of text-to-video Wan blocks only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = self.state.block_rotary()  # the block's own frame positions, not 0..block_size-1
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)

        cached = self.state.cache.get(self.state.branch, {}).get(self.layer)
        keys = key if cached is None else torch.cat([cached[0], key], dim=1)
        values = value if cached is None else torch.cat([cached[1], value], dim=1)
        if self.state.writing:
            self.state.pending[self.layer] = (keys, values)
        hidden_states = dispatch_attention_fn(
            query, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        if self.capture and self.state.recording:
            self.state.record(self.layer, query, keys)

        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


@contextmanager
def rollout_processors(model: WanTransformer3DModel, layers: Sequence[int], state: RolloutState) -> Iterator[RolloutState]:
    """Every block's ``attn1`` gets a ``RolloutProcessor`` (capturing on ``layers``); restored on exit."""
    chosen = set(layers)
    with processors_installed(model, lambda index: RolloutProcessor(index, state, capture=index in chosen)):
        yield state


@dataclass
class RolloutResult:
    """Captured rows per (step, layer), the final clean latents, and (if traced) each block's
    noisy input at each captured step, keyed (block index, step)."""

    records: dict[tuple[int, int], dict[str, torch.Tensor]]
    latents: torch.Tensor
    timesteps: torch.Tensor
    block_inputs: dict[tuple[int, int], torch.Tensor]


def run_rollout(
    loaded: LoadedModel,
    probe: Probe,
    *,
    layers: Sequence[int],
    capture_steps: Sequence[int],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    trace: bool = False,
    progress: bool = False,
) -> RolloutResult:
    """Denoise ``noise`` (``[1, C, T, h, w]``) block by block with a KV cache, capturing as asked."""
    transformer = loaded.transformer
    dtype = transformer.patch_embedding.weight.dtype
    _, _, latent_frames, height, width = noise.shape
    patch = loaded.config["patch_size"]
    state = RolloutState(
        tokens_per_frame=(height // patch[1]) * (width // patch[2]),
        latent_frames=latent_frames,
        metrics=tuple(m for m in METRICS if m in probe.metrics),
    )
    state.rotary = tuple(t.to(noise.device) for t in transformer.rope(noise))
    branches = {"cond": cond} | ({"uncond": uncond} if uncond is not None else {})
    latents = noise.clone()
    block_inputs: dict[tuple[int, int], torch.Tensor] = {}
    blocks = frames.blocks(latent_frames, probe.block_size)

    def forward(x: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
        state.branch = branch
        return transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=branches[branch], return_dict=False)[0]

    with torch.inference_mode(), rollout_processors(transformer, layers, state):
        for index, block in enumerate(tqdm(blocks, desc="rollout", unit="block", disable=not progress)):
            state.block = block
            scheduler = make_scheduler(probe)
            scheduler.set_timesteps(probe.sample_steps, device=noise.device)
            x = latents[:, :, block.start : block.stop]
            for step, timestep in enumerate(scheduler.timesteps):
                wanted = step in capture_steps
                if wanted and trace:
                    block_inputs[(index, step)] = x.detach().clone()
                state.step = step
                t = timestep.expand(1)
                state.recording = wanted and probe.branch == "cond"
                velocity = forward(x, t, "cond")
                if uncond is not None:
                    state.recording = wanted and probe.branch == "uncond"
                    velocity_uncond = forward(x, t, "uncond")
                    velocity = velocity_uncond + probe.guidance * (velocity - velocity_uncond)
                state.recording = False
                x = scheduler.step(velocity.float(), timestep, x, return_dict=False)[0]
            latents[:, :, block.start : block.stop] = x
            if index + 1 < len(blocks):
                state.writing = True
                context_t = torch.full((1,), CONTEXT_TIMESTEP, device=noise.device, dtype=scheduler.timesteps.dtype)
                for branch in branches:
                    state.pending = {}
                    forward(x, context_t, branch)
                    state.cache[branch] = state.pending
                state.writing, state.pending = False, {}
    return RolloutResult(state.records, latents, scheduler.timesteps.detach().cpu(), block_inputs)


def extract_rollout(loaded: LoadedModel, probe: Probe, *, progress: bool | None = None) -> xr.Dataset:
    """``extract`` for ``mode: rollout``: the same Dataset contract, rows filled block by block."""
    device = resolve_device(probe.device)
    dtype = DTYPES[probe.dtype]
    geo = probe_geometry(probe, loaded)
    layers = resolve_layers(probe.layers, len(loaded.transformer.blocks))
    capture_steps = resolve_steps(probe.capture_steps, probe.sample_steps)
    if probe.branch == "uncond" and probe.guidance <= 1.0:
        raise HarnessError("branch 'uncond' needs guidance > 1 (without guidance there is no unconditional pass)")
    text = conditioning(loaded, probe)
    shape = (1, loaded.config["in_channels"], geo["latent_frames"], geo["latent_height"], geo["latent_width"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(probe.seed), dtype=torch.float32).to(device)
    result = run_rollout(
        loaded,
        probe,
        layers=layers,
        capture_steps=capture_steps,
        noise=noise,
        cond=text.prompt.to(device=device, dtype=dtype),
        uncond=text.negative.to(device=device, dtype=dtype) if text.negative is not None else None,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    attrs = run_attrs(loaded, probe, geo, device, text) | {
        "rollout_steps_per_block": probe.sample_steps,
        "rollout_context": f"KV cache of the clean earlier blocks, re-encoded at timestep {CONTEXT_TIMESTEP:g}",
        "step_semantics": "step s = the s-th denoising step of every block; block b's rows hold its queries at its "
        "step s over the cached clean blocks < b and its own keys",
    }
    return records_to_dataset(
        result.records,
        metrics=[metric for metric in METRICS if metric in probe.metrics],
        steps=capture_steps,
        timesteps=[float(result.timesteps[s]) for s in capture_steps],
        layers=layers,
        attrs=attrs,
    )
