"""Atomic file writes: a reader never sees a half-written file, a failed write leaves none.

Every writer in the harness (NetCDF, JSON, safetensors, HTML, figures) goes through
``atomic_path``: it hands out a temp path beside the target, renames it into place when the
block succeeds and removes it when the block fails, so an existing file survives.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; ``os.replace`` it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # absent after the rename; never masks the original error


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)
