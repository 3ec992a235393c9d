"""``ds.attn``: the seed's statistics, figures and property checks on an extraction.

Data: the planted synthetic extraction of tests/test_figures.py (a self-frame bump in every
head, a +4 sink on key frame 0 in the listed heads). Statistics are compared with float64 loops
written here, to 1e-5 (float32 storage of values of size ~5 rounds at ~5e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

import attn_harness  # noqa: F401  (registers ds.attn)
from attn_harness.core.errors import HarnessError
from tests.test_figures import planted_dataset

TOL = 1e-5


def seed_stats(view: np.ndarray, query_frames: list[int]) -> list[dict]:
    """The seed notebook's per-head loop, in float64, over the valid (non-NaN) key frames."""
    rows = []
    for head in range(view.shape[0]):
        profile = [
            sum(float(view[head, a, b]) for a in query_frames) / len(query_frames) for b in range(view.shape[2])
        ]
        valid = [r for r in profile if not math.isnan(r)]
        middle = valid[1:-1] if len(valid) > 2 else valid
        mid = sum(middle) / len(middle)
        rows.append({"first": valid[0], "mid": mid, "last": valid[-1], "sink": valid[0] - mid})
    return rows


def test_stats_reproduce_the_seed_table_on_the_default_last_block() -> None:
    ds = planted_dataset(sink_heads=(0, 2))
    table = ds.attn.stats(layer=1, step="first")
    view = ds["logits"].sel(step=0, layer=1).transpose("head", "query_frame", "key_frame").values.astype(np.float64)
    assert table.summary["query_frames"] == [6, 7, 8]
    for row, want in zip(table.summary["heads"], seed_stats(view, [6, 7, 8])):
        for key in ("first", "mid", "last", "sink"):
            assert abs(row[key] - want[key]) < TOL, (row["head"], key)
    diagonal = np.mean([view[h, a, a] for h in range(view.shape[0]) for a in range(view.shape[1])])
    assert abs(table.summary["diagonal_mean"] - diagonal) < TOL
    assert abs(table.summary["first_frame_mean"] - view[:, :, 0].mean()) < TOL
    text = str(table)
    assert "Diagonal mean (self-attention)" in text and "H 2: first=" in text and "sink=" in text
    assert "<table" in table._repr_html_() and "H3" in table._repr_html_()
    assert list(table.to_dataframe().columns) == ["first", "mid", "last", "sink"]


def test_step_defaults_to_the_last_captured_step_and_unknown_steps_are_named() -> None:
    ds = planted_dataset(steps=3)
    assert ds.attn.step() == 10 and ds.attn.step("last") == 10 and ds.attn.step("first") == 0
    assert ds.attn.stats(layer=0).step == 10
    with pytest.raises(HarnessError, match=r"step 7 is not in this extraction; use 'first', 'last' or one of \[0, 5, 10\]"):
        ds.attn.stats(layer=0, step=7)
    with pytest.raises(HarnessError, match=r"layer 9 is not in this extraction; it has layers \[0, 1, 2\]"):
        ds.attn.plot_heads(layer=9)


def test_head_stats_keep_step_layer_and_head_and_match_the_seed_table() -> None:
    ds = planted_dataset(steps=2, layers=3, sink_heads=(1,))
    stats = ds.attn.head_stats()
    assert set(stats.data_vars) == {"first", "mid", "last", "sink", "diagonal"}
    assert dict(stats.sizes) == {"step": 2, "layer": 3, "head": 4}
    one = ds.attn.stats(layer=2, step=5)
    for row in one.summary["heads"]:
        assert abs(float(stats["sink"].sel(step=5, layer=2, head=row["head"])) - row["sink"]) < TOL
    sinks = ds.attn.head_stats(layer=2, step="last")["sink"]
    assert sinks.dims == ("head",) and int(sinks.idxmax("head")) == 1


def test_head_stats_on_mass_skip_the_cells_a_block_causal_mask_hides() -> None:
    ds = planted_dataset(mask="block-causal", frames=9)
    stats = ds.attn.head_stats(layer=0, step="first", metric="mass", query_frames=[3])
    view = ds["mass"].sel(step=0, layer=0).transpose("head", "query_frame", "key_frame").values.astype(np.float64)
    visible = view[:, :, :6].copy()  # query frame 3 (block 1) sees key frames 0..5 only
    for head, want in enumerate(seed_stats(visible, [3])):
        assert abs(float(stats["last"].sel(head=head)) - want["last"]) < TOL  # key frame 5, not the masked 8
        assert abs(float(stats["sink"].sel(head=head)) - want["sink"]) < TOL


def test_plot_heads_and_plot_bars_draw_one_panel_per_head() -> None:
    ds = planted_dataset(heads=6)
    grid = ds.attn.plot_heads(layer=1, step="first")
    assert isinstance(grid, Figure)
    assert len([ax for ax in grid.axes if ax.images and ax.get_label() != "colorbar"]) == 6
    assert "Layer 1, step 0" in grid._suptitle.get_text()
    bars = ds.attn.plot_bars(layer=1)
    titled = [ax.get_title() for ax in bars.axes if ax.get_title()]
    assert len(titled) == 6 and titled[0].startswith("H0 (sink=")
    pixels = ds.attn.plot_heads(layer=1, pixel_frames=True)
    assert any(ax.get_xlabel() == "key frame (pixel)" for ax in pixels.axes)


def test_check_passes_where_the_property_holds_and_renders_in_a_notebook() -> None:
    ds = planted_dataset(sink_heads=(0, 3))
    report = ds.attn.check("sink_heads", layer=2, expected=[0, 3], threshold=1.0)
    assert report.passed and bool(report) and report.status == "pass"
    page = report._repr_html_()
    assert "PASS" in page and "sink_heads" in page and "<table" not in page


def test_check_fails_naming_the_heads_that_break_the_property() -> None:
    ds = planted_dataset(sink_heads=(0, 3))
    report = ds.attn.check("sink_heads", layer=2, expected=[0, 1], threshold=1.0)
    assert not report.passed and report.status == "fail"
    located = {(v.location["head"], v.location["step"]) for v in report.result.violations}
    assert located == {(1, 0), (1, 5), (3, 0), (3, 5)}  # head 1 lost its sink, head 3 gained one
    page = report._repr_html_()
    assert "FAIL" in page and "<table" in page and "unlisted head gained a sink" in page
    assert "FAIL (layer 2) sink_heads on logits: 4 of 8 heads violate" in str(report)


def test_check_rejects_unknown_properties_and_parameters_in_one_line() -> None:
    ds = planted_dataset()
    with pytest.raises(HarnessError, match="unknown property 'sinks'; known: value_range"):
        ds.attn.check("sinks", layer=0)
    with pytest.raises(HarnessError, match="sink_heads: heads_expected: unknown key.*; known: .*expected"):
        ds.attn.check("sink_heads", layer=0, heads_expected=[0])
    with pytest.raises(HarnessError, match="sink_heads: expected: missing required parameter"):
        ds.attn.check("sink_heads", layer=0)
    with pytest.raises(HarnessError, match="threshold: expected a finite number"):
        ds.attn.check("sink_heads", layer=0, expected=[0], threshold="high")


def test_statistics_and_checks_leave_the_dataset_as_it_was() -> None:
    ds = planted_dataset(mask="block-causal")
    before = ds.copy(deep=True)
    ds.attn.head_stats(metric="mass")
    ds.attn.stats(layer=0)
    ds.attn.check("row_stochastic", layer=0)
    ds.attn.check("sink_score", layer=0, sign="positive", heads=[0])
    assert ds.identical(before)
    assert all(var.attrs == before[name].attrs for name, var in ds.variables.items())


def test_ds_attn_exists_however_late_xarray_is_imported() -> None:
    """The pytest plugin imports the package before any test file imports xarray."""
    import subprocess
    import sys

    code = ("import sys, attn_harness; assert 'xarray' not in sys.modules; "
            "import xarray as xr; print(hasattr(xr.Dataset(), 'attn'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "True"
