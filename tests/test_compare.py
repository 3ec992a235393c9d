"""Checkpoint comparison: geometry errors, differences, rankings, flips and the HTML page.

Oracles are plain float64 NumPy on the same float32 values (tolerance 1e-5 absolute).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from tests.test_figures import planted_dataset

from attn_harness.core.errors import HarnessError
from attn_harness.report import compare
from attn_harness.report.html import render_compare

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


def test_a_new_sink_head_and_a_lost_diagonal_are_flips():
    a = planted_dataset(sink_heads=(0,))
    b = planted_dataset(sink_heads=(0, 1))
    b["logits"].loc[{"head": 2}] -= 3.0 * np.eye(9)  # head 2 loses its diagonal
    found = compare.flips(compare.align(a, b), 1, 5)
    kinds = {(f["head"], f["kind"].split(" (")[0]) for f in found}
    assert (1, "sink head") in kinds and (2, "diagonal dominance") in kinds
    assert not any(f["head"] in (0, 3) for f in found)


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


def test_render_compare_writes_sections_flips_and_three_grids_per_layer(tmp_path):
    a = planted_dataset(mask="bidirectional")
    b = planted_dataset(mask="block-causal", seed=1, sink_heads=(0, 1))
    out = render_compare(a, b, tmp_path / "compare.html", labels=("base", "distilled"), layers=[0, 2])
    page = out.read_text()
    assert re.findall(r'<details class="layer" id="layer-(\d+)"', page) == ["0", "2"]
    aligned = compare.align(a, b, layers=[0, 2])
    expected = sum(len(compare.flips(aligned, layer, 5)) for layer in (0, 2))
    assert expected > 0 and page.count('<tr class="flip"') == expected
    assert page.count('<img src="data:image/png;base64,') == 3 * 2
    assert "distilled - base" in page and page.count("<svg") == 1


def test_mismatched_geometry_writes_no_file(tmp_path):
    with pytest.raises(HarnessError, match="key_frame|query_frame"):
        render_compare(planted_dataset(frames=9), planted_dataset(frames=6), tmp_path / "c.html")
    assert list(tmp_path.iterdir()) == []
