"""Read the plain NetCDF4 files the harness writes straight through h5py.

xarray's ``h5netcdf`` backend reads each attribute and dimension through several layers and
takes ~100 ms for a 50 KB baseline with its ~40 provenance attrs; reading the same arrays
and attrs with h5py takes a few milliseconds. The result equals ``xr.open_dataset(path,
engine="h5netcdf").load()`` (``tests/test_h5read.py`` compares them on every kind of file
the harness writes), a population's UTF-8 ``prompt`` strings included. Anything a plain reader
could decode differently (CF scaling, time units, masked fill values, other strings, groups,
dimensions without a variable) returns ``None`` and the caller reads the file with xarray.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import xarray as xr

# HDF5 dimension-scale bookkeeping and netCDF-4 internals: never user-visible attrs.
HIDDEN_ATTRS = frozenset({
    "REFERENCE_LIST", "CLASS", "DIMENSION_LIST", "NAME", "_Netcdf4Dimid", "_Netcdf4Coordinates",
    "_nc3_strict", "_NCProperties",
})
# Bookkeeping this reader does not need (REFERENCE_LIST is the costly one to read).
UNUSED_ATTRS = frozenset({"REFERENCE_LIST", "_Netcdf4Dimid", "_Netcdf4Coordinates", "_nc3_strict", "_NCProperties"})
# Attributes that make xarray's CF decoding change values or dtypes: left to xarray.
DECODED_ATTRS = frozenset({
    "scale_factor", "add_offset", "missing_value", "_Unsigned", "units", "calendar", "_Encoding",
})
PHONY_DIMENSION = b"This is a netCDF dimension but not a netCDF variable"


class _NotPlain(Exception):
    """Something only xarray's full decoding handles."""


def read_plain(path: str | os.PathLike) -> xr.Dataset | None:
    """The dataset in ``path`` if it is a plain harness NetCDF4 file, else ``None``."""
    try:
        with h5py.File(path, "r") as handle:
            if "_NCProperties" not in handle.attrs:  # not written by a netCDF-4 library
                raise _NotPlain
            variables, coord_names = {}, set()
            for name, node in handle.items():
                if not isinstance(node, h5py.Dataset):
                    raise _NotPlain  # groups
                dims, attrs = _variable_meta(handle, name, node)
                coord_names.update(str(attrs.pop("coordinates", "")).split())
                variables[name] = xr.Variable(dims, _values(node), attrs)
            attrs = {key: _attr(value) for key, value in _raw_attrs(handle).items() if key not in HIDDEN_ATTRS}
    except (_NotPlain, OSError, KeyError, ValueError, TypeError):
        return None
    coord_names |= {name for name, var in variables.items() if var.dims == (name,)}
    if not coord_names <= set(variables):
        return None
    coords = {name: variables.pop(name) for name in coord_names}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _variable_meta(handle: h5py.File, name: str, node: h5py.Dataset) -> tuple[tuple[str, ...], dict]:
    """Dims and user attrs of one variable, or ``_NotPlain``."""
    if node.dtype.kind not in "fiu" and not _is_text(node):
        raise _NotPlain
    raw = _raw_attrs(node)
    if DECODED_ATTRS.intersection(raw) or raw.get("dtype") == "bool":  # xarray's boolean encoding
        raise _NotPlain
    if "_FillValue" in raw:
        fill = np.asarray(raw["_FillValue"])
        if fill.size != 1 or node.dtype.kind != "f" or not np.isnan(fill).all():
            raise _NotPlain  # a non-NaN fill value is masked by xarray
    if raw.get("CLASS") == b"DIMENSION_SCALE":
        if bytes(raw.get("NAME", b"")).startswith(PHONY_DIMENSION) or node.ndim != 1:
            raise _NotPlain
        dims: tuple[str, ...] = (name,)
    elif node.ndim == 0:
        dims = ()
    else:
        dims = tuple(handle[ref].name.lstrip("/") for refs in raw["DIMENSION_LIST"] for ref in refs)
        if len(dims) != node.ndim:
            raise _NotPlain
    attrs = {key: _attr(value) for key, value in raw.items() if key not in HIDDEN_ATTRS and key != "_FillValue"}
    return dims, attrs


def _is_text(node: h5py.Dataset) -> bool:
    """Variable-length UTF-8 strings: how netCDF-4 stores a str variable (a population's prompts)."""
    info = h5py.check_string_dtype(node.dtype)
    return info is not None and info.encoding == "utf-8" and info.length is None


def _values(node: h5py.Dataset) -> np.ndarray:
    """The variable's data; strings as fixed-width unicode, as xarray decodes them (``astype(str)``)."""
    if node.dtype.kind in "fiu":
        return node[()]
    return np.asarray(node.asstr()[()]).astype(str)


def _raw_attrs(node: h5py.HLObject) -> dict:
    """Each attribute read once (h5py reads one per call), skipping unused bookkeeping."""
    return {key: node.attrs[key] for key in list(node.attrs) if key not in UNUSED_ATTRS}


def _attr(value: object) -> object:
    """An attribute as h5netcdf returns it: str as is, a one-element numeric array as its element."""
    if isinstance(value, str) or (isinstance(value, np.generic) and value.dtype.kind in "fiu"):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu" and value.ndim == 1:
        return value[0] if value.size == 1 else value
    raise _NotPlain
