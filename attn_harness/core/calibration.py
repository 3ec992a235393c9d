"""Calibrated baselines: a population's cells compared in units of their sampling spread.

A baseline of a population extraction (dim ``sample``) holds every sample. Per cell (step,
layer, head, query frame, key frame) the comparison computes a z score and fails the cell
when ``|z| > sigmas``:

* **paired**, when the run repeats the baseline's samples (same prompt and seed coordinates,
  so the same initial noise): with ``d`` the per-sample difference run - baseline,
  ``z = mean(d) / max(sd(d) / sqrt(n), floor)``. Prompt and seed variation cancel, so a small
  real change stands out.
* **unpaired** (Welch), when the samples differ (a new seed set):
  ``z = (mean_run - mean_baseline) / max(sqrt(sd_b^2 / n_b + sd_r^2 / n_r), floor)``, the
  difference of two sample means in units of its standard error.

``floor`` is the spec's float tolerance, ``atol + rtol * |mean_baseline|``: a cell that hardly
varies (a probability near 0, a repeat on the same machine) is held to the float tolerance
rather than to a spread of almost nothing.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from attn_harness.core.schema import SAMPLE_DIM

# Chosen from measured noise (docs/head-types.md, "Calibrated baselines"): on tiny-trained,
# 8 prompts x 2 seeds against the same prompts x 2 other seeds gave |z| <= 3.9 over 3,888
# cells (unpaired); one head's query weights scaled by 1.02 gave paired |z| of 61 to 83.
DEFAULT_SIGMAS = 6.0


def _samples_of(da: xr.DataArray) -> list[tuple[str, int]]:
    return [(str(p), int(s)) for p, s in zip(da["prompt"].values, da["seed"].values)]


def population_z(expected: xr.DataArray, obtained: xr.DataArray, atol: float, rtol: float) -> xr.Dataset:
    """Per cell: ``z``, both means and spreads; attrs say whether the comparison was paired."""
    base, run = expected.astype(np.float64), obtained.astype(np.float64).transpose(*expected.dims)
    n_b, n_r = base.sizes[SAMPLE_DIM], run.sizes[SAMPLE_DIM]

    def spread(da: xr.DataArray) -> xr.DataArray:
        return da.std(SAMPLE_DIM, ddof=1) if da.sizes[SAMPLE_DIM] > 1 else xr.zeros_like(da.isel({SAMPLE_DIM: 0}, drop=True))

    means = {"baseline_mean": base.mean(SAMPLE_DIM), "obtained_mean": run.mean(SAMPLE_DIM)}
    spreads = {"baseline_sd": spread(base), "obtained_sd": spread(run)}
    floor = atol + rtol * np.abs(means["baseline_mean"])
    paired = _samples_of(expected) == _samples_of(obtained)
    if paired:
        diff = run - base.values
        z = diff.mean(SAMPLE_DIM) / np.maximum(spread(diff) / np.sqrt(n_b), floor)
    else:
        se = np.sqrt(spreads["baseline_sd"] ** 2 / n_b + spreads["obtained_sd"] ** 2 / n_r)
        z = (means["obtained_mean"] - means["baseline_mean"]) / np.maximum(se, floor)
    nan_mismatch = means["baseline_mean"].isnull() != means["obtained_mean"].isnull()
    z = z.where(~nan_mismatch, np.inf).fillna(0.0)
    return xr.Dataset({"z": z, **means, **spreads},
                      attrs={"baseline_n": n_b, "obtained_n": n_r, "paired": int(paired)})


def calibrated_differences(name: str, expected: xr.DataArray, obtained: xr.DataArray, atol: float, rtol: float,
                           sigmas: float, worst: int = 5) -> list[str]:
    """Lines naming the cells whose mean moved by more than ``sigmas``; empty when none did."""
    found = population_z(expected, obtained.transpose(*expected.dims), atol, rtol)
    z = found["z"]
    bad = np.abs(z) > sigmas
    count = int(bad.sum())
    if count == 0:
        return []
    n_b, n_o = found.attrs["baseline_n"], found.attrs["obtained_n"]
    how = "paired, the same samples" if found.attrs["paired"] else f"unpaired, {n_b} baseline vs {n_o} obtained samples"
    lines = [f"{name}: {count} of {bad.size} cells moved by more than {sigmas:g} sigma "
             f"({how}; floor atol={atol:g} rtol={rtol:g})"]
    order = np.argsort(-np.abs(z.values), axis=None, kind="stable")[:worst]
    for flat in order:
        if not bad.values.flat[flat]:
            break
        index = np.unravel_index(flat, z.shape)
        where = " ".join(f"{dim}={int(z[dim].values[i])}" for dim, i in zip(z.dims, index))
        cell = {key: float(found[key].values[index]) for key in ("baseline_mean", "baseline_sd", "obtained_mean", "obtained_sd")}
        lines.append(f"  {where} moved by {float(z.values[index]):+.1f} sigma: baseline {cell['baseline_mean']:.5g} "
                     f"+/- {cell['baseline_sd']:.2g}, obtained {cell['obtained_mean']:.5g} +/- {cell['obtained_sd']:.2g}")
    return lines
