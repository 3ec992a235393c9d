"""Import the seed notebook's ``.pt`` files (one layer's frame x frame logits) as an extraction.

The seed extractor saves a dict with ``full_frame_attention`` (float16 ``[heads, T, T]``
block-mean logits) and a few plain values. It records neither the denoising step nor the
timestep, so the import has one step (``step=0``) whose ``timestep`` is NaN, meaning
"unknown"; attrs the file cannot know are the string ``"unknown"``.

Loading is safe (``attn_harness.model.torchfile.safe_load``, weights only): a file that needs
arbitrary unpickling is refused with an explanation instead of executing its code.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

import attn_harness
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import sha256_file
from attn_harness.core.frames import block_causal_mask
from attn_harness.core.metrics import default_query_frames
from attn_harness.core.schema import LEGACY_MASKS, build_dataset
from attn_harness.core.store import validate
from attn_harness.model.torchfile import safe_load

REQUIRED_KEYS: tuple[str, ...] = (
    "full_frame_attention",
    "layer_index",
    "num_frames",
    "num_heads",
    "last_block_query_frames",
    "tokens_per_frame",
    "prompt",
    "is_logits",
)
DEFAULT_BLOCK_SIZE = 3  # the seed's autoregressive models use blocks of 3 latent frames
DEFAULT_TEMPORAL_STRIDE = 4  # Wan's causal VAE: latent t >= 1 <- pixel frames 4t-3 .. 4t
UNKNOWN = "unknown"
UNKNOWN_TIMESTEP = float("nan")  # the seed files do not record the denoising timestep


def import_legacy(path: str | os.PathLike, mask: str = "auto") -> xr.Dataset:
    """Read a seed ``.pt`` file into a validated one-step, one-layer extraction.

    ``mask="auto"`` picks ``block-causal`` when every entry above the block diagonal is
    exactly 0 (the seed extractor's zero fill) and there is more than one block, else
    ``bidirectional``; ``"bidirectional"`` or ``"block-causal"`` force the choice. Masked
    cells become NaN.
    """
    if mask not in ("auto", *LEGACY_MASKS):
        raise HarnessError(f"mask must be 'auto' or one of {list(LEGACY_MASKS)}; got {mask!r}")
    path = Path(path)
    data = _load(path)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise HarnessError(
            f"{path} lacks the keys {missing} of a seed attention file; it has {sorted(map(str, data))}. "
            "Re-run the seed extractor, or use `attn-harness extract` for a fresh extraction"
        )
    if not data["is_logits"]:
        raise HarnessError(
            f"{path} holds attention probabilities (is_logits is False); only logit files can be "
            "imported. Re-run the seed extractor with logits, or use `attn-harness extract`"
        )
    num_heads = _integer(data, "num_heads", path)
    logits = _attention(data, num_heads, path)
    num_latent = logits.shape[-1]
    block_size = _block_size(data.get("block_sizes"), path)
    if mask == "auto":
        mask = _detect_mask(logits, block_size)
    if mask == "block-causal":
        logits[:, ~block_causal_mask(num_latent, block_size)] = np.nan
    stride = DEFAULT_TEMPORAL_STRIDE if data.get("vae_stride_t") is None else _integer(data, "vae_stride_t", path)
    attrs = {
        "source": "legacy-import",
        "model_id": UNKNOWN,
        "checkpoint_path": str(path.resolve()),
        "checkpoint_fingerprint": _sha256(path),
        "model_config": UNKNOWN,
        "prompt": data["prompt"] if data["prompt"] is not None else UNKNOWN,
        "prompt_embedding_fingerprint": UNKNOWN,
        "seed": UNKNOWN,
        "height": UNKNOWN,
        "width": UNKNOWN,
        "num_frames": 1 + stride * (num_latent - 1),
        "latent_frames": num_latent,
        "tokens_per_frame": _integer(data, "tokens_per_frame", path),
        "temporal_stride": stride,
        "block_size": block_size,
        "mask": mask,
        "dtype": str(data["full_frame_attention"].dtype).removeprefix("torch."),
        "device": UNKNOWN,
        "branch": UNKNOWN,
        "harness_version": attn_harness.__version__,
        "torch_version": UNKNOWN,
        "diffusers_version": UNKNOWN,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "legacy_query_frames": _integer_list(data, "last_block_query_frames", path),
        "legacy_num_frames": _integer(data, "num_frames", path),
    }
    ds = build_dataset(
        {"logits": logits[np.newaxis, np.newaxis]},
        steps=[0],
        timesteps=[UNKNOWN_TIMESTEP],
        layers=[_integer(data, "layer_index", path)],
        attrs=attrs,
    )
    ds.attrs["query_frames"] = default_query_frames(ds)
    try:
        validate(ds)
    except HarnessError as exc:
        raise HarnessError(f"{path} imports to invalid data: {exc}") from exc
    return ds


def _load(path: Path) -> dict:
    """The file through the harness's one safe loader (weights only); it must hold a dict."""
    data = safe_load(path, what="a seed extractor's .pt file (a dict with 'full_frame_attention')")
    if not isinstance(data, dict):
        raise HarnessError(f"{path} holds a {type(data).__name__}; expected the seed extractor's dict")
    return data


def _integer(data: dict, key: str, path: Path) -> int:
    """``data[key]`` as an int (python int or one-element tensor), else a HarnessError naming the key."""
    value = data[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise HarnessError(f"{path}: key {key!r} must be an integer; got {value!r}")
    return value


def _integer_list(data: dict, key: str, path: Path) -> list[int]:
    """``data[key]`` as a list of ints (list, tuple or integer tensor), else a HarnessError naming the key."""
    values = _as_list(data[key])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise HarnessError(f"{path}: key {key!r} must be a list of integers; got {data[key]!r}")
    return values


def _as_list(value: Any) -> list:
    """A list from a list, tuple, tensor or single number."""
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _attention(data: dict, num_heads: int, path: Path) -> np.ndarray:
    """``full_frame_attention`` as float32 ``[heads, T, T]`` (a copy), shape checked."""
    tensor = data["full_frame_attention"]
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        found = f"tensor of {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise HarnessError(f"{path}: 'full_frame_attention' must be a floating-point tensor; got a {found}")
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[0] != num_heads or shape[1] < 1:
        raise HarnessError(
            f"{path}: 'full_frame_attention' has shape {list(shape)}; expected [num_heads, T, T] "
            f"with num_heads = {num_heads} (from the file's 'num_heads')"
        )
    return tensor.detach().to(torch.float32).numpy().copy()


def _block_size(value: Any, path: Path) -> int:
    """The block size from ``block_sizes`` (an int or a list of equal ints); 3 when absent."""
    if value is None:
        return DEFAULT_BLOCK_SIZE
    sizes = _as_list(value)
    positive = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
    if not sizes or not positive or len(set(sizes)) > 1:
        raise HarnessError(
            f"{path}: 'block_sizes' is {value!r}; expected a positive int or a list of equal positive ints "
            "(the data contract has one block size)"
        )
    return sizes[0]


def _detect_mask(logits: np.ndarray, block_size: int) -> str:
    """block-causal iff there is more than one block and everything above the block diagonal is 0."""
    num_frames = logits.shape[-1]
    if num_frames <= block_size:
        return "bidirectional"
    above = logits[:, ~block_causal_mask(num_frames, block_size)]
    return "block-causal" if np.all(above == 0) else "bidirectional"


def _sha256(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes."""
    return f"sha256:{sha256_file(path)}"
