"""Interleaved repetitions and the record every measurement becomes.

Cases are run round-robin (A B C A B C ...) after a warm-up of each, so a change in machine
load during the run affects every case alike; ratios are taken against a baseline timed in
the same loop.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def environment(device: str) -> dict:
    """What the figures were measured on (stored in every record)."""
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def interleaved(cases: dict[str, Callable[[], object]], *, reps: int, warmup: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each case: ``warmup`` untimed rounds, then ``reps`` timed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + reps):
        for name, call in cases.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def summary(samples: list[float]) -> dict:
    """Median, extremes and spread ((max - min) / median) of one case's seconds."""
    median = statistics.median(samples)
    return {
        "median_s": median,
        "min_s": min(samples),
        "max_s": max(samples),
        "spread": (max(samples) - min(samples)) / median if median > 0 else 0.0,
        "reps": len(samples),
    }


def timing_records(
    section: str,
    samples: dict[str, list[float]],
    baseline: str,
    env: dict,
    params: dict | None = None,
    prefix: str = "",
) -> list[dict]:
    """One record per case: its summary, the baseline's median, and ``ratio`` = median / baseline median.

    ``paired_ratio`` is the median over rounds of (case / baseline in the same round), which is
    steadier than the ratio of medians when the machine's load drifts.
    """
    base = summary(samples[baseline])
    records = []
    for name, values in samples.items():
        paired = statistics.median(v / b for v, b in zip(values, samples[baseline]))
        records.append(
            {
                "name": f"{prefix}{name}",
                "section": section,
                **summary(values),
                "baseline": f"{prefix}{baseline}",
                "baseline_median_s": base["median_s"],
                "ratio": summary(values)["median_s"] / base["median_s"],
                "paired_ratio": paired,
                **(params or {}),
                "env": env,
            }
        )
    return records
