"""Regression of one layer of an extraction against a stored baseline (NetCDF), per environment class.

A baseline records the environment class it was made in (``cpu-float32``, ``cuda-float32``,
``cuda-bfloat16``: ``attn_harness.core.environment``). A run compares against, in this order:

1. the variant for its own class, ``layer3.cuda-float32.nc`` beside ``layer3.nc``, with the
   spec's tolerances;
2. the baseline file itself when it was made in the run's class, with the spec's tolerances;
3. the baseline file made in another class, with the spec's declared cross-environment
   tolerance (``baseline: {cross_env: ...}``);
4. else the item fails and says how to add a variant or a cross-environment tolerance.

Nothing is loosened silently: every message names the file and the tolerance used. ``compare``
checks dims and coords first, then values with explicit per-variable ``atol``/``rtol``, and
explains a difference: the provenance that differs, then per variable how many cells differ,
the largest absolute and relative differences with their locations, the worst cells
(``variable_differences``: the same as data for results.json).

Regeneration (the pytest-regressions options): a missing baseline is written and the item
fails; ``--force-regen`` rewrites the current class's file when it differs (the item still
fails); ``--regen-all`` rewrites it unless the values are within tolerance and the provenance
that decides them is unchanged, and ``attn_harness.pytest.regen`` says how many it rewrote and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from attn_harness.core import store
from attn_harness.core.calibration import DEFAULT_SIGMAS, calibrated_differences
from attn_harness.core.drift import structure_differences as _structure_differences
from attn_harness.core.environment import class_of
from attn_harness.core.errors import HarnessError
from attn_harness.core.results import VariableDiff, finite_or_text
from attn_harness.core.schema import SAMPLE_DIM, provenance_keys
from attn_harness.core.spec import Tolerance

# What a baseline records about the run that a difference may come from (not where or when).
PROVENANCE_ATTRS: tuple[str, ...] = ("environment_class", *provenance_keys("model", "probe", "software"))
# What the numbers are of: a change here makes --regen-all rewrite a baseline even when the
# values happen to agree. Versions, threads and timestamps are not: they only move values
# within the tolerance (if they move them beyond it, the values say so).
RELEVANT_PROVENANCE: tuple[str, ...] = (
    "checkpoint_fingerprint", "model_id", "dtype", "prompt", "negative_prompt", "prompt_embedding_fingerprint", "seed",
    "height", "width", "num_frames", "mask", "mode", "block_size", "sample_steps", "guidance", "shift", "branch",
)
WORST_CELLS = 5


def layer_slice(ds: xr.Dataset, layer: int) -> xr.Dataset:
    """What a baseline stores: every step and variable of one layer, with the extraction's attrs."""
    return ds.sel(layer=[layer])


def variant_file(path: Path, environment: str) -> Path:
    """``baselines/s/layer3.nc`` -> ``baselines/s/layer3.cuda-float32.nc``."""
    return path.with_name(f"{path.stem}.{environment}{path.suffix}")


def obtained_file(path: Path) -> Path:
    """Where a differing run's data is left (beside the baseline, whichever variant was compared)."""
    return path.with_name(path.stem + ".obtained" + path.suffix)


def tolerance_text(tolerances: Mapping[str, Tolerance]) -> str:
    return ", ".join(f"{name} atol={tol.atol:g} rtol={tol.rtol:g}" for name, tol in sorted(tolerances.items()))


def provenance_differences(expected: xr.Dataset, obtained: xr.Dataset, keys: tuple[str, ...] = PROVENANCE_ATTRS) -> list[str]:
    lines = []
    for key in keys:
        if key == "environment_class":
            before, now = class_of(expected.attrs), class_of(obtained.attrs)
        else:
            before, now = expected.attrs.get(key, "<absent>"), obtained.attrs.get(key, "<absent>")
        if before != now:
            lines.append(f"  {key}: baseline {before!r} vs obtained {now!r}")
    return lines


def _where(da: xr.DataArray, flat_index: int) -> dict[str, int]:
    index = np.unravel_index(flat_index, da.shape)
    return {dim: int(da[dim].values[i]) for dim, i in zip(da.dims, index)}


def _location_text(location: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in location.items())


def variable_difference(name: str, expected: xr.DataArray, obtained: xr.DataArray, tol: Tolerance) -> VariableDiff:
    """Cells of one variable beyond ``atol + rtol * |baseline|`` (or NaN in one only), the largest
    absolute and relative differences with their locations, and the worst cells."""
    obtained = obtained.transpose(*expected.dims)
    exp = expected.values.astype(np.float64)
    obt = obtained.values.astype(np.float64)
    exp_nan, obt_nan = np.isnan(exp), np.isnan(obt)
    abs_diff = np.where(exp_nan | obt_nan, 0.0, np.abs(obt - exp))
    bad = (exp_nan != obt_nan) | (abs_diff > tol.atol + tol.rtol * np.abs(np.nan_to_num(exp)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_diff = np.where(np.abs(exp) > 0, abs_diff / np.abs(exp), 0.0)
    abs_at, rel_at = int(np.argmax(abs_diff)), int(np.argmax(rel_diff))
    severity = np.where(exp_nan != obt_nan, np.inf, abs_diff)
    worst = [int(i) for i in np.argsort(-severity, axis=None, kind="stable")[:WORST_CELLS] if bad.flat[i]]
    return VariableDiff(
        variable=name, cells=int(bad.size), beyond=int(bad.sum()), share=float(bad.mean()) if bad.size else 0.0,
        nan_mismatch=int((exp_nan != obt_nan).sum()), atol=tol.atol, rtol=tol.rtol,
        max_abs=_cell(expected, abs_diff, abs_at, exp, obt), max_rel=_cell(expected, rel_diff, rel_at, exp, obt),
        worst=[
            {"location": _where(expected, i), "baseline": finite_or_text(exp.flat[i]),
             "obtained": finite_or_text(obt.flat[i]), "abs_diff": finite_or_text(abs_diff.flat[i])}
            for i in worst
        ],
    )


def _cell(da: xr.DataArray, diffs: np.ndarray, flat: int, exp: np.ndarray, obt: np.ndarray) -> dict:
    return {"value": finite_or_text(diffs.flat[flat]), "location": _where(da, flat),
            "baseline": finite_or_text(exp.flat[flat]), "obtained": finite_or_text(obt.flat[flat])}


def variable_differences(
    expected: xr.Dataset, obtained: xr.Dataset, tolerances: Mapping[str, Tolerance]
) -> list[VariableDiff]:
    """One :class:`VariableDiff` per variable (empty when dims or coords differ)."""
    if _structure_differences(expected, obtained):
        return []
    return [
        variable_difference(name, expected[name], obtained[name], tolerances[name]) for name in sorted(expected.data_vars)
    ]


def _value_differences(diff: VariableDiff, dims: Sequence[str]) -> list[str]:
    if diff.beyond == 0:
        return []
    lines = [
        f"{diff.variable}: {diff.beyond} of {diff.cells} cells differ ({diff.share:.2%}) "
        f"beyond atol={diff.atol:g} rtol={diff.rtol:g}"
    ]
    if diff.nan_mismatch:
        lines.append(f"  {diff.nan_mismatch} cells are NaN in one and not the other")
    for label, cell in (("abs", diff.max_abs), ("rel", diff.max_rel)):
        lines.append(
            f"  max {label} diff {float(cell['value']):.6g} at {_location_text(cell['location'])} "
            f"(baseline {float(cell['baseline']):.6g}, obtained {float(cell['obtained']):.6g})"
        )
    header = "".join(f"{d:>12}" for d in dims) + f"{'baseline':>13}{'obtained':>13}{'abs diff':>12}"
    lines += ["  worst cells:", f"  {header}"]
    for cell in diff.worst:
        row = "".join(f"{cell['location'][d]:>12}" for d in dims)
        lines.append(
            f"  {row}{float(cell['baseline']):>13.6g}{float(cell['obtained']):>13.6g}{float(cell['abs_diff']):>12.3g}"
        )
    return lines


def compare(
    expected: xr.Dataset, obtained: xr.Dataset, tolerances: Mapping[str, Tolerance], sigmas: float = DEFAULT_SIGMAS
) -> list[str]:
    """Lines explaining how ``obtained`` differs from ``expected``; empty when it matches.

    Populations (dim ``sample``) are compared cell by cell in units of their sampling spread
    (``attn_harness.core.calibration``); single extractions value by value within the tolerances.
    """
    structure = _structure_differences(expected, obtained)
    values: list[str] = []
    if not structure:
        if SAMPLE_DIM in expected.dims:
            for name in sorted(expected.data_vars):
                tol = tolerances[name]
                values += calibrated_differences(name, expected[name], obtained[name], tol.atol, tol.rtol, sigmas)
        else:
            for diff in variable_differences(expected, obtained, tolerances):
                values += _value_differences(diff, expected[diff.variable].dims)
    if not structure and not values:
        return []
    provenance = provenance_differences(expected, obtained)
    lines = ["provenance that differs:", *provenance] if provenance else ["provenance: same model, dtype, device and versions"]
    if structure:
        lines += ["dims/coords differ:", *(f"  {p}" for p in structure)]
    return lines + values


@dataclass(frozen=True)
class BaselineOutcome:
    """What a passing baseline item did: the file, the tolerance, and for --regen-all the action."""

    file: Path
    tolerance: str
    action: str  # compared | kept | rewritten
    reason: str = ""
    # the baseline's data as compared (not after a rewrite): the caller's report needs no second read of the file
    data: xr.Dataset | None = field(default=None, compare=False, repr=False)

    def text(self) -> str:
        if self.action == "compared":
            return f"matches {self.file} within {self.tolerance}"
        return f"{self.action} {self.file}: {self.reason}"


class _Unreadable(Exception):
    def __init__(self, path: Path, error: HarnessError) -> None:
        super().__init__(f"baseline {path} cannot be read: {error}")
        self.path = path


def _read(path: Path) -> xr.Dataset:
    try:
        return store.read_dataset(path)
    except HarnessError as err:
        raise _Unreadable(path, err) from None


def check_baseline(
    obtained: xr.Dataset,
    path: Path,
    tolerances: Mapping[str, Tolerance],
    *,
    config: pytest.Config,
    regen_command: str,
    cross_env: Mapping[str, Tolerance] | None = None,
    sigmas: float = DEFAULT_SIGMAS,
    spec_location: str = "the spec",
) -> BaselineOutcome:
    """Compare ``obtained`` with the baseline at ``path`` (or its variant for the run's class).

    Returns what was done on a pass; raises ``AssertionError`` with the explanation on a
    difference, ``pytest.fail.Exception`` when a baseline was written and the item must fail
    (missing, or ``--force-regen``). A differing run's data is left as ``*.obtained.nc``.
    """
    __tracebackhide__ = True
    run_class = class_of(obtained.attrs)
    variant = variant_file(path, run_class)
    force_regen = bool(config.getoption("force_regen", False))
    regen_all = bool(config.getoption("regen_all", False))
    obtained_file(path).unlink(missing_ok=True)

    if not variant.is_file() and not path.is_file():
        store.write_dataset(obtained, path)
        if regen_all:
            return BaselineOutcome(path, tolerance_text(tolerances), "rewritten", f"created (environment {run_class})")
        pytest.fail(f"baseline {path} did not exist: created from this run (environment {run_class})", pytrace=False)

    try:
        return _check_existing(obtained, path, variant, run_class, tolerances, cross_env, force_regen, regen_all,
                               regen_command, spec_location, sigmas)
    except _Unreadable as err:
        if not (force_regen or regen_all):
            raise AssertionError(f"{err}\nregenerate it from this run: {regen_command} --force-regen") from None
        store.write_dataset(obtained, err.path)
        if regen_all:
            return BaselineOutcome(err.path, tolerance_text(tolerances), "rewritten", "the old file could not be read")
        pytest.fail(f"{err}: rewritten from this run ({run_class})", pytrace=False)


def _select(path: Path, variant: Path, run_class: str, tolerances: Mapping[str, Tolerance],
            cross_env: Mapping[str, Tolerance] | None) -> tuple[Path, xr.Dataset, Mapping[str, Tolerance] | None, str]:
    """The file a run of ``run_class`` is judged against, its data, the tolerance and its name
    (tolerance None: another class and nothing declared for it)."""
    if variant.is_file():
        return variant, _read(variant), tolerances, f"{run_class} tolerance"
    expected = _read(path)
    base_class = class_of(expected.attrs)
    if base_class == run_class:
        return path, expected, tolerances, f"{run_class} tolerance"
    if cross_env:
        return path, expected, cross_env, f"cross-environment tolerance ({base_class} baseline, {run_class} run)"
    return path, expected, None, ""


def matches_baseline(obtained: xr.Dataset, path: Path, tolerances: Mapping[str, Tolerance], *,
                     config: pytest.Config, cross_env: Mapping[str, Tolerance] | None = None,
                     sigmas: float = DEFAULT_SIGMAS) -> bool:
    """Whether ``check_baseline`` would pass without writing anything (no regeneration asked,
    a readable baseline for the run's class or a declared cross-environment tolerance, values within)."""
    if config.getoption("force_regen", False) or config.getoption("regen_all", False):
        return False
    run_class = class_of(obtained.attrs)
    variant = variant_file(path, run_class)
    if not (variant.is_file() or path.is_file()):
        return False
    try:
        _, expected, tol, _ = _select(path, variant, run_class, tolerances, cross_env)
    except _Unreadable:
        return False
    return tol is not None and not compare(expected, obtained, tol, sigmas)


def _check_existing(obtained: xr.Dataset, path: Path, variant: Path, run_class: str, tolerances: Mapping[str, Tolerance],
                    cross_env: Mapping[str, Tolerance] | None, force_regen: bool, regen_all: bool, regen_command: str,
                    spec_location: str, sigmas: float = DEFAULT_SIGMAS) -> BaselineOutcome:
    __tracebackhide__ = True
    obtained_path = obtained_file(path)
    target, expected, tol, kind = _select(path, variant, run_class, tolerances, cross_env)
    own_file = target if target == variant or tol is tolerances else variant  # what regeneration writes

    if tol is None:  # another class, no variant, no declared cross-environment tolerance
        if force_regen or regen_all:
            store.write_dataset(obtained, variant)
            reason = f"no {run_class} baseline yet (only {path.name}, made in {class_of(expected.attrs)})"
            if regen_all:
                return BaselineOutcome(variant, tolerance_text(tolerances), "rewritten", reason)
            pytest.fail(f"baseline variant {variant} written for {run_class}: {reason}", pytrace=False)
        raise AssertionError(_no_baseline_for_class(expected, obtained, path, variant, run_class, tolerances,
                                                    regen_command, spec_location))

    lines = compare(expected, obtained, tol, sigmas)
    if regen_all:
        changed = provenance_differences(expected, obtained, ("environment_class", *RELEVANT_PROVENANCE))
        if not lines and not changed and own_file == target:
            return BaselineOutcome(target, tolerance_text(tol), "kept", f"values within {tolerance_text(tol)}, same provenance",
                                   data=expected)
        store.write_dataset(obtained, own_file)
        reason = _rewrite_reason(lines, changed, own_file, target)
        return BaselineOutcome(own_file, tolerance_text(tolerances), "rewritten", reason)
    if not lines:
        return BaselineOutcome(target, f"{tolerance_text(tol)} ({kind})", "compared", data=expected)
    if force_regen:
        store.write_dataset(obtained, own_file)
        pytest.fail(f"baseline {own_file} rewritten from this run ({run_class}); it differed from {target}:\n"
                    + "\n".join(lines), pytrace=False)
    store.write_dataset(obtained, obtained_path)
    raise AssertionError("\n".join(
        [f"baseline {target} differs from this run beyond the {kind}: {tolerance_text(tol)}", *lines,
         f"obtained data written to {obtained_path}",
         f"if the change is intended, regenerate: {regen_command} --force-regen (writes {own_file})"]
    ))


def _rewrite_reason(lines: list[str], changed: list[str], own_file: Path, target: Path) -> str:
    if own_file != target:
        return f"first baseline for this environment class (compared so far with {target.name})"
    if changed:
        return "provenance changed: " + "; ".join(line.strip() for line in changed)
    first = next((line for line in lines if "cells differ" in line or "coordinate" in line), lines[0])
    return "values changed: " + first.strip()


def _no_baseline_for_class(expected: xr.Dataset, obtained: xr.Dataset, path: Path, variant: Path, run_class: str,
                           tolerances: Mapping[str, Tolerance], regen_command: str, spec_location: str) -> str:
    base_class = class_of(expected.attrs)
    drift = compare(expected, obtained, tolerances)
    return "\n".join([
        f"baseline {path} was made in environment {base_class}; this run is {run_class}, and there is neither a "
        f"{run_class} variant ({variant}) nor a cross-environment tolerance in the spec. Add either:",
        f"  - a variant for {run_class}: {regen_command} --force-regen (writes {variant}; review and commit it)",
        f"  - a cross-environment tolerance at {spec_location}, chosen from the measured drift in docs/numerics.md, e.g.",
        "      baseline: {cross_env: {logits: {atol: 1e-3, rtol: 1e-4}, mass: {atol: 5e-4, rtol: 1e-4}}}",
        f"for information, against the {base_class} baseline with the {run_class} tolerance ({tolerance_text(tolerances)}):",
        *(f"  {line}" for line in drift), *([] if drift else ["  within it"]),
    ])
