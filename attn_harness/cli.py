"""``attn-harness``: extraction, legacy import, statistics, figures and comparison from the command line.

Every user-facing failure is a ``HarnessError``: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from attn_harness import __version__
from attn_harness.cli_drift import add_drift
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import DTYPES, MASKS, MODES, Probe
from attn_harness.core.schema import LEGACY_MASKS
from attn_harness.report.settings import DEFAULT_TOP, FLIP_MARGIN, SINK_HEAD_THRESHOLD


def parse_int_list(text: str) -> list[int]:
    """``"0-3,5"`` -> ``[0, 1, 2, 3, 5]`` (non-negative integers and inclusive ranges)."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise HarnessError(f"{text!r} is not a list of integers or ranges like 0-3,5")
        lo, hi = int(match[1]), int(match[2] or match[1])
        values.extend(range(lo, hi + 1))
    if not values:
        raise HarnessError(f"{text!r} names no integers")
    return values


def _layers(text: str) -> str | tuple[int, ...]:
    return "all" if text == "all" else tuple(parse_int_list(text))


def _steps(text: str) -> tuple[int | str, ...]:
    items: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        items.extend([part] if part in ("first", "mid", "last") else parse_int_list(part))
    return tuple(items)


def _metrics(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _timesteps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated timestep values such as 1000,750,500,250; got {text!r}") from None


def _query_frames(text: str) -> str | list[int]:
    return "last-block" if text == "last-block" else parse_int_list(text)


def _add_probe_arguments(p: argparse.ArgumentParser, *, single_run: bool = True) -> None:
    """The probe's flags (``Probe`` fields); ``single_run=False`` leaves out --prompt and --seed,
    which a sweep takes as lists."""
    defaults = Probe()
    p.add_argument(
        "--mode",
        choices=MODES,
        default=Probe().mode,
        help="teacher-forced: whole clip per step; rollout: block by block with a KV cache (needs --mask block-causal "
        "or sink-window)",
    )
    p.add_argument("--layers", default="all", type=_layers, help="blocks to capture: all, or e.g. 0-3,5")
    p.add_argument("--steps", default="first,mid,last", type=_steps, help="denoising steps to capture: first,mid,last or indices")
    p.add_argument("--metrics", default="logits,mass", type=_metrics, help="logits, plus mass, aligned_mass and/or text_mass")
    p.add_argument("--capture-timesteps", default=(), type=_timesteps,
                   help="capture the steps nearest these timestep values (e.g. 999,500) instead of --steps")
    p.add_argument("--frames", type=int, default=None, help="pixel frames, 1 + 4k (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixel height, a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixel width, a multiple of 16 (default: the model's)")
    p.add_argument("--sample-steps", type=int, default=defaults.sample_steps, help="denoising steps in the run")
    if single_run:
        p.add_argument("--seed", type=int, default=defaults.seed, help="noise seed")
        p.add_argument("--prompt", default=defaults.prompt, help="text prompt")
        p.add_argument("--prompts", dest="population_prompts", type=Path, default=None, metavar="FILE",
                       help="text file, one prompt a line: a population over prompts (dataset dim 'sample')")
        p.add_argument("--seeds", dest="population_seeds", type=lambda text: tuple(parse_int_list(text)), default=(),
                       help="noise seeds, e.g. 0,1,2 or 0-7: a population over seeds (dataset dim 'sample')")
        p.add_argument("--sample-batch", type=int, default=defaults.sample_batch,
                       help="samples per batched run of a population")
    p.add_argument("--negative-prompt", default=defaults.negative_prompt, help="negative prompt for CFG")
    p.add_argument("--guidance", type=float, default=defaults.guidance, help="CFG scale (<= 1 disables the unconditional pass)")
    p.add_argument("--shift", type=float, default=defaults.shift, help="flow shift of the scheduler")
    p.add_argument("--mask", choices=MASKS, default=defaults.mask, help="self-attention mask the model runs under")
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="latent frames per block (block-causal, sink-window)")
    p.add_argument("--sink-frames", type=int, default=defaults.sink_frames, help="sink-window: first frames every block sees")
    p.add_argument("--window-frames", type=int, default=defaults.window_frames,
                   help="sink-window: frames just before its block that a block sees")
    p.add_argument("--denoising-timesteps", default=None, type=_timesteps,
                   help="few-step sampler of distilled models, e.g. 1000,750,500,250 (replaces --sample-steps)")
    p.add_argument("--no-warp-timesteps", action="store_true", help="use --denoising-timesteps as given, not shifted")
    p.add_argument("--branch", choices=("cond", "uncond"), default=defaults.branch, help="CFG branch to capture")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="model dtype (statistics are always float32)")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")


def _read_prompts(path: Path) -> tuple[str, ...]:
    try:
        prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise HarnessError(f"--prompts {path}: cannot read it ({err})") from None
    if not prompts:
        raise HarnessError(f"--prompts {path}: holds no prompt (one prompt a line)")
    return prompts


def _probe_from_args(args: argparse.Namespace) -> Probe:
    """The ``Probe`` the flags of ``_add_probe_arguments`` describe (prompt and seed: defaults when absent)."""
    defaults = Probe()
    return Probe(
        prompt=getattr(args, "prompt", defaults.prompt),
        prompts=_read_prompts(args.population_prompts) if getattr(args, "population_prompts", None) else (),
        seeds=getattr(args, "population_seeds", ()),
        sample_batch=getattr(args, "sample_batch", defaults.sample_batch),
        negative_prompt=args.negative_prompt,
        seed=getattr(args, "seed", defaults.seed),
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        sample_steps=args.sample_steps,
        capture_steps=args.steps,
        layers=args.layers,
        metrics=args.metrics,
        guidance=args.guidance,
        shift=args.shift,
        mask=args.mask,
        block_size=args.block_size,
        dtype=args.dtype,
        device=args.device,
        branch=args.branch,
        prompt_embeds=getattr(args, "prompt_embeds", None),
        mode=args.mode,
        sink_frames=args.sink_frames,
        window_frames=args.window_frames,
        denoising_timesteps=args.denoising_timesteps,
        warp_timesteps=not args.no_warp_timesteps,
        capture_timesteps=args.capture_timesteps,
    )


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="run the sampler with capture and write a NetCDF extraction",
        description="Sample from a model with attention capture hooks and write frame x frame "
        "statistics (logits, mass) per step, layer and head to a NetCDF file.",
    )
    p.add_argument(
        "--model",
        default="tiny-random",
        help="embedded model name (tiny-random), a model dir (diffusers pipeline or transformer, original Wan), "
        "or a training checkpoint file (.pt/.safetensors)",
    )
    p.add_argument("--base-model", default=None, help="model dir giving a training checkpoint its architecture and text encoder")
    p.add_argument(
        "--prompt-embeds",
        default=None,
        help="text embeddings file (.pt tensor [1, tokens, text_dim], or dict/.safetensors with prompt_embeds "
        "and negative_prompt_embeds); replaces the text encoder",
    )
    p.add_argument("--out", required=True, type=Path, help="NetCDF file to write (.nc)")
    _add_probe_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from attn_harness.sampling.extract import extract
    from attn_harness.core.store import write_dataset

    probe = _probe_from_args(args)
    start = time.perf_counter()
    ds = extract(args.model, probe, progress=None if not args.no_progress else False, base_model=args.base_model)
    path = write_dataset(ds, args.out)
    sizes = ", ".join(f"{dim}={size}" for dim, size in ds.sizes.items())
    print(f"wrote {path} ({sizes}) in {time.perf_counter() - start:.1f} s")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="extract many checkpoints x prompts x seeds as tasks on a Dask cluster, merged into one dataset",
        description="Run one probe over every checkpoint, prompt and seed as Dask tasks (a local cluster "
        "or an existing scheduler), one part file per task; a rerun skips finished parts. Writes "
        "OUT/sweep.nc (dims checkpoint, prompt, seed, then the extraction's) and OUT/report.html.",
    )
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--models", nargs="+", metavar="MODEL", help="embedded names, model dirs or checkpoint files")
    models.add_argument("--models-from", type=Path, metavar="FILE", help="a file listing models, one a line (# comments)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", nargs="+", metavar="TEXT", help="text prompts (default: the probe's one prompt)")
    prompts.add_argument("--prompts-from", type=Path, metavar="FILE", help="a file of prompts, one a line")
    p.add_argument("--seeds", type=parse_int_list, default=[Probe().seed], help="noise seeds, e.g. 0-3,7 (default 0)")
    p.add_argument("--base-model", default=None, help="model dir giving training checkpoints their architecture and text encoder")
    p.add_argument("--out", type=Path, required=True, help="sweep directory: parts/, sweep.log, sweep.nc, report.html")
    p.add_argument("--scheduler", default="local:1", help="local:N (a cluster of N workers here; one per GPU on CUDA) or a scheduler address")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local worker (default: cores / workers)")
    p.add_argument("--retries", type=int, default=2, help="times Dask reruns a part whose task raised")
    p.add_argument("--resources", default="", help="what each task needs of a worker on an existing cluster, e.g. GPU=1")
    p.add_argument("--report", type=Path, default=None, help="HTML report across checkpoints (default: OUT/report.html)")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_probe_arguments(p, single_run=False)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from attn_harness.sampling.sweep import MERGED_NAME, parse_resources, read_list, sweep

    if args.retries < 0 or (args.threads is not None and args.threads < 1):
        raise HarnessError("--retries must be >= 0 and --threads >= 1")
    models = args.models or read_list(args.models_from, resolve_paths=True)
    prompts = args.prompts or (read_list(args.prompts_from, resolve_paths=False) if args.prompts_from else [Probe().prompt])
    start = time.perf_counter()
    ds = sweep(
        models, prompts, args.seeds, _probe_from_args(args), out=args.out, scheduler=args.scheduler,
        base_model=args.base_model, retries=args.retries, threads=args.threads, resources=parse_resources(args.resources),
        progress=False if args.no_progress else None,
    )
    sizes = ", ".join(f"{dim}={size}" for dim, size in ds.sizes.items())
    print(f"wrote {args.out / MERGED_NAME} ({sizes}) in {time.perf_counter() - start:.1f} s")
    if not args.no_report:
        from attn_harness.report.sweep import render_sweep_report

        print(f"wrote {render_sweep_report(ds, args.report or args.out / 'report.html')}")
    return 0


def _add_import_legacy(sub) -> None:
    p = sub.add_parser(
        "import-legacy",
        help="convert a seed-notebook .pt file to NetCDF",
        description="Import a .pt file written by the seed notebook's extractor (full_frame_attention "
        "[heads, T, T]); block-causal files are detected by zeros above the block diagonal.",
    )
    p.add_argument("file", type=Path, help="the legacy .pt file")
    p.add_argument("--out", required=True, type=Path, help="NetCDF file to write")
    p.add_argument("--mask", choices=("auto",) + LEGACY_MASKS, default="auto", help="mask of the file (default: detect)")
    p.set_defaults(func=cmd_import_legacy)


def cmd_import_legacy(args: argparse.Namespace) -> int:
    from attn_harness.model.legacy import import_legacy
    from attn_harness.core.store import write_dataset

    ds = import_legacy(args.file, mask=args.mask)
    path = write_dataset(ds, args.out)
    print(
        f"wrote {path}: layer {int(ds.layer[0])}, {ds.sizes['head']} heads, {ds.sizes['query_frame']} frames, "
        f"mask {ds.attrs['mask']}"
    )
    return 0


def _add_stats(sub) -> None:
    p = sub.add_parser(
        "stats",
        help="print the seed notebook's statistics for one layer",
        description="Diagonal mean, first-frame mean and per-head first / mid / last / sink "
        "(sink = first - mid) of one layer's logits, in latent frames.",
    )
    p.add_argument("file", type=Path, help="a NetCDF extraction")
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--step", type=int, default=None, help="denoising step index (default: the first captured)")
    p.add_argument("--query-frames", type=_query_frames, default="last-block", help="e.g. 18,19,20, or last-block")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)


def select_layer(ds, layer: int, step: int | None, variable: str = "logits"):
    """The seed's single-layer view (head, query_frame, key_frame), with clear errors."""
    layers = [int(v) for v in ds["layer"].values]
    steps = [int(v) for v in ds["step"].values]
    if layer not in layers:
        raise HarnessError(f"layer {layer} is not in this extraction; it has layers {layers}")
    step = steps[0] if step is None else step
    if step not in steps:
        raise HarnessError(f"step {step} is not in this extraction; it has steps {steps}")
    if variable not in ds:
        raise HarnessError(f"variable {variable!r} is not in this extraction; it has {list(ds.data_vars)}")
    return ds[variable].sel(step=step, layer=layer), step


def cmd_stats(args: argparse.Namespace) -> int:
    from attn_harness.core.metrics import default_query_frames, layer_summary
    from attn_harness.core.store import read_dataset

    ds = read_dataset(args.file)
    da, step = select_layer(ds, args.layer, args.step)
    query_frames = default_query_frames(ds) if args.query_frames == "last-block" else args.query_frames
    summary = layer_summary(da, query_frames)
    if args.json:
        print(json.dumps({"layer": args.layer, "step": step, **summary}))
        return 0
    print("=" * 60)
    print(f"Layer {args.layer} statistics (step {step}, {ds.attrs.get('mask')}, latent frames)")
    print("=" * 60)
    print(f"Diagonal mean (self-attention): {summary['diagonal_mean']:.4f}")
    print(f"First frame mean (sink): {summary['first_frame_mean']:.4f}")
    print(f"\nPer-head statistics (query frames {summary['query_frames']}):")
    for head in summary["heads"]:
        print(
            f"  H{head['head']:2d}: first={head['first']:7.3f}, mid={head['mid']:7.3f}, "
            f"last={head['last']:7.3f}, sink={head['sink']:+7.3f}"
        )
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="write the seed notebook's figures for one layer",
        description="Head grid (query x key frame) per metric, per-head bars of the query block "
        "with sink scores, the statistics table, the evolution across steps and the layer x head "
        "overview, as SVG (editable text) and PNG.",
    )
    p.add_argument("file", type=Path, help="a NetCDF extraction")
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--step", type=int, default=None, help="denoising step index (default: the last captured)")
    p.add_argument("--out", type=Path, required=True, help="directory for the figures")
    p.add_argument("--pixel-frames", action="store_true", help="draw in pixel frames (causal-VAE mapping)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from attn_harness.report.figures import plot_layer
    from attn_harness.core.store import read_dataset

    ds = read_dataset(args.file)
    select_layer(ds, args.layer, args.step)
    for path in plot_layer(ds, args.layer, args.step, args.out, pixel_frames=args.pixel_frames):
        print(path)
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two extractions (e.g. two checkpoints) in one HTML page",
        description="The provenance of both sides (a warning when the probes differ), an overview of "
        "mean |B - A| per layer x head, the layers ranked by it, flips beyond a noise margin (sink sign, "
        "sink-head membership, diagonal dominance), per-head deltas of every layer, and A, B and B - A "
        "head grids for the top layers (values under the pointer, click to enlarge).",
    )
    p.add_argument("a", type=Path, help="first extraction (.nc)")
    p.add_argument("b", type=Path, help="second extraction (.nc)")
    p.add_argument("--out", type=Path, default=Path("reports/compare.html"), help="HTML file to write")
    p.add_argument("--labels", default="A,B", help="two labels, comma-separated, e.g. base,distilled")
    p.add_argument("--layers", type=parse_int_list, default=None, help="layers to compare (default: all shared)")
    p.add_argument("--metric", choices=("logits", "mass"), default="logits", help="variable to compare")
    p.add_argument("--step", default="last",
                   help="first, mid, last or a step of A: the step of the ranking, flips and grids (paired by position)")
    p.add_argument("--steps", type=_step_pair, default=None, metavar="A_STEP,B_STEP",
                   help="compare one step of each side (first, mid, last or a captured step), e.g. last,0")
    p.add_argument("--top", type=_top, default=DEFAULT_TOP, metavar="K|all",
                   help=f"draw full head grids for the K layers that differ most, or all (default {DEFAULT_TOP})")
    p.add_argument("--sink-threshold", type=float, default=None, metavar="X",
                   help="sink score that makes a sink head (default: "
                   + ", ".join(f"{v:g} for {k}" for k, v in SINK_HEAD_THRESHOLD.items()) + ")")
    p.add_argument("--flip-margin", type=float, default=FLIP_MARGIN, metavar="F",
                   help=f"a flip counts when both values are F x scale from the boundary (default {FLIP_MARGIN})")
    p.set_defaults(func=cmd_compare)


def _step_pair(text: str) -> tuple[int | str, int | str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"needs two steps like last,0 (A's step, then B's); got {text!r}")
    return tuple(int(part) if part.isdigit() else part for part in parts)


def _top(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive number of layers or 'all'; got {text!r}")
    return int(text)


def cmd_compare(args: argparse.Namespace) -> int:
    from attn_harness.report.html import render_compare
    from attn_harness.core.store import read_dataset

    labels = tuple(part.strip() for part in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        raise HarnessError(f"--labels needs two comma-separated names like base,distilled; got {args.labels!r}")
    step = int(args.step) if args.step.isdigit() else args.step
    out = render_compare(
        read_dataset(args.a),
        read_dataset(args.b),
        args.out,
        labels=labels,
        layers=args.layers,
        metric=args.metric,
        step=step,
        sources=(str(args.a), str(args.b)),
        top=args.top,
        steps=args.steps,
        sink_threshold=args.sink_threshold,
        flip_margin=args.flip_margin,
    )
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attn-harness",
        description="Attention regression harness for video diffusion transformers (Wan2.1 family).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    _add_import_legacy(sub)
    _add_stats(sub)
    _add_plot(sub)
    _add_compare(sub)
    _add_sweep(sub)
    add_drift(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except HarnessError as err:
        print(f"attn-harness: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attn-harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
