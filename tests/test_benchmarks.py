"""The benchmark runner's machinery, on tiny sizes: records, ratios, exponents, memory probe.

The figures themselves are not asserted (they depend on the machine); what is asserted is
that every measurement becomes one well-formed record whose ratio is what it claims to be.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attn_harness.model.capture import frame_stats
from benchmarks import run as runner
from benchmarks.overhead import VARIANTS
from benchmarks.scaling import fitted_exponent
from benchmarks.seed_method import make_qk, naive_bytes, naive_frame_logits, peak_extra_bytes
from benchmarks.timing import timing_records


@pytest.fixture(scope="module")
def smoke_records(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    assert runner.main(["--smoke", "--sections", "overhead,seed-method,scaling", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_smoke_run_writes_one_named_record_per_measurement(smoke_records):
    names = [rec["name"] for rec in smoke_records]
    assert len(names) == len(set(names))
    expected = {f"overhead/smoke/{case}" for case in ("plain", *VARIANTS)}
    expected |= {f"seed-method/time/{n}/{m}" for n in (8, 16) for m in ("naive", "logits", "logits+mass")}
    expected |= {f"scaling/{n}/{m}" for n in (4, 8, 12, 16) for m in ("attention", "logits", "mass")}
    expected |= {f"scaling/exponent/{m}" for m in ("attention", "logits", "mass")}
    expected |= {f"scaling-logits/{n}/{m}" for n in (4, 8, 16, 32) for m in ("read-qk", "logits")}
    expected |= {f"scaling-logits/exponent/{m}" for m in ("read-qk", "logits")}
    expected.add("seed-method/naive-matrix-at-32760")
    assert set(names) == expected
    assert all({"section", "spread", "ratio", "env"} <= rec.keys() for rec in smoke_records)


def test_timing_records_carry_medians_spread_and_ratio_against_their_baseline(smoke_records):
    timed = [rec for rec in smoke_records if "median_s" in rec and "exponent" not in rec]
    by_name = {rec["name"]: rec for rec in smoke_records}
    assert timed
    for rec in timed:
        assert rec["reps"] >= 5
        assert 0 < rec["min_s"] <= rec["median_s"] <= rec["max_s"]
        assert rec["spread"] == pytest.approx((rec["max_s"] - rec["min_s"]) / rec["median_s"])
        baseline = by_name[rec["baseline"]]
        assert rec["ratio"] == pytest.approx(rec["median_s"] / baseline["median_s"])
        assert rec["env"]["torch_threads"] >= 1


def test_ratio_is_median_over_baseline_median_and_paired_ratio_is_per_round():
    samples = {"base": [1.0, 2.0, 3.0, 10.0, 4.0], "case": [2.0, 4.0, 6.0, 20.0, 8.0]}
    recs = {rec["name"]: rec for rec in timing_records("t", samples, "base", env={})}
    assert recs["case"]["ratio"] == pytest.approx(6.0 / 3.0)
    assert recs["case"]["paired_ratio"] == pytest.approx(2.0)
    assert recs["base"]["ratio"] == 1.0
    assert recs["case"]["spread"] == pytest.approx((20.0 - 2.0) / 6.0)


def test_fitted_exponent_recovers_known_powers():
    tokens = [1000, 2000, 4000, 8000]
    assert fitted_exponent(tokens, [3e-9 * n**2 for n in tokens]) == pytest.approx(2.0)
    assert fitted_exponent(tokens, [5e-6 * n for n in tokens]) == pytest.approx(1.0)
    assert fitted_exponent(tokens, [0.1 * math.sqrt(n) for n in tokens]) != pytest.approx(1.0)


def test_naive_method_computes_the_same_frame_logits_as_ours():
    q, k = make_qk(12, heads=3, head_dim=8)
    ours = frame_stats(q, k, 4, metrics=("logits",))["logits"]
    torch.testing.assert_close(naive_frame_logits(q, k, 4), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(naive_frame_logits(q, q, 4), ours, atol=1e-3)  # the comparison can tell


def test_memory_probe_sees_the_naive_logit_matrix():
    tokens = 1560
    peak = peak_extra_bytes("naive", tokens, tokens_per_frame=390)
    assert naive_bytes(tokens) <= peak <= 1.5 * naive_bytes(tokens)


def test_unknown_section_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--smoke", "--sections", "overhead,nonsense"])
    assert "nonsense" in capsys.readouterr().err


def test_report_scale_builds_the_real_models_geometry_and_well_formed_records(tmp_path):
    from benchmarks import report_scale

    ds = report_scale.synthetic(0, (0,))
    assert dict(ds["logits"].sizes) == {"step": 3, "layer": 30, "head": 12, "query_frame": 21, "key_frame": 21}
    assert ds["logits"].isel(query_frame=0, key_frame=5).isnull().all()  # block-causal: no future keys
    page = tmp_path / "page.html"
    page.write_text("x" * 100)
    record = report_scale.measure("case", lambda: page, reps=2)
    assert record["name"] == "case" and record["reps"] == 2 and record["bytes"] == 100
    assert record["min_s"] <= record["median_s"] <= record["max_s"]


def test_population_section_times_the_population_against_one_sample_in_the_same_run(tmp_path):
    path = tmp_path / "population.json"
    specs = Path(__file__).parents[1] / "specs"
    assert runner.main(["--smoke", "--sections", "population", "--specs", str(specs), "--json", str(path)]) == 0
    records = {rec["name"]: rec for rec in json.loads(path.read_text())}
    assert set(records) == {"population/one-sample", "population/2-samples", "population/2-samples/sampling-loop"}
    assert {rec["baseline"] for rec in records.values()} == {"population/one-sample"}
    assert records["population/2-samples"]["samples"] == 2
