"""The data contract of a sweep: one probe's extractions over checkpoints x prompts x seeds.

A sweep Dataset holds ``logits`` (and ``mass``) over
``(checkpoint, prompt, seed, step, layer, head, query_frame, key_frame)``: the extraction
contract's dims behind three sweep dims (docs/sweep.md, "Data contract").

- ``checkpoint``: 0..C-1 in the order given, with coordinates ``checkpoint_source`` (as given:
  an embedded name or a path), ``checkpoint_path``, ``checkpoint_fingerprint``, ``model_id``,
  ``checkpoint_layout`` and ``training_step`` (float, NaN where unknown).
- ``prompt``: 0..P-1 with coordinate ``prompt_text``.
- ``seed``: the noise seeds themselves.

Attrs equal in every part stay dataset attrs; an attr that differs becomes a coordinate over
the fewest sweep dims it varies along (``created`` ends up on all three, the prompt embedding
fingerprint on ``checkpoint`` x ``prompt``). ``part_view`` turns one cell back into a plain
extraction. Torch-free.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from attn_harness.core.errors import HarnessError
from attn_harness.core.schema import DIMS, METRICS
from attn_harness.core.store import read_netcdf, write_netcdf

SWEEP_DIMS: tuple[str, ...] = ("checkpoint", "prompt", "seed")
SWEEP_KIND = "attn-harness sweep"
# Part attrs that always become coordinates of the checkpoint dim.
CHECKPOINT_ATTRS: tuple[str, ...] = ("model_id", "checkpoint_path", "checkpoint_fingerprint", "checkpoint_layout")
# A part's own bookkeeping (docs/sweep.md): not carried into the merged Dataset.
PART_ATTRS: tuple[str, ...] = ("sweep_part_key", "checkpoint_source", "training_step")
# Training step in a checkpoint's file name: step_1200.pt, ckpt-1200.safetensors, iter1200, model_001200.pt
STEP_PATTERNS: tuple[str, ...] = (
    r"(?:global_step|step|iter|iteration|checkpoint|ckpt)[-_=]?(\d+)",
    r"[-_](\d+)$",
)


def training_step_from_name(source: str) -> int | None:
    """The training step a checkpoint's file or folder name states, if it states one."""
    stem = Path(source).name
    for suffix in (".safetensors", ".pt", ".pth", ".bin"):
        stem = stem.removesuffix(suffix)
    for pattern in STEP_PATTERNS:
        match = re.search(pattern, stem, flags=re.IGNORECASE)
        if match:
            return int(match[1])
    return None


def merge_parts(
    parts: Mapping[tuple[int, int, int], xr.Dataset],
    *,
    checkpoints: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
) -> xr.Dataset:
    """One Dataset from the parts keyed by (checkpoint index, prompt index, seed index).

    Values are copied unchanged (float32 to float32), so ``part_view`` of the result equals
    each part exactly. Parts must share variables and every extraction coordinate.
    """
    grid = (len(checkpoints), len(prompts), len(seeds))
    cells = list(itertools.product(*map(range, grid)))
    missing = [cell for cell in cells if cell not in parts]
    if missing:
        raise HarnessError(f"cannot merge the sweep: {len(missing)} of {len(cells)} parts missing, e.g. {missing[0]}")
    first = parts[cells[0]]
    variables = [m for m in METRICS if m in first]
    for cell in cells[1:]:
        _check_same_shape(first, parts[cell], cell, checkpoints, prompts, seeds, variables)
    data = {
        m: (SWEEP_DIMS + DIMS, np.stack([parts[c][m].transpose(*DIMS).values for c in cells]).reshape(grid + first[m].shape))
        for m in variables
    }
    coords = {name: first[name].values for name in DIMS}
    coords["timestep"] = ("step", first["timestep"].values)
    coords.update(checkpoint=np.arange(grid[0]), prompt=np.arange(grid[1]), seed=np.asarray(seeds, dtype=np.int64))
    coords["checkpoint_source"] = ("checkpoint", np.asarray([str(s) for s in checkpoints], dtype=object))
    coords["prompt_text"] = ("prompt", np.asarray([str(p) for p in prompts], dtype=object))
    steps = [parts[(c, 0, 0)].attrs.get("training_step", "") for c in range(grid[0])]
    coords["training_step"] = ("checkpoint", np.asarray([float(s) if s != "" else np.nan for s in steps]))
    ds = xr.Dataset(data, coords=coords)
    for m in variables:
        ds[m].attrs = dict(first[m].attrs)
    attrs = {"sweep": SWEEP_KIND}
    # seed and prompt are the sweep's own dims (prompt_text holds the prompt).
    for key in sorted(set().union(*(parts[c].attrs for c in cells)) - set(PART_ATTRS) - {"seed", "prompt"}):
        values = np.empty(grid, dtype=object)
        for cell in cells:
            values[cell] = _attr_text(parts[cell].attrs.get(key, ""))
        dims = ("checkpoint",) if key in CHECKPOINT_ATTRS else _varying_dims(values)
        if not dims:
            attrs[key] = parts[cells[0]].attrs[key]
        else:
            index = tuple(slice(None) if d in dims else 0 for d in SWEEP_DIMS)
            ds.coords[key] = (dims, _typed(values[index]))
    ds.attrs = attrs
    return ds


def _check_same_shape(first, other, cell, checkpoints, prompts, seeds, variables) -> None:
    where = f"checkpoint {checkpoints[cell[0]]!r}, prompt {prompts[cell[1]]!r}, seed {seeds[cell[2]]}"
    if [m for m in METRICS if m in other] != variables:
        raise HarnessError(f"cannot merge the sweep: part ({where}) has variables {sorted(other.data_vars)}, "
                           f"the first has {variables}")
    for name in DIMS:
        if not np.array_equal(first[name].values, other[name].values):
            raise HarnessError(
                f"cannot merge the sweep: part ({where}) has {name} {other[name].values.tolist()}, the first part "
                f"{first[name].values.tolist()}; every checkpoint must share the architecture and the probe's geometry"
            )


def _attr_text(value: object) -> object:
    """Attr values made comparable and storable: lists and dicts as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _typed(values: np.ndarray) -> np.ndarray:
    flat = values.ravel().tolist()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return np.asarray(values.tolist(), dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        return np.asarray(values.tolist(), dtype=np.float64)
    return np.vectorize(str, otypes=[object])(values) if values.size else values


def _varying_dims(values: np.ndarray) -> tuple[str, ...]:
    """The sweep dims along which ``values`` (checkpoint x prompt x seed) are not constant."""
    dims = []
    for axis, dim in enumerate(SWEEP_DIMS):
        reference = np.take(values, [0], axis=axis)
        if any(a != b for a, b in zip(np.broadcast_to(reference, values.shape).ravel(), values.ravel())):
            dims.append(dim)
    return tuple(dims)


def part_view(ds: xr.Dataset, *, checkpoint: int, prompt: int, seed: int) -> xr.Dataset:
    """One cell of a sweep as a plain extraction (the contract of ``attn_harness.core.schema``)."""
    cell = ds.sel(checkpoint=checkpoint, prompt=prompt, seed=seed)
    attrs = {k: v for k, v in ds.attrs.items() if k != "sweep"}
    attrs["seed"] = int(cell["seed"])
    attrs["prompt"] = str(cell["prompt_text"].values)
    extra = [name for name in cell.coords if name not in DIMS and name != "timestep"]
    for name in extra:
        if name in ("checkpoint", "prompt", "seed", "prompt_text", "checkpoint_source", "training_step"):
            continue
        value = cell[name].values.item()
        attrs[name] = _attr_value(value)
    out = cell.drop_vars(extra)
    out.attrs = attrs
    return out


def _attr_value(value: object) -> object:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def write_sweep(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a merged sweep atomically as NetCDF4 (engine h5netcdf); return the path."""
    return write_netcdf(ds, path)


def read_sweep(path: str | os.PathLike) -> xr.Dataset:
    """Read a merged sweep into memory; a file that is not one is a ``HarnessError``."""
    ds = read_netcdf(path, "a sweep dataset written by `attn-harness sweep`")
    if ds.attrs.get("sweep") != SWEEP_KIND or "logits" not in ds or ds["logits"].dims != SWEEP_DIMS + DIMS:
        raise HarnessError(
            f"{path} is not a sweep dataset (needs attr sweep={SWEEP_KIND!r} and logits over {SWEEP_DIMS + DIMS}); "
            "write one with `attn-harness sweep`"
        )
    for name in ("checkpoint_source", "prompt_text"):
        ds.coords[name] = ds[name].astype(object)
    return ds
