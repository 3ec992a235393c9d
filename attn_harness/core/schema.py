"""The data contract of one extraction (docs/design.md, "Data contract"), shared by every module.

An extraction is an ``xarray.Dataset`` with variables ``logits`` and (optionally) ``mass`` and
``aligned_mass`` over the dims ``(step, layer, head, query_frame, key_frame)``, optionally
``text_mass`` over ``(step, layer, head, query_frame, text_token)``, a ``timestep`` coordinate on
``step``, and JSON-safe attrs (structured values JSON-encoded, no bools).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from attn_harness.core.frames import MASKS  # noqa: F401  (the contract's masks, re-exported)

LEGACY_MASKS: tuple[str, ...] = ("bidirectional", "block-causal")  # what the seed notebook's files can hold

SCHEMA_VERSION = 1
DIMS: tuple[str, ...] = ("step", "layer", "head", "query_frame", "key_frame")
METRICS: tuple[str, ...] = ("logits", "mass", "aligned_mass")
# A population extraction (several prompts and/or seeds) puts a ``sample`` dim before DIMS,
# with these coordinates along it.
SAMPLE_DIM = "sample"
SAMPLE_COORDS: dict[str, str] = {"prompt": "the sample's prompt text", "seed": "the sample's noise seed"}
# Probability statistics: in [0, 1], 0 on cells a mask hides (logits are NaN there).
PROBABILITIES: tuple[str, ...] = ("mass", "aligned_mass")
TEXT_METRIC = "text_mass"
TEXT_DIMS: tuple[str, ...] = ("step", "layer", "head", "query_frame", "text_token")

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


# Every provenance attr, in the order reports show it, with its group. One list for the
# results record, the baseline diff, the run report and the comparison:
# - "model": which weights were measured (expected to differ between two checkpoints);
# - "probe": what was run on them: prompt, seed, geometry, sampler, mask and mode. Two
#   extractions whose probes differ measure different things (the comparison warns);
# - "software": device and library versions;
# - "record": where and when the file was written (shown, never compared).
PROVENANCE_ATTRS: dict[str, str] = {
    "model_id": "model",
    "checkpoint_layout": "model",
    "checkpoint_fingerprint": "model",
    "model_architecture": "model",
    "prompt": "probe",
    "negative_prompt": "probe",
    "prompt_encoder": "probe",
    "prompt_embedding_fingerprint": "probe",
    "seed": "probe",
    "height": "probe",
    "width": "probe",
    "num_frames": "probe",
    "latent_frames": "probe",
    "tokens_per_frame": "probe",
    "temporal_stride": "probe",
    "mode": "probe",
    "mask": "probe",
    "block_size": "probe",
    "sample_steps": "probe",
    "scheduler": "probe",
    "guidance": "probe",
    "shift": "probe",
    "branch": "probe",
    "dtype": "probe",
    "device": "software",
    "harness_version": "software",
    "torch_version": "software",
    "diffusers_version": "software",
    "source": "record",
    "checkpoint_path": "record",
    "created": "record",
}
PROVENANCE_GROUPS: tuple[str, ...] = ("model", "probe", "software", "record")


def provenance_keys(*groups: str) -> tuple[str, ...]:
    """The provenance attrs of the given groups (all of them when none is named), in report order."""
    unknown = set(groups) - set(PROVENANCE_GROUPS)
    if unknown:
        raise ValueError(f"unknown provenance groups {sorted(unknown)}; groups are {list(PROVENANCE_GROUPS)}")
    return tuple(key for key, group in PROVENANCE_ATTRS.items() if not groups or group in groups)


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
    text_mass: np.ndarray | None = None,
    text_content: Sequence[bool] | None = None,
    text_strings: Sequence[str] | None = None,
) -> xr.Dataset:
    """Assemble arrays shaped ``(step, layer, head, query_frame, key_frame)`` into the contract.

    ``text_mass`` (optional) is shaped ``(step, layer, head, query_frame, text_token)``: the
    cross-attention mass of each query frame on each text token; ``text_content`` marks the
    tokens that carry the prompt (1) rather than padding (0), stored as an int8 coordinate;
    ``text_strings`` (the token strings, where a tokenizer is known) become ``text_token_string``.
    """
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
    if text_mass is not None:
        data_vars[TEXT_METRIC] = (TEXT_DIMS, np.asarray(text_mass, dtype=np.float32))
        tokens = text_mass.shape[-1]
        coords["text_token"] = np.arange(tokens, dtype=np.int64)
        content = np.ones(tokens, dtype=np.int8) if text_content is None else np.asarray(text_content, dtype=np.int8)
        coords["text_content"] = ("text_token", content)
        if text_strings is not None:
            coords["text_token_string"] = ("text_token", np.asarray(list(text_strings), dtype=str))
    ds = xr.Dataset(data_vars, coords=coords)
    ds["logits"].attrs["long_name"] = "block-mean pre-softmax attention logit"
    if "mass" in ds:
        ds["mass"].attrs["long_name"] = "softmax probability mass from query frame to key frame"
    if "aligned_mass" in ds:
        ds["aligned_mass"].attrs["long_name"] = (
            "softmax probability from a query to the key at its own spatial position in the key frame"
        )
    if TEXT_METRIC in ds:
        ds[TEXT_METRIC].attrs["long_name"] = "cross-attention probability mass from query frame to text token"
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
