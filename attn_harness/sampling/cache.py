"""On-disk cache of extractions, shared safely by concurrent pytest workers.

Key: sha256 of the model's identity (the content fingerprint of its weight files; for a model
built in process, its config, seed and library versions), the probe, the resolved device and
the harness version, so a changed checkpoint, probe or harness never reuses stale data. The
key is computed without torch (file fingerprints are remembered on disk by path, size and
mtime), so a warm run imports torch and diffusers only when an extraction has to run. A file
lock per key makes concurrent workers (``pytest -n 2``) extract once: the first takes the
lock and extracts, the others wait and read the file. Every extraction appends one line to
``extractions.log`` in the cache directory (what the tests count).

The cache owns its directory and nothing else: it writes ``CACHEDIR.TAG`` into a new or
empty directory, refuses a non-empty directory without it, and ``clear`` removes only its
own entries (``<64 hex>.nc``, their locks, the log, its temps). Each entry records its key;
an entry that cannot be read, or that holds another key, is re-extracted with a warning.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import xarray as xr
from filelock import FileLock

import attn_harness
from attn_harness.core import catalog, store
from attn_harness.core.atomic import TEMP_PATTERN, describe_os_error, sweep_stale_temps, write_atomic
from attn_harness.core.environment import cpu_name, numerics_env
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import file_sha256, sha256_json
from attn_harness.core.probe import Probe

DEFAULT_DIR = ".attn-cache"
LOG_NAME = "extractions.log"
MARKER = "CACHEDIR.TAG"  # the cache-directory tag: backup tools skip the directory, the harness knows it
MARKER_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This directory is an attn-harness extraction cache; attn-harness clears only its own entries.\n"
)
MARKER_LINE = "attn-harness extraction cache"
ENTRY_PATTERN = re.compile(r"^[0-9a-f]{64}\.nc(\.lock)?$")
KEY_ATTR = "attn_cache_key"


def _ours(name: str) -> bool:
    """A name the cache writes (entries, locks, log, marker, temps): a concurrent worker's
    files never make a fresh directory look foreign."""
    return bool(ENTRY_PATTERN.match(name) or name in (LOG_NAME, MARKER) or TEMP_PATTERN.match(name))


class CacheEntryWarning(UserWarning):
    """A cache entry could not be used (corrupt, or another key's data) and is extracted again."""


def cache_key(fingerprint: str, probe: Probe, device: str, version: str = attn_harness.__version__, *,
              inputs: dict[str, str] | None = None) -> str:
    """sha256 of everything that decides an extraction; ``inputs`` fingerprints other files it reads."""
    payload = {"model": fingerprint, "probe": probe.as_dict(), "device": device, "harness": version, **(inputs or {})}
    return sha256_json(payload)


def resolved_device(device: str) -> str:
    """The device an extraction under ``device`` runs on, as the key names it. ``auto`` is
    ``cpu`` without importing torch when the torch build has no CUDA; otherwise torch decides."""
    if device == "cpu" or (device == "auto" and catalog.cuda_ruled_out()):
        return "cpu"
    from attn_harness.sampling.run import resolve_device

    return str(resolve_device(device))


class ExtractionCache:
    """Extractions stored as ``<key>.nc`` under ``directory``, a directory the cache owns."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.nc"

    def is_marked(self) -> bool:
        try:
            return MARKER_LINE in (self.directory / MARKER).read_text(encoding="utf-8", errors="replace")[:1000]
        except OSError:
            return False

    def prepare(self) -> None:
        """Create the directory and its marker, or refuse a directory that is not a cache."""
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise HarnessError(f"cache directory {directory} is a file; pass --attn-cache a directory")
        if self.is_marked():
            return
        try:
            foreign = directory.is_dir() and any(not _ours(entry.name) for entry in directory.iterdir())
        except OSError as err:
            raise HarnessError(describe_os_error(err, directory, "read")) from None
        if foreign:
            raise HarnessError(
                f"{directory} is not empty and is not an attn-harness cache (it has no {MARKER} written by "
                "the harness); choose a new or empty directory for --attn-cache"
            )
        write_atomic(directory / MARKER, MARKER_TEXT.encode())

    def key_for(self, model: str, probe: Probe, *, base_model: str | None = None) -> str:
        """The cache key of ``model`` under ``probe``: from file fingerprints (cached on disk) and
        static facts, so a warm lookup imports neither torch nor diffusers. The CPU and the
        kernel-selecting environment variables are in it: a forced ISA runs other kernels."""
        inputs = {"cpu": cpu_name(), "numerics_env": numerics_env()}
        if base_model:
            inputs["base_model"] = catalog.source_identity(base_model)
        if probe.prompt_embeds:
            inputs["prompt_embeds"] = file_sha256(Path(probe.prompt_embeds))
        return cache_key(catalog.source_identity(model), probe, resolved_device(probe.device), inputs=inputs)

    def load_or_extract(self, model: str, probe: Probe, *, base_model: str | None = None) -> tuple[xr.Dataset, Path]:
        """The cached extraction of ``model`` under ``probe``, extracting (once) if absent."""
        key = self.key_for(model, probe, base_model=base_model)
        path = self.path_for(key)
        self.prepare()
        with FileLock(str(path) + ".lock"):
            ds = self._read(path, key)
            if ds is None:
                from attn_harness.sampling.extract import extract  # torch: only when data must be made

                started = time.perf_counter()
                fresh = extract(model, probe, progress=False, base_model=base_model)
                store.write_dataset(fresh.assign_attrs({KEY_ATTR: key}), path)
                self._log(key, model, time.perf_counter() - started)
                ds = store.read_dataset(path)  # what later runs read: one code path for both
                ds.attrs.pop(KEY_ATTR, None)
        return ds, path

    def _read(self, path: Path, key: str) -> xr.Dataset | None:
        """The entry at ``path`` if it is readable and holds ``key``'s data; None to extract again."""
        if not path.is_file():
            return None
        try:
            ds = store.read_dataset(path)
        except HarnessError as err:
            warnings.warn(CacheEntryWarning(f"cache entry {path} cannot be read ({str(err).splitlines()[0]}); "
                                            "extracting it again"), stacklevel=3)
            return None
        found = ds.attrs.pop(KEY_ATTR, None)
        if found != key:
            warnings.warn(CacheEntryWarning(f"cache entry {path} holds data of another key ({found!r}); "
                                            "extracting it again"), stacklevel=3)
            return None
        return ds

    def _log(self, key: str, model: str, seconds: float) -> None:
        line = json.dumps({"key": key, "model": model, "pid": os.getpid(), "seconds": round(seconds, 3)})
        with open(self.directory / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def extractions(self) -> list[dict]:
        """Every extraction this cache has run, oldest first (from ``extractions.log``)."""
        log = self.directory / LOG_NAME
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]

    def clear(self) -> list[Path]:
        """Remove the cache's own entries (never anything else); return what was removed.

        A directory without the harness's marker is refused unless it is empty or absent.
        """
        directory = self.directory
        if not directory.exists():
            return []
        if not directory.is_dir():
            raise HarnessError(f"cache directory {directory} is a file; pass --attn-cache a directory")
        if not self.is_marked():
            if any(not _ours(entry.name) for entry in directory.iterdir()):
                raise HarnessError(
                    f"refusing to clear {directory}: it is not an attn-harness cache (no {MARKER} written by the "
                    "harness), so its files are not the harness's to delete"
                )
            return []
        removed = sweep_stale_temps(directory)
        for entry in directory.iterdir():
            if (ENTRY_PATTERN.match(entry.name) or entry.name == LOG_NAME) and entry.is_file() and not entry.is_symlink():
                try:
                    entry.unlink()
                    removed.append(entry)
                except OSError as err:
                    raise HarnessError(describe_os_error(err, entry, "remove")) from None
        return removed
