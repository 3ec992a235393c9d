"""Atomic file writes: a reader never sees a half-written file, a failed write leaves none.

Every writer in the harness (NetCDF, JSON, safetensors, HTML, figures) goes through
``atomic_path``: it hands out a temp path beside the target, renames it into place when the
block succeeds and removes it when the block fails, so an existing file survives. A temp
is named ``.<name>.<pid>-<random>.attn-tmp`` (git-ignored by the pattern ``*.attn-tmp``); one
left by a killed writer (its process gone, or older than a day) is swept by the next write
in that directory. A full disk or a read-only target is one ``HarnessError`` line.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attn_harness.core.errors import HarnessError

TEMP_SUFFIX = ".attn-tmp"
TEMP_PATTERN = re.compile(r"^\..+\.(\d+)-[0-9a-f]{32}\.attn-tmp$")
STALE_AFTER_S = 24 * 3600  # a temp this old is stale even if its pid is alive again (pid reuse, other host)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but is not ours, or cannot tell: keep the file
    return True


def sweep_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temps left in ``directory`` by writers that died; return what was removed.

    Only names this module hands out are touched: ``.<name>.<pid>-<32 hex>.attn-tmp``.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if old or not _alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def describe_os_error(err: OSError, path: str | os.PathLike, action: str = "write") -> str:
    """One line for a failed file operation, naming the path and what to do."""
    code = err.errno
    if code is None:  # HDF5 reports the C errno only in its message
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found.group(1)) if found else (errno.ENOSPC if "No space left" in str(err) else None)
    if code == errno.ENOSPC:
        return f"cannot {action} {path}: the disk is full (no space left on the device); free space and rerun"
    if code == errno.EDQUOT:
        return f"cannot {action} {path}: disk quota exceeded; free space and rerun"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot {action} {path}: permission denied or read-only file system"
    if code == errno.ENOTDIR:
        return f"cannot {action} {path}: a part of the path is a file, not a directory"
    if code == errno.EISDIR:
        return f"cannot {action} {path}: it is a directory; give a file name"
    return f"cannot {action} {path}: {(err.strerror or str(err)).splitlines()[0][:200]}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; ``os.replace`` it onto ``path`` if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"cannot write {path}: it is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise HarnessError(f"cannot write {path}: {path.parent} is a file, not a directory") from None
    except OSError as err:
        raise HarnessError(describe_os_error(err, path.parent, "create directory")) from None
    sweep_stale_temps(path.parent)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        yield temp
        os.replace(temp, path)
    except OSError as err:
        raise HarnessError(describe_os_error(err, path)) from None
    finally:
        try:
            temp.unlink(missing_ok=True)  # absent after the rename; never masks the original error
        except OSError:
            pass


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)
