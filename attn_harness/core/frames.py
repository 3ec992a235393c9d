"""Frame geometry of a causal-VAE video DiT: pixel frames, latent frames, tokens, blocks.

Pure NumPy (and xarray for the two DataArray helpers), so every other module can ask
"which latent frame is pixel frame 17?" or "which keys may query frame 19 see?" without
torch. Wan2.1 facts (docs/design.md, "Frame geometry"): the VAE is causal with temporal stride 4, so
latent frame 0 comes from pixel frame 0 alone and latent t >= 1 from pixel frames
4t-3 .. 4t; tokens are frame-major after patchify; autoregressive derivatives attend
block-causally over blocks of latent frames, or over a frame sink plus a window of recent
frames (a rolling KV cache).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

from attn_harness.core.errors import HarnessError

FRAME_DIMS: tuple[str, ...] = ("query_frame", "key_frame")
MASKS: tuple[str, ...] = ("bidirectional", "block-causal", "sink-window")

IntOrArray = int | np.ndarray


class FrameGeometryError(HarnessError, ValueError):
    """Invalid frame geometry input; a ``ValueError`` too, as for any bad argument value."""


def _require_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a plain int, or an error saying which integers are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FrameGeometryError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise FrameGeometryError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _require_index(name: str, value: object) -> IntOrArray:
    """A non-negative integer or integer array (as int64), or an error saying so."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.integer):
            raise FrameGeometryError(f"{name} must be a non-negative integer array; got dtype {value.dtype}")
        if value.size and value.min() < 0:
            raise FrameGeometryError(
                f"{name} must be non-negative (0, 1, 2, ...); got {int(value.min())} in the array"
            )
        return value.astype(np.int64)
    return _require_int(name, value, 0)


def _nearest_valid(value: int, step: int, first: int) -> str:
    """The valid values ``first + k*step`` (k >= 0) either side of an invalid ``value``."""
    k = (value - first) // step
    if k < 0:
        return str(first)
    below = first + k * step
    return f"{below} or {below + step}"


def num_latent_frames(num_pixel_frames: int, temporal_stride: int = 4) -> int:
    """T = 1 + (F - 1) / stride, for the F = 1 + k*stride pixel frames a causal VAE accepts."""
    stride = _require_int("temporal_stride", temporal_stride, 1)
    frames = _require_int("num_pixel_frames", num_pixel_frames, 1)
    if (frames - 1) % stride:
        examples = ", ".join(str(1 + k * stride) for k in range(3))
        raise FrameGeometryError(
            f"num_pixel_frames must be 1 + k*{stride} ({examples}, ...; {1 + 20 * stride} gives 21 latent "
            f"frames); got {frames}; nearest valid: {_nearest_valid(frames, stride, first=1)}"
        )
    return 1 + (frames - 1) // stride


def latent_frame_of_pixel(i: IntOrArray, temporal_stride: int = 4) -> IntOrArray:
    """ceil(i / stride): the latent frame that pixel frame ``i`` is encoded into (int or array)."""
    stride = _require_int("temporal_stride", temporal_stride, 1)
    pixel = _require_index("pixel frame index", i)
    return (pixel + stride - 1) // stride


def pixel_frames_of_latent(t: int, temporal_stride: int = 4) -> range:
    """The pixel frames latent frame ``t`` encodes: 0 alone for t = 0, else stride*t-stride+1 .. stride*t."""
    stride = _require_int("temporal_stride", temporal_stride, 1)
    latent = _require_int("latent frame index", t, 0)
    if latent == 0:
        return range(0, 1)
    return range(stride * (latent - 1) + 1, stride * latent + 1)


def tokens_per_frame(
    height: int, width: int, spatial_stride: int = 8, patch: tuple[int, int] = (2, 2)
) -> int:
    """Tokens in one latent frame: (H / (stride*patch_h)) * (W / (stride*patch_w)); 480x832 -> 1560."""
    stride = _require_int("spatial_stride", spatial_stride, 1)
    if not isinstance(patch, (tuple, list)) or len(patch) != 2:
        raise FrameGeometryError(f"patch must be a pair (patch_h, patch_w) such as (2, 2); got {patch!r}")
    patch_h = _require_int("patch[0]", patch[0], 1)
    patch_w = _require_int("patch[1]", patch[1], 1)
    counts = []
    for name, size, patch_size in (("height", height, patch_h), ("width", width, patch_w)):
        pixels = _require_int(name, size, 1)
        unit = stride * patch_size
        if pixels % unit:
            raise FrameGeometryError(
                f"{name} must be a multiple of spatial_stride * patch = {stride}*{patch_size} = {unit}; "
                f"got {pixels}; nearest valid: {_nearest_valid(pixels, unit, first=unit)}"
            )
        counts.append(pixels // unit)
    return counts[0] * counts[1]


def frame_of_token(n: IntOrArray, tokens_per_frame: int) -> IntOrArray:
    """n // tokens_per_frame: the latent frame of token ``n`` in the frame-major sequence."""
    per_frame = _require_int("tokens_per_frame", tokens_per_frame, 1)
    return _require_index("token index", n) // per_frame


def blocks(num_latent_frames: int, block_size: int) -> list[range]:
    """Consecutive blocks of ``block_size`` latent frames covering 0..T-1 (the last may be shorter)."""
    frames = _require_int("num_latent_frames", num_latent_frames, 1)
    size = _require_int("block_size", block_size, 1)
    return [range(start, min(start + size, frames)) for start in range(0, frames, size)]


def block_causal_mask(num_latent_frames: int, block_size: int) -> np.ndarray:
    """Bool [query_frame, key_frame]; True where a query in block c may see a key in blocks 0..c."""
    frames = _require_int("num_latent_frames", num_latent_frames, 1)
    size = _require_int("block_size", block_size, 1)
    block_of = np.arange(frames) // size
    return block_of[np.newaxis, :] <= block_of[:, np.newaxis]


def _sink_window_visible(query, key, block_size: int, sink_frames: int, window_frames: int):
    """The sink-window rule on frame indices (ints, arrays or DataArrays that broadcast)."""
    start = (query // block_size) * block_size  # first frame of the query's block
    own_block = (key // block_size) == (query // block_size)
    earlier = key < start
    return own_block | (earlier & ((key < sink_frames) | (key >= start - window_frames)))


def sink_window_mask(num_latent_frames: int, block_size: int, sink_frames: int, window_frames: int) -> np.ndarray:
    """Bool [query_frame, key_frame] of a rolling KV cache with a frame sink.

    A query in the block starting at frame s sees its own block, the first ``sink_frames``
    frames of the clip and the ``window_frames`` frames just before s (frames s-W .. s-1);
    every other earlier frame has been evicted from the cache, every later frame is not
    generated yet. With a window covering the whole past it is the block-causal mask.
    """
    frames = _require_int("num_latent_frames", num_latent_frames, 1)
    size = _require_int("block_size", block_size, 1)
    sink = _require_int("sink_frames", sink_frames, 0)
    window = _require_int("window_frames", window_frames, 0)
    index = np.arange(frames)
    return _sink_window_visible(index[:, np.newaxis], index[np.newaxis, :], size, sink, window)


def visible_mask(num_latent_frames: int, mask: str, block_size: int = 3, sink_frames: int = 0,
                 window_frames: int = 0) -> np.ndarray | None:
    """The bool [query_frame, key_frame] visibility of ``mask``; None for bidirectional (all visible)."""
    if mask == "bidirectional":
        return None
    if mask == "block-causal":
        return block_causal_mask(num_latent_frames, block_size)
    if mask == "sink-window":
        return sink_window_mask(num_latent_frames, block_size, sink_frames, window_frames)
    raise FrameGeometryError(f"mask must be one of {', '.join(MASKS)}; got {mask!r}")


def mask_params(attrs: Mapping) -> dict:
    """``mask``, ``block_size``, ``sink_frames``, ``window_frames`` of an extraction's attrs (defaults filled)."""
    return {
        "mask": str(attrs.get("mask", "bidirectional")),
        "block_size": int(attrs.get("block_size", 3) or 3),
        "sink_frames": int(attrs.get("sink_frames", 0) or 0),
        "window_frames": int(attrs.get("window_frames", 0) or 0),
    }


def hidden_cells(data: xr.DataArray | xr.Dataset, mask: str, block_size: int, sink_frames: int = 0,
                 window_frames: int = 0) -> xr.DataArray:
    """True where ``mask`` hides key frame b from query frame a, on ``data``'s frame coordinates.

    Block-causal: b's block comes after a's (``b // block_size > a // block_size``, by frame
    value, so a subset of frames works); sink-window: also the earlier frames that are neither
    sink nor window (``sink_window_mask``); bidirectional: nothing is hidden. Data without a
    ``key_frame`` dim (the text cross-attention) has nothing hidden.
    """
    if "key_frame" not in data.coords:
        return xr.zeros_like(data["query_frame"], dtype=bool)
    query, key = data["query_frame"].values, data["key_frame"].values
    coords = {"key_frame": data["key_frame"], "query_frame": data["query_frame"]}
    # numpy on the frame values (an xarray op costs far more than these few cells); dims as xarray's broadcasting
    # of ``key`` against ``query`` gives them, so arrays derived from the mask keep their layout
    if mask == "block-causal":
        hidden = (key[:, None] // block_size) > (query[None, :] // block_size)
    elif mask == "sink-window":
        hidden = ~_sink_window_visible(query[None, :], key[:, None], block_size, sink_frames, window_frames)
    else:
        return xr.DataArray(np.zeros((query.size, key.size), dtype=bool), coords, ("query_frame", "key_frame"))
    return xr.DataArray(hidden, coords, ("key_frame", "query_frame"))


def _frame_dims(da: xr.DataArray, caller: str) -> list[str]:
    dims = [dim for dim in FRAME_DIMS if dim in da.dims]
    if not dims:
        raise FrameGeometryError(
            f"{caller} needs a DataArray with a 'query_frame' and/or 'key_frame' dim; got dims {da.dims}"
        )
    return dims


def expand_to_pixel_frames(
    da: xr.DataArray, num_pixel_frames: int, temporal_stride: int = 4
) -> xr.DataArray:
    """Index ``da`` by pixel frames: each pixel frame takes its latent frame's value (ceil mapping).

    The frame dims keep their names with coords 0..F-1; ``attrs["frame_unit"] = "pixel"`` and a
    ``latent_query_frame`` / ``latent_key_frame`` coord record which latent frame each came from.
    """
    dims = _frame_dims(da, "expand_to_pixel_frames")
    if da.attrs.get("frame_unit") == "pixel":
        raise FrameGeometryError(
            "expand_to_pixel_frames needs latent frames; this DataArray is already in pixel frames"
        )
    latent_count = num_latent_frames(num_pixel_frames, temporal_stride)
    pixels = np.arange(num_pixel_frames)
    latent = latent_frame_of_pixel(pixels, temporal_stride)
    expanded = da
    for dim in dims:
        size = da.sizes[dim]
        if size != latent_count:
            raise FrameGeometryError(
                f"{dim} has {size} latent frames but num_pixel_frames={num_pixel_frames} at "
                f"temporal_stride={temporal_stride} has {latent_count}; pass num_pixel_frames = "
                f"{1 + (size - 1) * temporal_stride} for this DataArray"
            )
        if dim in da.coords and not np.array_equal(da[dim].values, np.arange(size)):
            raise FrameGeometryError(
                f"{dim} coordinate must be the latent frames 0..{size - 1} in order; got {da[dim].values.tolist()}"
            )
        expanded = expanded.isel({dim: latent}).assign_coords({dim: pixels, f"latent_{dim}": (dim, latent)})
    expanded.attrs = {**da.attrs, "frame_unit": "pixel"}
    return expanded


def average_to_latent_frames(da: xr.DataArray, temporal_stride: int = 4) -> xr.DataArray:
    """Mean over each latent frame's pixel frames: the inverse of :func:`expand_to_pixel_frames`.

    A NaN (masked) pixel cell makes its latent cell NaN, since masks act on whole latent frames.
    """
    dims = _frame_dims(da, "average_to_latent_frames")
    if da.attrs.get("frame_unit") == "latent":
        raise FrameGeometryError(
            "average_to_latent_frames needs pixel frames; this DataArray is already in latent frames"
        )
    averaged = da
    for dim in dims:
        size = da.sizes[dim]
        try:
            num_latent_frames(size, temporal_stride)
        except FrameGeometryError as err:
            raise FrameGeometryError(f"{dim} of size {size}: {err}") from None
        latent = latent_frame_of_pixel(np.arange(size), temporal_stride)
        group = f"latent_{dim}"
        if group in da.coords and not np.array_equal(da[group].values, latent):
            raise FrameGeometryError(
                f"{group} does not match temporal_stride={temporal_stride}; pass the stride the "
                f"DataArray was expanded with"
            )
        averaged = (
            averaged.assign_coords({group: (dim, latent)})
            .groupby(group)
            .mean(skipna=False)
            .rename({group: dim})
        )
    averaged.attrs = {**da.attrs, "frame_unit": "latent"}
    return averaged
