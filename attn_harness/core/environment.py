"""Environment classes: the coarse "where were these numbers made" that baselines are kept per.

An extraction's numbers depend on the device kind and the model dtype far more than on
anything else (a CUDA float32 run differs from a CPU one by ~1e-4 in logits, a bfloat16 run by
~1e-2); within one class they agree to float32 reduction-order noise (``docs/numerics.md``).
"""

from __future__ import annotations

from collections.abc import Mapping


def environment_class(device: str, dtype: str) -> str:
    """``"cuda:0"``, ``"bfloat16"`` -> ``"cuda-bfloat16"``; ``"cpu"``, ``"float32"`` -> ``"cpu-float32"``."""
    return f"{device.split(':', 1)[0]}-{dtype}"


def class_of(attrs: Mapping) -> str:
    """The environment class an extraction (or baseline) was made in, from its attrs.

    Extractions record it as ``environment_class``; older files have only ``device`` and ``dtype``.
    """
    recorded = attrs.get("environment_class")
    if recorded:
        return str(recorded)
    return environment_class(str(attrs.get("device", "unknown")), str(attrs.get("dtype", "unknown")))
