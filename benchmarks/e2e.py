"""Section 4: ``pytest specs/`` with a cold extraction cache, then warm (same cache dir)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

from benchmarks.timing import timing_records

SPEC_SUFFIXES = (".yaml", ".yml")


def _plugin_args() -> list[str]:
    registered = any(ep.value.startswith("attn_harness.pytest.plugin") for ep in entry_points(group="pytest11"))
    return [] if registered else ["-p", "attn_harness.pytest.plugin"]


def _pytest(specs: Path, cache: Path) -> float:
    cmd = [sys.executable, "-m", "pytest", str(specs), "-q", "-p", "no:cacheprovider", *_plugin_args(),
           "--attn-cache", str(cache)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1 = some spec failed: still a timed run
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def run(specs: Path, *, reps: int, env: dict) -> list[dict]:
    if not any(path.suffix in SPEC_SUFFIXES for path in specs.glob("**/*")):
        skipped = f"no spec files under {specs}"
        return [{"name": "e2e/pytest-specs", "section": "e2e", "skipped": skipped, "ratio": None, "spread": None, "env": env}]
    samples: dict[str, list[float]] = {"warm-cache": [], "cold-cache": []}
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="attn-bench-cache-") as tmp:
            samples["cold-cache"].append(_pytest(specs, Path(tmp)))
            samples["warm-cache"].append(_pytest(specs, Path(tmp)))
    return timing_records("e2e", samples, "cold-cache", env, {"specs": str(specs)}, prefix="e2e/pytest-specs/")
