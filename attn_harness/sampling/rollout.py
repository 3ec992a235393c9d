"""Chunk-by-chunk autoregressive rollout with a KV cache, captured per (block, denoising step).

Autoregressive Wan derivatives (Self-Forcing, CausVid; docs/autoregressive.md) sample a video
block by block: blocks of ``block_size`` latent frames, each denoised over its own steps while
attending to a KV cache of earlier blocks; once a block is clean it is run once more at
timestep 0 and its keys/values go into the cache. This module runs that loop on any Wan
transformer with either sampler (UniPC, or the distilled few-step sampler with re-noising), and
records, for each block's queries at chosen denoising steps, the frame statistics over the keys
it sees: the cached frames plus its own block.

The cache follows the probe's mask: ``block-causal`` keeps every earlier frame; ``sink-window``
keeps the first ``sink_frames`` frames and the last ``window_frames`` frames before the next
block and evicts the rest, so memory is bounded by the cache, not the rollout length.

How its numbers relate to the teacher-forced pass under the same mask: the visibility is the
same (hidden cells are NaN logits / 0 mass), the inputs differ. In the rollout, block b's row at
step s equals a masked pass over [clean generated frames at timestep 0, block b's noisy latents
at step s's timestep] (per-token timesteps), restricted to block b's queries;
``tests/test_rollout.py`` checks exactly that. With one block the rollout *is* the
bidirectional pass on that block.

Step semantics: dataset step s = the s-th denoising step of each block; every block runs the
same schedule, so the ``timestep`` coordinate holds for every block's rows, and the
``query_block`` coordinate says which block each query frame belongs to.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from tqdm.auto import tqdm

from attn_harness.core import frames
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.model.capture import (
    FRAME_METRICS,
    TEXT_METRIC,
    TextCaptureProcessor,
    frame_stats,
    processors_installed,
    text_stats,
)
from attn_harness.model.models import LoadedModel
from attn_harness.model.wan_attention import WanProcessorBase, apply_rotary, project_out, project_qkv
from attn_harness.sampling.run import (
    capture_steps,
    content_tokens,
    guided_velocity,
    prepare_run,
    records_to_dataset,
    run_attrs,
    token_strings,
)
from attn_harness.sampling.samplers import make_sampler

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
    cached_frames: list[int] = field(default_factory=list)  # latent frames whose keys/values the cache holds, in order
    cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    records: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    text_records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def block_rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = slice(self.block.start * self.tokens_per_frame, self.block.stop * self.tokens_per_frame)
        return self.rotary[0][:, tokens], self.rotary[1][:, tokens]

    def record(self, layer: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """Stats of the block's queries over the keys it sees, written into the block's rows of a full grid."""
        key_frames = self.cached_frames + list(self.block)
        count, own = len(key_frames), len(self.block)
        context = keys.shape[1] - query.shape[1]
        padded = torch.cat([query.new_zeros(query.shape[0], context, *query.shape[2:]), query], dim=1)
        mask = torch.zeros(count, count, dtype=torch.bool)
        mask[count - own :, :] = True
        metrics = tuple(m for m in self.metrics if m in FRAME_METRICS)
        stats = frame_stats(padded, keys, self.tokens_per_frame, mask=mask, metrics=metrics)
        entry = self.records.setdefault((self.step, layer), self._empty(query.shape[2], metrics))
        rows = torch.arange(self.block.start, self.block.stop)[:, None]
        columns = torch.tensor(key_frames)[None, :]
        for name, value in stats.items():
            entry[name][:, rows, columns] = value[0, :, count - own :].detach().cpu()

    def record_text(self, layer: int, query: torch.Tensor, text_keys: torch.Tensor) -> None:
        """The block's rows of ``text_mass`` (its queries over the text tokens)."""
        if not self.recording:
            return
        value = text_stats(query, text_keys, self.tokens_per_frame)[0].detach().cpu()
        shape = (value.shape[0], self.latent_frames, value.shape[-1])
        entry = self.text_records.setdefault((self.step, layer), torch.full(shape, float("nan")))
        entry[:, self.block.start : self.block.stop] = value

    def _empty(self, heads: int, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
        shape = (heads, self.latent_frames, self.latent_frames)
        fill = {"logits": float("nan"), "mass": 0.0}
        return {name: torch.full(shape, fill[name]) for name in metrics}

    def keep_for_next_block(self, visible: np.ndarray | None, next_start: int) -> list[int]:
        """Positions (in the cache after this block) of the frames the next block still sees."""
        frames_now = self.cached_frames + list(self.block)
        if visible is None:
            return list(range(len(frames_now)))
        return [i for i, frame in enumerate(frames_now) if visible[next_start, frame]]


class RolloutProcessor(WanProcessorBase):
    """Self-attention of one Wan block under the rollout: the current block's queries attend to
    [cached keys of earlier frames, own keys]; stock math otherwise (as ``WanAttnProcessor``)."""

    def __init__(self, layer: int, state: RolloutState, *, capture: bool) -> None:
        self.layer, self.state, self.capture = layer, state, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise HarnessError("RolloutProcessor is for self-attention (attn1) of Wan blocks only")
        query, key, value = project_qkv(attn, hidden_states)
        cos, sin = self.state.block_rotary()  # the block's own frame positions, not 0..block_size-1
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)

        cached = self.state.cache.get(self.state.branch, {}).get(self.layer)
        keys = key if cached is None else torch.cat([cached[0], key], dim=1)
        values = value if cached is None else torch.cat([cached[1], value], dim=1)
        if self.state.writing:
            self.state.pending[self.layer] = (keys, values)
        hidden_states = self.attend(query, keys, values)
        if self.capture and self.state.recording:
            self.state.record(self.layer, query, keys)
        return project_out(attn, hidden_states, query)


@contextmanager
def rollout_processors(model: WanTransformer3DModel, layers: Sequence[int], state: RolloutState) -> Iterator[RolloutState]:
    """Every block's ``attn1`` gets a ``RolloutProcessor`` (capturing on ``layers``), and ``attn2`` of
    ``layers`` a text-capturing processor when ``text_mass`` is wanted; restored on exit."""
    chosen = set(layers)
    wants_text = TEXT_METRIC in state.metrics

    def text_processor(index: int) -> TextCaptureProcessor | None:
        return TextCaptureProcessor(index, state) if wants_text and index in chosen else None

    with processors_installed(model, lambda index: RolloutProcessor(index, state, capture=index in chosen)), \
            processors_installed(model, text_processor, "attn2"):
        yield state


def _select_tokens(pair: tuple[torch.Tensor, torch.Tensor], positions: list[int], tokens_per_frame: int):
    """The cached keys/values of the frames at ``positions`` (frame-major token blocks)."""
    index = (torch.tensor(positions)[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)[None, :]).flatten()
    index = index.to(pair[0].device)
    return pair[0].index_select(1, index), pair[1].index_select(1, index)


@dataclass
class RolloutResult:
    """Captured rows per (step, layer), the final clean latents, the step timesteps, each block's
    noisy input at each captured step (if traced, keyed (block index, step)) and the largest
    number of frames the KV cache held."""

    records: dict[tuple[int, int], dict[str, torch.Tensor]]
    text_records: dict[tuple[int, int], torch.Tensor]
    latents: torch.Tensor
    timesteps: torch.Tensor
    block_inputs: dict[tuple[int, int], torch.Tensor]
    peak_cached_frames: int


def run_rollout(
    loaded: LoadedModel,
    probe: Probe,
    *,
    layers: Sequence[int],
    capture_steps: Sequence[int],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    generator: torch.Generator | None = None,
    trace: bool = False,
    progress: bool = False,
) -> RolloutResult:
    """Denoise ``noise`` (``[1, C, T, h, w]``) block by block with a KV cache, capturing as asked.

    ``generator`` draws the few-step sampler's re-noising noise (default: seeded by ``probe.seed``).
    """
    transformer = loaded.transformer
    dtype = transformer.patch_embedding.weight.dtype
    _, _, latent_frames, height, width = noise.shape
    patch = loaded.config["patch_size"]
    state = RolloutState(
        tokens_per_frame=(height // patch[1]) * (width // patch[2]),
        latent_frames=latent_frames,
        metrics=tuple(probe.metrics),
    )
    state.rotary = tuple(t.to(noise.device) for t in transformer.rope(noise))
    branches = {"cond": cond} | ({"uncond": uncond} if uncond is not None else {})
    generator = generator if generator is not None else torch.Generator().manual_seed(probe.seed)
    visible = frames.visible_mask(latent_frames, probe.mask, probe.block_size, probe.sink_frames, probe.window_frames)
    latents = noise.clone()
    block_inputs: dict[tuple[int, int], torch.Tensor] = {}
    blocks = frames.blocks(latent_frames, probe.block_size)
    peak = 0

    def forward(x: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
        state.branch = branch
        return transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=branches[branch], return_dict=False)[0]

    with torch.inference_mode(), rollout_processors(transformer, layers, state):
        for index, block in enumerate(tqdm(blocks, desc="rollout", unit="block", disable=not progress)):
            state.block = block
            sampler = make_sampler(probe, noise.device, generator)
            x = latents[:, :, block.start : block.stop]
            for step, timestep in enumerate(sampler.timesteps):
                wanted = step in capture_steps
                if wanted and trace:
                    block_inputs[(index, step)] = x.detach().clone()
                state.step = step
                t = timestep.expand(1)

                def on_branch(branch: str | None) -> None:
                    state.recording = wanted and branch == probe.branch

                velocity = guided_velocity(lambda branch: forward(x, t, branch), probe.guidance, list(branches), on_branch)
                x = sampler.step(step, velocity, x)
            latents[:, :, block.start : block.stop] = x
            if index + 1 < len(blocks):
                state.writing = True
                context_t = torch.full((1,), CONTEXT_TIMESTEP, device=noise.device, dtype=sampler.timesteps.dtype)
                keep = state.keep_for_next_block(visible, blocks[index + 1].start)
                for branch in branches:
                    state.pending = {}
                    forward(x, context_t, branch)
                    state.cache[branch] = {
                        layer: _select_tokens(pair, keep, state.tokens_per_frame) for layer, pair in state.pending.items()
                    }
                frames_now = state.cached_frames + list(block)
                state.cached_frames = [frames_now[i] for i in keep]
                peak = max(peak, len(state.cached_frames))
                state.writing, state.pending = False, {}
    return RolloutResult(state.records, state.text_records, latents, sampler.timesteps.detach().cpu(), block_inputs, peak)


def extract_rollout(loaded: LoadedModel, probe: Probe, *, progress: bool | None = None) -> xr.Dataset:
    """``extract`` for ``mode: rollout``: the same Dataset contract, rows filled block by block."""
    setup = prepare_run(loaded, probe)
    timesteps = make_sampler(probe, setup.device, torch.Generator()).timesteps.tolist()
    steps = capture_steps(probe, timesteps)
    result = run_rollout(
        loaded,
        probe,
        layers=setup.layers,
        capture_steps=steps,
        noise=setup.noise,
        cond=setup.cond,
        uncond=setup.uncond,
        generator=setup.generator,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    attrs = run_attrs(setup) | {
        "rollout_steps_per_block": len(timesteps),
        "rollout_context": f"KV cache of the clean earlier frames the mask lets the next block see, re-encoded at "
        f"timestep {CONTEXT_TIMESTEP:g}; at most {result.peak_cached_frames} frames cached",
        "step_semantics": "step s = the s-th denoising step of every block; block b's rows hold its queries at its "
        "step s over the cached clean frames and its own keys",
    }
    ds = records_to_dataset(
        result.records,
        metrics=[m for m in probe.metrics if m in FRAME_METRICS],
        steps=steps,
        timesteps=[float(result.timesteps[s]) for s in steps],
        layers=setup.layers,
        attrs=attrs,
        text_records=result.text_records,
        text_content=content_tokens(setup.cond if probe.branch == "cond" else setup.uncond),
        text_strings=token_strings(setup) if TEXT_METRIC in probe.metrics else None,
    )
    block_of = ds["query_frame"].values // probe.block_size
    return ds.assign_coords(query_block=("query_frame", block_of.astype(np.int64)))
