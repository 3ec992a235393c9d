"""Sweeps of one probe over checkpoints x prompts x seeds, run as tasks on a Dask cluster.

Each part (one checkpoint, prompt and seed) is one ``distributed`` task. Its key is the
extraction-cache key of the model's content fingerprint and the probe with that prompt and
seed, so a part is found again whatever order or list it came from. Layout of ``OUT``:

- ``OUT/parts/<key>.nc``: one extraction per part, written atomically by the task;
- ``OUT/sweep.log``: one JSON line when a task starts an extraction and one when it wrote it;
- ``OUT/sweep.nc``: the merged Dataset (``attn_harness.core.sweep_dataset``).

A rerun skips parts whose file exists (resumable). A task killed with its worker is
rescheduled by the scheduler, a task that raised is retried ``retries`` times; a part already
written is read back, never extracted twice. Results travel back to the client through Dask,
which writes a part its own filesystem lacks, so workers need no shared filesystem.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

from attn_harness.core import catalog
from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import sha256_text
from attn_harness.core.probe import Probe
from attn_harness.core.sweep_dataset import merge_parts, training_step_from_name, write_sweep

PARTS_DIR = "parts"
LOG_NAME = "sweep.log"
MERGED_NAME = "sweep.nc"
GPU_RESOURCE = "GPU"
STEP_KEYS: tuple[str, ...] = ("global_step", "step", "iteration")  # read from a training checkpoint dict
HOW_TO_INSTALL = "install the sweep extra: pip install 'attn-harness[sweep]'"


@dataclass(frozen=True)
class Part:
    """One task: a model source under a probe carrying this part's prompt and seed."""

    key: str
    model: str
    probe: Probe
    base_model: str | None
    cell: tuple[int, int, int]  # (checkpoint, prompt, seed) indices in the sweep


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    parts: tuple[Part, ...]

    def unique(self) -> list[Part]:
        """One part per key (the same checkpoint listed twice is extracted once)."""
        first: dict[str, Part] = {}
        for part in self.parts:
            first.setdefault(part.key, part)
        return list(first.values())


def read_list(path: str | os.PathLike, *, resolve_paths: bool) -> list[str]:
    """Entries of a list file, one a line; ``#`` starts a comment, blank lines are skipped.

    With ``resolve_paths`` a relative entry that exists relative to the file's folder becomes
    that path (a file listing a run's checkpoints can sit beside them).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise HarnessError(f"cannot read the list file {path}: {err}") from None
    entries = []
    for line in lines:
        entry = line.split("#", 1)[0].strip() if resolve_paths else line.strip()
        if not entry:
            continue
        if resolve_paths and not Path(entry).is_absolute() and (path.parent / entry).exists():
            entry = str(path.parent / entry)
        entries.append(entry)
    if not entries:
        raise HarnessError(f"the list file {path} names nothing (one entry a line)")
    return entries


def plan_sweep(
    models: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], probe: Probe = Probe(), *, base_model: str | None = None
) -> Plan:
    """Every (model, prompt, seed) part with its key; fingerprints each model once, on this machine
    and without torch (the extraction cache's identity of a source)."""
    from attn_harness.sampling.cache import cache_key

    for name, values in (("models", models), ("prompts", prompts), ("seeds", seeds)):
        if not values:
            raise HarnessError(f"a sweep needs at least one entry in {name}")
        if len(set(values)) != len(values):
            dup = next(v for v in values if list(values).count(v) > 1)
            raise HarnessError(f"{name} lists {dup!r} twice; each entry must be unique")
    inputs = {}
    if base_model:
        inputs["base_model"] = catalog.source_identity(base_model)
    if probe.prompt_embeds:
        raise HarnessError("a sweep encodes each prompt; --prompt-embeds (one fixed embedding) does not apply")
    fingerprints = [catalog.source_identity(model) for model in models]
    base_model = _absolute(base_model) if base_model else None
    parts = []
    for (c, model), (p, prompt), (s, seed) in itertools.product(enumerate(models), enumerate(prompts), enumerate(seeds)):
        part_probe = probe.replace(prompt=prompt, seed=int(seed))
        key = cache_key(fingerprints[c], part_probe, probe.device, inputs=inputs)
        parts.append(Part(key, _absolute(str(model)), part_probe, base_model, (c, p, s)))
    return Plan(tuple(map(str, models)), tuple(prompts), tuple(int(s) for s in seeds), tuple(parts))


def _absolute(source: str) -> str:
    """A path made absolute (a worker's working directory is not the client's); embedded names unchanged."""
    return source if source in catalog.EMBEDDED_NAMES or not Path(source).exists() else str(Path(source).resolve())


# --- on the worker ---------------------------------------------------------------------------

_LOADED: dict[tuple, object] = {}  # the last model this worker process loaded (one: GPU memory)


def _loaded_model(part: Part):
    """Load ``part.model``, keeping the last one: consecutive parts of one checkpoint load it once."""
    from attn_harness.model.models import load_model
    from attn_harness.sampling.extract import DTYPES, resolve_device

    device = resolve_device(part.probe.device)
    key = (part.model, part.base_model, part.probe.dtype, str(device))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(part.model, dtype=DTYPES[part.probe.dtype], device=device, base_model=part.base_model)
    return _LOADED[key]


def training_step(source: str) -> int | None:
    """A checkpoint's training step: from its name, else a ``global_step``/``step``/``iteration`` entry of its dict."""
    step = training_step_from_name(source)
    path = Path(source)
    if step is not None or not path.is_file() or path.suffix not in (".pt", ".pth"):
        return step
    import torch

    from attn_harness.model.layouts import load_checkpoint_file

    data = load_checkpoint_file(path)
    for key in STEP_KEYS:
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
    return None


def _log(log: Path, event: str, part: Part, **extra) -> None:
    """Append one JSON line (O_APPEND: lines of concurrent workers do not interleave)."""
    record = {"event": event, "key": part.key, "model": part.model, "prompt": part.probe.prompt,
              "seed": part.probe.seed, "host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 3), **extra}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run_part(part: Part, out_dir: str) -> bytes:
    """The task: extract one part into ``OUT/parts/<key>.nc`` unless it is there; return its bytes."""
    from attn_harness.core.store import write_dataset
    from attn_harness.sampling.extract import extract

    path = Path(out_dir) / PARTS_DIR / f"{part.key}.nc"
    if path.is_file():  # written by an earlier attempt whose result was lost with its worker
        return path.read_bytes()
    log = Path(out_dir) / LOG_NAME
    _log(log, "start", part)
    started = time.perf_counter()
    ds = extract(_loaded_model(part), part.probe, progress=False)
    ds.attrs["sweep_part_key"] = part.key
    ds.attrs["checkpoint_source"] = part.model
    step = training_step(part.model)
    if step is not None:
        ds.attrs["training_step"] = step
    write_dataset(ds, path)
    _log(log, "done", part, seconds=round(time.perf_counter() - started, 3))
    return path.read_bytes()


# --- on the client ---------------------------------------------------------------------------


def _distributed():
    try:
        import distributed
    except ImportError:
        raise HarnessError(f"sweeps run on Dask's distributed scheduler, which is not installed: {HOW_TO_INSTALL}") from None
    return distributed


def parse_scheduler(text: str) -> tuple[str, int | str]:
    """``local:N`` -> ("local", N); anything else is a scheduler address (tcp://host:8786, a file)."""
    if text.startswith("local"):
        count = text.partition(":")[2] or "1"
        if not count.isdigit() or int(count) < 1:
            raise HarnessError(f"scheduler {text!r}: use local:N with N >= 1 workers, or a scheduler address like tcp://host:8786")
        return "local", int(count)
    if not text.strip():
        raise HarnessError("empty scheduler: use local:N or a scheduler address like tcp://host:8786")
    return "address", text


def parse_resources(text: str) -> dict[str, float]:
    """``GPU=1,MEM=2`` -> ``{"GPU": 1.0, "MEM": 2.0}``: what each task asks of a worker ("" -> nothing)."""
    found = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, amount = item.partition("=")
        try:
            found[name.strip()] = float(amount)
        except ValueError:
            raise HarnessError(f"resources {text!r}: expected NAME=AMOUNT pairs like GPU=1") from None
        if not name.strip() or not found[name.strip()] > 0:
            raise HarnessError(f"resources {text!r}: each NAME=AMOUNT needs a name and an amount > 0")
    return found


def local_worker_specs(workers: int, *, gpus: int, threads: int | None) -> dict[str, dict]:
    """Worker specs of a local cluster: one per GPU pinned by ``CUDA_VISIBLE_DEVICES`` and declaring
    one ``GPU`` resource, or ``workers`` CPU workers with ``threads`` torch threads each.

    Every worker runs one task at a time (``nthreads=1``): an extraction is itself parallel.
    """
    if gpus:
        if workers > gpus:
            raise HarnessError(f"local:{workers} asks for more workers than the {gpus} GPU(s) here; use local:{gpus} or fewer")
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        return {
            f"gpu-{index}": {
                "nthreads": 1,
                "resources": {GPU_RESOURCE: 1},
                "env": {"CUDA_VISIBLE_DEVICES": str(index), "OMP_NUM_THREADS": str(threads)},
            }
            for index in range(workers)
        }
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    return {f"cpu-{index}": {"nthreads": 1, "env": {"OMP_NUM_THREADS": str(threads)}} for index in range(workers)}


def local_cluster(workers: int, *, gpus: int | None = None, threads: int | None = None):
    """A ``SpecCluster`` of nanny-managed worker processes (what ``LocalCluster`` builds), one spec per worker."""
    distributed = _distributed()
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    specs = local_worker_specs(workers, gpus=gpus, threads=threads)
    return distributed.SpecCluster(
        workers={
            name: {"cls": distributed.Nanny,
                   "options": {**options, "memory_limit": 0, "dashboard": False, "silence_logs": logging.ERROR}}
            for name, options in specs.items()
        },
        scheduler={"cls": distributed.Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}},
        silence_logs=logging.ERROR,  # a killed worker is reported by the sweep, not as a page of log lines
    )


@contextlib.contextmanager
def connect(scheduler: str, *, threads: int | None = None, gpus: int | None = None) -> Iterator[tuple[object, dict]]:
    """A ``distributed.Client`` for ``local:N`` (a cluster started here and closed after) or an
    address, with the resources each task asks for (``GPU: 1`` on a local GPU cluster)."""
    distributed = _distributed()
    kind, value = parse_scheduler(scheduler)
    if kind == "local":
        with local_cluster(int(value), gpus=gpus, threads=threads) as cluster, distributed.Client(cluster) as client:
            gpu_workers = any(GPU_RESOURCE in spec.get("options", {}).get("resources", {})
                              for spec in cluster.worker_spec.values())
            yield client, ({GPU_RESOURCE: 1} if gpu_workers else {})
        return
    try:
        client = distributed.Client(value, timeout="30s")
    except (OSError, TimeoutError) as err:
        raise HarnessError(f"cannot reach the Dask scheduler at {value!r}: {err}") from None
    with client:
        yield client, {}


def part_path(out_dir: str | os.PathLike, part: Part) -> Path:
    return Path(out_dir) / PARTS_DIR / f"{part.key}.nc"


def run_parts(
    client,
    parts: Sequence[Part],
    out_dir: str | os.PathLike,
    *,
    retries: int = 2,
    resources: dict | None = None,
    progress: bool | None = None,
) -> Iterator[Part]:
    """Submit the parts whose file is missing, yield each part as its file is in place.

    Parts already on disk are yielded first. A failed part does not stop the others; the
    failures are raised together at the end as one ``HarnessError`` (finished parts stay).
    """
    distributed = _distributed()
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).resolve()
    done = [part for part in parts if part_path(out_dir, part).is_file()]
    todo = [part for part in parts if not part_path(out_dir, part).is_file()]
    yield from done
    # The task's key names the part and the sweep directory: two sweeps of one part into two
    # directories are two tasks, two clients of one directory share one.
    where = sha256_text(str(out_dir))[:12]
    futures = {
        client.submit(run_part, part, str(out_dir), key=f"attn-part-{part.key}-{where}", pure=False, retries=retries,
                      resources=resources or None): part
        for part in todo
    }
    show = sys.stderr.isatty() if progress is None else progress
    failures = []
    bar = tqdm(total=len(parts), initial=len(done), desc="sweep", unit="part", disable=not show)
    try:
        for future in distributed.as_completed(futures):
            part = futures.pop(future)
            try:
                data = future.result()
            except Exception as err:  # noqa: BLE001 - any task error: report it with its part, keep the others
                failures.append(f"{part.model} / prompt {part.probe.prompt!r} / seed {part.probe.seed}: "
                                f"{type(err).__name__}: {err}")
                continue
            path = part_path(out_dir, part)
            if not path.is_file():  # a worker on another filesystem: the bytes came back through Dask
                write_atomic(path, data)
            bar.update(1)
            yield part
    finally:
        bar.close()
        for future in futures:
            future.cancel()
    if failures:
        raise HarnessError(
            f"{len(failures)} of {len(parts)} sweep parts failed (finished parts are kept; rerun to retry the rest): "
            + "; ".join(failures[:3])
        )


def merge(plan: Plan, out_dir: str | os.PathLike) -> xr.Dataset:
    """The merged Dataset of a finished plan (reads every part)."""
    from attn_harness.core.store import read_dataset

    parts = {part.cell: read_dataset(part_path(out_dir, part)) for part in plan.parts}
    return merge_parts(parts, checkpoints=plan.models, prompts=plan.prompts, seeds=plan.seeds)


def sweep(
    models: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    probe: Probe = Probe(),
    *,
    out: str | os.PathLike,
    scheduler: str = "local:1",
    base_model: str | None = None,
    retries: int = 2,
    threads: int | None = None,
    resources: dict | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """Run every part missing under ``out`` on ``scheduler``, merge, write ``out/sweep.nc``; return the Dataset.

    ``threads``: torch threads per local worker (default: the cores split between workers).
    ``resources``: what each task asks of a worker on an existing cluster (e.g. ``{"GPU": 1}``).
    """
    parse_scheduler(scheduler)
    plan = plan_sweep(models, prompts, seeds, probe, base_model=base_model)
    unique = plan.unique()
    if any(not part_path(out, part).is_file() for part in unique):
        with connect(scheduler, threads=threads) as (client, default_resources):
            for _ in run_parts(client, unique, out, retries=retries, resources=resources or default_resources, progress=progress):
                pass
    ds = merge(plan, out)
    write_sweep(ds, Path(out) / MERGED_NAME)
    return ds
