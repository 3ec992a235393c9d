"""Storage and validation of extractions: atomic NetCDF round trips and the data contract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from attn_harness.core import store
from attn_harness.core.errors import HarnessError
from attn_harness.core.schema import DIMS, REQUIRED_ATTRS, build_dataset, decode_attr
from attn_harness.core.store import dataset_summary, read_dataset, validate, write_dataset

LAYERS = (3, 7)  # coordinate values differ from positions, so messages must use the values


def hidden_cells(frames: int, block_size: int) -> np.ndarray:
    """[query, key] True where the block-causal mask hides the key (oracle for the tests)."""
    return np.array([[b // block_size > a // block_size for b in range(frames)] for a in range(frames)])


def make_dataset(mask: str = "bidirectional", *, frames: int = 6, block_size: int = 3, mass: bool = True,
                 seed: int = 0) -> xr.Dataset:
    """A small valid extraction: 2 steps, layers 3 and 7, 2 heads, random logits, softmax mass."""
    rng = np.random.default_rng(seed)
    shape = (2, len(LAYERS), 2, frames, frames)
    logits = rng.normal(0.0, 2.0, size=shape)
    hidden = hidden_cells(frames, block_size) if mask == "block-causal" else np.zeros((frames, frames), bool)
    logits[..., hidden] = np.nan
    scores = np.where(hidden, -np.inf, rng.normal(size=shape))
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    attrs = {key: "unknown" for key in REQUIRED_ATTRS}
    attrs.update(
        source="test", seed=0, num_frames=1 + 4 * (frames - 1), latent_frames=frames, tokens_per_frame=4,
        temporal_stride=4, block_size=block_size, mask=mask, model_config={"dim": 64, "num_layers": 8},
        query_frames=[frames - 1], empty_list=[],
    )
    variables = {"logits": logits} | ({"mass": probs} if mass else {})
    return build_dataset(variables, steps=[0, 5], timesteps=[999.0, 501.5], layers=LAYERS, attrs=attrs)


def problems_of(ds: xr.Dataset) -> str:
    with pytest.raises(HarnessError) as info:
        validate(ds)
    return str(info.value)


# --- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
def test_round_trip_preserves_values_nan_positions_coords_and_attrs(tmp_path: Path, mask: str) -> None:
    ds = make_dataset(mask)
    back = read_dataset(write_dataset(ds, tmp_path / "x.nc"))
    xr.testing.assert_identical(back, ds)  # values bit-exact, NaN where NaN, coords, all attrs
    assert back["logits"].isnull().sum() == ds["logits"].isnull().sum()
    assert back.attrs["query_frames"] == [5]  # a one-element list stays a list, not a scalar
    assert back.attrs["empty_list"] == []
    assert decode_attr(back, "model_config") == {"dim": 64, "num_layers": 8}


def open_paths() -> set[str]:
    """Files this process holds open (Linux)."""
    fds = Path("/proc/self/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds)}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_read_loads_every_variable_into_memory_and_closes_the_file(tmp_path: Path) -> None:
    ds = make_dataset()
    ds["entropy"] = ds["logits"] * 0 + 1  # a variable that validation never touches
    path = write_dataset(ds, tmp_path / "x.nc")
    back = read_dataset(path)
    assert str(path.resolve()) not in open_paths()
    path.unlink()  # the data must not depend on the file any more
    np.testing.assert_array_equal(back["entropy"].values, ds["entropy"].values)


def test_write_encodes_raw_dict_and_bool_attrs_without_touching_the_callers_dataset(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.attrs["extra"] = {"shift": 3.0, "steps": [1, 2]}
    ds.attrs["flag"] = True
    back = read_dataset(write_dataset(ds, tmp_path / "x.nc"))
    assert decode_attr(back, "extra") == {"shift": 3.0, "steps": [1, 2]}
    assert back.attrs["flag"] == 1
    assert ds.attrs["extra"] == {"shift": 3.0, "steps": [1, 2]} and ds.attrs["flag"] is True


def test_write_creates_parent_directories_and_compresses_float_variables(tmp_path: Path) -> None:
    path = write_dataset(make_dataset(), tmp_path / "a" / "b" / "x.nc")
    assert path == tmp_path / "a" / "b" / "x.nc" and path.is_file()
    with xr.open_dataset(path, engine="h5netcdf") as raw:
        for name in ("logits", "mass"):
            assert raw[name].encoding["zlib"] and raw[name].encoding["complevel"] == 4


def test_writing_a_read_dataset_again_works(tmp_path: Path) -> None:
    back = read_dataset(write_dataset(make_dataset(), tmp_path / "x.nc"))
    subset = back.isel(key_frame=slice(0, 4), query_frame=slice(0, 4))  # smaller than the stored chunks
    subset["mass"] = subset["mass"] / subset["mass"].sum("key_frame")
    xr.testing.assert_identical(read_dataset(write_dataset(subset, tmp_path / "y.nc")), subset)


# --- atomic writes -----------------------------------------------------------------------------

def unstorable(ds: xr.Dataset) -> xr.Dataset:
    """An attr that h5netcdf fails on only once it is writing (an int beyond 64 bits)."""
    ds.attrs["too_big"] = 2**70
    return ds


def test_failed_write_leaves_neither_file_nor_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.nc"
    with pytest.raises(HarnessError, match=f"could not write {target}"):
        write_dataset(unstorable(make_dataset()), target)
    assert not target.parent.exists()  # serialised in memory first: nothing was created


def test_failed_write_leaves_an_existing_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "x.nc"
    first = make_dataset(seed=1)
    write_dataset(first, target)
    with pytest.raises(HarnessError):
        write_dataset(unstorable(make_dataset(seed=2)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nc"]
    xr.testing.assert_identical(read_dataset(target), first)


def test_failed_rename_removes_the_temp_file_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.nc"
    first = make_dataset(seed=1)
    write_dataset(first, target)

    def refuse(src, dst):
        assert Path(src).is_file() and Path(src).parent == target.parent  # temp sits beside the target
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", refuse)
    with pytest.raises(HarnessError, match="disk full"):
        write_dataset(make_dataset(seed=2), target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["x.nc"]
    xr.testing.assert_identical(read_dataset(target), first)


def test_write_below_a_plain_file_is_a_harness_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(HarnessError, match="cannot write .*taken is a file, not a directory"):
        write_dataset(make_dataset(), tmp_path / "taken" / "x.nc")


def test_write_refuses_an_invalid_dataset_before_touching_disk(tmp_path: Path) -> None:
    ds = make_dataset()
    del ds.attrs["seed"]
    with pytest.raises(HarnessError, match=r"missing attrs \['seed'\]"):
        write_dataset(ds, tmp_path / "new" / "x.nc")
    assert not (tmp_path / "new").exists()


# --- validate -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
@pytest.mark.parametrize("mass", [True, False])
def test_validate_accepts_a_good_dataset(mask: str, mass: bool) -> None:
    validate(make_dataset(mask, mass=mass))


def test_validate_accepts_frames_that_are_a_later_window() -> None:
    # Block membership comes from frame values, not positions: frames 3..8 are blocks 1 and 2.
    ds = make_dataset("block-causal").assign_coords(query_frame=np.arange(3, 9), key_frame=np.arange(3, 9))
    validate(ds)


def test_validate_rejects_wrong_dims() -> None:
    ds = make_dataset()
    ds["logits"] = ds["logits"].transpose("layer", "step", "head", "query_frame", "key_frame")
    assert f"logits has dims ('layer', 'step', 'head', 'query_frame', 'key_frame'); expected exactly {DIMS}" in (
        problems_of(ds)
    )


def test_validate_rejects_a_missing_attr() -> None:
    ds = make_dataset()
    del ds.attrs["checkpoint_fingerprint"]
    assert "missing attrs ['checkpoint_fingerprint']" in problems_of(ds)


def test_validate_rejects_nan_in_bidirectional_logits_naming_the_cell() -> None:
    ds = make_dataset()
    ds["logits"].loc[dict(step=5, layer=7, head=1, query_frame=2, key_frame=5)] = np.nan
    ds["logits"].loc[dict(step=5, layer=7, head=1, query_frame=3, key_frame=0)] = np.nan  # later in order
    assert ("logits has NaN at step=5 layer=7 head=1 query_frame=2 key_frame=5 but mask is 'bidirectional' "
            "(2 cells in all)") in problems_of(ds)


def test_validate_rejects_nan_in_a_cell_the_block_causal_mask_leaves_visible() -> None:
    ds = make_dataset("block-causal")
    ds["logits"].loc[dict(step=0, layer=3, head=0, query_frame=1, key_frame=2)] = np.nan  # same block
    assert ("logits has NaN at step=0 layer=3 head=0 query_frame=1 key_frame=2, a cell the block-causal mask "
            "(block_size=3) leaves visible") in problems_of(ds)


def test_validate_rejects_a_value_in_a_cell_the_block_causal_mask_hides() -> None:
    ds = make_dataset("block-causal")
    ds["logits"].loc[dict(step=5, layer=7, head=1, query_frame=2, key_frame=3)] = 0.0  # next block
    assert "logits has a value at step=5 layer=7 head=1 query_frame=2 key_frame=3, a cell the block-causal" in (
        problems_of(ds)
    )


def test_validate_uses_the_block_size_attr() -> None:
    ds = make_dataset("block-causal", block_size=3)
    ds.attrs["block_size"] = 2  # frame 2 is now in block 1, hidden from frames 0 and 1
    assert "logits has a value at step=0 layer=3 head=0 query_frame=0 key_frame=2" in problems_of(ds)


def test_validate_rejects_inf_in_logits() -> None:
    ds = make_dataset()
    ds["logits"].loc[dict(step=0, layer=7, head=0, query_frame=4, key_frame=1)] = -np.inf
    assert "logits has inf at step=0 layer=7 head=0 query_frame=4 key_frame=1" in problems_of(ds)


def test_validate_rejects_a_mass_row_that_does_not_sum_to_one() -> None:
    ds = make_dataset()
    row = dict(step=5, layer=3, head=1, query_frame=4)
    ds["mass"].loc[row] = ds["mass"].loc[row] * np.float32(1 + 2e-4)  # twice the 1e-4 tolerance
    assert "mass row does not sum to 1 (within 0.0001) at step=5 layer=3 head=1 query_frame=4" in problems_of(ds)


def test_validate_tolerates_float32_rounding_in_mass_rows() -> None:
    ds = make_dataset()
    row = dict(step=5, layer=3, head=1, query_frame=4)
    ds["mass"].loc[row] = ds["mass"].loc[row] * np.float32(1 + 2e-5)  # a fifth of the tolerance
    validate(ds)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(np.nan, "mass is not finite at"), (-0.01, "mass is outside [0, 1] at"), (1.01, "mass is outside [0, 1] at")],
)
def test_validate_rejects_mass_values_that_are_not_probabilities(value: float, expected: str) -> None:
    ds = make_dataset()
    ds["mass"].loc[dict(step=0, layer=3, head=0, query_frame=0, key_frame=1)] = value
    assert f"{expected} step=0 layer=3 head=0 query_frame=0 key_frame=1" in problems_of(ds)


def test_validate_rejects_mass_on_a_masked_cell() -> None:
    ds = make_dataset("block-causal")
    ds["mass"].loc[dict(step=0, layer=3, head=0, query_frame=0, key_frame=4)] = 0.1
    assert "mass is not 0 at masked cell step=0 layer=3 head=0 query_frame=0 key_frame=4" in problems_of(ds)


def test_validate_rejects_bad_coordinates() -> None:
    ds = make_dataset().assign_coords(layer=[7, 3], head=[0.0, 1.0])
    message = problems_of(ds)
    assert "coordinate 'layer' must be unique and sorted ascending; 7 is followed by 3 at position 1" in message
    assert "coordinate 'head' has dtype float64; expected integers" in message


def test_validate_rejects_unequal_frame_axes_and_float64_logits() -> None:
    ds = make_dataset(mass=False).isel(key_frame=slice(0, 5))
    ds["logits"] = ds["logits"].astype(np.float64)
    message = problems_of(ds)
    assert "query_frame and key_frame must have equal lengths; got 6 and 5" in message
    assert "logits has dtype float64; expected float32" in message


def test_validate_rejects_an_unknown_mask_and_a_bad_block_size() -> None:
    ds = make_dataset()
    ds.attrs.update(mask="causal", block_size=0)
    message = problems_of(ds)
    assert "attr mask is 'causal'; expected one of ['bidirectional', 'block-causal', 'sink-window']" in message
    assert "attr block_size is 0; expected a positive integer" in message


def test_validate_lists_every_problem_not_just_the_first() -> None:
    ds = make_dataset()
    del ds.attrs["prompt"]
    ds["logits"].loc[dict(step=0, layer=3, head=0, query_frame=0, key_frame=0)] = np.inf
    ds = ds.drop_vars("timestep")
    message = problems_of(ds)
    assert "3 problems" in message
    for part in ("missing attrs ['prompt']", "missing coordinate 'timestep'", "logits has inf at"):
        assert part in message


# --- read_dataset on files that are not extractions ---------------------------------------------

def test_read_a_missing_path_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"nope\.nc does not exist.*attn-harness extract"):
        read_dataset(tmp_path / "nope.nc")


def test_read_a_text_file_says_it_is_not_netcdf(tmp_path: Path) -> None:
    path = tmp_path / "notes.nc"
    path.write_text("layer 20 looked fine\n")
    with pytest.raises(HarnessError, match=r"notes\.nc is not a NetCDF4/HDF5 file"):
        read_dataset(path)


def test_read_a_foreign_netcdf_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "weather.nc"
    xr.Dataset({"temperature": (("x",), np.arange(3.0))}).to_netcdf(path, engine="h5netcdf")
    with pytest.raises(HarnessError) as info:
        read_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not an attention extraction: missing variable 'logits'")
    assert "missing coordinate 'step'" in message and "attn-harness import-legacy" in message


def test_read_a_broken_extraction_names_the_file_and_the_cell(tmp_path: Path) -> None:
    path = tmp_path / "x.nc"
    ds = make_dataset()
    ds["logits"].loc[dict(step=0, layer=3, head=1, query_frame=0, key_frame=0)] = np.nan
    ds.to_netcdf(path, engine="h5netcdf")  # plain xarray: bypasses write_dataset's check
    expected = r"x\.nc is not an attention extraction: logits has NaN at step=0 layer=3 head=1 "
    with pytest.raises(HarnessError, match=expected):
        read_dataset(path)


def test_summary_names_layers_steps_mask_and_model() -> None:
    ds = make_dataset("block-causal")
    ds.attrs["model_id"] = "Wan2.1-T2V-1.3B"
    text = dataset_summary(ds)
    for part in ("Wan2.1-T2V-1.3B", "2 step(s) [0, 5]", "2 layer(s) [3, 7]", "2 heads", "6 query x 6 key",
                 "block-causal (block size 3)", "variables logits, mass"):
        assert part in text
    assert os.linesep not in text
