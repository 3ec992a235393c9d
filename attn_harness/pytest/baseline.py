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

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from pytest_regressions.common import perform_regression_check

from attn_harness.core import store
from attn_harness.core.errors import HarnessError
from attn_harness.core.schema import DIMS
from attn_harness.core.spec import Tolerance

PROVENANCE_ATTRS: tuple[str, ...] = (
    "checkpoint_fingerprint", "model_id", "dtype", "device", "torch_version", "diffusers_version",
    "harness_version", "prompt", "seed", "height", "width", "num_frames", "mask", "block_size",
    "sample_steps", "guidance", "shift", "branch",
)
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


def _value_differences(name: str, expected: xr.DataArray, obtained: xr.DataArray, tol: Tolerance) -> list[str]:
    obtained = obtained.transpose(*expected.dims)
    exp = expected.values.astype(np.float64)
    obt = obtained.values.astype(np.float64)
    exp_nan, obt_nan = np.isnan(exp), np.isnan(obt)
    abs_diff = np.where(exp_nan | obt_nan, 0.0, np.abs(obt - exp))
    bad = (exp_nan != obt_nan) | (abs_diff > tol.atol + tol.rtol * np.abs(np.nan_to_num(exp)))
    count = int(bad.sum())
    if count == 0:
        return []
    lines = [
        f"{name}: {count} of {bad.size} cells differ ({count / bad.size:.2%}) beyond atol={tol.atol:g} rtol={tol.rtol:g}"
    ]
    nan_mismatch = int((exp_nan != obt_nan).sum())
    if nan_mismatch:
        lines.append(f"  {nan_mismatch} cells are NaN in one and not the other")
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_diff = np.where(np.abs(exp) > 0, abs_diff / np.abs(exp), 0.0)
    for label, diffs in (("abs", abs_diff), ("rel", rel_diff)):
        flat = int(np.argmax(diffs))
        loc = _where(expected, flat)
        lines.append(
            f"  max {label} diff {diffs.flat[flat]:.6g} at {_location_text(loc)} "
            f"(baseline {exp.flat[flat]:.6g}, obtained {obt.flat[flat]:.6g})"
        )
    severity = np.where(exp_nan != obt_nan, np.inf, abs_diff)
    worst = [i for i in np.argsort(-severity, axis=None, kind="stable")[:WORST_CELLS] if bad.flat[i]]
    header = "".join(f"{d:>12}" for d in expected.dims) + f"{'baseline':>13}{'obtained':>13}{'abs diff':>12}"
    lines += ["  worst cells:", f"  {header}"]
    for i in worst:
        loc = _where(expected, int(i))
        row = "".join(f"{loc[d]:>12}" for d in expected.dims)
        lines.append(f"  {row}{exp.flat[i]:>13.6g}{obt.flat[i]:>13.6g}{abs_diff.flat[i]:>12.3g}")
    return lines


def compare(expected: xr.Dataset, obtained: xr.Dataset, tolerances: Mapping[str, Tolerance]) -> list[str]:
    """Lines explaining how ``obtained`` differs from ``expected``; empty when it matches."""
    structure = _structure_differences(expected, obtained)
    values: list[str] = []
    if not structure:
        for name in sorted(expected.data_vars):
            values += _value_differences(name, expected[name], obtained[name], tolerances[name])
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
        lines = compare(expected, store.read_dataset(obtained_file_), tolerances)
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
