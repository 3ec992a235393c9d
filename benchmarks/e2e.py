"""Section 4: ``pytest specs/`` end to end: cold extraction cache, warm cache without and
with the HTML report, and ``--collect-only``.

Each round starts from empty caches (extraction cache and fingerprint cache, both in a temp
dir), runs the four cases in order and times each subprocess: wall seconds (the records'
``median_s``) and the child's CPU seconds (``cpu_median_s``, user + sys), which say more
than wall time on a shared machine. ``bytecode_cache`` records whether Python may write
``.pyc`` files (``PYTHONDONTWRITEBYTECODE`` makes every run compile every module again).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

from benchmarks.timing import timing_records

SPEC_SUFFIXES = (".yaml", ".yml")
CASES = ("cold-cache", "warm-cache", "warm-cache-report", "collect-only")


def _plugin_args() -> list[str]:
    registered = any(ep.value.startswith("attn_harness.pytest.plugin") for ep in entry_points(group="pytest11"))
    return [] if registered else ["-p", "attn_harness.pytest.plugin"]


def _case_args(case: str, tmp: Path) -> list[str]:
    if case == "collect-only":
        return ["--collect-only"]
    if case == "warm-cache-report":
        return ["--attn-report", str(tmp / "report")]
    return ["--no-attn-report"]


def _pytest(specs: Path, tmp: Path, case: str) -> tuple[float, float]:
    """Wall and CPU seconds of one ``pytest specs/`` subprocess."""
    cmd = [sys.executable, "-m", "pytest", str(specs), "-q", "-p", "no:cacheprovider", *_plugin_args(),
           "--attn-cache", str(tmp / "extractions"), *_case_args(case, tmp)]
    env = {**os.environ, "ATTN_HARNESS_CACHE": str(tmp / "fingerprints")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # 1 = some spec failed: still a timed run
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def run(specs: Path, *, reps: int, env: dict) -> list[dict]:
    if not any(path.suffix in SPEC_SUFFIXES for path in specs.glob("**/*")):
        skipped = f"no spec files under {specs}"
        return [{"name": "e2e/pytest-specs", "section": "e2e", "skipped": skipped, "ratio": None, "spread": None, "env": env}]
    wall: dict[str, list[float]] = {case: [] for case in CASES}
    cpu: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="attn-bench-cache-") as tmp:
            for case in CASES:
                seconds, cpu_seconds = _pytest(specs, Path(tmp), case)
                wall[case].append(seconds)
                cpu[case].append(cpu_seconds)
    bytecode = not sys.flags.dont_write_bytecode and not os.environ.get("PYTHONDONTWRITEBYTECODE")
    records = timing_records("e2e", wall, "cold-cache", env, {"specs": str(specs), "bytecode_cache": bytecode},
                             prefix="e2e/pytest-specs/")
    for record, case in zip(records, CASES):
        record["cpu_median_s"] = statistics.median(cpu[case])
    return records
