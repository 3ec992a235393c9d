"""The pieces of diffusers' ``WanAttnProcessor`` that every harness processor shares.

A processor that captures or reroutes Wan attention must still compute exactly what the stock
processor computes (same ops in the same order, so float32 outputs stay bitwise equal). These
helpers are those ops, written once: the q/k/v projections with their RMSNorms and head split,
Wan's interleaved RoPE, the attention call through diffusers' dispatcher, and the output
projection. Self-attention (``attn1``) and text cross-attention (``attn2``) both use them.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from attn_harness.core.errors import HarnessError


class WanProcessorBase:
    """What diffusers expects of a processor object (backend and parallel config slots)."""

    _attention_backend = None
    _parallel_config = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
               *, cross: bool = False) -> torch.Tensor:
        """Attention through diffusers' dispatcher, as the stock processor calls it."""
        return dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=None if cross else self._parallel_config,
        )


def project_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
    """q, k, v as ``[batch, tokens, heads, head_dim]`` after Wan's q/k RMSNorm (no RoPE yet).

    ``encoder_hidden_states`` given: cross-attention, keys and values from the text tokens.
    Image-conditioned blocks (extra key/value projections) are not supported.
    """
    if attn.add_k_proj is not None:
        raise HarnessError("image-conditioned Wan blocks (add_k_proj) are not supported; use a text-to-video model")
    query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    return (
        query.unflatten(2, (attn.heads, -1)),
        key.unflatten(2, (attn.heads, -1)),
        value.unflatten(2, (attn.heads, -1)),
    )


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE, in the same op order as diffusers so results are bitwise equal."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def project_out(attn, hidden_states: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Heads merged, cast to the query dtype, then the output projection (and its dropout)."""
    hidden_states = hidden_states.flatten(2, 3).type_as(like)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)
