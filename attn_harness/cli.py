"""``attn-harness``: extraction, legacy import, statistics, figures and comparison from the command line.

Every user-facing failure is a ``HarnessError``: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attn_harness import __version__
from attn_harness.cli_drift import add_drift
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import PROBE_FIELDS, Probe, ProbeError, read_prompts
from attn_harness.core.schema import LEGACY_MASKS
from attn_harness.core.vocabulary import DEFAULT_STEP, REQUIRED, FieldError, parse_layers, parse_step, step_index
from attn_harness.report.settings import DEFAULT_TOP, FLIP_MARGIN, SINK_HEAD_THRESHOLD

EMBEDDED_NAMES = "tiny-random, tiny-trained, tiny-trained-causal"  # attn_harness.model.models.EMBEDDED


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.required or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def parse_int_list(text: str) -> list[int]:
    """``"0-3,5"`` -> ``[0, 1, 2, 3, 5]``: the one layer-list parser (reversed ranges refused, duplicates dropped)."""
    try:
        found = parse_layers(text)
    except ValueError as err:
        raise HarnessError(f"{text!r} is not a list of integers or ranges like 0-3,5: {err}") from None
    if found == "all":
        raise HarnessError(f"{text!r}: give integers or ranges like 0-3,5 here, not 'all'")
    return list(found)


def _layers(text: str) -> str | tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as err:
        raise HarnessError(f"--layers {text!r} is not a list of integers or ranges like 0-3,5: {err}") from None


def _step(text: str) -> int | str:
    try:
        return parse_step(text)
    except ValueError as err:
        raise HarnessError(f"--step: {err}") from None


def _query_frames(text: str) -> str | list[int]:
    return "last-block" if text == "last-block" else parse_int_list(text)


def _flag(key: str) -> str:
    return PROBE_FIELDS[key].flag or "--" + key.replace("_", "-")


def _refuse_overwrite(out: Path, inputs: Sequence[str | os.PathLike | None], option: str = "--out") -> None:
    """An output must never replace an input of the same command."""
    for given in inputs:
        if given is None or not Path(given).exists() or not out.exists():
            continue
        if os.path.samefile(out, given):
            raise HarnessError(f"{option} {out} is an input of this command ({given}); write to another file")


SWEPT_KEYS = ("prompt", "seed", "prompts", "seeds", "sample_batch")  # a sweep takes prompts and seeds as its own lists


def _add_probe_arguments(p: argparse.ArgumentParser, *, exclude: Sequence[str] = ()) -> None:
    """One flag per probe field of the vocabulary (``PROBE_FIELDS``), with its meaning, choices
    and default; a spec's ``probe:`` key and the flag take the same values."""
    p.add_argument("--layers", default="all", help="blocks to capture: all, or e.g. 0-3,5")
    for key, field_ in PROBE_FIELDS.items():
        if key in exclude:
            continue
        if field_.kind == "bool" and field_.default is True:  # a switch that turns it off
            p.add_argument("--no-" + key.replace("_", "-"), dest=f"probe_{key}", action="store_const", const="false",
                           default=None, help=f"do not {field_.doc}")
            continue
        shown = ",".join(str(v) for v in field_.default) if isinstance(field_.default, tuple) else field_.default_text()
        default = "" if field_.default in (REQUIRED, ()) or "default:" in field_.doc else f" (default: {shown})"
        choices = f"; one of {', '.join(field_.choices)}" if field_.choices else ""
        metavar = "FILE" if key in FILE_KEYS else key.upper()
        p.add_argument(_flag(key), dest=f"probe_{key}", default=None, metavar=metavar, help=f"{field_.doc}{choices}{default}")


FILE_KEYS = ("prompts", "prompt_embeds")  # flags that name a file


def _read_prompts(path: str) -> list[str]:
    try:
        return read_prompts(path)
    except ValueError as err:
        raise HarnessError(f"--prompts {err}") from None


def probe_from_args(args: argparse.Namespace) -> Probe:
    """The probe the flags describe, validated by the vocabulary (the flag is named on error)."""
    values = {}
    for key, field_ in PROBE_FIELDS.items():
        text = getattr(args, f"probe_{key}", None)
        if text is None:
            continue
        try:
            values[key] = field_.coerce(_read_prompts(text) if key == "prompts" else field_.parse_text(text), key)
        except FieldError as err:
            raise HarnessError(f"{_flag(key)} {text!r}: {err.message}") from None
    try:
        return Probe.from_keys(values, layers=_layers(args.layers))
    except ProbeError as err:
        flag = _flag(err.key) if err.key in PROBE_FIELDS else f"--{err.key}"
        raise HarnessError(f"{flag}: {str(err).split(': ', 1)[1]}") from None


def _field_arg(key: str):
    """An argparse ``type`` that reads one probe field's value from its flag text."""
    field_ = PROBE_FIELDS[key]

    def convert(text: str) -> Any:
        try:
            return list(field_.coerce(field_.parse_text(text), key))
        except FieldError as err:
            raise argparse.ArgumentTypeError(err.message) from None

    return convert


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="run the sampler with capture and write a NetCDF extraction",
        description="Sample from a model with attention capture hooks and write frame x frame "
        "statistics (logits, mass) per step, layer and head to a NetCDF file. Every probe option "
        "takes the values a spec's probe: key takes (specs/README.md). --prompts and/or --seeds "
        "make a population: the dataset gains a dim 'sample' with coordinates prompt and seed.",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"embedded model name ({EMBEDDED_NAMES}), a model dir (diffusers pipeline or transformer, "
        "original Wan), or a training checkpoint file (.pt/.safetensors)",
    )
    p.add_argument("--base-model", default=None, help="model dir giving a training checkpoint its architecture and text encoder")
    p.add_argument("--out", required=True, type=Path, help="NetCDF file to write (.nc)")
    _add_probe_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from attn_harness.core.store import write_dataset
    from attn_harness.sampling.extract import extract

    probe = probe_from_args(args)
    _refuse_overwrite(args.out, [args.model, args.base_model, probe.prompt_embeds])
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
    p.add_argument("--seeds", type=_field_arg("seeds"), default=[Probe().seed], help="noise seeds, e.g. 0-3,7 (default 0)")
    p.add_argument("--base-model", default=None, help="model dir giving training checkpoints their architecture and text encoder")
    p.add_argument("--out", type=Path, required=True, help="sweep directory: parts/, sweep.log, sweep.nc, report.html")
    p.add_argument("--scheduler", default="local:1",
                   help="local:N (a cluster of N workers here; one per GPU on CUDA) or a scheduler address")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local worker (default: cores / workers)")
    p.add_argument("--retries", type=int, default=2, help="times Dask reruns a part whose task raised")
    p.add_argument("--resources", default="", help="what each task needs of a worker on an existing cluster, e.g. GPU=1")
    p.add_argument("--report", type=Path, default=None, help="HTML report across checkpoints (default: OUT/report.html)")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_probe_arguments(p, exclude=SWEPT_KEYS)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from attn_harness.sampling.sweep import MERGED_NAME, parse_resources, read_list, sweep

    if args.retries < 0 or (args.threads is not None and args.threads < 1):
        raise HarnessError("--retries must be >= 0 and --threads >= 1")
    models = args.models or read_list(args.models_from, resolve_paths=True)
    prompts = args.prompts or (read_list(args.prompts_from, resolve_paths=False) if args.prompts_from else [Probe().prompt])
    start = time.perf_counter()
    ds = sweep(
        models, prompts, args.seeds, probe_from_args(args), out=args.out, scheduler=args.scheduler,
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
        formatter_class=_Formatter,
    )
    p.add_argument("file", type=Path, help="the legacy .pt file")
    p.add_argument("--out", required=True, type=Path, help="NetCDF file to write")
    p.add_argument("--mask", choices=("auto",) + LEGACY_MASKS, default="auto", help="mask of the file (auto: detect)")
    p.set_defaults(func=cmd_import_legacy)


def cmd_import_legacy(args: argparse.Namespace) -> int:
    from attn_harness.core.store import write_dataset
    from attn_harness.model.legacy import import_legacy

    _refuse_overwrite(args.out, [args.file])
    ds = import_legacy(args.file, mask=args.mask)
    path = write_dataset(ds, args.out)
    print(
        f"wrote {path}: layer {int(ds.layer[0])}, {ds.sizes['head']} heads, {ds.sizes['query_frame']} frames, "
        f"mask {ds.attrs['mask']}"
    )
    return 0


STEP_HELP = ("denoising step: first (0), mid (sample_steps // 2), last (sample_steps - 1) or an index; "
             "it must be a captured step")


def _add_stats(sub) -> None:
    p = sub.add_parser(
        "stats",
        help="print the seed notebook's statistics for one layer",
        description="Diagonal mean, first-frame mean and per-head first / mid / last / sink "
        "(sink = first - mid) of one layer's logits, in latent frames.",
        formatter_class=_Formatter,
    )
    p.add_argument("file", type=Path, help="a NetCDF extraction")
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--step", type=_step_arg, default=DEFAULT_STEP, help=STEP_HELP)
    p.add_argument("--query-frames", type=str, default="last-block", help="e.g. 18,19,20, or last-block")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)


def _step_arg(text: str) -> str:
    return text  # validated by the command (one error line, exit 2), not by argparse


def select_layer(ds, layer: int, step: int | str | None = DEFAULT_STEP, variable: str = "logits"):
    """The seed's single-layer view (head, query_frame, key_frame) and the step it shows, with clear errors.

    ``step`` is ``first``, ``mid``, ``last`` or an index (``attn_harness.core.vocabulary.step_index``).
    """
    layers = [int(v) for v in ds["layer"].values]
    steps = [int(v) for v in ds["step"].values]
    if layer not in layers:
        raise HarnessError(f"layer {layer} is not in this extraction; it has layers {layers}")
    selector = DEFAULT_STEP if step is None else _step(step) if isinstance(step, str) else step
    chosen = step_index(selector, steps, ds.attrs.get("sample_steps"))
    if chosen not in steps:
        named = f" ({selector})" if isinstance(selector, str) else ""
        raise HarnessError(f"step {chosen}{named} is not in this extraction; it has steps {steps}")
    if variable not in ds:
        raise HarnessError(f"variable {variable!r} is not in this extraction; it has {list(ds.data_vars)}")
    return ds[variable].sel(step=chosen, layer=layer), chosen


def cmd_stats(args: argparse.Namespace) -> int:
    from attn_harness.core.metrics import default_query_frames, layer_summary
    from attn_harness.core.store import read_dataset

    query_frames = _query_frames(args.query_frames)
    ds = read_dataset(args.file)
    da, step = select_layer(ds, args.layer, args.step)
    query_frames = default_query_frames(ds) if query_frames == "last-block" else query_frames
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
        formatter_class=_Formatter,
    )
    p.add_argument("file", type=Path, help="a NetCDF extraction")
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--step", type=_step_arg, default=DEFAULT_STEP, help=STEP_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for the figures")
    p.add_argument("--pixel-frames", action="store_true", help="draw in pixel frames (causal-VAE mapping)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from attn_harness.core.store import read_dataset
    from attn_harness.report.figures import plot_layer

    if args.out.exists() and not args.out.is_dir():
        raise HarnessError(f"--out {args.out} is a file; give a directory for the figures")
    ds = read_dataset(args.file)
    _, step = select_layer(ds, args.layer, args.step)
    for path in plot_layer(ds, args.layer, step, args.out, pixel_frames=args.pixel_frames):
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
        formatter_class=_Formatter,
    )
    p.add_argument("a", type=Path, help="first extraction (.nc)")
    p.add_argument("b", type=Path, help="second extraction (.nc)")
    p.add_argument("--out", type=Path, default=Path("reports/compare.html"), help="HTML file to write")
    p.add_argument("--labels", default="A,B", help="two labels, comma-separated, e.g. base,distilled")
    p.add_argument("--layers", default=None, help="layers to compare, e.g. 0-3,5 (default: all shared)")
    p.add_argument("--metric", choices=("logits", "mass"), default="logits", help="variable to compare")
    p.add_argument("--step", type=_step_arg, default=DEFAULT_STEP, help=STEP_HELP + " (of A): the step of the "
                   "ranking, flips and grids (paired by position)")
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
    from attn_harness.core.store import read_dataset
    from attn_harness.report.html import render_compare

    labels = tuple(part.strip() for part in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        raise HarnessError(f"--labels needs two comma-separated names like base,distilled; got {args.labels!r}")
    layers = parse_int_list(args.layers) if args.layers is not None else None
    selector = _step(args.step)
    _refuse_overwrite(args.out, [args.a, args.b])
    a = read_dataset(args.a)
    steps = [int(v) for v in a["step"].values]
    step = step_index(selector, steps, a.attrs.get("sample_steps"))
    out = render_compare(
        a,
        read_dataset(args.b),
        args.out,
        labels=labels,
        layers=layers,
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
        formatter_class=_Formatter,
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
    """Run one command; every user-facing failure is one line on stderr and exit code 2."""
    from attn_harness.core.atomic import describe_os_error

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except HarnessError as err:
        print(f"attn-harness: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `attn-harness stats ... | head`: the reader has all it wants
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"attn-harness: error: {describe_os_error(err, err.filename or 'a file', 'access')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attn-harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
