"""On-disk cache of extractions, shared safely by concurrent pytest workers.

Key: sha256 of the model's identity (the content fingerprint of its weight files; for a model
built in process, its config, seed and library versions), the probe, the resolved device and
the harness version, so a changed checkpoint, probe or harness never reuses stale data. The
key is computed without torch (file fingerprints are remembered on disk by path, size and
mtime), so a warm run imports torch and diffusers only when an extraction has to run. A file
lock per key makes concurrent workers (``pytest -n 2``) extract once: the first takes the
lock and extracts, the others wait and read the file. Every extraction appends one line to
``extractions.log`` in the cache directory (what the tests count).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import xarray as xr
from filelock import FileLock

import attn_harness
from attn_harness.core import catalog, store
from attn_harness.core.environment import cpu_name, numerics_env
from attn_harness.core.fingerprint import file_sha256, sha256_json
from attn_harness.core.probe import Probe

DEFAULT_DIR = ".attn-cache"
LOG_NAME = "extractions.log"


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
    """Extractions stored as ``<key>.nc`` under ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.nc"

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
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                from attn_harness.sampling.extract import extract  # torch: only when data must be made

                started = time.perf_counter()
                store.write_dataset(extract(model, probe, progress=False, base_model=base_model), path)
                self._log(key, model, time.perf_counter() - started)
        return store.read_dataset(path), path

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

    def clear(self) -> None:
        if self.directory.is_dir():
            shutil.rmtree(self.directory)
