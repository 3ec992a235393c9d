"""Baseline comparison: structure first, then values with explicit tolerances, named locations."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from attn_harness.core import store
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.core.spec import DEFAULT_TOLERANCES, Tolerance
from attn_harness.pytest.baseline import check_baseline, compare, layer_slice, obtained_file


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
        check_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig, regen_command="pytest x")
    assert path.is_file() and not obtained_file(path).exists()
    check_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig, regen_command="pytest x")
    assert not obtained_file(path).exists()


def test_a_passing_baseline_is_read_once_and_handed_back(tmp_path, pytestconfig, monkeypatch):
    path = store.write_dataset(layer_slice(make_ds(), 3), tmp_path / "layer3.nc")
    reads = []
    monkeypatch.setattr(store, "read_dataset", lambda p, read=store.read_dataset: reads.append(p) or read(p))
    done = check_baseline(layer_slice(make_ds(), 3), path, DEFAULT_TOLERANCES, config=pytestconfig, regen_command="pytest x")
    assert reads == [path]  # the plugin records the differences from done.data: no second read
    xr.testing.assert_identical(done.data, store.read_dataset(path))


def test_check_baseline_failure_leaves_obtained_file_and_says_how_to_regenerate(tmp_path, pytestconfig):
    path = tmp_path / "layer3.nc"
    ds = layer_slice(make_ds(), 3)
    store.write_dataset(ds, path)
    changed = ds.copy(deep=True)
    changed["logits"][dict(step=0, layer=0, head=1, query_frame=2, key_frame=2)] += 1.0
    with pytest.raises(AssertionError) as info:
        check_baseline(changed, path, DEFAULT_TOLERANCES, config=pytestconfig,
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
        check_baseline(layer_slice(make_ds(), 3), path, DEFAULT_TOLERANCES, config=pytestconfig,
                       regen_command="pytest 'specs/x.yaml::s::layer3::baseline'")
    message = str(info.value)
    assert message.startswith(f"baseline {path} cannot be read:") and "not a NetCDF4/HDF5 file" in message
    assert "pytest 'specs/x.yaml::s::layer3::baseline' --force-regen" in message


# --- environment classes: variants, cross-environment tolerance, regeneration ----------------------


class Options:
    """The two pytest-regressions options check_baseline reads, as a run would set them."""

    def __init__(self, force_regen: bool = False, regen_all: bool = False) -> None:
        self.values = {"force_regen": force_regen, "regen_all": regen_all}

    def getoption(self, name, default=None):
        return self.values.get(name, default)


CROSS = {"logits": Tolerance(atol=1e-3, rtol=1e-4), "mass": Tolerance(atol=5e-4, rtol=1e-4)}


def cuda_run(shift: float = 0.0, **attrs):
    """Layer 3 of make_ds() as a CUDA float32 run whose logits moved by ``shift`` everywhere."""
    ds = layer_slice(make_ds(device="cuda:0", **attrs), 3)
    ds["logits"] = ds["logits"] + shift
    return ds


def check(ds, path, options=Options(), cross_env=None):
    return check_baseline(ds, path, DEFAULT_TOLERANCES, config=options, regen_command="pytest 'x::baseline'",
                          cross_env=cross_env, spec_location="specs/x.yaml:44")


@pytest.fixture
def cpu_baseline(tmp_path):
    path = tmp_path / "layer3.nc"
    store.write_dataset(layer_slice(make_ds(), 3), path)
    return path


def test_another_environment_without_variant_or_cross_tolerance_fails_saying_how_to_add_either(cpu_baseline):
    before = cpu_baseline.read_bytes()
    with pytest.raises(AssertionError) as info:
        check(cuda_run(), cpu_baseline)  # even identical values: the classes differ and nothing says how to judge
    message = str(info.value)
    assert f"baseline {cpu_baseline} was made in environment cpu-float32; this run is cuda-float32" in message
    assert f"pytest 'x::baseline' --force-regen (writes {cpu_baseline.parent / 'layer3.cuda-float32.nc'}" in message
    assert "a cross-environment tolerance at specs/x.yaml:44" in message and "cross_env: {logits:" in message
    assert cpu_baseline.read_bytes() == before and sorted(p.name for p in cpu_baseline.parent.iterdir()) == ["layer3.nc"]


def test_cross_environment_tolerance_is_used_and_named(cpu_baseline):
    done = check(cuda_run(shift=5e-4), cpu_baseline, cross_env=CROSS)  # beyond 1e-4, within 1e-3
    assert done.file == cpu_baseline and "cross-environment tolerance (cpu-float32 baseline, cuda-float32 run)" in done.tolerance
    assert "logits atol=0.001 rtol=0.0001" in done.tolerance
    with pytest.raises(AssertionError) as info:
        check(cuda_run(shift=5e-3), cpu_baseline, cross_env=CROSS)
    message = str(info.value)
    assert message.startswith(f"baseline {cpu_baseline} differs from this run beyond the cross-environment tolerance")
    assert "logits atol=0.001 rtol=0.0001, mass atol=0.0005 rtol=0.0001" in message


def test_a_committed_variant_for_the_runs_class_wins_with_the_same_environment_tolerance(cpu_baseline):
    variant = cpu_baseline.parent / "layer3.cuda-float32.nc"
    store.write_dataset(cuda_run(shift=5e-3), variant)
    done = check(cuda_run(shift=5e-3), cpu_baseline, cross_env=CROSS)
    assert done.file == variant and "(cuda-float32 tolerance)" in done.tolerance and "atol=0.0001" in done.tolerance
    with pytest.raises(AssertionError, match="layer3.cuda-float32.nc differs from this run beyond the cuda-float32 tolerance"):
        check(cuda_run(shift=5e-3 + 3e-4), cpu_baseline, cross_env=CROSS)


def test_force_regen_writes_the_variant_for_the_runs_class_only(cpu_baseline):
    before = cpu_baseline.read_bytes()
    with pytest.raises(pytest.fail.Exception, match="variant .*layer3.cuda-float32.nc written for cuda-float32"):
        check(cuda_run(shift=5e-3), cpu_baseline, Options(force_regen=True))
    assert cpu_baseline.read_bytes() == before
    assert store.read_dataset(cpu_baseline.parent / "layer3.cuda-float32.nc").attrs["device"] == "cuda:0"
    check(cuda_run(shift=5e-3), cpu_baseline)  # from now on the variant is the CUDA baseline


def test_force_regen_beyond_the_cross_tolerance_writes_the_variant_not_the_cpu_baseline(cpu_baseline):
    before = cpu_baseline.read_bytes()
    with pytest.raises(pytest.fail.Exception, match="rewritten from this run"):
        check(cuda_run(shift=5e-3), cpu_baseline, Options(force_regen=True), cross_env=CROSS)
    assert cpu_baseline.read_bytes() == before and (cpu_baseline.parent / "layer3.cuda-float32.nc").is_file()


def test_a_baseline_without_environment_class_attr_is_classed_by_device_and_dtype(cpu_baseline):
    assert "environment_class" not in store.read_dataset(cpu_baseline).attrs
    assert check(layer_slice(make_ds(), 3), cpu_baseline).action == "compared"


def test_regen_all_keeps_a_baseline_within_tolerance_and_rewrites_on_a_real_change(cpu_baseline):
    stat = cpu_baseline.stat()
    moved = layer_slice(make_ds(torch_version="2.14.0", created="later"), 3)
    moved["logits"] = moved["logits"] + 2e-6  # a version bump's noise
    done = check(moved, cpu_baseline, Options(regen_all=True))
    assert done.action == "kept" and cpu_baseline.stat().st_mtime_ns == stat.st_mtime_ns
    done = check(layer_slice(make_ds(checkpoint_fingerprint="def"), 3), cpu_baseline, Options(regen_all=True))
    assert done.action == "rewritten" and (
        "provenance changed: checkpoint_fingerprint: baseline 'abc' vs obtained 'def'" in done.reason
    )
    changed = layer_slice(make_ds(checkpoint_fingerprint="def"), 3)
    changed["logits"] = changed["logits"] + 0.01
    done = check(changed, cpu_baseline, Options(regen_all=True))
    assert done.action == "rewritten" and done.reason.startswith("values changed: logits: 96 of 96 cells differ")
    assert store.read_dataset(cpu_baseline)["logits"].equals(changed["logits"])
