"""NetCDF storage of extractions and validation against the data contract (docs/design.md, "Data contract").

Files are NetCDF4 written and read with the explicitly named engine ``h5netcdf``. Writes are
atomic (temp file in the same directory, then ``os.replace``), so a crash never leaves a
half-written extraction behind. ``validate`` is the single gate every file passes on the way
in and out; it lists every problem it finds, each with the first offending location.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import hidden_cells, mask_params
from attn_harness.core.h5read import read_plain
from attn_harness.core.schema import (
    DIMS,
    MASKS,
    METRICS,
    PROBABILITIES,
    REQUIRED_ATTRS,
    SAMPLE_COORDS,
    SAMPLE_DIM,
    TEXT_DIMS,
    TEXT_METRIC,
    json_safe_attr,
)

ENGINE = "h5netcdf"
# zlib level 4 with byte shuffle: most of the gain of level 9 on float32 at a fraction of the time.
FLOAT_ENCODING = {"zlib": True, "complevel": 4, "shuffle": True}
# NetCDF reads a one-element list attr back as a scalar; this attr names the list-valued attrs
# so ``read_dataset`` restores them exactly. It never appears on a Dataset in memory.
LIST_ATTRS_KEY = "harness_list_attrs"
INDEX_COORDS: tuple[str, ...] = ("step", "layer", "head", "query_frame", "key_frame")
MASS_RANGE_TOLERANCE = 1e-5  # float32 rounding of a probability sum can overshoot 1 slightly
MASS_ROW_TOLERANCE = 1e-4  # rows of up to ~100 float32 terms sum to 1 well within this
HOW_TO_WRITE = "write one with `attn-harness extract` or `attn-harness import-legacy`"


def write_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Validate ``ds`` and write it atomically to ``path`` as NetCDF4; return the path.

    Attrs are made NetCDF-safe (dicts as JSON, bools as ints) on a copy; the caller's
    Dataset is not modified. An existing file at ``path`` survives a failed write.
    """
    validate(ds)
    return write_netcdf(ds, path)


def _local_lock() -> contextlib.AbstractContextManager:
    """Inside a Dask worker, xarray would guard an in-memory write with a cluster-wide lock named
    by the buffer object, which the scheduler refuses; the write is local, so a local lock serves."""
    try:
        import dask
    except ImportError:
        return contextlib.nullcontext()
    return dask.config.set(scheduler="synchronous")


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` atomically as NetCDF4 with NetCDF-safe attrs, without contract validation."""
    path = Path(path)
    out = storable(ds)
    encoding = {name: dict(FLOAT_ENCODING) for name, var in out.data_vars.items() if var.dtype == np.float32}
    try:
        # Serialised in memory first: HDF5 keeps no handle on the target, so a full disk is one
        # OSError from a plain write (no HDF5 errors at exit, no crash) and the temp goes away.
        with _local_lock():
            data = bytes(out.to_netcdf(engine=ENGINE, format="NETCDF4", encoding=encoding))
    except (OSError, TypeError, ValueError) as exc:
        raise HarnessError(f"could not write {path}: {exc}") from exc
    write_atomic(path, data)
    return path


def read_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Read an extraction fully into memory (the file is closed on return) and validate it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise HarnessError(f"{path} {what}; expected an attention extraction (.nc): {HOW_TO_WRITE}")
    ds = read_plain(path)  # h5py directly: milliseconds instead of ~0.1 s (falls back to xarray)
    try:
        if ds is None:
            with xr.open_dataset(path, engine=ENGINE) as opened:
                ds = opened.load()
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"{path} is not a NetCDF4/HDF5 file ({exc}); expected an attention extraction: {HOW_TO_WRITE}"
        ) from exc
    ds.attrs = restore_attrs(ds.attrs)
    for var in ds.variables.values():
        var.attrs = restore_attrs(var.attrs)
    problems = _problems(ds)
    if problems:
        raise HarnessError(f"{path} is not an attention extraction: {'; '.join(problems)}; {HOW_TO_WRITE}")
    return ds


def read_netcdf(path: str | os.PathLike, expected: str) -> xr.Dataset:
    """Any NetCDF file the harness writes, fully in memory with its attrs restored; ``expected``
    names what the caller wants (and how to make one) in the error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path} does not exist; expected {expected}")
    try:
        with xr.open_dataset(path, engine=ENGINE) as opened:
            ds = opened.load()
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path} is not a NetCDF4/HDF5 file ({exc}); expected {expected}") from exc
    ds.attrs = restore_attrs(ds.attrs)
    for var in ds.variables.values():
        var.attrs = restore_attrs(var.attrs)
    return ds


def validate(ds: xr.Dataset) -> None:
    """Raise ``HarnessError`` listing every way ``ds`` breaks the data contract."""
    problems = _problems(ds)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        listing = "; ".join(problems)
        contract = "the data contract (docs/design.md, section 'Data contract')"
        raise HarnessError(f"dataset does not follow {contract}, {count}: {listing}")


def dataset_summary(ds: xr.Dataset) -> str:
    """One paragraph for humans: model, prompt, steps, layers, heads, frames, mask, variables."""
    attrs = ds.attrs
    steps = ds["step"].values.tolist() if "step" in ds.coords else []
    layers = ds["layer"].values.tolist() if "layer" in ds.coords else []
    mask = attrs.get("mask", "unknown")
    if mask == "block-causal":
        mask = f"block-causal (block size {attrs.get('block_size', 'unknown')})"
    elif mask == "sink-window":
        mask = (f"sink-window (block size {attrs.get('block_size', 'unknown')}, sink {attrs.get('sink_frames', 0)} "
                f"frames, window {attrs.get('window_frames', 0)} frames)")
    variables = ", ".join(sorted(ds.data_vars))
    return (
        f"Attention extraction of {attrs.get('model_id', 'unknown model')} "
        f"(source {attrs.get('source', 'unknown')}, checkpoint {attrs.get('checkpoint_path', 'unknown')}): "
        f"{len(steps)} step(s) {steps}, {len(layers)} layer(s) {layers}, "
        f"{ds.sizes.get('head', 0)} heads, {ds.sizes.get('query_frame', 0)} query x "
        f"{ds.sizes.get('key_frame', 0)} key latent frames, mask {mask}, variables {variables}; "
        f"prompt {attrs.get('prompt', 'unknown')!r}; dtype {attrs.get('dtype', 'unknown')}, "
        f"created {attrs.get('created', 'unknown')}."
    )


def storable(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy with NetCDF-safe attrs (the caller's Dataset keeps its own)."""
    out = ds.copy(deep=False)
    list_attrs = sorted(key for key, value in ds.attrs.items() if isinstance(json_safe_attr(value), list))
    out.attrs = {key: json_safe_attr(value) for key, value in ds.attrs.items()}
    if list_attrs:
        out.attrs[LIST_ATTRS_KEY] = json.dumps(list_attrs)
    for name, var in out.variables.items():
        var.attrs = {key: json_safe_attr(value) for key, value in ds[name].attrs.items()}
    return out


def restore_attrs(attrs: dict) -> dict:
    """NetCDF attrs back to plain Python: arrays to lists, numpy scalars to numbers."""
    list_attrs = set(json.loads(attrs.get(LIST_ATTRS_KEY, "[]")))
    restored = {}
    for key, value in attrs.items():
        if key == LIST_ATTRS_KEY:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if key in list_attrs and not isinstance(value, list):
            value = [value]
        restored[key] = value
    return restored


def _problems(ds: xr.Dataset) -> list[str]:
    """Every contract violation in ``ds``, structural first, then values."""
    problems: list[str] = []
    good_vars = _variable_problems(ds, problems)
    coords_ok = _coord_problems(ds, problems)
    params = _attr_problems(ds, problems)
    if coords_ok:  # value checks name locations by coordinate, so they need sound coords
        masked = _masked_cells(ds, params) if params is not None else None
        if "logits" in good_vars:
            _logits_value_problems(ds["logits"], masked, params, problems)
        for name in PROBABILITIES:
            if name in good_vars:
                _mass_value_problems(ds[name], masked, problems)
        if TEXT_METRIC in good_vars:
            _text_mass_value_problems(ds[TEXT_METRIC], problems)
    return problems


def _variable_problems(ds: xr.Dataset, problems: list[str]) -> set[str]:
    """Check dims and dtype of logits (required) and mass (optional); return the sound ones."""
    if "logits" not in ds.data_vars:
        problems.append(f"missing variable 'logits' (found variables {sorted(map(str, ds.data_vars))})")
    good = set()
    for name, dims in (*((metric, DIMS) for metric in METRICS), (TEXT_METRIC, TEXT_DIMS)):
        if name not in ds.data_vars:
            continue
        var = ds[name]
        ok = True
        if var.dims not in (dims, (SAMPLE_DIM, *dims)):
            problems.append(f"{name} has dims {var.dims}; expected exactly {dims}, or ({SAMPLE_DIM!r}, ...) before them")
            ok = False
        if var.dtype != np.float32:
            problems.append(f"{name} has dtype {var.dtype}; expected float32")
            ok = False
        if ok:
            good.add(name)
    return good


def _coord_problems(ds: xr.Dataset, problems: list[str]) -> bool:
    """Check the index coords and ``timestep``; return whether the index coords are sound."""
    before = len(problems)
    for name in INDEX_COORDS + (("text_token",) if TEXT_METRIC in ds.data_vars else ()):
        if name not in ds.coords:
            problems.append(f"missing coordinate '{name}'")
            continue
        coord = ds[name]
        if coord.dims != (name,):
            problems.append(f"coordinate '{name}' has dims {coord.dims}; expected ('{name}',)")
        elif not np.issubdtype(coord.dtype, np.integer):
            problems.append(f"coordinate '{name}' has dtype {coord.dtype}; expected integers")
        else:
            values = coord.values
            steps_down = np.flatnonzero(np.diff(values) <= 0)
            if steps_down.size:
                i = int(steps_down[0])
                problems.append(
                    f"coordinate '{name}' must be unique and sorted ascending; "
                    f"{values[i]} is followed by {values[i + 1]} at position {i + 1}"
                )
    if SAMPLE_DIM in ds.dims:
        for name, kind in SAMPLE_COORDS.items():
            if name not in ds.coords or ds[name].dims != (SAMPLE_DIM,):
                problems.append(f"a population needs coordinate '{name}' ({kind}) on dim '{SAMPLE_DIM}'")
    index_ok = len(problems) == before
    if "timestep" not in ds.coords:
        problems.append("missing coordinate 'timestep' (on dim 'step')")
    elif ds["timestep"].dims != ("step",) or not np.issubdtype(ds["timestep"].dtype, np.number):
        problems.append(
            f"coordinate 'timestep' must be numbers on dim ('step',); got dims {ds['timestep'].dims}, "
            f"dtype {ds['timestep'].dtype}"
        )
    if "query_frame" in ds.dims and "key_frame" in ds.dims and ds.sizes["query_frame"] != ds.sizes["key_frame"]:
        problems.append(
            f"query_frame and key_frame must have equal lengths; got {ds.sizes['query_frame']} "
            f"and {ds.sizes['key_frame']}"
        )
    return index_ok


def _attr_problems(ds: xr.Dataset, problems: list[str]) -> dict | None:
    """Check the required attrs; return the mask parameters (``frames.mask_params``), None when unusable."""
    missing = [key for key in REQUIRED_ATTRS if key not in ds.attrs]
    if missing:
        problems.append(f"missing attrs {missing}")
    mask = ds.attrs.get("mask")
    if "mask" in ds.attrs and mask not in MASKS:
        problems.append(f"attr mask is {mask!r}; expected one of {list(MASKS)}")
    block_size = ds.attrs.get("block_size")
    block_ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool) and block_size >= 1
    if "block_size" in ds.attrs and not block_ok:
        problems.append(f"attr block_size is {block_size!r}; expected a positive integer")
    windows_ok = True
    for key in ("sink_frames", "window_frames"):
        value = ds.attrs.get(key, 0)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            problems.append(f"attr {key} is {value!r}; expected an integer >= 0")
            windows_ok = False
    usable = mask in MASKS and (mask == "bidirectional" or block_ok) and (mask != "sink-window" or windows_ok)
    return mask_params(ds.attrs) if usable else None


def _masked_cells(ds: xr.Dataset, params: dict) -> xr.DataArray:
    """True where the mask hides key frame b from query frame a (``frames.hidden_cells``)."""
    return hidden_cells(ds, **params).transpose("query_frame", "key_frame")


def _mask_text(params: dict) -> str:
    text = f"the {params['mask']} mask (block_size={params['block_size']}"
    if params["mask"] == "sink-window":
        text += f", sink_frames={params['sink_frames']}, window_frames={params['window_frames']}"
    return text + ")"


def _logits_value_problems(
    logits: xr.DataArray, masked: xr.DataArray | None, params: dict | None, problems: list[str]
) -> None:
    """No inf anywhere; NaN exactly on the masked cells (skipped when the mask is unknown)."""
    axes, x = _axes(logits), logits.values
    _report(problems, axes, np.isinf(x), "logits has inf at {where}")
    nan = np.isnan(x)
    if masked is None:
        return
    if params["mask"] == "bidirectional":
        _report(problems, axes, nan, "logits has NaN at {where} but mask is 'bidirectional'")
        return
    hidden = masked.values
    _report(problems, axes, nan & ~hidden, f"logits has NaN at {{where}}, a cell {_mask_text(params)} leaves visible")
    _report(
        problems, axes, ~nan & hidden,
        f"logits has a value at {{where}}, a cell {_mask_text(params)} hides (masked cells must be NaN)",
    )


def _text_mass_value_problems(text_mass: xr.DataArray, problems: list[str]) -> None:
    """Finite, within [0, 1], each query frame's mass over the text tokens summing to 1."""
    axes, x = _axes(text_mass), text_mass.values
    finite = np.isfinite(x)
    _report(problems, axes, ~finite, "text_mass is not finite at {where}")
    _report(problems, axes, finite & ((x < 0) | (x > 1 + MASS_RANGE_TOLERANCE)), "text_mass is outside [0, 1] at {where}")
    row_sum = x.astype(np.float64).sum(axis=-1)
    _report(problems, axes[:-1], np.abs(row_sum - 1) > MASS_ROW_TOLERANCE,
            f"text_mass over the text tokens does not sum to 1 (within {MASS_ROW_TOLERANCE}) at {{where}}")


def _mass_value_problems(mass: xr.DataArray, masked: xr.DataArray | None, problems: list[str]) -> None:
    """Finite, 0 where masked, within [0, 1]; ``mass`` rows (not ``aligned_mass``) sum to 1."""
    name, axes, x = mass.name, _axes(mass), mass.values
    finite = np.isfinite(x)
    _report(problems, axes, ~finite, f"{name} is not finite at {{where}}")
    if masked is not None:
        _report(problems, axes, finite & masked.values & (x != 0), f"{name} is not 0 at masked cell {{where}}")
    _report(
        problems, axes, finite & ((x < 0) | (x > 1 + MASS_RANGE_TOLERANCE)),
        f"{name} is outside [0, 1] at {{where}}",
    )
    if name == "mass":
        row_sum = x.astype(np.float64).sum(axis=-1)
        _report(
            problems, axes[:-1], np.abs(row_sum - 1) > MASS_ROW_TOLERANCE,
            f"mass row does not sum to 1 (within {MASS_ROW_TOLERANCE}) at {{where}}",
        )


def _axes(da: xr.DataArray) -> list[tuple[str, np.ndarray]]:
    """Each dim with its coordinate values, in order. The value checks run on numpy (elementwise, far cheaper than
    xarray ops) on variables whose dims the contract fixes, frames last, so the (query, key) mask broadcasts."""
    return [(dim, da[dim].values) for dim in da.dims]


def _report(problems: list[str], axes: list[tuple[str, np.ndarray]], flags: np.ndarray, template: str) -> None:
    """Append ``template`` with the first bad cell (by coordinate value) and the count of bad cells."""
    count = int(np.count_nonzero(flags))
    if count == 0:
        return
    index = np.argwhere(flags)[0]
    where = " ".join(f"{dim}={values[i]}" for (dim, values), i in zip(axes, index))
    extra = f" ({count} cells in all)" if count > 1 else ""
    problems.append(template.format(where=where) + extra)
