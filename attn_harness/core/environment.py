"""Environment classes: the coarse "where were these numbers made" that baselines are kept per.

An extraction's numbers depend on the device kind and the model dtype far more than on
anything else (a CUDA float32 run differs from a CPU one by ~1e-4 in logits, a bfloat16 run by
~1e-2); within one class they agree to float32 reduction-order noise (``docs/numerics.md``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

# Environment variables that change which kernels run (recorded when set, part of the cache key).
NUMERICS_ENV: tuple[str, ...] = (
    "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
)


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


def numerics_env() -> str:
    """``KEY=value`` of the kernel-selecting environment variables that are set, space separated."""
    return " ".join(f"{key}={os.environ[key]}" for key in NUMERICS_ENV if key in os.environ)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
