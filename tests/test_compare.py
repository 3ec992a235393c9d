"""Checkpoint comparison: geometry errors, differences, rankings, flips and the HTML page.

Oracles are plain float64 NumPy on the same float32 values (tolerance 1e-5 absolute).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from attn_harness.cli import main
from attn_harness.core import metrics
from attn_harness.core.errors import HarnessError
from attn_harness.core.store import write_dataset
from attn_harness.report import compare
from attn_harness.report.html import render_compare
from attn_harness.report.settings import DEFAULT_TOP
from tests.test_figures import oracle_sink, planted_dataset

TOL = 1e-5


def test_different_frame_counts_name_the_dim_and_both_sizes():
    with pytest.raises(HarnessError, match=r"query_frame differs, A \(base\) has 9 and B \(distilled\) has 6"):
        compare.align(planted_dataset(frames=9), planted_dataset(frames=6), labels=("base", "distilled"))


def test_different_head_counts_and_step_counts_are_errors_naming_the_dim():
    with pytest.raises(HarnessError, match="head differs, A .* has 4 and B .* has 2"):
        compare.align(planted_dataset(heads=4), planted_dataset(heads=2, sink_heads=(0,)))
    with pytest.raises(HarnessError, match="step differs, A .* has 2 and B .* has 3; .*capture_steps"):
        compare.align(planted_dataset(steps=2), planted_dataset(steps=3))


def test_layers_must_be_shared_and_a_subset_of_shared_layers_works():
    a = planted_dataset(layers=4)
    b = planted_dataset(layers=6, seed=1).sel(layer=[2, 3, 4, 5])
    assert compare.align(a, b).a["layer"].values.tolist() == [2, 3]
    assert compare.align(a, b, layers=[3]).b["layer"].values.tolist() == [3]
    with pytest.raises(HarnessError, match=r"layers \[5\]: not in both extractions; layers in both: \[2, 3\]"):
        compare.align(a, b, layers=[3, 5])
    with pytest.raises(HarnessError, match="no shared layers"):
        compare.align(a.sel(layer=[0, 1]), b)


def test_missing_metric_is_an_error_suggesting_logits():
    with pytest.raises(HarnessError, match="B .* has no 'mass' variable.*--metric logits"):
        compare.align(planted_dataset(), planted_dataset().drop_vars("mass"), metric="mass")


def test_steps_are_paired_by_position():
    a = planted_dataset(steps=2)
    b = planted_dataset(steps=2, seed=1).assign_coords(step=[3, 49])
    aligned = compare.align(a, b)
    assert aligned.b["step"].values.tolist() == [0, 5] and aligned.b_steps == [3, 49]
    np.testing.assert_array_equal(aligned.b.isel(step=1).values, b.logits.sel(step=49).values)
    assert compare.pick_step(aligned, "first") == 0 and compare.pick_step(aligned, "last") == 5
    with pytest.raises(HarnessError, match=r"step 7 is not one of A's captured steps \[0, 5\]"):
        compare.pick_step(aligned, 7)


def test_mean_abs_difference_matches_a_brute_force_oracle_and_skips_masked_cells():
    a = planted_dataset(mask="block-causal")
    b = planted_dataset(mask="block-causal", seed=1)
    score = compare.mean_abs_difference(compare.align(a, b))
    diff = np.abs(b.logits.values.astype(np.float64) - a.logits.values.astype(np.float64))
    np.testing.assert_allclose(score.transpose("step", "layer", "head").values, np.nanmean(diff, axis=(-2, -1)), atol=TOL)


def test_top_differences_rank_the_changed_head_first():
    a = planted_dataset()
    b = a.copy(deep=True)
    b["logits"].loc[{"layer": 1, "head": 3}] += 0.7
    b["logits"].loc[{"layer": 2, "head": 0}] += 0.2
    top = compare.top_differences(compare.align(a, b))
    assert [(t["layer"], t["head"]) for t in top[:2]] == [(1, 3), (2, 0)]
    assert top[0]["mean_abs_diff"] == pytest.approx(0.7, abs=TOL) and top[2]["mean_abs_diff"] == 0.0


def test_identical_checkpoints_have_no_flips():
    a = planted_dataset()
    aligned = compare.align(a, a.copy(deep=True))
    assert all(compare.flips(aligned, layer, 5) == [] for layer in (0, 1, 2))


def _counted(found: list[dict]) -> set[tuple[int, str]]:
    return {(f["head"], f["kind"].split(" (")[0]) for f in found if f["counted"]}


def test_a_new_sink_head_and_a_lost_diagonal_are_flips():
    a = planted_dataset(sink_heads=(0,))
    b = planted_dataset(sink_heads=(0, 1))
    b["logits"].loc[{"head": 2}] -= 3.0 * np.eye(9)  # head 2 loses its diagonal
    found = compare.flips(compare.align(a, b), 1, 5)
    assert (1, "sink head") in _counted(found) and (2, "diagonal dominance") in _counted(found)
    assert not any(f["head"] in (0, 3) for f in found)


def _with_sink(ds, head: int, sink: float):
    """``ds`` with head's sink score at step 5, layer 1 moved to exactly ``sink`` (first key column shifted)."""
    ds = ds.copy(deep=True)
    view = ds.logits.sel(step=5, layer=1)
    now = float(oracle_sink(view.values, metrics.default_query_frames(ds))[head])
    ds["logits"].loc[{"step": 5, "layer": 1, "head": head, "key_frame": 0}] += sink - now
    return ds


@pytest.mark.parametrize("sink_a, sink_b, margin, counted", [
    (0.032, -0.040, 0.1, False),  # the noise-level sign change seen on a real pair: not a flip
    (0.032, -0.040, 0.01, True),  # a smaller margin counts it
    (0.5, -0.5, 0.1, True),
])
def test_a_sink_sign_change_counts_only_beyond_the_noise_margin(sink_a, sink_b, margin, counted):
    base = planted_dataset(sink_heads=(0,))
    a, b = _with_sink(base, 2, sink_a), _with_sink(base, 2, sink_b)
    found = [f for f in compare.flips(compare.align(a, b), 1, 5, margin=margin) if f["head"] == 2]
    sign = [f for f in found if f["kind"] == "sink sign"]
    assert len(sign) == 1 and sign[0]["counted"] is counted
    assert sign[0]["a"] == f"{sink_a:+.3f}" and sign[0]["b"] == f"{sink_b:+.3f}"


def test_the_sink_threshold_is_configurable():
    base = planted_dataset(sink_heads=(0,))
    a, b = _with_sink(base, 2, 2.0), _with_sink(base, 2, 4.0)
    aligned = compare.align(a, b)
    assert (2, "sink head") not in _counted(compare.flips(aligned, 1, 5))  # both are sink heads at 1.0
    assert (2, "sink head") in _counted(compare.flips(aligned, 1, 5, sink_threshold=3.0))
    assert (2, "sink head") not in _counted(compare.flips(aligned, 1, 5, sink_threshold=2.1))  # 2.0 is within 10%


def test_one_chosen_step_per_side_compares_a_three_step_with_a_one_step_extraction():
    a = planted_dataset(steps=3)
    b = planted_dataset(steps=1, seed=1)
    with pytest.raises(HarnessError, match="step differs"):
        compare.align(a, b)
    aligned = compare.align(a, b, steps=("last", 0))
    assert aligned.a["step"].values.tolist() == [10] and aligned.b_steps == [0]
    np.testing.assert_array_equal(aligned.b.isel(step=0).values, b.logits.sel(step=0).values)
    with pytest.raises(HarnessError, match=r"step 7 is not one of B \(B\)'s captured steps \[0\]"):
        compare.align(a, b, steps=("first", 7))


def test_layer_ranking_orders_layers_by_mean_abs_difference_and_names_the_worst_cell():
    a = planted_dataset(layers=4)
    b = a.copy(deep=True)
    b["logits"].loc[{"layer": 2}] += 0.3
    b["logits"].loc[{"step": 5, "layer": 3, "head": 1, "query_frame": 6, "key_frame": 4}] += 5.0
    ranking = compare.layer_ranking(compare.align(a, b), 5)
    assert [r["layer"] for r in ranking[:2]] == [2, 3]
    worst = ranking[1]
    assert (worst["head"], worst["query_frame"], worst["key_frame"]) == (1, 6, 4)
    assert worst["max_abs_diff"] == pytest.approx(5.0, abs=TOL) and ranking[0]["mean_abs_diff"] == pytest.approx(0.3, abs=TOL)


def test_diagonal_dominance_is_the_share_of_rows_whose_maximum_is_on_the_diagonal():
    view = planted_dataset(steps=1, layers=1).logits.isel(step=0, layer=0)
    share = compare.diagonal_dominance(view)
    values = view.values.astype(np.float64)
    oracle = [np.mean([values[h, a, a] >= np.nanmax(values[h, a]) for a in range(9)]) for h in range(4)]
    np.testing.assert_allclose(share.values, oracle)
    assert share.sel(head=0) < 0.5 <= share.sel(head=1)  # head 0's sink outweighs its diagonal


def test_head_table_deltas_are_b_minus_a():
    a, b = planted_dataset(), planted_dataset(seed=1, sink_heads=(1,))
    rows = compare.head_table(compare.align(a, b), 2, 5)
    for row in rows:
        for key in ("first", "mid", "last", "sink"):
            before, after, delta = row[key]
            assert delta == pytest.approx(after - before)
    assert rows[1]["sink"][2] > 3.0 and rows[0]["sink"][2] < -3.0


def _grid_data(page: str) -> dict[int, dict]:
    found = re.findall(r'<script type="application/json" class="grid-data">(.*?)</script>', page, flags=re.S)
    return {data["layer"]: data for data in map(json.loads, found)}


def test_render_compare_writes_sections_flips_and_three_grids_per_drawn_layer(tmp_path):
    a = planted_dataset(mask="bidirectional")
    b = planted_dataset(mask="block-causal", seed=1, sink_heads=(0, 1))
    out = render_compare(a, b, tmp_path / "compare.html", labels=("base", "distilled"), layers=[0, 2])
    page = out.read_text()
    assert re.findall(r'<details class="layer" id="layer-(\d+)"', page) == ["0", "2"]
    aligned = compare.align(a, b, layers=[0, 2])
    expected = sum(f["counted"] for layer in (0, 2) for f in compare.flips(aligned, layer, 5))
    assert expected > 0 and page.count('<tr class="flip"') == expected
    assert page.count('<canvas class="heatmap"') == 3 * 2
    assert "distilled - base" in page and page.count("<svg") == 1


def test_the_heatmap_data_is_the_extractions_values_at_the_shown_step(tmp_path):
    a = planted_dataset(mask="block-causal")
    b = planted_dataset(mask="block-causal", seed=1)
    grids = _grid_data(render_compare(a, b, tmp_path / "c.html", step="first").read_text())
    assert sorted(grids) == [0, 1, 2]
    for layer, data in grids.items():
        for side, ds in (("a", a), ("b", b)):
            expected = ds.logits.sel(step=0, layer=layer).values.astype(np.float64).ravel()
            shown = np.array([np.nan if v is None else v for v in data[side]], dtype=np.float64)
            np.testing.assert_array_equal(np.isnan(shown), np.isnan(expected))  # masked cells stay masked
            np.testing.assert_allclose(shown, expected, rtol=5e-4, atol=1e-12, equal_nan=True)  # 4 significant digits
        assert data["heads"] == [0, 1, 2, 3] and data["query"] == list(range(9))


def test_full_grids_only_for_the_top_layers_that_differ_most(tmp_path):
    a = planted_dataset(layers=6)
    b = a.copy(deep=True)
    for layer, shift in ((4, 0.5), (1, 0.3), (5, 0.1)):
        b["logits"].loc[{"layer": layer}] += shift
    page = render_compare(a, b, tmp_path / "c.html", top=2).read_text()
    assert sorted(_grid_data(page)) == [1, 4]
    ranked = re.findall(r'<tr class="ranked-layer" data-layer="(\d+)">', page)
    assert ranked[:3] == ["4", "1", "5"] and len(ranked) == 6
    assert page.index('id="layer-ranking"') < page.index('<details class="layer"')  # overview and ranking first
    assert sorted(_grid_data(render_compare(a, b, tmp_path / "all.html", top=None).read_text())) == list(range(6))
    with pytest.raises(HarnessError, match="--top must be a positive number"):
        render_compare(a, b, tmp_path / "none.html", top=0)


def _provenance(page: str) -> dict[str, bool]:
    rows = re.findall(r'data-key="([^"]+)" data-differs="(true|false)"', page)
    return {key: differs == "true" for key, differs in rows}


def test_provenance_is_diffed_in_full_with_a_banner_when_the_probes_differ(tmp_path):
    a = planted_dataset(mask="bidirectional")
    a.attrs.update(mode="teacher-forced", sample_steps=10, guidance=5.0, shift=3.0, block_size=3)
    same = render_compare(a, a.copy(deep=True), tmp_path / "same.html").read_text()
    assert 'id="probe-warning"' not in same and not any(_provenance(same).values())
    b = planted_dataset(mask="block-causal", seed=1)
    b.attrs.update(mode="rollout", sample_steps=4, guidance=5.0, shift=3.0, block_size=3)
    page = render_compare(a, b, tmp_path / "c.html").read_text()
    rows = _provenance(page)
    assert {"mode", "sample_steps", "guidance", "shift", "block_size", "mask", "seed", "model_id"} <= set(rows)
    assert rows["mode"] and rows["sample_steps"] and rows["mask"] and not rows["guidance"]
    banner = re.search(r'<div class="warning-banner" id="probe-warning"[^>]*>(.*?)</div>', page, flags=re.S).group(1)
    for key in ("mode", "mask", "sample_steps", "seed"):
        assert key in banner
    assert "model_id" not in banner  # a different model is what a comparison is for


def test_a_full_geometry_comparison_stays_under_two_megabytes(tmp_path):
    """30 layers x 12 heads x 3 steps x 21 frames, default --top (time: benchmarks/report_scale.py)."""
    a = planted_dataset(steps=3, layers=30, heads=12, frames=21, mask="block-causal")
    b = planted_dataset(steps=3, layers=30, heads=12, frames=21, mask="block-causal", seed=1, sink_heads=(0, 3))
    page = render_compare(a, b, tmp_path / "c.html")
    assert page.stat().st_size < 2_000_000
    assert len(_grid_data(page.read_text())) == DEFAULT_TOP


def test_the_compare_command_takes_top_steps_and_thresholds(tmp_path, capsys):
    a, b = tmp_path / "a.nc", tmp_path / "b.nc"
    write_dataset(planted_dataset(steps=3, layers=4), a)
    write_dataset(planted_dataset(steps=1, layers=4, seed=1), b)
    out = tmp_path / "c.html"
    argv = ["compare", str(a), str(b), "--out", str(out), "--steps", "last,0", "--top", "2",
            "--sink-threshold", "2.5", "--flip-margin", "0.2"]
    assert main(argv) == 0
    page = out.read_text()
    assert len(_grid_data(page)) == 2 and "sink threshold 2.5" in page and "at least 0.2" in page
    assert "step 10 of A with step 0 of B" in page
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(a), str(b), "--top", "none"])
    assert exit_info.value.code == 2 and "positive number of layers or 'all'" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--steps", "last,0", "--flip-margin", "-0.1"]) == 2
    assert "--flip-margin must be a fraction in [0, 1); got -0.1" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--steps", "last,0", "--sink-threshold", "0"]) == 2
    assert "--sink-threshold must be a positive sink score" in capsys.readouterr().err


def test_mismatched_geometry_writes_no_file(tmp_path):
    with pytest.raises(HarnessError, match="key_frame|query_frame"):
        render_compare(planted_dataset(frames=9), planted_dataset(frames=6), tmp_path / "c.html")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("before, after, counted", [(10, 11, False), (9, 11, False), (9, 12, True), (12, 5, True)])
def test_a_dominance_flip_at_21_query_frames_needs_both_shares_five_points_from_half(before, after, counted):
    aligned = compare.align(planted_dataset(), planted_dataset())
    rows = [{"head": 0, "sink": (2.0, 2.0, 0.0), "diagonal_dominance": (before / 21, after / 21)}]
    (found,) = compare.flips(aligned, 1, 5, rows=rows)
    assert found["kind"].startswith("diagonal dominance") and found["counted"] is counted
