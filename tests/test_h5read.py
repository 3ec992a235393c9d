"""The direct h5py reader gives exactly what xarray's h5netcdf backend gives, and hands every
file it cannot decode the same way back to xarray."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

from attn_harness.core import store
from attn_harness.core.h5read import read_plain
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset

ROOT = Path(__file__).resolve().parents[1]


def extraction(mask: str = "bidirectional") -> xr.Dataset:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 2, 6, 6))
    x = np.exp(logits)
    if mask == "block-causal":  # blocks of 3 frames: frames 0-2 do not see frames 3-5
        x[..., :3, 3:] = 0.0
        logits[..., :3, 3:] = np.nan
    attrs = {key: "unknown" for key in REQUIRED_ATTRS}
    attrs.update(mask=mask, block_size=3, seed=7, guidance=5.0, query_frames=[3, 4, 5], capture_steps=["first"])
    return build_dataset({"logits": logits, "mass": x / x.sum(axis=-1, keepdims=True)}, steps=[0, 4],
                         timesteps=[999.0, 250.5], layers=[0, 2, 5], attrs=attrs)


def via_xarray(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, engine="h5netcdf") as opened:
        return opened.load()


def assert_same(fast: xr.Dataset, slow: xr.Dataset) -> None:
    """Identical values, dims, coords and attrs, and the same dtypes and attr types."""
    xr.testing.assert_identical(fast, slow)
    assert set(fast.coords) == set(slow.coords)
    for name, var in slow.variables.items():
        assert fast[name].dtype == var.dtype, name
        assert {k: type(v) for k, v in fast[name].attrs.items()} == {k: type(v) for k, v in var.attrs.items()}, name
    assert {k: type(v) for k, v in fast.attrs.items()} == {k: type(v) for k, v in slow.attrs.items()}


@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
def test_an_extraction_written_by_the_store_reads_back_as_xarray_reads_it(tmp_path, mask):
    path = store.write_dataset(extraction(mask), tmp_path / "x.nc")
    fast, slow = read_plain(path), via_xarray(path)
    assert fast is not None
    assert_same(fast, slow)
    if mask == "block-causal":
        assert int(fast["logits"].isnull().sum()) == 2 * 3 * 2 * 3 * 3  # the masked cells stay NaN


@pytest.mark.parametrize("path", sorted((ROOT / "baselines").glob("*/*.nc")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_committed_baselines_read_as_xarray_reads_them(path):
    fast, slow = read_plain(path), via_xarray(path)
    assert fast is not None
    assert_same(fast, slow)


def _with_units(path: Path) -> None:
    ds = extraction().assign_coords(timestep=("step", [0.0, 1.0], {"units": "days since 2000-01-01"}))
    ds.to_netcdf(path, engine="h5netcdf")


def _with_bool(path: Path) -> None:
    extraction().assign(flag=("head", np.array([True, False]))).to_netcdf(path, engine="h5netcdf")


def _with_fill(path: Path) -> None:
    extraction().to_netcdf(path, engine="h5netcdf", encoding={"logits": {"_FillValue": -1.0}})


def _with_group(path: Path) -> None:
    extraction().to_netcdf(path, engine="h5netcdf")
    with h5py.File(path, "a") as handle:
        handle.create_group("extra")


def _plain_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["logits"] = np.zeros((2, 2), dtype=np.float32)


def test_strings_read_as_xarray_reads_them(tmp_path):
    # a population's prompts (non-index, UTF-8 of unequal lengths) and a string dimension coordinate
    ds = extraction().assign_coords(prompt=("head", np.array(["a red square", "ein grünes Dreieck ↑"])),
                                    name=("name", np.array(["x", "", "yz"])))
    path = tmp_path / "x.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    fast = read_plain(path)
    assert fast is not None
    assert_same(fast, via_xarray(path))
    assert fast["prompt"].values.tolist() == ["a red square", "ein grünes Dreieck ↑"]


def _with_bytes(path: Path) -> None:
    extraction().assign(names=("head", np.array([b"a", b"b"]))).to_netcdf(path, engine="h5netcdf")


@pytest.mark.parametrize("write", [_with_units, _with_bool, _with_fill, _with_bytes, _with_group, _plain_hdf5])
def test_what_xarray_would_decode_differently_is_left_to_xarray(tmp_path, write):
    path = tmp_path / "x.nc"
    write(path)
    assert read_plain(path) is None


def test_a_file_left_to_xarray_is_still_read_by_the_store(tmp_path):
    path = tmp_path / "x.nc"
    _with_fill(path)
    assert read_plain(path) is None
    ds = store.read_dataset(path)
    assert ds["logits"].equals(extraction()["logits"])


def test_not_hdf5_at_all_is_none_and_the_store_still_names_the_file(tmp_path):
    path = tmp_path / "x.nc"
    path.write_text("not netcdf")
    assert read_plain(path) is None
    with pytest.raises(store.HarnessError, match="is not a NetCDF4/HDF5 file"):
        store.read_dataset(path)
