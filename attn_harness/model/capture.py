"""Exact frame x frame attention statistics from q and k, and the processor that captures them.

``frame_stats`` turns post-RoPE queries and keys into the two statistics of docs/design.md
("Statistics") without ever materialising the token x token matrix:

* ``logits[a, b]`` by bilinearity: (mean of q over frame a) . (mean of k over frame b) / sqrt(d);
* ``mass[a, b]`` by running attention with the values replaced by one-hot(frame of key),
  so the output row of query i is the probability it sends to each key frame;
* ``aligned_mass[a, b]`` (optional) from each query's row logsumexp and only the
  frames x tokens scores between a query and the keys at its own spatial position.

``CaptureProcessor`` replaces the self-attention processor of a diffusers
``WanTransformer3DModel`` block. It computes exactly what diffusers' ``WanAttnProcessor``
computes (same ops in the same order, so the fp32 output is bitwise identical) and hands q
and k to a ``Recorder``. Under a frame mask it also restricts the model's own attention to
the allowed key frames, one dense attention call per group of query frames that share a
mask row, so the model computes what a block-causal (or sink + window) checkpoint computes.
``TextCaptureProcessor`` does the same for the text cross-attention (``attn2``) and records
``text_stats``: per query frame, the softmax mass on each text token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from attn_harness.core.errors import HarnessError
from attn_harness.model.kernels import triton_available
from attn_harness.model.kernels.framesums import frame_sums
from attn_harness.model.wan_attention import WanProcessorBase, apply_rotary, project_out, project_qkv

STAT_DTYPE = torch.float32
DEFAULT_QUERY_CHUNK_TOKENS = 8192
FRAME_METRICS: tuple[str, ...] = ("logits", "mass", "aligned_mass")
TEXT_METRIC = "text_mass"


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


LSE_BLOCK_ELEMENTS = 1 << 24  # scores held at once by the row-logsumexp pass (64 MiB of float32)


def _row_logsumexp(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, groups) -> torch.Tensor:
    """Log of each query's softmax denominator over its allowed keys, float32 ``[batch, heads, tokens]``.

    Exact in float32 (``torch.logsumexp`` subtracts the row maximum); queries are taken in
    blocks so that at most ``LSE_BLOCK_ELEMENTS`` scores exist at once. Rows with no allowed
    key stay ``-inf``.
    """
    batch, tokens, heads, head_dim = q.shape
    lse = torch.full((batch, heads, tokens), float("-inf"), dtype=STAT_DTYPE, device=q.device)
    scale = 1.0 / math.sqrt(head_dim)
    for query_frames, key_frames in groups:
        keys = _take(k, _token_index(key_frames, tokens_per_frame, k.device)).to(STAT_DTYPE)
        block = max(1, LSE_BLOCK_ELEMENTS // max(1, keys.shape[1] * batch))
        query_tokens = _token_index(query_frames, tokens_per_frame, q.device)
        positions = torch.arange(tokens, device=q.device)[query_tokens]
        for t0 in range(0, len(positions), block):
            rows = positions[t0 : t0 + block]
            queries = q.index_select(1, rows).to(STAT_DTYPE)
            for head in range(heads):
                scores = torch.einsum("bqd,bkd->bqk", queries[:, :, head], keys[:, :, head]) * scale
                lse[:, head, rows] = torch.logsumexp(scores, dim=-1)
    return lse


def _aligned_mass(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, groups) -> torch.Tensor:
    """``aligned_mass[a, b]``: mean over the queries of frame a of the probability each sends to
    the key at its own spatial position in frame b. Exact: p = exp(score - row logsumexp), so
    beyond the logsumexp only frames x tokens scores are computed, one batched matmul per block
    of query frames (at most ``LSE_BLOCK_ELEMENTS`` scores at once). Hidden cells are 0.
    """
    batch, tokens, heads, head_dim = q.shape
    num_frames = tokens // tokens_per_frame
    lse = _row_logsumexp(q, k, tokens_per_frame, groups).unflatten(2, (num_frames, tokens_per_frame))
    q_frames = q.unflatten(1, (num_frames, tokens_per_frame))
    k_frames = k.unflatten(1, (num_frames, tokens_per_frame))
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(batch, heads, num_frames, num_frames, dtype=STAT_DTYPE, device=q.device)
    for query_frames, key_frames in groups:
        keys = k_frames[:, key_frames].to(STAT_DTYPE).permute(0, 2, 3, 4, 1)  # [batch, position, head, dim, key frame]
        columns = torch.tensor(key_frames, device=q.device)[None, :]
        block = max(1, LSE_BLOCK_ELEMENTS // (batch * tokens_per_frame * heads * len(key_frames)))
        for a0 in range(0, len(query_frames), block):
            rows = torch.tensor(query_frames[a0 : a0 + block], device=q.device)
            queries = q_frames[:, rows].to(STAT_DTYPE).permute(0, 2, 3, 1, 4)  # [batch, position, head, query frame, dim]
            scores = torch.matmul(queries, keys) * scale  # [batch, position, head, query frame, key frame]
            probs = torch.exp(scores - lse[:, :, rows].permute(0, 3, 1, 2)[..., None])
            out[:, :, rows[:, None], columns] = probs.mean(1)
    return out


def frame_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens_per_frame: int,
    *,
    mask: torch.Tensor | None = None,
    metrics: Sequence[str] = ("logits", "mass"),
    chunk_tokens: int = DEFAULT_QUERY_CHUNK_TOKENS,
    lse: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Frame x frame ``logits``, ``mass`` and ``aligned_mass`` of one attention call, float32 ``[batch, heads, qf, kf]``.

    ``q`` and ``k`` are post-RoPE ``[batch, tokens, heads, head_dim]`` with tokens frame-major;
    ``mask`` is bool ``[query_frame, key_frame]`` (True = may attend). Masked cells: logits NaN,
    mass 0. The logits need only per-frame sums of q and k (float32, no copy of q or k). On
    CUDA with Triton the mass comes from the kernels of ``kernels.mass`` (one pass over the
    keys when ``lse``, the row logsumexp ``[batch, heads, tokens]`` of the model's own call, is
    given; two otherwise); elsewhere from float32 SDPA with one-hot values, queries
    ``chunk_tokens`` at a time (whole frames). Memory stays linear in the token count.
    """
    num_frames = _check_qk(q, k, tokens_per_frame)
    unknown = set(metrics) - set(FRAME_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(FRAME_METRICS)}")
    if mask is not None:
        mask = mask.to(device=q.device)
    out: dict[str, torch.Tensor] = {}
    if "logits" in metrics:
        q_mean = frame_sums(q, tokens_per_frame) / tokens_per_frame
        k_mean = frame_sums(k, tokens_per_frame) / tokens_per_frame
        logits = torch.einsum("bahd,bchd->bhac", q_mean, k_mean) / math.sqrt(q.shape[-1])
        out["logits"] = logits if mask is None else logits.masked_fill(~mask, float("nan"))
    if "mass" in metrics:
        groups = mask_groups(mask, num_frames)
        if q.is_cuda and triton_available():
            from attn_harness.model.kernels.mass import frame_mass  # imports Triton

            out["mass"] = frame_mass(q, k, tokens_per_frame, groups, lse=lse)
        else:
            out["mass"] = _mass(q, k, tokens_per_frame, groups, chunk_tokens)
    if "aligned_mass" in metrics:
        out["aligned_mass"] = _aligned_mass(q, k, tokens_per_frame, mask_groups(mask, num_frames))
    return out


def text_stats(
    q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, *, chunk_tokens: int = DEFAULT_QUERY_CHUNK_TOKENS
) -> torch.Tensor:
    """Cross-attention ``text_mass``, float32 ``[batch, heads, query_frame, text_token]``.

    ``text_mass[a, t]`` = mean over the query tokens i of frame a of softmax_t(q_i . k_t / sqrt(d)):
    the share of frame a's text attention that lands on text token t (rows sum to 1). ``q`` is
    ``[batch, video tokens, heads, d]`` frame-major, ``k`` ``[batch, text tokens, heads, d]``.
    Exact softmax, one head and ``chunk_tokens`` queries (whole frames) at a time.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must be [batch, tokens, heads, head_dim] with equal batch, heads and head_dim; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if tokens_per_frame < 1 or q.shape[1] % tokens_per_frame:
        raise ValueError(f"token count {q.shape[1]} is not a multiple of tokens_per_frame={tokens_per_frame}")
    batch, tokens, heads, head_dim = q.shape
    num_frames = tokens // tokens_per_frame
    frames_per_chunk = max(1, chunk_tokens // tokens_per_frame)
    out = torch.empty(batch, heads, num_frames, k.shape[1], dtype=STAT_DTYPE, device=q.device)
    scale = 1.0 / math.sqrt(head_dim)
    for head in range(heads):
        keys = k[:, :, head].to(STAT_DTYPE)
        for f0 in range(0, num_frames, frames_per_chunk):
            f1 = min(f0 + frames_per_chunk, num_frames)
            queries = q[:, f0 * tokens_per_frame : f1 * tokens_per_frame, head].to(STAT_DTYPE)
            probs = torch.softmax(torch.einsum("bnd,btd->bnt", queries, keys) * scale, dim=-1)
            out[:, head, f0:f1] = probs.unflatten(1, (f1 - f0, tokens_per_frame)).mean(2)
    return out


@dataclass
class Recorder:
    """Collects frame statistics per (step, layer) while ``active``; state lives here, not in kwargs.

    ``metrics`` may hold the self-attention statistics (``logits``, ``mass``) and ``text_mass``,
    the cross-attention mass over text tokens (kept in ``text_records``).
    """

    tokens_per_frame: int
    metrics: tuple[str, ...] = ("logits", "mass")
    mask: torch.Tensor | None = None
    active: bool = False
    step: int = 0
    records: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    text_records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def frame_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in FRAME_METRICS)

    @property
    def wants_text(self) -> bool:
        return TEXT_METRIC in self.metrics

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if not self.active:
            return
        if (self.step, layer) in self.records:
            raise RuntimeError(f"layer {layer} captured twice at step {self.step}")
        stats = frame_stats(q, k, self.tokens_per_frame, mask=self.mask, metrics=self.frame_metrics)
        self.records[(self.step, layer)] = {name: value.detach().cpu() for name, value in stats.items()}

    def record_text(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if not self.active:
            return
        if (self.step, layer) in self.text_records:
            raise RuntimeError(f"layer {layer} cross-attention captured twice at step {self.step}")
        self.text_records[(self.step, layer)] = text_stats(q, k, self.tokens_per_frame).detach().cpu()


class CaptureProcessor(WanProcessorBase):
    """Self-attention processor for one Wan block: stock math, optional frame mask, optional capture."""

    def __init__(self, layer: int, recorder: Recorder, *, capture: bool = True) -> None:
        self.layer = layer
        self.recorder = recorder
        self.capture = capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise HarnessError("CaptureProcessor is for self-attention (attn1) of Wan blocks only")
        query, key, value = project_qkv(attn, hidden_states)
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)
            key = apply_rotary(key, *rotary_emb)

        if self.recorder.mask is None:
            hidden_states = self.attend(query, key, value, attention_mask)
        else:
            hidden_states = self._attend_masked(query, key, value)
        if self.capture:
            self.recorder.record(self.layer, query, key)
        return project_out(attn, hidden_states, query)

    def _attend_masked(self, query, key, value):
        """Dense attention per group of query frames over its allowed key frames (no N x N mask)."""
        tpf = self.recorder.tokens_per_frame
        num_frames = _check_qk(query, key, tpf)
        out = torch.zeros_like(query)
        for query_frames, key_frames in mask_groups(self.recorder.mask, num_frames):
            q_index = _token_index(query_frames, tpf, query.device)
            k_index = _token_index(key_frames, tpf, key.device)
            result = self.attend(_take(query, q_index), _take(key, k_index), _take(value, k_index))
            out[:, q_index] = result.to(out.dtype)
        return out


class TextCaptureProcessor(WanProcessorBase):
    """Cross-attention (``attn2``) processor: stock math, and the text mass of each query frame."""

    def __init__(self, layer: int, recorder: Recorder) -> None:
        self.layer = layer
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            raise HarnessError("TextCaptureProcessor is for the text cross-attention (attn2) of Wan blocks only")
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        hidden_states = self.attend(query, key, value, attention_mask, cross=True)
        self.recorder.record_text(self.layer, query, key)
        return project_out(attn, hidden_states, query)


def attention_modules(model: WanTransformer3DModel, attribute: str = "attn1") -> list:
    """Every block's ``attn1`` (self-attention) or ``attn2`` (text cross-attention)."""
    return [getattr(block, attribute) for block in model.blocks]


@contextmanager
def capture(
    model: WanTransformer3DModel,
    layers: Sequence[int],
    recorder: Recorder,
) -> Iterator[Recorder]:
    """Install capture processors on ``attn1`` of ``layers`` and restore the originals on exit.

    With ``recorder.mask`` set, every block gets a masking processor (capturing only on
    ``layers``), so the whole model runs under the mask. With ``text_mass`` among the
    recorder's metrics, ``attn2`` of ``layers`` gets a text-capturing processor too.
    """
    count = len(attention_modules(model))
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise HarnessError(f"layer(s) {bad} out of range: this model has {count} layers (0-{count - 1})")
    chosen = set(layers)

    def processor(index: int) -> CaptureProcessor | None:
        if index in chosen or recorder.mask is not None:
            return CaptureProcessor(index, recorder, capture=index in chosen)
        return None

    def text_processor(index: int) -> TextCaptureProcessor | None:
        return TextCaptureProcessor(index, recorder) if recorder.wants_text and index in chosen else None

    with processors_installed(model, processor), processors_installed(model, text_processor, "attn2"):
        yield recorder


@contextmanager
def processors_installed(
    model: WanTransformer3DModel, make: Callable[[int], object | None], attribute: str = "attn1"
) -> Iterator[None]:
    """Give block i's ``attribute`` module the processor ``make(i)`` (None keeps the stock one); restore all on exit."""
    modules = attention_modules(model, attribute)
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
