"""Baseline comparison: structure first, then values with explicit tolerances, named locations."""

from __future__ import annotations

import numpy as np
import pytest

from attn_harness.core import store
from attn_harness.pytest.baseline import check_baseline, compare, layer_slice, obtained_file
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.core.spec import DEFAULT_TOLERANCES, Tolerance


def make_ds(seed: int = 0, **attrs):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 2, 3, 4, 4))
    x = np.exp(logits)
    mass = x / x.sum(axis=-1, keepdims=True)
    base = {key: "unknown" for key in REQUIRED_ATTRS}
    base.update(mask="bidirectional", block_size=3, dtype="float32", device="cpu", torch_version="2.13.0",
                checkpoint_fingerprint="abc")
    base.update(attrs)
    return build_dataset({"logits": logits, "mass": mass}, steps=[0, 5], timesteps=[999.0, 500.0],
                         layers=[3, 7], attrs=base)


def test_identical_data_has_no_differences():
    assert compare(make_ds(), make_ds(), DEFAULT_TOLERANCES) == []


def test_difference_within_tolerance_passes_and_beyond_fails():
    expected = make_ds()
    obtained = expected.copy(deep=True)
    obtained["logits"][dict(step=1, layer=1, head=2, query_frame=3, key_frame=0)] += 5e-5
    assert compare(expected, obtained, DEFAULT_TOLERANCES) == []
    strict = {**DEFAULT_TOLERANCES, "logits": Tolerance(atol=1e-6, rtol=0.0)}
    assert compare(expected, obtained, strict)


def test_perturbed_cell_is_reported_with_count_share_and_named_location():
    expected = make_ds()
    obtained = expected.copy(deep=True)
    cell = dict(step=1, layer=1, head=2, query_frame=3, key_frame=0)
    obtained["logits"][cell] += 0.5
    lines = compare(expected, obtained, DEFAULT_TOLERANCES)
    text = "\n".join(lines)
    assert "logits: 1 of 192 cells differ (0.52%) beyond atol=0.0001 rtol=0.0001" in text
    assert "max abs diff 0.5 at step=5 layer=7 head=2 query_frame=3 key_frame=0" in text
    assert "worst cells:" in text and not any(line.startswith("mass:") for line in lines)


def test_provenance_differences_come_first():
    lines = compare(make_ds(), make_ds(seed=1, torch_version="2.14.0", device="cuda:0"), DEFAULT_TOLERANCES)
    assert lines[0] == "provenance that differs:"
    assert "  device: baseline 'cpu' vs obtained 'cuda:0'" in lines
    assert "  torch_version: baseline '2.13.0' vs obtained '2.14.0'" in lines
    assert lines.index("  torch_version: baseline '2.13.0' vs obtained '2.14.0'") < next(
        i for i, line in enumerate(lines) if line.startswith("logits:")
    )


def test_provenance_alone_is_not_a_failure():
    assert compare(make_ds(), make_ds(torch_version="2.14.0"), DEFAULT_TOLERANCES) == []


def test_different_coords_are_reported_before_values():
    expected = make_ds()
    obtained = expected.assign_coords(step=[0, 6])
    text = "\n".join(compare(expected, obtained, DEFAULT_TOLERANCES))
    assert "coordinate step: baseline [0, 5] vs obtained [0, 6]" in text
    assert "cells differ" not in text


def test_nan_in_only_one_of_them_is_a_difference():
    expected = make_ds()
    obtained = expected.copy(deep=True)
    obtained["logits"][dict(step=0, layer=0, head=0, query_frame=0, key_frame=1)] = np.nan
    text = "\n".join(compare(expected, obtained, DEFAULT_TOLERANCES))
    assert "1 cells are NaN in one and not the other" in text


def test_layer_slice_keeps_the_layer_dim():
    assert layer_slice(make_ds(), 7)["layer"].values.tolist() == [7]


def test_check_baseline_writes_a_missing_baseline_and_fails(tmp_path, pytestconfig):
    path = tmp_path / "spec" / "layer3.nc"
    ds = layer_slice(make_ds(), 3)
    with pytest.raises(pytest.fail.Exception, match="created"):
        check_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig, item_name="baseline", regen_command="pytest x")
    assert path.is_file() and not obtained_file(path).exists()
    check_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig, item_name="baseline", regen_command="pytest x")
    assert not obtained_file(path).exists()


def test_check_baseline_failure_leaves_obtained_file_and_says_how_to_regenerate(tmp_path, pytestconfig):
    path = tmp_path / "layer3.nc"
    ds = layer_slice(make_ds(), 3)
    store.write_dataset(ds, path)
    changed = ds.copy(deep=True)
    changed["logits"][dict(step=0, layer=0, head=1, query_frame=2, key_frame=2)] += 1.0
    with pytest.raises(AssertionError) as info:
        check_baseline(changed, path, DEFAULT_TOLERANCES, config=pytestconfig, item_name="baseline",
                       regen_command="pytest 'specs/x.yaml::s::layer3::baseline'")
    message = str(info.value)
    assert "step=0 layer=3 head=1 query_frame=2 key_frame=2" in message
    assert "pytest 'specs/x.yaml::s::layer3::baseline' --force-regen" in message
    assert obtained_file(path).name == "layer3.obtained.nc"
    assert store.read_dataset(obtained_file(path))["logits"].equals(changed["logits"])


def test_a_corrupt_baseline_fails_naming_the_file_and_how_to_regenerate(tmp_path, pytestconfig):
    path = tmp_path / "layer3.nc"
    path.write_text("not netcdf")
    with pytest.raises(AssertionError) as info:
        check_baseline(layer_slice(make_ds(), 3), path, DEFAULT_TOLERANCES, config=pytestconfig, item_name="baseline",
                       regen_command="pytest 'specs/x.yaml::s::layer3::baseline'")
    message = str(info.value)
    assert message.startswith(f"baseline {path} cannot be read:") and "not a NetCDF4/HDF5 file" in message
    assert "pytest 'specs/x.yaml::s::layer3::baseline' --force-regen" in message
