"""How far two extractions of the same probe are apart: per variable, the largest absolute and
relative difference and where (step, layer, head, query_frame, key_frame).

Used by ``attn-harness drift`` (two environments, one spec: the measurements behind the default
tolerances in ``docs/numerics.md``) and by the baseline comparison. NaN equals NaN (masked
cells); NaN against a number counts as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from attn_harness.core.environment import class_of
from attn_harness.core.schema import DIMS, SAMPLE_DIM

# Attrs worth showing when two extractions differ: they decide the numbers (attn_harness.model.numerics).
ENVIRONMENT_ATTRS: tuple[str, ...] = (
    "environment_class", "device", "device_name", "cpu_capability", "torch_threads", "numerics_env",
    "fp32_precision", "deterministic_algorithms", "attention_backend", "torch_version", "diffusers_version",
    "cuda_version",
)


@dataclass(frozen=True)
class Extreme:
    """The largest difference of one kind and the cell it is at."""

    value: float
    where: dict[str, int]
    a: float
    b: float

    def text(self) -> str:
        where = " ".join(f"{dim}={index}" for dim, index in self.where.items())
        return f"{self.value:.3g} at {where} ({self.a:.6g} vs {self.b:.6g})"


@dataclass(frozen=True)
class VariableDrift:
    name: str
    cells: int
    nan_mismatch: int
    max_abs: Extreme
    max_rel: Extreme


def structure_differences(a: xr.Dataset, b: xr.Dataset, labels: tuple[str, str] = ("baseline", "obtained")) -> list[str]:
    """Variables, dims and coords that differ (values are comparable only when this is empty)."""
    first, second = labels
    problems = []
    if (SAMPLE_DIM in a.dims) != (SAMPLE_DIM in b.dims):
        which = first if SAMPLE_DIM in a.dims else second
        problems.append(f"only the {which} is a population (dim '{SAMPLE_DIM}'): regenerate the baseline from this probe")
    if set(a.data_vars) != set(b.data_vars):
        problems.append(f"variables: {first} {sorted(a.data_vars)} vs {second} {sorted(b.data_vars)}")
    for dim in DIMS:
        before = a[dim].values.tolist() if dim in a.coords else None
        now = b[dim].values.tolist() if dim in b.coords else None
        if before != now:
            problems.append(f"coordinate {dim}: {first} {before} vs {second} {now}")
    if not problems and not np.allclose(a["timestep"].values, b["timestep"].values):
        problems.append(
            f"coordinate timestep: {first} {a['timestep'].values.tolist()} vs {second} {b['timestep'].values.tolist()}"
        )
    return problems


def differences(a: xr.DataArray, b: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(|b - a|, |b - a| / |a|, NaN mismatch)`` in float64 over ``a``'s dims; 0 where both are NaN
    (and relative 0 where ``a`` is 0)."""
    b = b.transpose(*a.dims)
    x = a.values.astype(np.float64)
    y = b.values.astype(np.float64)
    x_nan, y_nan = np.isnan(x), np.isnan(y)
    abs_diff = np.where(x_nan | y_nan, 0.0, np.abs(y - x))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_diff = np.where(np.abs(np.nan_to_num(x)) > 0, abs_diff / np.abs(x), 0.0)
    return abs_diff, rel_diff, x_nan != y_nan


def location(da: xr.DataArray, flat_index: int) -> dict[str, int]:
    """Coordinates of a flat index into ``da`` (step/layer/head/frame numbers, not positions)."""
    index = np.unravel_index(flat_index, da.shape)
    return {dim: int(da[dim].values[i]) for dim, i in zip(da.dims, index)}


def _extreme(diffs: np.ndarray, a: xr.DataArray, b: xr.DataArray) -> Extreme:
    flat = int(np.argmax(diffs))
    return Extreme(float(diffs.flat[flat]), location(a, flat), float(a.values.flat[flat]),
                   float(b.transpose(*a.dims).values.flat[flat]))


def variable_drift(name: str, a: xr.DataArray, b: xr.DataArray) -> VariableDrift:
    abs_diff, rel_diff, nan_mismatch = differences(a, b)
    return VariableDrift(name=name, cells=int(abs_diff.size), nan_mismatch=int(nan_mismatch.sum()),
                         max_abs=_extreme(abs_diff, a, b), max_rel=_extreme(rel_diff, a, b))


def drift(a: xr.Dataset, b: xr.Dataset) -> list[VariableDrift]:
    """Per variable of two extractions with the same structure; ``ValueError`` naming what differs."""
    problems = structure_differences(a, b, ("a", "b"))
    if problems:
        raise ValueError("the extractions have different structure: " + "; ".join(problems))
    return [variable_drift(name, a[name], b[name]) for name in sorted(a.data_vars)]


def environment_differences(a: xr.Dataset, b: xr.Dataset) -> list[tuple[str, str, str]]:
    """``(attr, in a, in b)`` for the numerics-deciding attrs that differ."""
    found = []
    for key in ENVIRONMENT_ATTRS:
        before = class_of(a.attrs) if key == "environment_class" else a.attrs.get(key, "<absent>")
        now = class_of(b.attrs) if key == "environment_class" else b.attrs.get(key, "<absent>")
        if before != now:
            found.append((key, str(before), str(now)))
    return found


def format_drift(a: xr.Dataset, b: xr.Dataset, labels: tuple[str, str] = ("a", "b")) -> str:
    """The report ``attn-harness drift`` prints: environments that differ, then one block per variable."""
    lines = [f"drift of {labels[1]} against {labels[0]}"]
    env = environment_differences(a, b)
    lines += [f"  {key}: {before} vs {now}" for key, before, now in env] or ["  same environment attrs"]
    for item in drift(a, b):
        lines.append(f"{item.name}: {item.cells} cells, {item.nan_mismatch} NaN mismatches")
        lines.append(f"  max abs diff {item.max_abs.text()}")
        lines.append(f"  max rel diff {item.max_rel.text()}")
    return "\n".join(lines)


def drift_record(a: xr.Dataset, b: xr.Dataset) -> dict:
    """The same as data (``--json``)."""
    return {
        "environment": {key: [before, now] for key, before, now in environment_differences(a, b)},
        "variables": {
            item.name: {
                "cells": item.cells, "nan_mismatch": item.nan_mismatch,
                "max_abs": {"value": item.max_abs.value, "where": item.max_abs.where},
                "max_rel": {"value": item.max_rel.value, "where": item.max_rel.where},
            }
            for item in drift(a, b)
        },
    }
