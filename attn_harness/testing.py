"""Assertions for ordinary pytest functions: a property check and a baseline regression.

    from attn_harness.testing import assert_baseline, assert_property

    def test_layer_3_keeps_its_sinks(extraction):
        assert_property(extraction, "sink_heads", layer=3, expected=[0, 2])
    def test_layer_3_is_unchanged(extraction, request):
        assert_baseline(extraction, Path(__file__).parent / "baselines" / "layer3.nc", request, layer=3)

A failing property says how many units (cells, rows, heads) violate it and where, by
coordinates; a failing baseline says how many cells differ, by how much and where, the
provenance that changed, and how to regenerate the file. Baselines follow pytest-regressions:
a missing baseline is written and the test fails once; ``--force-regen`` rewrites a differing
one and fails; ``--regen-all`` rewrites and passes (pytest's ``request`` fixture carries the flags).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

from attn_harness.accessor import require_layer, run_property
from attn_harness.core.checks import CheckResult
from attn_harness.core.spec import DEFAULT_TOLERANCES, Tolerance
from attn_harness.pytest.baseline import check_baseline, layer_slice


class PropertyWarning(UserWarning):
    """A property with ``severity="warn"`` did not hold."""


def assert_property(ds: xr.Dataset, name: str, *, layer: int | None = None, **params: Any) -> CheckResult:
    """Fail the test unless property ``name`` holds on ``ds`` (one ``layer`` of it, or every layer).

    ``params`` are the property's parameters as in a spec file (``expected=[0, 3]``,
    ``mostly=0.9``, ``severity="warn"`` ...). A warn-severity failure emits a ``PropertyWarning``
    and returns. Returns the result for further inspection.
    """
    __tracebackhide__ = True
    result = run_property(ds, name, params, layer=layer)
    where = f" (layer {layer})" if layer is not None else ""
    if result.status == "fail":
        raise AssertionError(f"{result.message}{where}")
    if result.status == "warn":
        warnings.warn(PropertyWarning(f"{result.message}{where}"), stacklevel=2)
    return result


def assert_baseline(
    ds: xr.Dataset,
    path: str | os.PathLike,
    request: pytest.FixtureRequest,
    *,
    layer: int | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
) -> None:
    """Fail the test unless ``ds`` (one ``layer`` of it) matches the NetCDF baseline at ``path``.

    ``tolerances`` per variable (``logits``, ``mass``) default to the spec files' defaults.
    ``request`` is the test's pytest ``request`` fixture (it carries ``--force-regen``).
    """
    __tracebackhide__ = True
    path = Path(path)
    obtained = layer_slice(ds, require_layer(ds, layer)) if layer is not None else ds
    check_baseline(
        obtained,
        path,
        {**DEFAULT_TOLERANCES, **(tolerances or {})},
        config=request.config,
        regen_command=f"pytest {request.node.nodeid}",
    )
