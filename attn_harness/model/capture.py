"""Exact frame x frame attention statistics from q and k, and the processor that captures them.

``frame_stats`` turns post-RoPE queries and keys into the two statistics of docs/design.md
("Statistics") without ever materialising the token x token matrix:

* ``logits[a, b]`` by bilinearity: (mean of q over frame a) . (mean of k over frame b) / sqrt(d);
* ``mass[a, b]`` by running attention with the values replaced by one-hot(frame of key),
  so the output row of query i is the probability it sends to each key frame.

``CaptureProcessor`` replaces the self-attention processor of a diffusers
``WanTransformer3DModel`` block. It computes exactly what diffusers' ``WanAttnProcessor``
computes (same ops in the same order, so the fp32 output is bitwise identical) and hands q
and k to a ``Recorder``. Under a frame mask it also restricts the model's own attention to
the allowed key frames, one dense attention call per group of query frames that share a
mask row, so the model computes what a block-causal checkpoint computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, _get_qkv_projections

from attn_harness.core.errors import HarnessError

STAT_DTYPE = torch.float32
DEFAULT_QUERY_CHUNK_TOKENS = 8192


def _check_qk(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int) -> int:
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [batch, tokens, heads, head_dim]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if tokens_per_frame < 1 or q.shape[1] % tokens_per_frame:
        raise ValueError(f"token count {q.shape[1]} is not a multiple of tokens_per_frame={tokens_per_frame}")
    return q.shape[1] // tokens_per_frame


def mask_groups(mask: torch.Tensor | None, num_frames: int) -> list[tuple[list[int], list[int]]]:
    """Group query frames that share a mask row: ``[(query_frames, allowed_key_frames), ...]``.

    Without a mask there is one group (every frame sees every frame). Rows with no allowed
    key are left out: those query frames attend to nothing.
    """
    if mask is None:
        frames = list(range(num_frames))
        return [(frames, frames)]
    if tuple(mask.shape) != (num_frames, num_frames) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [{num_frames}, {num_frames}]; got {mask.dtype} {tuple(mask.shape)}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for a in range(num_frames):
        keys = tuple(int(b) for b in torch.nonzero(mask[a]).flatten())
        if keys:
            groups.setdefault(keys, []).append(a)
    return [(queries, list(keys)) for keys, queries in groups.items()]


def _token_index(frames: Sequence[int], tokens_per_frame: int, device: torch.device) -> torch.Tensor | slice:
    """Token positions of the given frames: a slice when they are contiguous (no copy)."""
    if list(frames) == list(range(frames[0], frames[0] + len(frames))):
        return slice(frames[0] * tokens_per_frame, (frames[0] + len(frames)) * tokens_per_frame)
    starts = torch.tensor(frames, device=device) * tokens_per_frame
    return (starts[:, None] + torch.arange(tokens_per_frame, device=device)[None, :]).flatten()


def _take(x: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    return x[:, index] if isinstance(index, slice) else x.index_select(1, index)


def _mass(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, groups, chunk_tokens: int) -> torch.Tensor:
    """Probability mass per (query frame, key frame), exact, memory linear in tokens.

    One SDPA call per (head, query chunk): the one-hot indicator is shared by every head as a
    stride-0 view, so the extra memory is one head's chunk of output, not a copy per head.
    """
    batch, tokens, heads, head_dim = q.shape
    num_frames = tokens // tokens_per_frame
    mass = torch.zeros(batch, heads, num_frames, num_frames, dtype=STAT_DTYPE, device=q.device)
    frames_per_chunk = max(1, chunk_tokens // tokens_per_frame)
    for query_frames, key_frames in groups:
        keys = _take(k, _token_index(key_frames, tokens_per_frame, k.device))
        chunks = [
            (chunk, _take(q, _token_index(chunk, tokens_per_frame, q.device)))
            for chunk in (query_frames[q0 : q0 + frames_per_chunk] for q0 in range(0, len(query_frames), frames_per_chunk))
        ]
        # SDPA keeps its fused kernel only when the value has the query's head dim, so the
        # indicator is padded to head_dim columns; more key frames than that take several calls.
        for col0 in range(0, len(key_frames), head_dim):
            cols = key_frames[col0 : col0 + head_dim]
            indicator = torch.zeros(len(key_frames), head_dim, dtype=STAT_DTYPE, device=q.device)
            indicator[torch.arange(col0, col0 + len(cols)), torch.arange(len(cols))] = 1.0
            values = indicator.repeat_interleave(tokens_per_frame, dim=0).expand(batch, 1, -1, -1)
            col_index = torch.tensor(cols, device=q.device)[None, :]
            for head in range(heads):
                head_keys = keys[:, :, head : head + 1].to(STAT_DTYPE).transpose(1, 2)
                for chunk, chunk_queries in chunks:
                    queries = chunk_queries[:, :, head : head + 1].to(STAT_DTYPE).transpose(1, 2)
                    probs = F.scaled_dot_product_attention(queries, head_keys, values)[..., : len(cols)]
                    per_frame = probs.unflatten(2, (len(chunk), tokens_per_frame)).mean(3)
                    rows = torch.tensor(chunk, device=q.device)[:, None]
                    mass[:, head : head + 1, rows, col_index] = per_frame
    return mass


def frame_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens_per_frame: int,
    *,
    mask: torch.Tensor | None = None,
    metrics: Sequence[str] = ("logits", "mass"),
    chunk_tokens: int = DEFAULT_QUERY_CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Frame x frame ``logits`` and ``mass`` of one attention call, float32 ``[batch, heads, qf, kf]``.

    ``q`` and ``k`` are post-RoPE ``[batch, tokens, heads, head_dim]`` with tokens frame-major;
    ``mask`` is bool ``[query_frame, key_frame]`` (True = may attend). Masked cells: logits NaN,
    mass 0. Queries are processed ``chunk_tokens`` at a time (whole frames), so memory stays
    linear in the token count whatever attention kernel runs.
    """
    num_frames = _check_qk(q, k, tokens_per_frame)
    unknown = set(metrics) - {"logits", "mass"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from 'logits', 'mass'")
    if mask is not None:
        mask = mask.to(device=q.device)
    out: dict[str, torch.Tensor] = {}
    if "logits" in metrics:
        q_mean = q.to(STAT_DTYPE).unflatten(1, (num_frames, tokens_per_frame)).mean(2)
        k_mean = k.to(STAT_DTYPE).unflatten(1, (num_frames, tokens_per_frame)).mean(2)
        logits = torch.einsum("bahd,bchd->bhac", q_mean, k_mean) / math.sqrt(q.shape[-1])
        out["logits"] = logits if mask is None else logits.masked_fill(~mask, float("nan"))
    if "mass" in metrics:
        out["mass"] = _mass(q, k, tokens_per_frame, mask_groups(mask, num_frames), chunk_tokens)
    return out


@dataclass
class Recorder:
    """Collects frame statistics per (step, layer) while ``active``; state lives here, not in kwargs."""

    tokens_per_frame: int
    metrics: tuple[str, ...] = ("logits", "mass")
    mask: torch.Tensor | None = None
    active: bool = False
    step: int = 0
    records: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if not self.active:
            return
        if (self.step, layer) in self.records:
            raise RuntimeError(f"layer {layer} captured twice at step {self.step}")
        stats = frame_stats(q, k, self.tokens_per_frame, mask=self.mask, metrics=self.metrics)
        self.records[(self.step, layer)] = {name: value.detach().cpu() for name, value in stats.items()}


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE, in the same op order as diffusers so results are bitwise equal."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CaptureProcessor:
    """Self-attention processor for one Wan block: stock math, optional frame mask, optional capture."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, recorder: Recorder, *, capture: bool = True) -> None:
        self.layer = layer
        self.recorder = recorder
        self.capture = capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise HarnessError("CaptureProcessor is for self-attention (attn1) of text-to-video Wan blocks only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)
            key = apply_rotary(key, *rotary_emb)

        if self.recorder.mask is None:
            hidden_states = self._attend(query, key, value, attention_mask)
        else:
            hidden_states = self._attend_masked(query, key, value)
        if self.capture:
            self.recorder.record(self.layer, query, key)

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    def _attend(self, query, key, value, attention_mask=None):
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

    def _attend_masked(self, query, key, value):
        """Dense attention per group of query frames over its allowed key frames (no N x N mask)."""
        tpf = self.recorder.tokens_per_frame
        num_frames = _check_qk(query, key, tpf)
        out = torch.zeros_like(query)
        for query_frames, key_frames in mask_groups(self.recorder.mask, num_frames):
            q_index = _token_index(query_frames, tpf, query.device)
            k_index = _token_index(key_frames, tpf, key.device)
            result = self._attend(_take(query, q_index), _take(key, k_index), _take(value, k_index))
            out[:, q_index] = result.to(out.dtype)
        return out


def self_attention_modules(model: WanTransformer3DModel) -> list:
    return [block.attn1 for block in model.blocks]


@contextmanager
def capture(
    model: WanTransformer3DModel,
    layers: Sequence[int],
    recorder: Recorder,
) -> Iterator[Recorder]:
    """Install capture processors on ``attn1`` of ``layers`` and restore the originals on exit.

    With ``recorder.mask`` set, every block gets a masking processor (capturing only on
    ``layers``), so the whole model runs block-causal.
    """
    count = len(self_attention_modules(model))
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise HarnessError(f"layer(s) {bad} out of range: this model has {count} layers (0-{count - 1})")
    chosen = set(layers)

    def processor(index: int) -> CaptureProcessor | None:
        if index in chosen or recorder.mask is not None:
            return CaptureProcessor(index, recorder, capture=index in chosen)
        return None

    with processors_installed(model, processor):
        yield recorder


@contextmanager
def processors_installed(model: WanTransformer3DModel, make: Callable[[int], object | None]) -> Iterator[None]:
    """Give block i's ``attn1`` the processor ``make(i)`` (None keeps the stock one); restore all on exit."""
    modules = self_attention_modules(model)
    originals = [module.processor for module in modules]
    try:
        for index, module in enumerate(modules):
            replacement = make(index)
            if replacement is not None:
                module.set_processor(replacement)
        yield
    finally:
        for module, original in zip(modules, originals):
            module.set_processor(original)
