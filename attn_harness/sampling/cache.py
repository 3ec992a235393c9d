"""On-disk cache of extractions, shared safely by concurrent pytest workers.

Key: sha256 of the model's content fingerprint, the probe, the resolved device and the
harness version, so a changed checkpoint, probe or harness never reuses stale data. A file
lock per key makes concurrent workers (``pytest -n 2``) extract once: the first takes the
lock and extracts, the others wait and read the file. Every extraction appends one line to
``extractions.log`` in the cache directory (what the tests count).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import xarray as xr
from filelock import FileLock

import attn_harness
from attn_harness.core import store
from attn_harness.core.environment import cpu_name, numerics_env
from attn_harness.core.probe import Probe

DEFAULT_DIR = ".attn-cache"
LOG_NAME = "extractions.log"


def cache_key(fingerprint: str, probe: Probe, device: str, version: str = attn_harness.__version__, *,
              inputs: dict[str, str] | None = None) -> str:
    """sha256 of everything that decides an extraction; ``inputs`` fingerprints other files it reads."""
    payload = {"model": fingerprint, "probe": probe.as_dict(), "device": device, "harness": version, **(inputs or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ExtractionCache:
    """Extractions stored as ``<key>.nc`` under ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.nc"

    def load_or_extract(self, model: str, probe: Probe, *, base_model: str | None = None) -> tuple[xr.Dataset, Path]:
        """The cached extraction of ``model`` under ``probe``, extracting (once) if absent."""
        from attn_harness.sampling.extract import extract, resolve_device  # torch: only when data is needed
        from attn_harness.model.models import file_sha256, model_fingerprint

        device = str(resolve_device(probe.device))
        inputs = {"cpu": cpu_name(), "numerics_env": numerics_env()}  # forced ISA or threads: other kernels
        if base_model:
            inputs["base_model"] = model_fingerprint(base_model)
        if probe.prompt_embeds:
            inputs["prompt_embeds"] = file_sha256(Path(probe.prompt_embeds))
        key = cache_key(model_fingerprint(model), probe, device, inputs=inputs)
        path = self.path_for(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
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
