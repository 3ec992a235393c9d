"""Derived statistics on frame x frame DataArrays (docs/design.md, "Statistics").

Every function takes a DataArray with dims ``query_frame`` and ``key_frame`` plus any others
(``step``, ``layer``, ``head``) and keeps those others, so the same code serves one layer in
a notebook and a whole extraction in a check. Masked cells are NaN and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from attn_harness.core.errors import HarnessError


def last_block(num_frames: int, block_size: int = 3) -> list[int]:
    """The query frames of the last block: the seed's default ``[18, 19, 20]`` at 21 frames."""
    if num_frames < 1 or block_size < 1:
        raise HarnessError(f"need num_frames >= 1 and block_size >= 1; got {num_frames}, {block_size}")
    start = ((num_frames - 1) // block_size) * block_size
    return list(range(start, num_frames))


def default_query_frames(ds: xr.Dataset | xr.DataArray) -> list[int]:
    """Last block under a block-causal or sink-window mask, else the last ``block_size`` (default 3) frames."""
    num_frames = ds.sizes["query_frame"]
    block_size = int(ds.attrs.get("block_size", 3) or 3)
    if ds.attrs.get("mask") in ("block-causal", "sink-window"):
        return last_block(num_frames, block_size)
    return list(range(max(num_frames - block_size, 0), num_frames))


def _check_frames(da: xr.DataArray, query_frames: Sequence[int]) -> None:
    available = set(int(f) for f in da["query_frame"].values)
    missing = [f for f in query_frames if f not in available]
    if missing:
        raise HarnessError(
            f"query frames {missing} are not in this data (query_frame runs "
            f"{min(available)}..{max(available)})"
        )


def query_profile(da: xr.DataArray, query_frames: Sequence[int]) -> xr.DataArray:
    """r[b] = mean over the query frames a of da[a, b]; masked cells are skipped."""
    _check_frames(da, query_frames)
    return da.sel(query_frame=list(query_frames)).mean("query_frame", skipna=True)


def head_stats(da: xr.DataArray, query_frames: Sequence[int]) -> xr.Dataset:
    """Per-head ``first``, ``mid``, ``last`` and ``sink = first - mid`` of the query profile.

    With valid key frames k_0 < ... < k_m (not NaN in the profile): first = r[k_0],
    last = r[k_m], mid = mean of r over k_1..k_{m-1}. With fewer than three valid key frames
    there is no middle; like the seed, mid is then the mean over all valid key frames.
    """
    profile = query_profile(da, query_frames)
    valid = profile.notnull().any([d for d in profile.dims if d != "key_frame"])
    keys = profile["key_frame"].values[valid.values]
    if len(keys) == 0:
        raise HarnessError("no valid key frames for the chosen query frames (everything is masked)")
    first = profile.sel(key_frame=keys[0], drop=True)
    last = profile.sel(key_frame=keys[-1], drop=True)
    middle_keys = keys[1:-1] if len(keys) > 2 else keys
    mid = profile.sel(key_frame=middle_keys).mean("key_frame", skipna=True)
    return xr.Dataset({"first": first, "mid": mid, "last": last, "sink": first - mid})


def diagonal(da: xr.DataArray) -> xr.DataArray:
    """da[a, a] along a new ``frame`` dim (query and key frames must share indices)."""
    frames = np.intersect1d(da["query_frame"].values, da["key_frame"].values)
    picked = da.sel(query_frame=xr.DataArray(frames, dims="frame"), key_frame=xr.DataArray(frames, dims="frame"))
    return picked.drop_vars(["query_frame", "key_frame"]).assign_coords(frame=frames)


def diagonal_mean(da: xr.DataArray, keep: Sequence[str] = ()) -> xr.DataArray:
    """Mean of da[a, a] over heads and frames (and every dim not in ``keep``)."""
    diag = diagonal(da)
    return diag.mean([d for d in diag.dims if d not in keep], skipna=True)


def first_frame_mean(da: xr.DataArray, keep: Sequence[str] = ()) -> xr.DataArray:
    """Mean of the unmasked entries of da[:, :, key_frame=0] (every dim not in ``keep``)."""
    col = da.sel(key_frame=int(da["key_frame"].values.min()))
    return col.mean([d for d in col.dims if d not in keep], skipna=True)


def layer_summary(da: xr.DataArray, query_frames: Sequence[int]) -> dict:
    """The seed's statistics table for one (step, layer) view ``(head, query_frame, key_frame)``."""
    extra = [d for d in da.dims if d not in ("head", "query_frame", "key_frame")]
    if any(da.sizes[d] != 1 for d in extra):
        raise HarnessError(f"layer_summary needs a single step and layer; got dims {dict(da.sizes)}")
    da = da.squeeze(extra, drop=True)
    stats = head_stats(da, query_frames)
    return {
        "diagonal_mean": float(diagonal_mean(da)),
        "first_frame_mean": float(first_frame_mean(da)),
        "query_frames": [int(f) for f in query_frames],
        "heads": [
            {
                "head": int(h),
                "first": float(stats["first"].sel(head=h)),
                "mid": float(stats["mid"].sel(head=h)),
                "last": float(stats["last"].sel(head=h)),
                "sink": float(stats["sink"].sel(head=h)),
            }
            for h in da["head"].values
        ],
    }


# Head types. A head's probability from the query frames a >= 1 (frame 0 has no earlier
# frame to sink into) splits into three shares, each a mean over those query frames:
#   first    = mass[a, 0]                     probability on the first frame (the sink)
#   own      = mass[a, a]                     probability kept in the query's own frame
#   aligned  = sum_{b != a} aligned_mass[a, b] probability on the same spatial position of
#                                             other frames (the signature of a temporal head)
# The type is the first of sink, spatial, temporal whose share reaches its threshold, else
# mixed. With uniform attention over F frames of P tokens the shares are 1/F, 1/F and
# (F - 1) / (F P), so a threshold of one half is far from chance for any F >= 3.
HEAD_TYPES: tuple[str, ...] = ("sink", "spatial", "temporal", "mixed")
HEAD_TYPE_THRESHOLDS: dict[str, float] = {"sink": 0.5, "spatial": 0.5, "temporal": 0.5}


def head_shares(mass: xr.DataArray, aligned_mass: xr.DataArray) -> xr.Dataset:
    """Per head (and every other dim but the frames): the ``first``, ``own`` and ``aligned`` shares."""
    frames = [int(f) for f in mass["query_frame"].values if f >= 1]
    if not frames or 0 not in set(int(f) for f in mass["key_frame"].values):
        raise HarnessError("head types need query frames >= 1 and key frame 0 (at least two latent frames)")
    mass = mass.sel(query_frame=frames)
    aligned_mass = aligned_mass.sel(query_frame=frames)
    same = mass["query_frame"] == mass["key_frame"]
    return xr.Dataset({
        "first": mass.sel(key_frame=0, drop=True).mean("query_frame"),
        "own": mass.where(same).sum("key_frame").mean("query_frame"),
        "aligned": aligned_mass.where(~same).sum("key_frame").mean("query_frame"),
    })


def head_types(
    mass: xr.DataArray, aligned_mass: xr.DataArray, thresholds: dict[str, float] | None = None
) -> xr.DataArray:
    """Each head's type (``sink``, ``spatial``, ``temporal`` or ``mixed``) from its shares."""
    limits = {**HEAD_TYPE_THRESHOLDS, **(thresholds or {})}
    shares = head_shares(mass, aligned_mass)
    kind = xr.full_like(shares["first"], "mixed", dtype=object)
    for name, share in (("temporal", "aligned"), ("spatial", "own"), ("sink", "first")):  # later wins
        kind = kind.where(~(shares[share] >= limits[name]), name)
    return kind.rename("head_type")


def sink_trend(history: xr.DataArray, query_frames: Sequence[int]) -> xr.DataArray:
    """The sink score (``head_stats``) of every head at every checkpoint of a training history."""
    if "checkpoint" not in history.dims:
        raise HarnessError(f"a trend needs a history with a 'checkpoint' dim; got dims {history.dims}")
    return head_stats(history, query_frames)["sink"]


def sample_mean(ds: xr.Dataset) -> xr.Dataset:
    """A population's mean over samples (attrs kept, prompt/seed coords dropped); others unchanged."""
    if "sample" not in ds.dims:
        return ds
    mean = ds.drop_vars(["prompt", "seed"], errors="ignore").mean("sample", keep_attrs=True)
    mean.attrs["samples_averaged"] = int(ds.sizes["sample"])
    return mean
