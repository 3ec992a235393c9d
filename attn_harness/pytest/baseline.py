"""Regression of one layer of an extraction against a stored baseline (NetCDF).

``compare`` checks dims and coords first, then values with explicit per-variable
``atol``/``rtol`` (``attn_harness.core.spec.DEFAULT_TOLERANCES``), and explains a difference: the
provenance that differs (fingerprint, dtype, device, versions), then per variable how many
cells differ, the largest absolute and relative differences with their locations and a
table of the worst cells. ``check_baseline`` runs it through pytest-regressions'
``perform_regression_check``, so missing baselines, ``--force-regen`` and ``--regen-all``
behave exactly as in every other pytest-regressions fixture; a match is decided in memory
first (``matches_baseline``), so a passing check reads one file and writes none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from pytest_regressions.common import perform_regression_check

from attn_harness.core import store
from attn_harness.core.errors import HarnessError
from attn_harness.core.calibration import DEFAULT_SIGMAS, calibrated_differences
from attn_harness.core.results import VariableDiff, finite_or_text
from attn_harness.core.schema import DIMS, SAMPLE_DIM, provenance_keys
from attn_harness.core.spec import Tolerance

# What a baseline records about the run that a difference may come from (not where or when).
PROVENANCE_ATTRS: tuple[str, ...] = provenance_keys("model", "probe", "software")
WORST_CELLS = 5


def layer_slice(ds: xr.Dataset, layer: int) -> xr.Dataset:
    """What a baseline stores: every step and variable of one layer, with the extraction's attrs."""
    return ds.sel(layer=[layer])


def provenance_differences(expected: xr.Dataset, obtained: xr.Dataset) -> list[str]:
    lines = []
    for key in PROVENANCE_ATTRS:
        before, now = expected.attrs.get(key, "<absent>"), obtained.attrs.get(key, "<absent>")
        if before != now:
            lines.append(f"  {key}: baseline {before!r} vs obtained {now!r}")
    return lines


def _structure_differences(expected: xr.Dataset, obtained: xr.Dataset) -> list[str]:
    problems = []
    if (SAMPLE_DIM in expected.dims) != (SAMPLE_DIM in obtained.dims):
        which = "baseline" if SAMPLE_DIM in expected.dims else "run"
        problems.append(f"only the {which} is a population (dim '{SAMPLE_DIM}'): regenerate the baseline from this probe")
    if set(expected.data_vars) != set(obtained.data_vars):
        problems.append(f"variables: baseline {sorted(expected.data_vars)} vs obtained {sorted(obtained.data_vars)}")
    for dim in DIMS:
        before = expected[dim].values.tolist() if dim in expected.coords else None
        now = obtained[dim].values.tolist() if dim in obtained.coords else None
        if before != now:
            problems.append(f"coordinate {dim}: baseline {before} vs obtained {now}")
    if not problems and not np.allclose(expected["timestep"].values, obtained["timestep"].values):
        problems.append(
            f"coordinate timestep: baseline {expected['timestep'].values.tolist()} vs obtained "
            f"{obtained['timestep'].values.tolist()}"
        )
    return problems


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


def check_baseline(
    obtained: xr.Dataset,
    path: Path,
    tolerances: Mapping[str, Tolerance],
    *,
    config: pytest.Config,
    item_name: str,
    regen_command: str,
    sigmas: float = DEFAULT_SIGMAS,
) -> None:
    """Compare with the baseline at ``path`` (pytest-regressions semantics); fail with a diff.

    A missing baseline is written and the check fails; ``--force-regen`` rewrites a differing
    baseline and still fails; ``--regen-all`` rewrites it and passes. On a difference the
    obtained data is left beside the baseline as ``*.obtained.nc`` (a CI artifact).
    """
    __tracebackhide__ = True
    obtained_path = obtained_file(path)
    if matches_baseline(obtained, path, tolerances, config=config):
        obtained_path.unlink(missing_ok=True)  # left by an earlier failing run
        return

    def check_fn(obtained_file_: Path, expected_file: Path) -> None:
        try:
            expected = store.read_dataset(expected_file)
        except HarnessError as err:
            raise AssertionError(
                f"baseline {path} cannot be read: {err}\nregenerate it from this run: {regen_command} --force-regen"
            ) from None
        lines = compare(expected, store.read_dataset(obtained_file_), tolerances, sigmas)
        if lines:
            raise AssertionError("\n".join(
                [f"baseline {path} differs from this run", *lines,
                 f"obtained data written to {obtained_path}",
                 f"if the change is intended, regenerate: {regen_command} --force-regen"]
            ))

    # perform_regression_check reads only .config and .node.{cls,name} from the request.
    request = SimpleNamespace(config=config, node=SimpleNamespace(cls=None, name=item_name))
    try:
        perform_regression_check(
            datadir=path.parent,
            original_datadir=path.parent,
            request=request,
            check_fn=check_fn,
            dump_fn=lambda target: store.write_dataset(obtained, target),
            extension=".nc",
            fullpath=path,
            obtained_filename=obtained_path,
        )
    except pytest.fail.Exception:
        obtained_path.unlink(missing_ok=True)  # the baseline itself was (re)written from this run
        raise
    obtained_path.unlink(missing_ok=True)


def matches_baseline(obtained: xr.Dataset, path: Path, tolerances: Mapping[str, Tolerance], *,
                     config: pytest.Config) -> bool:
    """The fast path of a passing check: the baseline read once and compared in memory, no
    file written. Anything else (missing or unreadable baseline, a difference, ``--force-regen``,
    ``--regen-all``) is False and goes through pytest-regressions, which writes and explains."""
    if config.getoption("force_regen", False) or config.getoption("regen_all", False) or not path.is_file():
        return False
    try:
        expected = store.read_dataset(path)
    except HarnessError:
        return False
    return not compare(expected, obtained, tolerances)


def obtained_file(path: Path) -> Path:
    return path.with_name(path.stem + ".obtained" + path.suffix)
