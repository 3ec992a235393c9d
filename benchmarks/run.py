"""One runner for every benchmark: ``python -m benchmarks.run [--quick] [--json FILE]``.

Sizes per profile are data (``PROFILES``); every measurement becomes one JSON record with
its ``name``, medians, ``spread`` and ``ratio`` against a baseline timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import e2e, logits_cpu, overhead, population, scaling, seed_method, sweep
from benchmarks.shapes import EMBEDDED, MID, MID_QUICK, SMOKE, WAN_1_3B, Shape
from benchmarks.timing import environment

SECTIONS = ("overhead", "seed-method", "scaling", "e2e", "logits-cpu", "kernels", "sweep", "population")


@dataclass(frozen=True)
class Profile:
    reps: int
    warmup: int
    overhead_shapes: tuple[Shape, ...]
    seed_time_tokens: tuple[int, ...]
    seed_memory_tokens: tuple[int, ...]
    seed_tokens_per_frame: int
    scaling_frames: tuple[int, ...]
    scaling_tokens_per_frame: int
    logits_frames: tuple[int, ...]
    e2e_reps: int
    logits_cpu_tokens: tuple[int, ...] = (7800, 32760)
    sweep_reps: int = 2
    population_cut: tuple[int | None, int | None, int | None] = (None, None, None)  # prompts, seeds, steps of the spec's


PROFILES = {
    "full": Profile(
        5, 1, (EMBEDDED, MID), (1560, 3120, 4680, 7800), (1560, 3120, 4680, 7800), 1560, (2, 3, 4, 5), 1560, (3, 6, 12, 21), 5,
        sweep_reps=3
    ),
    "quick": Profile(5, 1, (EMBEDDED, MID_QUICK), (1560, 3120), (1560, 7800), 1560, (1, 2, 3, 4), 780, (3, 6, 12, 21), 1,
                     sweep_reps=2),
    "smoke": Profile(5, 1, (SMOKE,), (8, 16), (), 4, (1, 2, 3, 4), 4, (1, 2, 4, 8), 0, (16, 32), sweep_reps=0,
                     population_cut=(2, 1, 2)),
}


def run(profile: Profile, sections: tuple[str, ...], *, device: str, specs: Path, log=print) -> list[dict]:
    env = environment(device)
    records: list[dict] = []
    if "overhead" in sections:
        for shape in profile.overhead_shapes:
            log(f"[overhead] {shape.name}: {shape.tokens} tokens, {shape.config['num_layers']} layers")
            records += overhead.run(shape, reps=profile.reps, warmup=profile.warmup, env=env, device=device)
        if device.startswith("cuda"):
            log(f"[overhead] {WAN_1_3B.name} (bfloat16): {WAN_1_3B.tokens} tokens")
            records += overhead.run(
                WAN_1_3B, reps=profile.reps, warmup=profile.warmup, env=env, dtype=torch.bfloat16, device=device
            )
    if "seed-method" in sections:
        log(f"[seed-method] time at {profile.seed_time_tokens} tokens, peak memory at {profile.seed_memory_tokens}")
        records += seed_method.run(
            list(profile.seed_time_tokens), profile.seed_tokens_per_frame, reps=profile.reps, warmup=profile.warmup,
            env=env, memory_tokens=list(profile.seed_memory_tokens),
        )
    if "scaling" in sections:
        log(f"[scaling] {profile.scaling_frames} frames of {profile.scaling_tokens_per_frame} tokens")
        timing = {"reps": profile.reps, "warmup": profile.warmup, "env": env}
        records += scaling.run(list(profile.scaling_frames), profile.scaling_tokens_per_frame, **timing)
        log(f"[scaling] logits alone on {profile.logits_frames} frames of {profile.scaling_tokens_per_frame} tokens")
        records += scaling.run_logits_wide(list(profile.logits_frames), profile.scaling_tokens_per_frame, reps=profile.reps,
                                           warmup=profile.warmup, env=env)
    if "logits-cpu" in sections:
        log(f"[logits-cpu] per-frame sums vs float32 copies at {profile.logits_cpu_tokens} tokens")
        records += logits_cpu.run(list(profile.logits_cpu_tokens), profile.seed_tokens_per_frame, reps=profile.reps,
                                  warmup=profile.warmup, env=env)
    if "kernels" in sections:
        if device.startswith("cuda"):
            from benchmarks import kernels_gpu  # imports Triton

            log(f"[kernels] Triton mass at the full Wan shape, per layer and whole model ({device})")
            records += kernels_gpu.run(reps=min(profile.reps, 3), warmup=profile.warmup, env=env, device=device)
        else:
            records.append({"name": "kernels", "skipped": "GPU only (--device cuda)"})
    if "e2e" in sections and profile.e2e_reps:
        log(f"[e2e] pytest {specs}: cold cache, warm cache, warm with report, collect-only")
        records += e2e.run(specs, reps=profile.e2e_reps, env=env)
    if "sweep" in sections and profile.sweep_reps:
        log(f"[sweep] {len(sweep.MODELS)} models x {len(sweep.PROMPTS)} prompts x {len(sweep.SEEDS)} seeds: "
            "2 workers vs 1 (1 torch thread each)")
        records += sweep.run(reps=profile.sweep_reps, env=env)
    if "population" in sections:
        probe = population.population_probe(specs, device, *profile.population_cut)
        log(f"[population] {len(probe.samples())} samples ({probe.sample_steps} steps) vs one sample, tiny-trained")
        records += population.run(probe, reps=profile.reps, warmup=profile.warmup, env=env)
    return records


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(records: list[dict]) -> str:
    """Human-readable summary: one line per record."""
    lines = [f"{'name':58} {'median':>12} {'spread':>7} {'ratio':>8}  note"]
    for rec in records:
        if "skipped" in rec:
            lines.append(f"{rec['name']:58} {'-':>12} {'-':>7} {'-':>8}  skipped: {rec['skipped']}")
        elif "exponent" in rec:
            baseline = rec["baseline"].rsplit("/", 1)[-1]
            exponent = f"exponent {rec['exponent']:.2f} (ratio: to {baseline}'s)"
            lines.append(f"{rec['name']:58} {'-':>12} {'-':>7} {rec['ratio']:8.3f}  {exponent}")
        elif "median_bytes" in rec:
            note = rec.get("note", "")
            if "times_less_than_naive" in rec:
                at_least = ">= " if rec["below_resolution"] else ""
                note = f"{at_least}{rec['times_less_than_naive']:.0f}x less than naive"
            if "median_bytes_bf16" in rec:
                note = f"bf16: {_fmt_bytes(rec['median_bytes_bf16'])}; {note}"
            ratio = f"{rec['ratio']:8.4f}" if rec.get("ratio") is not None else f"{'-':>8}"
            lines.append(f"{rec['name']:58} {_fmt_bytes(rec['median_bytes']):>12} {'-':>7} {ratio}  {note}")
        elif "median_s" not in rec:
            lines.append(f"{rec['name']:58} {'-':>12} {'-':>7} {'-':>8}  {rec.get('note', '')}")
        else:
            note = f"paired {rec['paired_ratio']:.3f}, min {rec['min_s']:.4f}s, max {rec['max_s']:.4f}s, n={rec['reps']}"
            if "cpu_median_s" in rec:
                note += f", cpu {rec['cpu_median_s']:.2f}s"
            lines.append(f"{rec['name']:58} {rec['median_s']:11.4f}s {rec['spread']:7.3f} {rec['ratio']:8.3f}  {note}")
    return "\n".join(lines)


def write_json(records: list[dict], path: Path) -> None:
    """Whole file or nothing: a temp file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(records, handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on a CPU")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the machinery only (used by the tests)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the records to FILE")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--device", default="cpu",
                        help="device for the capture-overhead section (cuda adds the full Wan2.1-1.3B shape) "
                             "and the kernels section (cuda only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--specs", type=Path, default=Path("specs"), help="spec directory for the e2e section")
    args = parser.parse_args(argv)
    sections = tuple(part.strip() for part in args.sections.split(",") if part.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    start = time.perf_counter()
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    records = run(profile, sections, device=args.device, specs=args.specs, log=log)
    print(table(records))
    print(f"({len(records)} records in {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} torch thread(s))")
    if args.json:
        write_json(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
