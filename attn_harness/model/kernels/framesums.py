"""Per-frame sums of q or k in float32, with extra memory of one chunk, not a copy of the tensor."""

from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 512


def frame_sums(x: torch.Tensor, tokens_per_frame: int, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum over each frame's tokens, float32 ``[batch, frames, heads, head_dim]``.

    ``x`` is ``[batch, tokens, heads, head_dim]``, tokens frame-major. float32 input, and
    16-bit input on CUDA (whose reduction converts as it loads), are reduced in place; other
    input is converted ``chunk_tokens`` tokens at a time (a whole frame per chunk when it fits),
    so the float32 scratch is one chunk (512 tokens x 12 heads x 128 = 3 MiB at Wan's width).
    """
    batch, tokens, heads, head_dim = x.shape
    frames = tokens // tokens_per_frame
    view = x.unflatten(1, (frames, tokens_per_frame))
    if x.dtype == torch.float32 or x.is_cuda:
        return view.sum(2, dtype=torch.float32)
    out = torch.zeros(batch, frames, heads, head_dim, dtype=torch.float32, device=x.device)
    frames_per_chunk = max(1, chunk_tokens // tokens_per_frame)
    piece = min(tokens_per_frame, chunk_tokens)
    for f0 in range(0, frames, frames_per_chunk):
        for t0 in range(0, tokens_per_frame, piece):
            out[:, f0 : f0 + frames_per_chunk] += view[:, f0 : f0 + frames_per_chunk, t0 : t0 + piece].float().sum(2)
    return out
