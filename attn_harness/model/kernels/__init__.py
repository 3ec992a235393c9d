"""Accelerated building blocks of ``capture.frame_stats``.

* ``framesums.frame_sums``: per-frame sums of q or k in float32 without a float32 copy of the
  whole tensor (the logits need only these);
* ``mass.frame_mass``: Triton kernels for the exact frame mass (imported only when Triton is);
* ``sdpa_lse``: the model's attention output together with its row logsumexp, where a backend
  returns both and its output equals stock SDPA's.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when Triton can be imported (it ships with CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None
