"""The model's attention output together with its row logsumexp, when that changes nothing.

The mass kernel needs only one pass over the keys when it is given each query row's
logsumexp. Attention kernels compute it anyway; ``torch.ops.aten._scaled_dot_product_cudnn_attention``
returns it on CUDA, ``_scaled_dot_product_flash_attention_for_cpu`` on CPU. Using such an op
in place of ``F.scaled_dot_product_attention`` is only allowed where its output is bitwise the
stock one: ``attention_with_lse`` checks that once per (device, dtype, shapes) on the first call
(running both) and otherwise returns the stock output and no logsumexp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_VERDICTS: dict[tuple, bool] = {}


def _op_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(output, lse)`` in ``[batch, heads, tokens, ...]`` layout, or None without such an op here."""
    if q.is_cuda:
        op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
        if op is None:
            return None
        try:
            result = op(q, k, v, None, True)
        except RuntimeError:  # cuDNN unavailable or this shape/dtype unsupported
            return None
    elif q.device.type == "cpu":
        result = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    else:
        return None
    return result[0], result[1]


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stock SDPA output ``[batch, tokens, heads, head_dim]`` (diffusers' layout) and ``lse`` ``[batch, heads, tokens]`` or None.

    The output is always bitwise what ``F.scaled_dot_product_attention`` gives: the op with a
    logsumexp is used only after it gave exactly that output on this device, dtype and shape.
    """
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    verdict_key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(), v.stride())
    verdict = _VERDICTS.get(verdict_key)
    if verdict is False:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2), None
    fused = _op_with_lse(q, k, v)
    if verdict is None:
        stock = F.scaled_dot_product_attention(q, k, v)
        verdict = fused is not None and torch.equal(fused[0], stock)
        _VERDICTS[verdict_key] = verdict
        if not verdict:
            return stock.transpose(1, 2), None
    if fused is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2), None
    return fused[0].transpose(1, 2), fused[1]
