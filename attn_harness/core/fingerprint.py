"""Content fingerprints: every sha256 the harness records or keys a cache by is computed here.

Files (checkpoints, ``--prompt-embeds``, seed ``.pt`` files), byte streams (model weights,
prompt embeddings), text (prompts, cache keys) and JSON payloads (extraction cache keys). One
module, so the attrs of a dataset, the cache and the legacy import agree on what a fingerprint is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 24  # 16 MiB reads: checkpoints are gigabytes


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
