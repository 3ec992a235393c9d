"""Import of the seed notebook's ``.pt`` files into the data contract."""

from __future__ import annotations

import hashlib
import math
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import attn_harness
from attn_harness.core.errors import HarnessError
from attn_harness.core.store import read_dataset, validate, write_dataset
from attn_harness.model.legacy import import_legacy

HEADS = 12
FRAMES = 21  # 81 pixel frames -> 21 latent frames


def block_hidden(frames: int, block_size: int) -> np.ndarray:
    """[query, key] True above the block diagonal (written out as loops: the test's own oracle)."""
    return np.array([[b // block_size > a // block_size for b in range(frames)] for a in range(frames)])


def seed_file(tmp_path: Path, *, frames: int = FRAMES, causal: bool = False, block_size: int = 3,
              name: str = "layer20.pt", drop: tuple[str, ...] = (), **overrides) -> Path:
    """Write a .pt exactly as the seed extractor does: fp16 [heads, T, T] and plain Python values."""
    generator = torch.Generator().manual_seed(frames)
    attention = (torch.randn(HEADS, frames, frames, generator=generator) * 3 + 1).to(torch.float16)
    if causal:
        attention[:, torch.from_numpy(block_hidden(frames, block_size))] = 0
    data = {
        "full_frame_attention": attention,
        "layer_index": 20,
        "num_frames": frames,
        "num_heads": HEADS,
        "block_sizes": [block_size] * math.ceil(frames / block_size),
        "last_block_query_frames": [frames - 3, frames - 2, frames - 1],
        "tokens_per_frame": 1560,
        "prompt": "a red fox running through snow",
        "is_logits": True,
    }
    data.update(overrides)
    for key in drop:
        del data[key]
    path = tmp_path / name
    torch.save(data, path)
    return path


def stored(path: Path) -> np.ndarray:
    """The file's tensor cast to float32, [heads, T, T]."""
    return torch.load(path, weights_only=True)["full_frame_attention"].float().numpy()


def single_layer(ds: xr.Dataset) -> np.ndarray:
    """The seed's view: logits of the one step and layer as [head, query_frame, key_frame]."""
    return ds["logits"].sel(step=0, layer=20).transpose("head", "query_frame", "key_frame").values


def test_bidirectional_file_imports_exactly(tmp_path: Path) -> None:
    path = seed_file(tmp_path)
    ds = import_legacy(path)
    validate(ds)
    assert ds.attrs["mask"] == "bidirectional"
    assert ds["logits"].dtype == np.float32
    np.testing.assert_array_equal(single_layer(ds), stored(path))  # fp16 -> fp32 is exact
    assert not ds["logits"].isnull().any()
    assert "mass" not in ds


def test_import_records_what_the_file_knows_and_marks_the_rest_unknown(tmp_path: Path) -> None:
    path = seed_file(tmp_path, prompt="一只狐狸在雪地里奔跑")
    ds = import_legacy(path)
    assert ds["step"].values.tolist() == [0] and np.isnan(ds["timestep"].values).all()
    assert ds["layer"].values.tolist() == [20] and ds.sizes["head"] == HEADS
    attrs = ds.attrs
    assert attrs["source"] == "legacy-import"
    assert attrs["checkpoint_path"] == str(path.resolve())
    assert attrs["checkpoint_fingerprint"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert attrs["prompt"] == "一只狐狸在雪地里奔跑"
    assert (attrs["latent_frames"], attrs["num_frames"], attrs["temporal_stride"]) == (21, 81, 4)
    assert (attrs["tokens_per_frame"], attrs["block_size"], attrs["dtype"]) == (1560, 3, "float16")
    assert attrs["legacy_query_frames"] == [18, 19, 20] and attrs["query_frames"] == [18, 19, 20]
    assert attrs["harness_version"] == attn_harness.__version__
    assert attrs["seed"] == attrs["model_id"] == attrs["torch_version"] == "unknown"


def test_bidirectional_file_with_other_length_and_stride(tmp_path: Path) -> None:
    ds = import_legacy(seed_file(tmp_path, frames=13, vae_stride_t=2, orig_num_frames=25))
    assert (ds.attrs["latent_frames"], ds.attrs["num_frames"], ds.attrs["temporal_stride"]) == (13, 25, 2)
    assert ds.attrs["query_frames"] == [10, 11, 12]  # last block_size frames of a bidirectional model


def test_block_causal_file_is_detected_and_masked_cells_become_nan(tmp_path: Path) -> None:
    path = seed_file(tmp_path, causal=True)
    ds = import_legacy(path)
    validate(ds)
    assert ds.attrs["mask"] == "block-causal" and ds.attrs["query_frames"] == [18, 19, 20]
    got, want, hidden = single_layer(ds), stored(path), block_hidden(FRAMES, 3)
    np.testing.assert_array_equal(np.isnan(got), np.broadcast_to(hidden, got.shape))
    np.testing.assert_array_equal(got[:, ~hidden], want[:, ~hidden])


@pytest.mark.parametrize("block_sizes", [7, [7, 7, 7]], ids=["int", "list"])
def test_block_size_comes_from_an_int_or_a_list(tmp_path: Path, block_sizes) -> None:
    ds = import_legacy(seed_file(tmp_path, causal=True, block_size=7, block_sizes=block_sizes))
    assert ds.attrs["block_size"] == 7 and ds.attrs["mask"] == "block-causal"
    assert ds.attrs["query_frames"] == [14, 15, 16, 17, 18, 19, 20]
    np.testing.assert_array_equal(np.isnan(single_layer(ds)[0]), block_hidden(FRAMES, 7))


def test_block_size_defaults_to_three_when_the_file_has_none(tmp_path: Path) -> None:
    ds = import_legacy(seed_file(tmp_path, causal=True, drop=("block_sizes",)))
    assert ds.attrs["block_size"] == 3 and ds.attrs["mask"] == "block-causal"


def test_one_nonzero_entry_above_the_block_diagonal_means_bidirectional(tmp_path: Path) -> None:
    attention = torch.load(seed_file(tmp_path, causal=True), weights_only=True)["full_frame_attention"]
    attention[5, 2, 20] = 0.001  # query frame 2 (block 0) -> key frame 20 (block 6)
    ds = import_legacy(seed_file(tmp_path, full_frame_attention=attention, name="nearly.pt"))
    assert ds.attrs["mask"] == "bidirectional"
    assert not ds["logits"].isnull().any()


def test_a_single_block_is_never_called_block_causal(tmp_path: Path) -> None:
    assert import_legacy(seed_file(tmp_path, frames=3, causal=True)).attrs["mask"] == "bidirectional"


def test_mask_argument_overrides_detection_both_ways(tmp_path: Path) -> None:
    forced_causal = import_legacy(seed_file(tmp_path, name="bi.pt"), mask="block-causal")
    assert forced_causal.attrs["mask"] == "block-causal"
    np.testing.assert_array_equal(np.isnan(single_layer(forced_causal)[3]), block_hidden(FRAMES, 3))
    causal_path = seed_file(tmp_path, causal=True, name="causal.pt")
    forced_bi = import_legacy(causal_path, mask="bidirectional")
    assert forced_bi.attrs["mask"] == "bidirectional"
    np.testing.assert_array_equal(single_layer(forced_bi), stored(causal_path))  # zeros kept as logits


def test_an_unknown_mask_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="mask must be 'auto' or one of"):
        import_legacy(seed_file(tmp_path), mask="causal")


@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
def test_imported_dataset_round_trips_through_netcdf(tmp_path: Path, mask: str) -> None:
    ds = import_legacy(seed_file(tmp_path, causal=mask == "block-causal"))
    xr.testing.assert_identical(read_dataset(write_dataset(ds, tmp_path / "imported.nc")), ds)


def test_missing_keys_are_named_with_what_the_file_has(tmp_path: Path) -> None:
    path = seed_file(tmp_path, drop=("layer_index", "is_logits"))
    with pytest.raises(HarnessError) as info:
        import_legacy(path)
    message = str(info.value)
    assert str(path) in message
    assert "lacks the keys ['layer_index', 'is_logits']" in message
    assert "'full_frame_attention'" in message and "'tokens_per_frame'" in message  # what it found


@pytest.mark.parametrize(
    ("attention", "num_heads"),
    [
        (torch.zeros(HEADS, FRAMES, FRAMES + 1, dtype=torch.float16), HEADS),
        (torch.zeros(8, FRAMES, FRAMES, dtype=torch.float16), HEADS),
        (torch.zeros(FRAMES, FRAMES, dtype=torch.float16), HEADS),
    ],
    ids=["not-square", "heads-differ-from-num_heads", "no-head-axis"],
)
def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path: Path, attention: torch.Tensor, num_heads: int) -> None:
    path = seed_file(tmp_path, full_frame_attention=attention, num_heads=num_heads)
    with pytest.raises(HarnessError, match=r"'full_frame_attention' has shape .*expected \[num_heads, T, T\]"):
        import_legacy(path)


@pytest.mark.parametrize(
    ("key", "value"), [("layer_index", "20"), ("num_heads", 12.0), ("last_block_query_frames", ["18", "19"])]
)
def test_values_of_the_wrong_type_name_their_key(tmp_path: Path, key: str, value) -> None:
    with pytest.raises(HarnessError, match=f"key '{key}' must be"):
        import_legacy(seed_file(tmp_path, **{key: value}))


def test_probability_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="only logit files can be imported"):
        import_legacy(seed_file(tmp_path, is_logits=False))


def test_unequal_block_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"'block_sizes' is \[1, 4, 4, 4, 4, 4\]"):
        import_legacy(seed_file(tmp_path, block_sizes=[1, 4, 4, 4, 4, 4]))


def test_overflowed_fp16_values_are_reported_with_their_cell(tmp_path: Path) -> None:
    attention = torch.ones(HEADS, FRAMES, FRAMES, dtype=torch.float16)
    attention[4, 7, 9] = float("inf")
    with pytest.raises(HarnessError, match="logits has inf at step=0 layer=20 head=4 query_frame=7 key_frame=9"):
        import_legacy(seed_file(tmp_path, full_frame_attention=attention))


class _TouchOnLoad:
    """Unpickling this runs code (creates a file): safe loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_files_that_need_arbitrary_unpickling_are_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = seed_file(tmp_path, prompt=_TouchOnLoad(marker))
    with pytest.raises(HarnessError, match=r"contains Python objects \(\S+\) that safe loading"):
        import_legacy(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when loaded unsafely
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n"], ids=["empty", "text"])
def test_files_not_written_by_torch_save_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "layer20.pt"
    path.write_bytes(content)
    with pytest.raises(HarnessError, match=r"layer20\.pt is not a file written by torch\.save"):
        import_legacy(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"nope\.pt does not exist"):
        import_legacy(tmp_path / "nope.pt")
