"""The report across a sweep's checkpoints: how attention moved from checkpoint to checkpoint.

One self-contained HTML page (inline SVG, no network): the checkpoints ranked by how far they
moved from the first (mean |X_c - X_0| over every cell, prompt and seed), per-head trends of
the sink score and the diagonal mass across checkpoints, one panel pair per layer, and the
layer x head overview of each checkpoint. Statistics of one checkpoint are means over the
sweep's prompts and seeds of the per-sample statistic, at one denoising step. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from attn_harness.core import metrics
from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.sweep_dataset import SWEEP_DIMS
from attn_harness.report import figures
from attn_harness.report.html import _environment

SAMPLE_DIMS: tuple[str, ...] = ("prompt", "seed")


def pick_step(ds: xr.Dataset, step: int | str) -> int:
    """A captured step: ``first``, ``mid``, ``last`` or its index."""
    steps = [int(s) for s in ds["step"].values]
    named = {"first": steps[0], "mid": steps[(len(steps) - 1) // 2], "last": steps[-1]}
    if step in named:
        return named[step]
    if step not in steps:
        raise HarnessError(f"step {step!r} is not captured in this sweep; it has steps {steps} (or first, mid, last)")
    return int(step)


def checkpoint_distance(ds: xr.Dataset, metric: str = "logits") -> xr.DataArray:
    """mean |X_c - X_0| per checkpoint over prompts, seeds, steps, layers, heads and frames (masked cells skipped)."""
    da = _variable(ds, metric)
    moved = abs(da - da.isel(checkpoint=0))
    return moved.mean([d for d in moved.dims if d != "checkpoint"], skipna=True)


def layer_distance(ds: xr.Dataset, metric: str = "logits") -> xr.DataArray:
    """mean |X_c - X_0| per checkpoint and layer."""
    da = _variable(ds, metric)
    moved = abs(da - da.isel(checkpoint=0))
    return moved.mean([d for d in moved.dims if d not in ("checkpoint", "layer")], skipna=True)


def head_trends(ds: xr.Dataset, step: int) -> xr.Dataset:
    """Per checkpoint, layer and head at ``step``: the sink score (first - mid of the logits' query
    profile) and the diagonal mass (mean probability a frame keeps on itself; the logits'
    diagonal mean when the sweep has no mass), each a mean over prompts and seeds."""
    query_frames = metrics.default_query_frames(ds)
    logits = ds["logits"].sel(step=step)
    sink = metrics.head_stats(logits, query_frames)["sink"].mean(list(SAMPLE_DIMS))
    diag_metric = "mass" if "mass" in ds else "logits"
    diagonal = metrics.diagonal_mean(ds[diag_metric].sel(step=step), keep=("checkpoint", "layer", "head"))
    out = xr.Dataset({"sink": sink.transpose("checkpoint", "layer", "head"),
                      "diagonal": diagonal.transpose("checkpoint", "layer", "head")})
    out["diagonal"].attrs["metric"] = diag_metric
    return out


def ranking(ds: xr.Dataset, metric: str = "logits") -> list[dict]:
    """Checkpoints by distance from the first, largest first (ties: sweep order)."""
    distance = checkpoint_distance(ds, metric)
    order = np.argsort(-distance.values, kind="stable")
    return [_checkpoint_row(ds, int(i), float(distance.values[i]), rank + 1) for rank, i in enumerate(order)]


def _checkpoint_row(ds: xr.Dataset, index: int, distance: float, rank: int) -> dict:
    cell = ds.isel(checkpoint=index)
    step = float(cell["training_step"])
    return {
        "index": index,
        "rank": rank,
        "source": str(cell["checkpoint_source"].values),
        "model_id": str(cell["model_id"].values) if "model_id" in ds.coords else "",
        "fingerprint": str(cell["checkpoint_fingerprint"].values)[:12] if "checkpoint_fingerprint" in ds.coords else "",
        "training_step": "" if np.isnan(step) else int(step),
        "distance": distance,
    }


def _variable(ds: xr.Dataset, metric: str) -> xr.DataArray:
    if metric not in ds:
        raise HarnessError(f"this sweep has no {metric!r} variable (has {sorted(ds.data_vars)}); use logits")
    return ds[metric]


def _axis(ds: xr.Dataset) -> tuple[np.ndarray, str, list[str]]:
    """x positions of the checkpoints: training steps when every one is known, else their index."""
    steps = ds["training_step"].values
    if np.isfinite(steps).all() and len(set(steps.tolist())) == len(steps):
        return steps, "training step", [str(int(s)) for s in steps]
    names = [f"{int(i)}: {Path(str(v)).name}" for i, v in zip(ds["checkpoint"].values, ds["checkpoint_source"].values)]
    return ds["checkpoint"].values, "checkpoint (sweep order)", names


def trend_figure(trends: xr.Dataset, layer: int, ds: xr.Dataset) -> Figure:
    """Sink score and diagonal mass of every head of ``layer`` against the checkpoints."""
    x, xlabel, labels = _axis(ds)
    layer_trends = trends.sel(layer=layer)
    diag_name = "diagonal mass" if trends["diagonal"].attrs.get("metric") == "mass" else "diagonal mean (logits)"
    with figures.style():
        fig = Figure(figsize=(9.0, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
        heads = layer_trends["head"].values
        colors = matplotlib.colormaps["tab10" if len(heads) <= 10 else "tab20"]
        for head in heads:
            color = colors(int(head) % colors.N)
            axes[0].plot(x, layer_trends["sink"].sel(head=head).values, "o-", color=color, label=f"H{int(head)}", markersize=3)
            axes[1].plot(x, layer_trends["diagonal"].sel(head=head).values, "o-", color=color, markersize=3)
        for ax, name in zip(axes, ("sink score (first - mid), logits", diag_name)):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.set_xticks(x, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
            ax.grid(True, alpha=0.3)
        axes[0].axhline(0.0, color="black", linewidth=0.6)
        fig.legend(loc="outside right upper", ncols=max(1, int(np.ceil(len(heads) / 16))))
        fig.suptitle(f"Layer {layer}: per-head statistics across checkpoints", fontweight="bold")
    return fig


def checkpoint_view(ds: xr.Dataset, index: int) -> xr.Dataset:
    """One checkpoint as an extraction-shaped Dataset: the mean over prompts and seeds."""
    view = ds.isel(checkpoint=index).mean(list(SAMPLE_DIMS), keep_attrs=True)
    return view.drop_vars([name for name in view.coords if name not in view.dims and name != "timestep"])


def render_sweep_report(
    ds: xr.Dataset, out: str | os.PathLike, *, metric: str = "logits", step: int | str = "last", source: str = ""
) -> Path:
    """Write the report across ``ds``'s checkpoints to ``out``; return its path."""
    missing = [d for d in SWEEP_DIMS if d not in ds.dims]
    if missing:
        raise HarnessError(f"not a sweep dataset: no {missing} dims; write one with `attn-harness sweep`")
    chosen = pick_step(ds, step)
    trends = head_trends(ds, chosen)
    per_layer = layer_distance(ds, metric)
    rows = ranking(ds, metric)
    layers = [int(layer) for layer in ds["layer"].values]
    overviews = [
        {**row, "svg": figures.inline_svg(figures.layer_head_overview(checkpoint_view(ds, row["index"]), chosen, metric=metric))}
        for row in sorted(rows, key=lambda r: r["index"])
    ]
    page = _environment().get_template("sweep.html.j2").render(
        source=source,
        metric=metric,
        step=chosen,
        sizes={d: ds.sizes[d] for d in SWEEP_DIMS},
        prompts=[str(p) for p in ds["prompt_text"].values],
        seeds=[int(s) for s in ds["seed"].values],
        query_frames=metrics.default_query_frames(ds),
        attrs={k: ds.attrs.get(k, "") for k in ("mask", "dtype", "sample_steps", "guidance", "num_frames", "height", "width")},
        ranking=rows,
        layers=layers,
        layer_distance=[[float(per_layer.sel(checkpoint=r["index"], layer=layer)) for layer in layers] for r in rows],
        trends=[{"layer": layer, "svg": figures.inline_svg(trend_figure(trends, layer, ds))} for layer in layers],
        overviews=overviews,
    )
    return write_atomic(Path(out), page.encode("utf-8"))
