"""Brute-force float64 references: the full token x token computation the harness avoids."""

from __future__ import annotations

import math

import torch


def brute_force_stats(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, mask: torch.Tensor | None = None):
    """logits and mass ``[batch, heads, qf, kf]`` from the whole float64 score matrix."""
    q64, k64 = q.double(), k.double()
    batch, tokens, heads, dim = q.shape
    frames = tokens // tokens_per_frame
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64) / math.sqrt(dim)
    logits = scores.unflatten(2, (frames, tokens_per_frame)).unflatten(4, (frames, tokens_per_frame)).mean((3, 5))
    if mask is not None:
        token_mask = mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
        scores = scores.masked_fill(~token_mask, float("-inf"))
        logits = logits.masked_fill(~mask, float("nan"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    blocks = probs.unflatten(2, (frames, tokens_per_frame)).unflatten(4, (frames, tokens_per_frame))
    mass = blocks.sum(5).mean(3)
    # aligned: query at position p of frame a -> key at position p of frame b (diagonal of each block)
    aligned_mass = torch.diagonal(blocks, dim1=3, dim2=5).mean(-1)
    return {"logits": logits, "mass": mass, "aligned_mass": aligned_mass}


@torch.no_grad()
def reference_qk(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE q, k of a Wan self-attention in float64, RoPE applied as complex rotation.

    Independent of diffusers' processor code: linear + RMSNorm written out, and the rotation
    of each (even, odd) channel pair done by multiplying complex numbers.
    """
    x = hidden_states.double()
    freqs_cos, freqs_sin = (f.double() for f in rotary_emb)
    angle = torch.atan2(freqs_sin[..., 1::2], freqs_cos[..., 0::2])
    rotation = torch.polar(torch.ones_like(angle), angle)

    def project(linear, norm):
        y = x @ linear.weight.double().T + linear.bias.double()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        y = y.unflatten(2, (attn.heads, -1))
        pairs = torch.view_as_complex(y.unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * rotation).flatten(-2)

    return project(attn.to_q, attn.norm_q), project(attn.to_k, attn.norm_k)


def brute_force_text_mass(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Cross-attention mass ``[batch, heads, query_frame, text_token]`` from the whole float64 score matrix."""
    q64, k64 = q.double(), k.double()
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores, dim=-1)
    return probs.unflatten(2, (q.shape[1] // tokens_per_frame, tokens_per_frame)).mean(3)


@torch.no_grad()
def reference_cross_qk(attn, hidden_states: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (from the video tokens) and k (from the text tokens) of a Wan cross-attention in float64:
    linear + RMSNorm written out, no RoPE (cross-attention has none)."""

    def project(x, linear, norm):
        y = x.double() @ linear.weight.double().T + linear.bias.double()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        return y.unflatten(2, (attn.heads, -1))

    return project(hidden_states, attn.to_q, attn.norm_q), project(text, attn.to_k, attn.norm_k)
