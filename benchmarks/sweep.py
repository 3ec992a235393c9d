"""Section 5: a sweep on 2 workers x 1 torch thread against 1 worker, and the cost of a task.

Both local clusters are started first and warmed by one untimed sweep (torch imported, models
loaded), then the two are timed in turns, each sweep into a fresh directory. Scheduling
overhead per task is (wall time of the 1-worker sweep - the seconds the tasks spent extracting
and writing, from ``sweep.log``) / tasks: submission, the scheduler's round trips, the result's
bytes and the client's bookkeeping.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from attn_harness.core.probe import Probe
from attn_harness.sampling import sweep as sw
from benchmarks.timing import summary, timing_records

MODELS = ("tiny-random", "tiny-trained")
PROMPTS = ("a red square moving from left to right", "a blue blob moving up", "a green square moving down",
           "a yellow blob moving from right to left")
SEEDS = (0, 1)
PROBE = Probe(device="cpu")
WORKERS = {"1-worker": 1, "2-workers": 2}


def _timed_sweep(client, plan: sw.Plan, root: Path) -> tuple[float, float]:
    """(wall seconds, seconds spent inside the tasks) of one sweep into a fresh directory."""
    import time

    out = Path(tempfile.mkdtemp(dir=root))
    start = time.perf_counter()
    for _ in sw.run_parts(client, plan.unique(), out, retries=0, progress=False):
        pass
    wall = time.perf_counter() - start
    events = [json.loads(line) for line in (out / sw.LOG_NAME).read_text().splitlines()]
    return wall, sum(e["seconds"] for e in events if e["event"] == "done")


def run(*, reps: int, env: dict) -> list[dict]:
    plan = sw.plan_sweep(MODELS, PROMPTS, SEEDS, PROBE)
    tasks = len(plan.unique())
    samples: dict[str, list[float]] = {name: [] for name in WORKERS}
    overhead: list[float] = []
    inside: list[float] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="attn-bench-sweep-") as tmp:
        clients = {name: stack.enter_context(sw.connect(f"local:{n}", threads=1, gpus=0))[0] for name, n in WORKERS.items()}
        for client in clients.values():
            _timed_sweep(client, plan, Path(tmp))  # warm-up: imports and model loads
        for _ in range(reps):
            for name, client in clients.items():
                wall, busy = _timed_sweep(client, plan, Path(tmp))
                samples[name].append(wall)
                if name == "1-worker":
                    overhead.append((wall - busy) / tasks)
                    inside.append(busy / tasks)
    params = {"models": list(MODELS), "prompts": len(PROMPTS), "seeds": list(SEEDS), "tasks": tasks,
              "torch_threads_per_worker": 1, "sample_steps": PROBE.sample_steps}
    records = timing_records("sweep", samples, "1-worker", env, params, prefix="sweep/")
    per_task = summary(overhead)
    share = per_task["median_s"] / statistics.median(inside)
    records.append({
        "name": "sweep/overhead-per-task", "section": "sweep", **per_task, "ratio": share, "paired_ratio": share,
        "note": "ratio: overhead / seconds inside a task", "env": env, "params": params,
    })
    return records
