"""Content fingerprints: every sha256 the harness records or keys a cache by is computed here.

Files (checkpoints, ``--prompt-embeds``, seed ``.pt`` files), byte streams (model weights,
prompt embeddings), text (prompts, cache keys) and JSON payloads (extraction cache keys). One
module, so the attrs of a dataset, the cache and the legacy import agree on what a fingerprint is.

Hashing a multi-gigabyte checkpoint takes seconds to minutes, so each file digest is remembered
in ``fingerprints.json`` under ``cache_dir()`` by (resolved path, size, mtime). Torch-free:
a warm ``pytest specs/`` computes its cache keys from this module alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from attn_harness.core.atomic import write_atomic

CHUNK_BYTES = 1 << 24  # 16 MiB reads: checkpoints are gigabytes
CACHE_ENV = "ATTN_HARNESS_CACHE"
FINGERPRINTS_FILE = "fingerprints.json"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    """Hex sha256 of the concatenated byte chunks (a stream never held in memory at once)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(payload: Any) -> str:
    """Hex sha256 of ``payload`` as JSON with sorted keys (non-JSON values by ``str``)."""
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def seed_of_text(text: str) -> int:
    """A 64-bit integer seed derived from a string (its sha256, first 8 bytes little-endian)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def cache_dir() -> Path:
    """``$ATTN_HARNESS_CACHE``, else ``~/.cache/attn-harness``: fingerprints and prompt embeddings."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attn-harness").expanduser()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (resolved path, size, mtime) and cached on disk.

    The cache is ``fingerprints.json`` in ``cache_dir()``, updated under a file lock and
    replaced atomically, so parallel test workers neither lose entries nor see half a file.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_dir() / FINGERPRINTS_FILE
    known = _read_fingerprints(store)
    if key in known:
        return known[key]
    digest = sha256_file(resolved)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(store) + ".lock"):
            known = _read_fingerprints(store)
            known[key] = digest
            write_atomic(store, json.dumps(known, indent=0, sort_keys=True).encode())
    except OSError:
        pass  # a read-only cache only costs rehashing next time
    return digest


def _read_fingerprints(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def files_fingerprint(paths: Sequence[Path]) -> str:
    """One file: its sha256 (what ``sha256sum`` prints). Several: sha256 of the ``sha256sum``
    listing ``"<sha256>  <name>\\n"`` in name order, i.e. ``sha256sum $(ls FILES) | sha256sum``."""
    paths = sorted(paths, key=lambda p: p.name)
    if len(paths) == 1:
        return file_sha256(paths[0])
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in paths)
    return sha256_text(listing)
