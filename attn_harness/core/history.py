"""A training history: the extractions of one fixed probe at successive checkpoints, one file.

The history is an extraction with one more dim, ``checkpoint``, in front, and coordinates
along it: ``train_step`` (int), ``timestamp`` (ISO 8601) and ``fingerprint`` (the weights'
sha256 at that checkpoint). Every entry must share the probe's coordinates (steps, layers,
heads, frames); attrs are the first entry's, less those that change per checkpoint. The file
carries a marker attr, so appending never rewrites a file the harness did not write as a history.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import xarray as xr

from attn_harness.core.errors import HarnessError
from attn_harness.core.store import read_netcdf, validate, write_netcdf

MARK = "attn_harness_history"
PER_CHECKPOINT_ATTRS = ("checkpoint_fingerprint", "checkpoint_path", "created")


def checkpoint_entry(ds: xr.Dataset, *, train_step: int, timestamp: str | None = None) -> xr.Dataset:
    """One extraction as a history entry (a ``checkpoint`` dim of length 1)."""
    validate(ds)
    when = timestamp or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry = ds.expand_dims("checkpoint").assign_coords(
        train_step=("checkpoint", np.asarray([train_step], dtype=np.int64)),
        timestamp=("checkpoint", np.asarray([when], dtype=object)),
        fingerprint=("checkpoint", np.asarray([str(ds.attrs.get("checkpoint_fingerprint", ""))], dtype=object)),
    )
    entry.attrs = {key: value for key, value in ds.attrs.items() if key not in PER_CHECKPOINT_ATTRS}
    entry.attrs[MARK] = 1
    return entry


def read_history(path: str | os.PathLike) -> xr.Dataset:
    """Read a history written by ``append_checkpoint`` fully into memory."""
    history = read_netcdf(path, "a training history, written by attn_harness.sampling.monitor.AttentionMonitor")
    if history.attrs.get(MARK) != 1 or "checkpoint" not in history.dims:
        raise HarnessError(
            f"{path} is not a training history (no '{MARK}' marker or no 'checkpoint' dim); "
            "choose a new file name: the harness appends only to histories it wrote"
        )
    return history


def append_checkpoint(path: str | os.PathLike, ds: xr.Dataset, *, train_step: int, timestamp: str | None = None) -> xr.Dataset:
    """Append ``ds`` as the checkpoint at ``train_step`` to the history at ``path`` (created if absent).

    The whole file is rewritten atomically, so an interrupted append leaves the previous history.
    """
    path = Path(path)
    entry = checkpoint_entry(ds, train_step=train_step, timestamp=timestamp)
    if path.exists():
        history = read_history(path)
        _check_compatible(path, history, entry, train_step)
        entry = xr.concat([history, entry], dim="checkpoint", combine_attrs="drop_conflicts")
        entry.attrs[MARK] = 1
    write_netcdf(entry, path)
    return entry


def _check_compatible(path: Path, history: xr.Dataset, entry: xr.Dataset, train_step: int) -> None:
    """Refuse an entry of another probe (other coords or variables) or a train step already there."""
    for dim in ("step", "layer", "head", "query_frame", "key_frame"):
        if not np.array_equal(history[dim].values, entry[dim].values):
            raise HarnessError(
                f"{path}: this extraction's {dim} values {entry[dim].values.tolist()} differ from the history's "
                f"{history[dim].values.tolist()}; a history holds one fixed probe: start a new file"
            )
    if set(history.data_vars) != set(entry.data_vars):
        raise HarnessError(f"{path}: variables {sorted(entry.data_vars)} differ from the history's {sorted(history.data_vars)}")
    if train_step in set(int(s) for s in history["train_step"].values):
        raise HarnessError(f"{path}: train step {train_step} is already in the history")
