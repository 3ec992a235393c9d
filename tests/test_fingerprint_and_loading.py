"""The one hashing module and the one torch-file reader.

Fingerprints are compared with digests written out here (the sha256 of known bytes), so a change
of definition, not just of code, shows up. ``safe_load`` must read both of torch's file formats
and refuse code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import seed_of_text, sha256_chunks, sha256_file, sha256_json, sha256_text
from attn_harness.model.torchfile import safe_load

ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc"), FIPS 180-2
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_digests_of_known_bytes(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "abc") == ABC and sha256_file(tmp_path / "empty") == EMPTY
    assert sha256_text("abc") == ABC
    assert sha256_chunks([b"a", b"", b"bc"]) == ABC  # chunking does not change the digest


def test_json_fingerprints_ignore_key_order_but_not_values() -> None:
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    assert sha256_json({"p": Path("x")}) == sha256_json({"p": "x"})  # non-JSON values by str


def test_text_seeds_are_stable_64_bit_integers() -> None:
    assert seed_of_text("abc") == int.from_bytes(bytes.fromhex(ABC)[:8], "little")
    assert seed_of_text("abc") != seed_of_text("abd") and 0 <= seed_of_text("") < 2**64


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_safe_load_reads_both_torch_file_formats(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": 3}, path, _use_new_zipfile_serialization=zip_format)
    loaded = safe_load(path)
    assert loaded["n"] == 3 and torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_safe_load_refuses_pickled_code_and_names_what_was_expected(tmp_path: Path, capsys) -> None:
    code = tmp_path / "code.pt"
    torch.save({"x": Payload()}, code)
    with pytest.raises(HarnessError, match=r"code\.pt contains Python objects \(\S*print\) that safe loading"):
        safe_load(code)
    assert "unpickled code ran" not in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps("text", protocol=2)[:3])  # a truncated pickle
    with pytest.raises(HarnessError, match=r"junk\.pt is not a file written by torch\.save.*expected prompt embeddings"):
        safe_load(junk, what="prompt embeddings")
    with pytest.raises(HarnessError, match=r"none\.pt does not exist; expected a training checkpoint"):
        safe_load(tmp_path / "none.pt", what="a training checkpoint")
