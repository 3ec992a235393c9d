"""The data contract of one extraction (docs/design.md, "Data contract"), shared by every module.

An extraction is an ``xarray.Dataset`` with variables ``logits`` and (optionally) ``mass``
over the dims ``(step, layer, head, query_frame, key_frame)``, a ``timestep`` coordinate on
``step``, and JSON-safe attrs (structured values JSON-encoded, no bools).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

SCHEMA_VERSION = 1
DIMS: tuple[str, ...] = ("step", "layer", "head", "query_frame", "key_frame")
METRICS: tuple[str, ...] = ("logits", "mass")

# Attrs every extraction carries. Legacy imports fill what the seed files know and
# write "unknown" for the rest.
REQUIRED_ATTRS: tuple[str, ...] = (
    "schema_version",
    "source",
    "model_id",
    "checkpoint_path",
    "checkpoint_fingerprint",
    "model_config",
    "prompt",
    "prompt_embedding_fingerprint",
    "seed",
    "height",
    "width",
    "num_frames",
    "latent_frames",
    "tokens_per_frame",
    "temporal_stride",
    "block_size",
    "mask",
    "dtype",
    "device",
    "branch",
    "harness_version",
    "torch_version",
    "diffusers_version",
    "created",
)

MASKS: tuple[str, ...] = ("bidirectional", "block-causal")


def json_safe_attr(value: Any) -> str | int | float | list:
    """Turn an attr value into something NetCDF stores: dicts as JSON, bools as ints, None as ''."""
    if isinstance(value, bool):
        return int(value)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # plain str: subclasses such as torch's TorchVersion confuse h5py
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value
    ):
        return [v.item() if hasattr(v, "item") else v for v in value]
    return json.dumps(value, default=str)


def build_dataset(
    variables: Mapping[str, np.ndarray],
    *,
    steps: Sequence[int],
    timesteps: Sequence[float],
    layers: Sequence[int],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    """Assemble arrays shaped ``(step, layer, head, query_frame, key_frame)`` into the contract."""
    unknown = set(variables) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown variables {sorted(unknown)}; expected some of {list(METRICS)}")
    first = next(iter(variables.values()))
    n_heads, n_query, n_key = first.shape[2:]
    coords = {
        "step": np.asarray(steps, dtype=np.int64),
        "timestep": ("step", np.asarray(timesteps, dtype=np.float64)),
        "layer": np.asarray(layers, dtype=np.int64),
        "head": np.arange(n_heads, dtype=np.int64),
        "query_frame": np.arange(n_query, dtype=np.int64),
        "key_frame": np.arange(n_key, dtype=np.int64),
    }
    data_vars = {name: (DIMS, np.asarray(arr, dtype=np.float32)) for name, arr in variables.items()}
    ds = xr.Dataset(data_vars, coords=coords)
    ds["logits"].attrs["long_name"] = "block-mean pre-softmax attention logit"
    if "mass" in ds:
        ds["mass"].attrs["long_name"] = "softmax probability mass from query frame to key frame"
    ds.attrs = {key: json_safe_attr(value) for key, value in attrs.items()}
    ds.attrs.setdefault("schema_version", SCHEMA_VERSION)
    return ds


def decode_attr(ds: xr.Dataset, key: str) -> Any:
    """Read a JSON-encoded attr back into Python (plain strings pass through)."""
    value = ds.attrs[key]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
