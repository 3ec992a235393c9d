"""Each property passes on data where it holds and fails, naming the location, where it does not.

Data is synthetic (attn_harness.core.schema.build_dataset), shaped like a tiny extraction: 6 latent
frames, block size 3, 4 heads. Statistics are compared with float64 loops written here.
"""

from __future__ import annotations

import numpy as np
import pytest

from attn_harness.core import checks
from attn_harness.core.errors import HarnessError
from attn_harness.core.schema import build_dataset

FRAMES = 6
HEADS = 4
BLOCK = 3


def hidden_cells(frames: int = FRAMES, block: int = BLOCK) -> np.ndarray:
    a = np.arange(frames)
    return (a[np.newaxis, :] // block) > (a[:, np.newaxis] // block)


def softmax_rows(logits: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
    x = logits.astype(np.float64).copy()
    if hidden is not None:
        x[..., hidden] = -np.inf
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def structured_logits(steps: int = 1, layers: int = 1, sink_heads=(0, 2)) -> np.ndarray:
    """2 - 0.3 |a - b| (diagonal-dominant, decaying); sink heads get 1.9 on key frame 0."""
    a = np.arange(FRAMES)
    distance = np.abs(a[:, np.newaxis] - a[np.newaxis, :])
    base = 2.0 - 0.3 * distance
    out = np.empty((steps, layers, HEADS, FRAMES, FRAMES))
    for h in range(HEADS):
        head = base.copy()
        head[1:, 0] = 1.9 if h in sink_heads else base[1:, 0] - 0.5  # the diagonal stays the maximum
        out[:, :, h] = head
    return out


def make_ds(logits: np.ndarray, *, mask: str = "bidirectional", mass: np.ndarray | None = None, layers=None):
    hidden = hidden_cells() if mask == "block-causal" else None
    logits = logits.astype(np.float64)
    if mass is None:
        mass = softmax_rows(logits, hidden)
    if hidden is not None:
        logits = logits.copy()
        logits[..., hidden] = np.nan
    steps, n_layers = logits.shape[:2]
    return build_dataset(
        {"logits": logits, "mass": mass},
        steps=list(range(0, 3 * steps, 3)),
        timesteps=[1000.0 - 100 * s for s in range(steps)],
        layers=layers or list(range(20, 20 + n_layers)),
        attrs={"mask": mask, "block_size": BLOCK},
    )


def run(ds, name, **params):
    return checks.run_check(ds, name, params)


# ----------------------------------------------------------------------------- value_range


def test_value_range_passes_within_bounds_and_skips_masked_nan():
    ds = make_ds(structured_logits(), mask="block-causal")
    assert run(ds, "value_range", min=-5, max=5).status == "pass"


def test_value_range_names_the_cell_outside_the_bounds():
    logits = structured_logits()
    logits[0, 0, 3, 4, 1] = 9.0
    result = run(make_ds(logits), "value_range", max=5)
    assert result.status == "fail"
    assert [v.location for v in result.violations] == [
        {"step": 0, "layer": 20, "head": 3, "query_frame": 4, "key_frame": 1}
    ]
    assert result.violations[0].observed == pytest.approx(9.0)
    assert "step=0 layer=20 head=3 query_frame=4 key_frame=1" in result.message


def test_value_range_finite_catches_nan_in_a_visible_cell():
    logits = structured_logits()
    logits[0, 0, 1, 2, 2] = np.nan
    ds = make_ds(logits)
    assert run(ds, "value_range").status == "fail"
    assert run(ds, "value_range", finite=False).status == "pass"


def test_value_range_finite_catches_inf():
    logits = structured_logits()
    mass = softmax_rows(logits)
    logits[0, 0, 0, 5, 5] = np.inf
    assert run(make_ds(logits, mass=mass), "value_range").violations[0].location["query_frame"] == 5


# ----------------------------------------------------------------------------- sink_score


def oracle_sink(head: np.ndarray, query_frames) -> float:
    """float64 loops: r[b] = mean_a head[a, b]; sink = r[first valid] - mean r[middle valid]."""
    r = []
    for b in range(head.shape[1]):
        column = [float(head[a, b]) for a in query_frames if not np.isnan(head[a, b])]
        r.append(sum(column) / len(column) if column else np.nan)
    valid = [x for x in r if not np.isnan(x)]
    middle = valid[1:-1]
    return valid[0] - sum(middle) / len(middle)


def test_sink_score_positive_passes_on_sink_heads():
    ds = make_ds(structured_logits())
    assert run(ds, "sink_score", sign="positive", heads=[0, 2]).status == "pass"


def test_sink_score_failure_names_head_and_query_frames_with_exact_value():
    logits = structured_logits()
    result = run(make_ds(logits), "sink_score", sign="positive")
    assert result.status == "fail"
    assert [v.location["head"] for v in result.violations] == [1, 3]
    expected = oracle_sink(logits[0, 0, 1], [3, 4, 5])
    assert result.violations[0].observed == pytest.approx(expected, abs=1e-5)  # float32 storage
    assert "head=1" in result.message and "query_frames=[3, 4, 5]" in result.message


def test_sink_score_min_max_and_custom_query_frames():
    logits = structured_logits()
    ds = make_ds(logits)
    value = oracle_sink(logits[0, 0, 0], [0, 1])
    assert run(ds, "sink_score", heads=[0], query_frames=[0, 1], min=value - 0.01, max=value + 0.01).status == "pass"
    assert run(ds, "sink_score", heads=[0], query_frames=[0, 1], min=value + 0.01).status == "fail"


def test_sink_score_on_mass_under_block_causal_mask_uses_visible_keys_only():
    ds = make_ds(structured_logits(), mask="block-causal")
    result = run(ds, "sink_score", metric="mass", sign="positive", heads=[0, 2])
    assert result.status == "pass"
    assert result.metric == "mass"


# ----------------------------------------------------------------------------- diagonal_dominance


def test_diagonal_dominance_passes_on_diagonal_data():
    ds = make_ds(structured_logits(sink_heads=()))
    assert run(ds, "diagonal_dominance").status == "pass"
    assert run(ds, "diagonal_dominance", metric="mass", margin=0.01).status == "pass"


def test_diagonal_dominance_failure_names_query_frame_and_strongest_key_frame():
    logits = structured_logits(sink_heads=())
    logits[0, 0, 2, 4, 1] = 5.0
    result = run(make_ds(logits), "diagonal_dominance")
    assert [v.location for v in result.violations] == [{"step": 0, "layer": 20, "head": 2, "query_frame": 4}]
    assert "key_frame=1" in result.violations[0].note
    assert result.violations[0].observed == pytest.approx(2.0 - 5.0)


def test_diagonal_dominance_against_mean_is_weaker_than_against_max():
    logits = structured_logits(sink_heads=())
    logits[0, 0, 2, 4, 1] = 2.5  # beats the diagonal (2.0) but not the row mean
    ds = make_ds(logits)
    assert run(ds, "diagonal_dominance").status == "fail"
    assert run(ds, "diagonal_dominance", against="mean").status == "pass"
    assert run(ds, "diagonal_dominance", against="mean", margin=5.0).status == "fail"


def test_diagonal_dominance_ignores_masked_keys():
    ds = make_ds(structured_logits(sink_heads=()), mask="block-causal")
    assert run(ds, "diagonal_dominance", metric="mass").status == "pass"


# ----------------------------------------------------------------------------- row_stochastic


def test_row_stochastic_passes_on_softmax_rows():
    assert run(make_ds(structured_logits(), mask="block-causal"), "row_stochastic").status == "pass"


def test_row_stochastic_fails_on_row_that_does_not_sum_to_one():
    logits = structured_logits()
    mass = softmax_rows(logits)
    mass[0, 0, 1, 3, 2] += 0.01
    result = run(make_ds(logits, mass=mass), "row_stochastic")
    assert result.status == "fail"
    assert result.violations[0].location == {"step": 0, "layer": 20, "head": 1, "query_frame": 3}
    assert result.violations[0].observed == pytest.approx(1.01, abs=1e-6)


def test_row_stochastic_fails_on_negative_entry_even_if_row_sums_to_one():
    logits = structured_logits()
    mass = softmax_rows(logits)
    moved = mass[0, 0, 0, 2, 0] + 0.1  # key frame 0 goes to -0.1, key frame 1 takes it: sum stays 1
    mass[0, 0, 0, 2, 0] -= moved
    mass[0, 0, 0, 2, 1] += moved
    result = run(make_ds(logits, mass=mass), "row_stochastic")
    assert [v.location.get("key_frame") for v in result.violations] == [0]


def test_row_stochastic_refuses_logits():
    with pytest.raises(HarnessError, match="mass only"):
        run(make_ds(structured_logits()), "row_stochastic", metric="logits")


# ----------------------------------------------------------------------------- causal


def test_causal_passes_on_block_causal_data_for_both_metrics():
    ds = make_ds(structured_logits(), mask="block-causal")
    assert run(ds, "causal").status == "pass"
    assert run(ds, "causal", metric="logits").status == "pass"


def test_causal_fails_on_bidirectional_data_naming_the_leaking_cell():
    result = run(make_ds(structured_logits()), "causal", heads=[0], metric="mass")
    assert result.status == "fail"
    first = result.violations[0]
    assert first.location == {"step": 0, "layer": 20, "head": 0, "query_frame": 0, "key_frame": 3}
    assert "key block 1 after query block 0" in first.note
    assert len(result.violations) == hidden_cells().sum()


def test_causal_fails_when_one_masked_logit_is_not_nan():
    ds = make_ds(structured_logits(), mask="block-causal")
    ds["logits"][dict(step=0, layer=0, head=2, query_frame=1, key_frame=4)] = 0.5
    result = run(ds, "causal", metric="logits")
    assert [v.location for v in result.violations] == [
        {"step": 0, "layer": 20, "head": 2, "query_frame": 1, "key_frame": 4}
    ]


def test_causal_with_one_block_covering_every_frame_is_an_error():
    with pytest.raises(HarnessError, match="nothing is masked"):
        run(make_ds(structured_logits(), mask="block-causal"), "causal", block_size=FRAMES)


# ----------------------------------------------------------------------------- temporal_decay


def test_temporal_decay_passes_on_decaying_data():
    assert run(make_ds(structured_logits()), "temporal_decay").status == "pass"


def test_temporal_decay_needs_frame_zero_excluded_when_frame_zero_is_a_sink():
    logits = structured_logits(sink_heads=(0,))
    logits[:, :, 0, :, 0] = 3.0  # a strong sink makes far distances look larger
    ds = make_ds(logits)
    assert run(ds, "temporal_decay", exclude_first=False).status == "fail"
    assert run(ds, "temporal_decay").status == "pass"


def test_temporal_decay_names_head_and_distance_where_it_grows():
    logits = structured_logits()
    for a in range(1, FRAMES - 3):
        logits[0, 0, 3, a, a + 3] = 1.9
        logits[0, 0, 3, a + 3, a] = 1.9
    result = run(make_ds(logits), "temporal_decay")
    assert result.status == "fail"
    assert [(v.location["head"], v.location["distance"]) for v in result.violations] == [(3, 3)]
    assert run(make_ds(logits), "temporal_decay", tol=2.0).status == "pass"


# ----------------------------------------------------------------------------- sink_heads


def test_sink_heads_equals_passes_on_exact_set():
    assert run(make_ds(structured_logits()), "sink_heads", expected=[0, 2]).status == "pass"


def test_sink_heads_catches_a_head_that_lost_its_sink():
    result = run(make_ds(structured_logits(sink_heads=(0,))), "sink_heads", expected=[0, 2])
    assert [v.location["head"] for v in result.violations] == [2]
    assert "lost its sink" in result.message


def test_sink_heads_catches_a_head_that_gained_a_sink_unless_contains():
    ds = make_ds(structured_logits(sink_heads=(0, 1, 2)))
    result = run(ds, "sink_heads", expected=[0, 2])
    assert [v.location["head"] for v in result.violations] == [1]
    assert "gained a sink" in result.message
    assert run(ds, "sink_heads", expected=[0, 2], match="contains").status == "pass"


def test_sink_heads_threshold_decides_membership():
    ds = make_ds(structured_logits())
    assert run(ds, "sink_heads", expected=[0, 2], threshold=100.0).status == "fail"


# ----------------------------------------------------------------------------- shared parameters


def test_mostly_accepts_a_share_of_failing_units():
    ds = make_ds(structured_logits())  # heads 1 and 3 have no sink: half the heads fail
    assert run(ds, "sink_score", sign="positive", mostly=0.5).status == "pass"
    assert run(ds, "sink_score", sign="positive", mostly=0.75).status == "fail"


def test_severity_warn_turns_a_failure_into_a_warning():
    result = run(make_ds(structured_logits()), "sink_score", sign="positive", severity="warn")
    assert result.status == "warn" and result.passed and result.violations


def test_steps_and_layer_selection_limit_the_units():
    logits = structured_logits(steps=2, layers=2)
    logits[1, 1, 3, 2, 2] = 50.0
    ds = make_ds(logits)
    assert run(ds, "value_range", max=5, steps=["first"]).status == "pass"
    assert checks.run_check(ds, "value_range", {"max": 5}, layer=20).status == "pass"
    failing = checks.run_check(ds, "value_range", {"max": 5, "steps": ["last"]}, layer=21)
    assert failing.violations[0].location == {"step": 3, "layer": 21, "head": 3, "query_frame": 2, "key_frame": 2}


def test_selecting_a_head_that_does_not_exist_is_an_error():
    with pytest.raises(HarnessError, match=r"head \[7\] not in this extraction"):
        run(make_ds(structured_logits()), "value_range", heads=[7])


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("sink_score", {}, "needs at least one of sign, min, max"),
        ("sink_heads", {}, "expected: missing required parameter"),
        ("value_range", {"min": "low"}, "min: expected a finite number"),
        ("value_range", {"mostly": 1.5}, r"mostly: must be <= 1; got 1.5"),
        ("value_range", {"mostly": 0}, r"mostly: must be > 0; got 0"),
        ("diagonal_dominance", {"against": "median"}, "one of max, mean"),
        ("value_range", {"min": float("nan")}, "min: must be a finite number; got nan"),
        ("sink_score", {"max": float("inf")}, "max: must be a finite number; got inf"),
        ("row_stochastic", {"tol": float("inf")}, "tol: must be a finite number"),
        ("row_stochastic", {"tol": -1e-3}, "tol: must be >= 0"),
        ("value_range", {"min": 2, "max": 1}, "min 2 is above max 1: nothing can pass"),
    ],
)
def test_bad_parameters_are_refused_with_what_was_expected(name, params, message):
    with pytest.raises(ValueError, match=message):
        checks.normalize_params(name, params)


def test_every_bad_parameter_is_named_at_once_by_key():
    with pytest.raises(ValueError) as info:
        checks.normalize_params("diagonal_dominance", {"margn": 1, "mostly": float("nan"), "heads": ["x"]})
    assert sorted(p.key for p in info.value.problems) == ["heads", "margn", "mostly"]
    assert "margn: unknown key" in str(info.value)


def test_a_scalar_is_accepted_where_a_one_element_list_is_meant():
    params = checks.normalize_params("sink_heads", {"expected": 3, "heads": 0, "steps": "last", "query_frames": 5})
    assert params["expected"] == (3,) and params["heads"] == (0,) and params["steps"] == ("last",)
    assert params["query_frames"] == (5,)


def test_every_property_documents_a_formula_and_its_parameters():
    for prop in checks.PROPERTIES.values():
        assert prop.formula
        assert all(param.doc for param in prop.params.values())
    assert set(checks.PROPERTIES) >= {
        "value_range", "sink_score", "diagonal_dominance", "row_stochastic", "causal", "temporal_decay", "sink_heads"
    }


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("diagonal_dominance", {"query_frames": [50]}, r"query frames \[50\] are not in this data"),
        ("temporal_decay", {"min_distance": 40}, "leave nothing to compare"),
    ],
)
def test_selections_beyond_the_data_are_one_clear_error(name, params, message):
    with pytest.raises(HarnessError, match=message):
        run(make_ds(structured_logits()), name, **params)


def test_temporal_decay_on_one_frame_is_an_error_not_a_vacuous_pass():
    one_frame = make_ds(structured_logits()).isel(query_frame=[0], key_frame=[0])
    with pytest.raises(HarnessError, match="fewer than two distances|leave nothing to compare"):
        run(one_frame, "temporal_decay")
