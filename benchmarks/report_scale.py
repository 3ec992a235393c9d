"""Report writing at the real model's scale: ``python -m benchmarks.report_scale [--json FILE]``.

Two synthetic extractions of Wan2.1-T2V-1.3B's geometry (30 layers x 12 heads x 3 captured
steps x 21 latent frames, block-causal; a diagonal bump, a first-frame sink in two heads,
noise) are written to NetCDF, then timed (median of ``--reps`` after one warm-up, one thread):

- ``compare/top-default``, ``compare/top-all``: ``attn-harness compare`` on them;
- ``run-report/6-failing``: the run report of a 30-layer spec with 6 failing checks;
- ``read-both``: reading the two files, the floor every comparison pays (the ratio baseline).

Each record gives the median seconds, the spread, the page size and the ratio to ``read-both``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: the targets are for one CPU thread

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attn_harness.core.frames import block_causal_mask
from attn_harness.core.results import CheckRecord, Results, RunInfo, SpecInfo
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.core.store import read_dataset, write_dataset
from attn_harness.report.html import render_compare, render_run_report
from attn_harness.report.settings import DEFAULT_TOP

GEOMETRY = {"steps": 3, "layers": 30, "heads": 12, "frames": 21}


def synthetic(seed: int, sink_heads: tuple[int, ...]):
    """One extraction with Wan2.1-T2V-1.3B's geometry and planted structure."""
    steps, layers, heads, frames = GEOMETRY.values()
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.3, (steps, layers, heads, frames, frames)) + 3.0 * np.eye(frames)
    for head in sink_heads:
        logits[:, :, head, :, 0] += 4.0
    logits = np.where(block_causal_mask(frames, 3), logits, np.nan)
    weights = np.exp(np.nan_to_num(logits, nan=-np.inf))
    attrs = dict.fromkeys(REQUIRED_ATTRS, "unknown") | {
        "mask": "block-causal", "block_size": 3, "temporal_stride": 4, "latent_frames": frames,
        "num_frames": 1 + 4 * (frames - 1), "seed": seed, "model_id": f"synthetic-seed{seed}",
    }
    return build_dataset(
        {"logits": logits, "mass": weights / weights.sum(-1, keepdims=True)},
        steps=[0, 25, 49], timesteps=[999.0, 500.0, 20.0], layers=list(range(layers)), attrs=attrs,
    )


def failing_results(dataset: Path) -> Results:
    """A 30-layer spec's record: every layer passes two checks, 6 layers fail a sink check."""
    checks = []
    for layer in range(GEOMETRY["layers"]):
        for prop, status in (("row_stochastic", "pass"), ("sink_heads", "fail" if layer % 5 == 0 else "pass")):
            violations = [{"location": {"step": 49, "layer": layer, "head": 1}, "observed": -0.2, "expected": "> 0"}]
            checks.append(CheckRecord(
                nodeid=f"specs/wan.yaml::wan::layer{layer}::{prop}", spec="wan", status=status, name=prop,
                file="specs/wan.yaml", line=10, layer=layer, property=prop, metric="logits",
                message=f"{prop} {status}", violations=violations if status == "fail" else [],
            ))
    spec = SpecInfo(spec="wan", file="specs/wan.yaml", line=1, model="synthetic", dataset=str(dataset))
    return Results(run=RunInfo(command="pytest specs/"), specs=[spec], checks=checks)


def measure(name: str, fn: Callable[[], Path | None], reps: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"name": name, "median_s": round(median, 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
            "spread": round((max(times) - min(times)) / median, 3), "reps": reps,
            "bytes": out.stat().st_size if isinstance(out, Path) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a_path = write_dataset(synthetic(0, (0,)), work / "a.nc")
        b_path = write_dataset(synthetic(1, (0, 3)), work / "b.nc")
        results = failing_results(a_path)

        def compare(top: int | None) -> Path:
            return render_compare(read_dataset(a_path), read_dataset(b_path), work / "c.html", top=top,
                                  labels=("base", "distilled"))

        records = [
            measure("read-both", lambda: (read_dataset(a_path), read_dataset(b_path)) and None, args.reps),
            measure("compare/top-default", lambda: compare(DEFAULT_TOP), args.reps),
            measure("compare/top-all", lambda: compare(None), args.reps),
            measure("run-report/6-failing", lambda: render_run_report(results, work / "report"), args.reps),
        ]
    floor = records[0]["median_s"]
    for record in records:
        record["ratio"] = round(record["median_s"] / floor, 2) if floor else None
        size = f", {record['bytes'] / 1e6:.2f} MB" if record["bytes"] else ""
        print(f"{record['name']:<24} {record['median_s']:7.3f} s (spread {record['spread']:.2f}, x{record['ratio']}){size}")
    if args.json:
        args.json.write_text(json.dumps({"geometry": GEOMETRY, "threads": os.environ["OMP_NUM_THREADS"],
                                         "records": records}, indent=1))


if __name__ == "__main__":
    main()
