"""Frame geometry, stated as invariants.

Each invariant is a small predicate below; the property tests show our geometry keeps it for
every stride and size hypothesis draws, and a companion test shows the predicate rejects a
mapping that breaks it (the seed notebook's ``i // 4`` among them), so no check passes vacuously.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_harness.core import frames
from attn_harness.core.errors import HarnessError

STRIDES = st.integers(min_value=1, max_value=8)


@st.composite
def pixel_geometries(draw, max_latent: int = 24) -> tuple[int, int]:
    """(temporal_stride, num_pixel_frames) with num_pixel_frames = 1 + k*stride."""
    stride = draw(STRIDES)
    k = draw(st.integers(min_value=0, max_value=max_latent - 1))
    return stride, 1 + k * stride


def ours(num_pixel_frames: int, stride: int) -> np.ndarray:
    return frames.latent_frame_of_pixel(np.arange(num_pixel_frames), stride)


def seed_orig_to_latent(num_orig_frames: int, num_latent: int, stride: int = 4) -> np.ndarray:
    """The seed notebook's mapping, verbatim: ``np.minimum(orig_indices // TEMPORAL_STRIDE, T - 1)``."""
    return np.minimum(np.arange(num_orig_frames) // stride, num_latent - 1)


# Invariant predicates on a pixel -> latent mapping (an int array indexed by pixel frame).


def is_monotone_onto(latent_of_pixel: np.ndarray, num_latent: int) -> bool:
    return bool(np.all(np.diff(latent_of_pixel) >= 0)) and set(latent_of_pixel.tolist()) == set(range(num_latent))


def has_causal_vae_counts(latent_of_pixel: np.ndarray, num_latent: int, stride: int) -> bool:
    counts = np.bincount(latent_of_pixel, minlength=num_latent).tolist()
    return counts == [1] + [stride] * (num_latent - 1)


def is_inverse_of_pixel_frames(latent_of_pixel: np.ndarray, num_latent: int, stride: int) -> bool:
    forward = all(i in frames.pixel_frames_of_latent(int(t), stride) for i, t in enumerate(latent_of_pixel))
    backward = all(
        i < len(latent_of_pixel) and latent_of_pixel[i] == t
        for t in range(num_latent)
        for i in frames.pixel_frames_of_latent(t, stride)
    )
    return forward and backward


def each_frame_is_one_run(frame_of: np.ndarray, num_frames: int, per_frame: int) -> bool:
    runs = [np.flatnonzero(frame_of == f) for f in range(num_frames)]
    return all(len(run) == per_frame and run[-1] - run[0] == per_frame - 1 for run in runs)


def block_causal_oracle(num_latent: int, block_size: int) -> np.ndarray:
    """Brute force from blocks(): query in block c sees every key in blocks 0..c."""
    allowed = np.zeros((num_latent, num_latent), dtype=bool)
    parts = frames.blocks(num_latent, block_size)
    for c, block in enumerate(parts):
        for query in block:
            for earlier in parts[: c + 1]:
                for key in earlier:
                    allowed[query, key] = True
    return allowed


# Pixel frames <-> latent frames.


@given(pixel_geometries())
def test_latent_frame_of_pixel_is_monotone_and_onto_every_latent_frame(geometry):
    stride, num_pixel = geometry
    assert is_monotone_onto(ours(num_pixel, stride), frames.num_latent_frames(num_pixel, stride))


def test_monotone_onto_check_rejects_decreasing_and_gapped_mappings():
    assert not is_monotone_onto(np.array([0, 2, 1]), 3)
    assert not is_monotone_onto(np.array([0, 0, 2]), 3)


@given(pixel_geometries())
def test_latent_zero_has_one_pixel_frame_and_every_other_latent_has_stride(geometry):
    stride, num_pixel = geometry
    num_latent = frames.num_latent_frames(num_pixel, stride)
    assert has_causal_vae_counts(ours(num_pixel, stride), num_latent, stride)
    sizes = [len(frames.pixel_frames_of_latent(t, stride)) for t in range(num_latent)]
    assert sizes == [1] + [stride] * (num_latent - 1)


@given(pixel_geometries())
def test_latent_frame_of_pixel_and_pixel_frames_of_latent_are_inverse(geometry):
    stride, num_pixel = geometry
    assert is_inverse_of_pixel_frames(ours(num_pixel, stride), frames.num_latent_frames(num_pixel, stride), stride)


@given(STRIDES, st.integers(min_value=0, max_value=500))
def test_latent_frame_of_pixel_is_ceil_for_ints_and_arrays_alike(stride, pixel):
    as_int = frames.latent_frame_of_pixel(pixel, stride)
    assert type(as_int) is int and as_int == -(-pixel // stride)
    assert frames.latent_frame_of_pixel(np.array([pixel, pixel]), stride).tolist() == [as_int, as_int]


def test_seed_floor_mapping_gives_latent_zero_four_pixel_frames_where_a_causal_vae_gives_one():
    seed, correct = seed_orig_to_latent(81, 21), ours(81, 4)
    assert seed[:4].tolist() == [0, 0, 0, 0] and correct[:4].tolist() == [0, 1, 1, 1]
    assert not has_causal_vae_counts(seed, 21, 4) and has_causal_vae_counts(correct, 21, 4)
    assert not is_inverse_of_pixel_frames(seed, 21, 4) and is_inverse_of_pixel_frames(correct, 21, 4)


def test_seed_default_of_21_original_frames_folds_21_latent_frames_into_6():
    assert len(set(seed_orig_to_latent(21, 21).tolist())) == 6
    latent = xr.DataArray(np.zeros((21, 21)), dims=("query_frame", "key_frame"))
    assert len(set(frames.expand_to_pixel_frames(latent, 81)["latent_query_frame"].values.tolist())) == 21
    with pytest.raises(ValueError, match="pass num_pixel_frames = 81"):
        frames.expand_to_pixel_frames(latent, 21)


# Expanding a latent-frame DataArray to pixel frames and back.


@st.composite
def latent_arrays(draw) -> tuple[xr.DataArray, int, int]:
    """(DataArray over head and frame dims with masked NaN cells, num_pixel_frames, stride)."""
    stride = draw(st.integers(min_value=1, max_value=4))
    num_latent = draw(st.integers(min_value=1, max_value=6))
    heads = draw(st.integers(min_value=1, max_value=3))
    dims = draw(st.sampled_from([("head", "query_frame", "key_frame"), ("key_frame", "head"), ("query_frame",)]))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    sizes = {"head": heads, "query_frame": num_latent, "key_frame": num_latent}
    values = np.random.default_rng(seed).normal(size=[sizes[d] for d in dims])
    coords = {d: np.arange(sizes[d]) for d in dims if d != "head"}
    da = xr.DataArray(values, dims=dims, coords=coords, attrs={"mask": "block-causal"})
    if "query_frame" in dims and "key_frame" in dims:
        mask = xr.DataArray(frames.block_causal_mask(num_latent, 2), dims=("query_frame", "key_frame"))
        da = da.where(mask)
    return da, 1 + (num_latent - 1) * stride, stride


@settings(max_examples=40, deadline=None)
@given(latent_arrays())
def test_expanding_then_averaging_back_is_the_identity(case):
    da, num_pixel, stride = case
    back = frames.average_to_latent_frames(frames.expand_to_pixel_frames(da, num_pixel, stride), stride)
    # The mean of `stride` equal float64 values may differ from them by a few ulps of summation.
    xr.testing.assert_allclose(back, da, rtol=1e-12, atol=0)
    assert back.attrs == {**da.attrs, "frame_unit": "latent"}


@settings(max_examples=40, deadline=None)
@given(latent_arrays())
def test_each_pixel_frame_takes_the_value_of_its_ceil_latent_frame(case):
    da, num_pixel, stride = case
    expanded = frames.expand_to_pixel_frames(da, num_pixel, stride)
    frame_dims = [d for d in frames.FRAME_DIMS if d in da.dims]
    assert expanded.attrs["frame_unit"] == "pixel"
    for dim in frame_dims:
        assert expanded[dim].values.tolist() == list(range(num_pixel))
        assert expanded[f"latent_{dim}"].values.tolist() == [-(-i // stride) for i in range(num_pixel)]
    for pixels in itertools.product(range(num_pixel), repeat=len(frame_dims)):
        cell = expanded.sel(dict(zip(frame_dims, pixels)))
        source = da.sel({dim: -(-i // stride) for dim, i in zip(frame_dims, pixels)})
        np.testing.assert_array_equal(cell.values, source.transpose(*cell.dims).values)


def test_averaging_a_floor_expansion_does_not_recover_the_latent_frames():
    latent = xr.DataArray(np.arange(3.0), dims="query_frame", coords={"query_frame": np.arange(3)})
    floor_expanded = latent.isel(query_frame=seed_orig_to_latent(9, 3)).assign_coords(query_frame=np.arange(9))
    assert not frames.average_to_latent_frames(floor_expanded).equals(latent)


# Blocks and the block-causal mask.


@given(st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=45))
def test_blocks_partition_the_latent_frames_in_order(num_latent, block_size):
    parts = frames.blocks(num_latent, block_size)
    assert [f for block in parts for f in block] == list(range(num_latent))
    assert all(len(block) == block_size for block in parts[:-1]) and 1 <= len(parts[-1]) <= block_size


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=1, max_value=35))
def test_block_causal_mask_is_lower_block_triangular_with_full_diagonal_blocks(num_latent, block_size):
    mask = frames.block_causal_mask(num_latent, block_size)
    np.testing.assert_array_equal(mask, block_causal_oracle(num_latent, block_size))


@given(st.integers(min_value=2, max_value=30), st.integers(min_value=2, max_value=35))
def test_frame_causal_mask_is_not_block_causal(num_latent, block_size):
    frame_causal = np.tril(np.ones((num_latent, num_latent), dtype=bool))
    assert not np.array_equal(frame_causal, block_causal_oracle(num_latent, block_size))


@given(st.integers(min_value=1, max_value=30))
def test_block_size_one_is_frame_causal(num_latent):
    frame_causal = np.tril(np.ones((num_latent, num_latent), dtype=bool))
    np.testing.assert_array_equal(frames.block_causal_mask(num_latent, 1), frame_causal)


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=10))
def test_block_size_at_least_the_frame_count_is_bidirectional(num_latent, extra):
    assert frames.block_causal_mask(num_latent, num_latent + extra).all()


def sink_window_oracle(num_latent: int, block_size: int, sink: int, window: int) -> np.ndarray:
    """Brute force from blocks(): a query in the block starting at s sees its block, frames 0..sink-1
    and frames s-window..s-1 (never a frame at or after s outside its block)."""
    allowed = np.zeros((num_latent, num_latent), dtype=bool)
    for block in frames.blocks(num_latent, block_size):
        for query in block:
            for key in range(num_latent):
                earlier = key < block.start and (key < sink or key >= block.start - window)
                allowed[query, key] = key in block or earlier
    return allowed


SINK_WINDOW = (st.integers(1, 30), st.integers(1, 8), st.integers(0, 10), st.integers(0, 12))


@given(*SINK_WINDOW)
def test_sink_window_mask_is_own_block_plus_sink_plus_window(num_latent, block_size, sink, window):
    mask = frames.sink_window_mask(num_latent, block_size, sink, window)
    np.testing.assert_array_equal(mask, sink_window_oracle(num_latent, block_size, sink, window))


@given(*SINK_WINDOW)
def test_sink_window_hides_everything_block_causal_hides_and_keeps_at_most_sink_plus_window_earlier_frames(
    num_latent, block_size, sink, window
):
    mask = frames.sink_window_mask(num_latent, block_size, sink, window)
    causal = frames.block_causal_mask(num_latent, block_size)
    assert not (mask & ~causal).any()
    for block in frames.blocks(num_latent, block_size):
        assert mask[block.start][: block.start].sum() <= sink + window
        assert mask[np.ix_(list(block), list(block))].all()


@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 10))
def test_a_window_covering_the_whole_past_is_block_causal(num_latent, block_size, sink):
    np.testing.assert_array_equal(
        frames.sink_window_mask(num_latent, block_size, sink, num_latent),
        frames.block_causal_mask(num_latent, block_size),
    )


def test_sink_window_of_10_blocks_of_3_keeps_the_first_block_and_the_last_two():
    mask = frames.sink_window_mask(30, 3, sink_frames=3, window_frames=6)
    assert np.flatnonzero(mask[27]).tolist() == [0, 1, 2, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    assert not np.array_equal(mask, frames.block_causal_mask(30, 3))


@settings(max_examples=40, deadline=None)
@given(*SINK_WINDOW, st.data())
def test_hidden_cells_follow_the_mask_by_frame_value_on_any_subset_of_frames(num_latent, block_size, sink, window, data):
    query = sorted(data.draw(st.sets(st.integers(0, num_latent - 1), min_size=1)))
    key = sorted(data.draw(st.sets(st.integers(0, num_latent - 1), min_size=1)))
    da = xr.DataArray(np.zeros((len(query), len(key))), dims=frames.FRAME_DIMS, coords={"query_frame": query, "key_frame": key})
    hidden = frames.hidden_cells(da, "sink-window", block_size, sink, window).transpose(*frames.FRAME_DIMS)
    expected = ~sink_window_oracle(num_latent, block_size, sink, window)[np.ix_(query, key)]
    np.testing.assert_array_equal(hidden.values, expected)


@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 10), st.integers(0, 12))
def test_visible_mask_names_every_mask(num_latent, block_size, sink, window):
    assert frames.visible_mask(num_latent, "bidirectional") is None
    np.testing.assert_array_equal(frames.visible_mask(num_latent, "block-causal", block_size),
                                  frames.block_causal_mask(num_latent, block_size))
    np.testing.assert_array_equal(frames.visible_mask(num_latent, "sink-window", block_size, sink, window),
                                  frames.sink_window_mask(num_latent, block_size, sink, window))


def test_an_unknown_mask_is_an_error_naming_the_valid_ones():
    with pytest.raises(HarnessError, match="bidirectional, block-causal, sink-window"):
        frames.visible_mask(6, "causal")


# Tokens.


@given(st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=200))
def test_each_frames_tokens_form_one_contiguous_run(num_latent, per_frame):
    frame_of = frames.frame_of_token(np.arange(num_latent * per_frame), per_frame)
    assert each_frame_is_one_run(frame_of, num_latent, per_frame)


def test_contiguity_check_rejects_frame_minor_token_order():
    assert not each_frame_is_one_run(np.arange(3 * 5) % 3, 3, 5)


@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 16), st.integers(1, 4), st.integers(1, 4))
def test_tokens_per_frame_is_the_patch_grid(rows, cols, spatial_stride, patch_h, patch_w):
    height, width = rows * spatial_stride * patch_h, cols * spatial_stride * patch_w
    assert frames.tokens_per_frame(height, width, spatial_stride, (patch_h, patch_w)) == rows * cols


# Wan2.1 facts (docs/design.md, "Frame geometry").


def test_wan_geometry_facts():
    assert frames.num_latent_frames(81) == 21
    assert frames.tokens_per_frame(480, 832) == frames.tokens_per_frame(832, 480) == 1560
    assert 21 * frames.tokens_per_frame(480, 832) == 32760
    assert frames.frame_of_token(32759, 1560) == 20 and frames.frame_of_token(1560, 1560) == 1
    assert len(frames.blocks(21, 3)) == 7 and list(frames.blocks(21, 3)[-1]) == [18, 19, 20]
    assert list(frames.pixel_frames_of_latent(20)) == [77, 78, 79, 80]


# Invalid input.

LATENT_9 = xr.DataArray(np.zeros((3, 3)), dims=("query_frame", "key_frame"))

INVALID = {
    "frame count off the 1+4k grid": (
        lambda: frames.num_latent_frames(80),
        ["1 + k*4", "1, 5, 9", "got 80", "77 or 81"],
    ),
    "zero pixel frames": (lambda: frames.num_latent_frames(0), ["num_pixel_frames", ">= 1", "got 0"]),
    "zero temporal stride": (lambda: frames.num_latent_frames(81, 0), ["temporal_stride", ">= 1"]),
    "negative pixel frame": (lambda: frames.latent_frame_of_pixel(-1), ["pixel frame", ">= 0", "got -1"]),
    "negative pixel in array": (lambda: frames.latent_frame_of_pixel(np.array([0, -3])), ["non-negative", "-3"]),
    "float pixel array": (
        lambda: frames.latent_frame_of_pixel(np.array([0.0, 4.0])),
        ["integer array", "float64"],
    ),
    "float pixel frame": (lambda: frames.latent_frame_of_pixel(1.5), ["integer", "1.5"]),
    "negative latent frame": (lambda: frames.pixel_frames_of_latent(-2), ["latent frame", ">= 0"]),
    "height off the 16 grid": (
        lambda: frames.tokens_per_frame(470, 832),
        ["height", "multiple of", "16", "464 or 480"],
    ),
    "height below one patch": (lambda: frames.tokens_per_frame(8, 832), ["height", "got 8", "nearest valid: 16"]),
    "width off the 16 grid": (lambda: frames.tokens_per_frame(480, 830), ["width", "16", "816 or 832"]),
    "zero spatial stride": (lambda: frames.tokens_per_frame(480, 832, 0), ["spatial_stride", ">= 1"]),
    "one-number patch": (lambda: frames.tokens_per_frame(480, 832, 8, (2,)), ["pair", "(2, 2)"]),
    "negative token": (lambda: frames.frame_of_token(-1, 1560), ["token", ">= 0"]),
    "zero tokens per frame": (lambda: frames.frame_of_token(5, 0), ["tokens_per_frame", ">= 1"]),
    "zero block size": (lambda: frames.blocks(21, 0), ["block_size", ">= 1", "got 0"]),
    "zero frames in mask": (lambda: frames.block_causal_mask(0, 3), ["num_latent_frames", ">= 1"]),
    "mask block size zero": (lambda: frames.block_causal_mask(21, 0), ["block_size", ">= 1"]),
    "latent count mismatch": (
        lambda: frames.expand_to_pixel_frames(LATENT_9, 13),
        ["3 latent frames", "has 4", "num_pixel_frames = 9"],
    ),
    "no frame dims": (
        lambda: frames.expand_to_pixel_frames(xr.DataArray(np.zeros(3), dims="head"), 9),
        ["query_frame", "key_frame"],
    ),
    "relabelled latent coord": (
        lambda: frames.expand_to_pixel_frames(LATENT_9.assign_coords(query_frame=[1, 2, 3]), 9),
        ["0..2", "[1, 2, 3]"],
    ),
    "expanding twice": (
        lambda: frames.expand_to_pixel_frames(frames.expand_to_pixel_frames(LATENT_9, 9), 33),
        ["already in pixel frames"],
    ),
    "averaging a pixel count off the grid": (
        lambda: frames.average_to_latent_frames(xr.DataArray(np.zeros(8), dims="key_frame")),
        ["key_frame", "1 + k*4", "got 8"],
    ),
    "averaging twice": (
        lambda: frames.average_to_latent_frames(
            frames.average_to_latent_frames(frames.expand_to_pixel_frames(LATENT_9, 9))
        ),
        ["already in latent frames"],
    ),
    "averaging with the wrong stride": (
        lambda: frames.average_to_latent_frames(frames.expand_to_pixel_frames(LATENT_9, 5, 2), 4),
        ["latent_query_frame", "temporal_stride=4"],
    ),
}


@pytest.mark.parametrize("call, phrases", INVALID.values(), ids=INVALID.keys())
def test_invalid_input_raises_a_value_error_saying_what_is_valid(call, phrases):
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, HarnessError)
    assert all(phrase in str(info.value) for phrase in phrases), str(info.value)


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=1, max_value=35), st.integers(min_value=0, max_value=5))
def test_hidden_cells_are_the_complement_of_the_mask_by_frame_value(num_latent, block_size, first):
    """On a subset of frames starting at ``first``, hidden cells follow the frame values, not positions."""
    values = np.arange(first, first + num_latent)
    da = xr.DataArray(np.zeros((num_latent, num_latent)), dims=("query_frame", "key_frame"),
                      coords={"query_frame": values, "key_frame": values})
    whole = ~frames.block_causal_mask(first + num_latent, block_size)[first:, first:]
    hidden = frames.hidden_cells(da, "block-causal", block_size).transpose("query_frame", "key_frame")
    assert np.array_equal(hidden.values, whole)
    assert not frames.hidden_cells(da, "bidirectional", block_size).any()
