"""``pytest specs/ --attn-scheduler ADDR|local:N``: the specs' extractions as tasks on a Dask cluster.

When collection ends, the extraction of every collected spec that is not skipped is submitted
at once; the checks then run in pytest's order, each waiting only for its own spec's
extraction, so the first checks run while later specs are still extracting. A worker runs
the extraction through the extraction cache (same key, same log), and the file comes back
to this process through Dask, so workers need not share its filesystem. The checks and the
baselines are evaluated here, by the same code as a local run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from attn_harness.core.atomic import write_atomic
from attn_harness.core.fingerprint import sha256_json
from attn_harness.core.probe import Probe
from attn_harness.sampling.cache import ExtractionCache


def remote_extract(model: str, probe: Probe, base_model: str | None, cache_dir: str) -> tuple[str, bytes]:
    """On a worker: the cached extraction (extracting it if absent) as (file name, bytes)."""
    _, path = ExtractionCache(cache_dir).load_or_extract(model, probe, base_model=base_model)
    return path.name, path.read_bytes()


@dataclass
class RemoteExtractions:
    """The futures of one run's spec extractions, by the plugin's spec key (``file::name``)."""

    cache: ExtractionCache
    futures: dict[str, Any] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __contains__(self, key: str) -> bool:
        return key in self.futures

    def result(self, key: str):
        """Wait for one spec's extraction, place its file in the local cache, read it: (Dataset, path)."""
        from attn_harness.core.store import read_dataset

        name, data = self.futures[key].result()
        path = self.cache.directory / name
        if not path.is_file():  # the worker's filesystem is not ours
            write_atomic(path, data)
        return read_dataset(path), path

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.stack.close()


def _skipped(item: pytest.Item) -> bool:
    """A spec marked skip, or skipif with a true condition, needs no extraction."""
    if any(True for _ in item.iter_markers("skip")):
        return True
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition", False)
        if isinstance(condition, bool) and condition:
            return True
    return False


def submit_specs(items: list[pytest.Item], cache: ExtractionCache, scheduler: str) -> RemoteExtractions:
    """Connect to ``scheduler`` and submit the extraction of every spec the ``items`` need."""
    from attn_harness.sampling.sweep import connect

    remote = RemoteExtractions(cache)
    wanted: dict[str, tuple[str, str | None, Probe]] = {}
    for item in items:
        node = getattr(item, "spec_node", None)
        if node is None or node.source is None or _skipped(item):
            continue
        wanted.setdefault(f"{node.spec.file}::{node.spec.name}", (node.source, node.base_model, node.probe))
    if not wanted:
        return remote
    cache.directory.mkdir(parents=True, exist_ok=True)
    client, resources = remote.stack.enter_context(connect(scheduler))
    for key, (source, base_model, probe) in wanted.items():
        cache_dir = str(Path(cache.directory).resolve())
        task = sha256_json([source, base_model, probe.as_dict(), cache_dir])
        remote.futures[key] = client.submit(
            remote_extract, source, probe, base_model, cache_dir,
            key=f"attn-spec-{task}", pure=False, retries=2, resources=resources or None,
        )
    return remote
