"""Weight fingerprints (sha256, cached on disk) and extraction from a trainer's checkpoint file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from attn_harness.cli import main
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.store import read_dataset
from attn_harness.model.models import (
    FINGERPRINTS_FILE,
    TINY_TEXT_TOKENS,
    build_tiny_random,
    cache_dir,
    file_sha256,
    files_fingerprint,
    hash_prompt_embedding,
    load_model,
    model_fingerprint,
)
from attn_harness.model.prompts import save_prompt_embeds
from attn_harness.sampling.extract import extract
from tests.test_layouts import to_original, write_original_dir

PROBE = Probe(num_frames=21, height=32, width=32, sample_steps=2, capture_steps=("last",), device="cpu", mask="block-causal")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_HARNESS_CACHE", str(tmp_path / "cache"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_file_fingerprint_is_the_sha256_of_its_bytes_and_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights v1")
    assert file_sha256(path) == _sha256(b"weights v1")
    store = json.loads((cache_dir() / FINGERPRINTS_FILE).read_text())
    key = f"{path.resolve()}|{path.stat().st_size}|{path.stat().st_mtime_ns}"
    assert store == {key: _sha256(b"weights v1")}
    # the cache is what answers next time: plant a different value under the same key
    (cache_dir() / FINGERPRINTS_FILE).write_text(json.dumps({key: "planted"}))
    assert file_sha256(path) == "planted"
    path.write_bytes(b"weights v2!")  # new size and mtime: a new key, hashed afresh
    assert file_sha256(path) == _sha256(b"weights v2!")
    assert not [p.name for p in cache_dir().iterdir() if p.name.endswith((".tmp", ".attn-tmp"))]


def test_sharded_fingerprint_is_sha256sum_listing_hashed(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"two")
    (tmp_path / "a.safetensors").write_bytes(b"one")
    listing = f"{_sha256(b'one')}  a.safetensors\n{_sha256(b'two')}  b.safetensors\n"
    paths = [tmp_path / "b.safetensors", tmp_path / "a.safetensors"]
    assert files_fingerprint(paths) == _sha256(listing.encode())


def test_model_fingerprint_matches_the_loaded_model_and_the_dataset_attrs(tmp_path):
    write_original_dir(build_tiny_random(), tmp_path / "wan", shards=2)
    fingerprint = model_fingerprint(tmp_path / "wan")
    assert load_model(tmp_path / "wan").fingerprint == fingerprint
    ds = extract(str(tmp_path / "wan"), PROBE.replace(prompt_embeds=str(_embeds(tmp_path))), progress=False)
    assert ds.attrs["checkpoint_fingerprint"] == fingerprint and ds.attrs["checkpoint_layout"] == "wan-original"
    shards = sorted((tmp_path / "wan").glob("*-of-*.safetensors"))
    assert fingerprint == files_fingerprint(shards) != files_fingerprint(shards[:1])


def _embeds(tmp_path):
    prompt = hash_prompt_embedding(PROBE.prompt, TINY_TEXT_TOKENS, 64)
    negative = hash_prompt_embedding(PROBE.negative_prompt, TINY_TEXT_TOKENS, 64)
    return save_prompt_embeds(tmp_path / "embeds.safetensors", prompt, negative)


def _checkpoint(tmp_path):
    state = {f"model.{k}": v.clone() for k, v in to_original(build_tiny_random().state_dict()).items()}
    torch.save({"generator_ema": state}, tmp_path / "self_forcing.pt")
    return tmp_path / "self_forcing.pt"


def test_block_causal_extraction_runs_on_a_training_checkpoint_as_on_the_model_it_holds(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    from_checkpoint = extract(str(checkpoint), PROBE.replace(prompt_embeds=str(_embeds(tmp_path))), progress=False)
    embedded = extract("tiny-random", PROBE, progress=False)
    for metric in ("logits", "mass"):
        np.testing.assert_array_equal(from_checkpoint[metric].values, embedded[metric].values)
    assert np.isnan(from_checkpoint.logits.sel(query_frame=0, key_frame=5)).all()
    assert from_checkpoint.attrs["checkpoint_path"].endswith("self_forcing.pt#generator_ema")
    assert from_checkpoint.attrs["checkpoint_fingerprint"] == _sha256(checkpoint.read_bytes())


def test_cli_extracts_a_rollout_from_a_checkpoint_with_base_model_and_prompt_embeds(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    write_original_dir(build_tiny_random(), tmp_path / "base")
    out = tmp_path / "rollout.nc"
    args = ["extract", "--model", str(checkpoint), "--base-model", str(tmp_path / "base"),
            "--prompt-embeds", str(_embeds(tmp_path)),
            "--mask", "block-causal", "--mode", "rollout", "--frames", "21", "--height", "32", "--width", "32",
            "--sample-steps", "2", "--steps", "last", "--layers", "0,3", "--device", "cpu", "--dtype", "float16",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    ds = read_dataset(out)
    assert ds.attrs["mode"] == "rollout" and ds.attrs["dtype"] == "float16" and ds.logits.dtype == np.float32
    assert ds.attrs["model_architecture"].startswith("wan-original config of")
    assert np.isfinite(ds.logits.sel(query_frame=5, key_frame=0)).all()


def test_cli_reports_a_checkpoint_without_prompt_embeds_as_one_line(tmp_path, capsys):
    code = main(["extract", "--model", str(_checkpoint(tmp_path)), "--device", "cpu", "--out", str(tmp_path / "x.nc")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pass --prompt-embeds FILE" in err
    assert not (tmp_path / "x.nc").exists()


def test_base_model_on_a_dir_or_the_embedded_model_is_refused(tmp_path):
    write_original_dir(build_tiny_random(), tmp_path / "wan")
    with pytest.raises(HarnessError, match="--base-model only applies to a training checkpoint file"):
        load_model(tmp_path / "wan", base_model=tmp_path / "wan")
    with pytest.raises(HarnessError, match="--base-model only applies"):
        load_model("tiny-random", base_model=tmp_path / "wan")


def test_float16_extraction_keeps_float32_modules_and_float32_statistics(tmp_path):
    loaded = load_model("tiny-random", dtype=torch.float16)
    assert loaded.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float16
    assert loaded.transformer.scale_shift_table.dtype == torch.float32
    assert loaded.transformer.rope.freqs_cos.dtype == torch.float32
    ds = extract(loaded, PROBE.replace(dtype="float16"), progress=False)
    reference = extract("tiny-random", PROBE, progress=False)
    assert ds.logits.dtype == np.float32
    # float16 weights and activations: agreement with float32 to a few 1e-3 on O(1) logits
    np.testing.assert_allclose(ds.logits.values, reference.logits.values, atol=5e-2, equal_nan=True)
