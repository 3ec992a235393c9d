"""The typed results record: what the plugin writes is what the report reads, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attn_harness.core.errors import HarnessError
from attn_harness.core.results import CheckRecord, Results, RunInfo, SpecInfo, VariableDiff
from attn_harness.core.schema import PROVENANCE_ATTRS, PROVENANCE_GROUPS, provenance_keys


def _results() -> Results:
    diff = VariableDiff(
        variable="logits", cells=324, beyond=1, share=1 / 324, nan_mismatch=0, atol=1e-4, rtol=1e-4,
        max_abs={"value": 0.25, "location": {"step": 0, "layer": 3}, "baseline": 0.4, "obtained": 0.15},
        max_rel={"value": "inf", "location": {"step": 0, "layer": 3}, "baseline": 0.0, "obtained": 0.1},
        worst=[{"location": {"step": 0, "layer": 3}, "baseline": 0.4, "obtained": 0.15, "abs_diff": 0.25}],
    )
    check = CheckRecord(nodeid="specs/m.yaml::m::layer3::baseline", spec="m", status="fail", kind="baseline",
                        layer=3, variables=[diff])
    spec = SpecInfo(spec="m", probe={"seed": 0}, provenance={"model_id": "tiny-random"})
    return Results(run=RunInfo(command="pytest specs/"), specs=[spec], checks=[check])


def test_a_record_survives_results_json_unchanged(tmp_path):
    results = _results()
    path = results.write(tmp_path)
    assert path.name == "results.json"
    assert Results.read(path) == results
    assert json.loads(path.read_text())["checks"][0]["variables"][0]["max_rel"]["value"] == "inf"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["checks"][0].update(violating=3),
     r"checks\[0\] \(specs/m.yaml::m::layer3::baseline\): unknown keys \['violating'\]"),
    (lambda d: d["checks"][0].update(status="passed"), r"status 'passed' not in"),
    (lambda d: d["checks"][0]["variables"][0].pop("beyond"), r"variables: .*missing .*'beyond'"),
    (lambda d: d.pop("specs"), r"lacks \['specs'\]"),
])
def test_a_record_with_a_wrong_key_or_status_is_refused_by_name(mutate, message):
    data = _results().to_dict()
    mutate(data)
    with pytest.raises(HarnessError, match=message):
        Results.from_dict(data)


def test_one_provenance_list_with_groups():
    assert set(PROVENANCE_ATTRS.values()) == set(PROVENANCE_GROUPS)
    assert {"mask", "mode", "sample_steps", "num_frames", "block_size", "guidance", "shift"} <= set(provenance_keys("probe"))
    assert "created" not in provenance_keys("model", "probe", "software")  # never compared
    assert provenance_keys() == tuple(PROVENANCE_ATTRS)
    with pytest.raises(ValueError, match="unknown provenance groups"):
        provenance_keys("weights")


def test_the_record_and_the_comparison_settings_import_without_torch_or_numpy():
    code = ("import sys, attn_harness.core.results, attn_harness.report.settings; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
