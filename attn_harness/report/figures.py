"""The seed notebook's figures, generalised: head grids, per-head bars, statistics, overviews.

Every function takes latent-frame data as stored (docs/design.md, "Data contract") and returns a
``matplotlib.figure.Figure`` built without pyplot, so nothing depends on a display or on
global figure state. Pass ``pixel_frames=F`` to draw the frame axes in pixel frames
(each pixel frame shows its latent frame, ceil(i / stride)); axis labels say which unit.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from attn_harness.core import metrics
from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import expand_to_pixel_frames, num_latent_frames
from attn_harness.core.schema import PROBABILITIES

# The seed's rcParams (editable SVG text), with a smaller screen dpi for reports.
STYLE: dict[str, object] = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["Arial", "DejaVu Sans", "Helvetica"],
    "font.size": 10,
    "axes.labelsize": 9,
    "axes.titlesize": 10,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.1,
}

# Colormaps: logits and differences are signed (diverging, symmetric about 0); mass is a share.
CMAPS: dict[str, str] = {"logits": "RdBu_r", "mass": "viridis", "aligned_mass": "viridis", "difference": "RdBu_r"}
LABELS: dict[str, str] = {
    "logits": "attention logit (block mean)",
    "mass": "attention mass",
    "aligned_mass": "aligned attention mass",
    "difference": "difference",
}
MASKED_COLOR = "#d0d0d0"
HIGHLIGHT_COLOR = "#ff00ff"  # in neither RdBu nor viridis
BAR_COLOR = "#0173b2"
PANEL_INCHES = (2.6, 2.3)


@contextmanager
def style() -> Iterator[None]:
    """Apply :data:`STYLE` while a figure is built or saved."""
    with matplotlib.rc_context(STYLE):
        yield


def grid_shape(num_panels: int) -> tuple[int, int]:
    """Rows x columns close to 4:3 landscape: 12 -> 3x4, 2 -> 1x2, 4 -> 2x2, 40 -> 5x8."""
    if num_panels < 1:
        raise HarnessError(f"need at least one panel to draw; got {num_panels}")
    rows = max(1, math.floor(math.sqrt(num_panels * 3 / 4) + 0.5))
    return rows, math.ceil(num_panels / rows)


def _head_panels(count: int, *, title: str | None, bottom: float, hspace: float) -> tuple[Figure, list[tuple[Axes, bool, bool]]]:
    """``count`` head panels on a ``grid_shape`` grid, unused panels hidden; each panel with whether it is on the
    bottom row and in the left column (where the axis labels go). Fixed margins in inches instead of a layout
    engine: grids are drawn by the hundred. The right margin holds the colour bar (``_finish_head_panels``)."""
    rows, cols = grid_shape(count)
    left, right, top = 0.7, 1.3, 0.8 if title else 0.4
    width, height = PANEL_INCHES[0] * cols + left + right, PANEL_INCHES[1] * rows + bottom + top
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.3, hspace=hspace)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, [(ax, index // cols == rows - 1, index % cols == 0) for index, ax in enumerate(axes[:count])]


def _finish_head_panels(fig: Figure, image: AxesImage, label: str, *, title: str | None, bottom: float) -> None:
    """The colour bar of ``image`` in the right margin of a ``_head_panels`` figure, and its title."""
    width, height = fig.get_size_inches()
    top = 0.8 if title else 0.4
    colorbar_box = (1 - 0.95 / width, bottom / height + 0.1, 0.15 / width, 0.8 - (bottom + top) / height)
    fig.colorbar(image, cax=fig.add_axes(colorbar_box, label="colorbar")).set_label(label)
    if title:
        fig.suptitle(title, fontweight="bold", y=1 - 0.15 / height, va="top")


def frame_ticks(num_frames: int) -> list[int]:
    """At most 8 evenly spaced tick positions at round steps (1, 2, 5, 10, 20, ...), from 0."""
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if num_frames / s <= 8)
    return list(range(0, num_frames, step))


def symmetric_limit(values: np.ndarray) -> float:
    """max |x| over the finite values (1.0 when there are none or all are 0), for a centred scale."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _unit_label(da: xr.DataArray) -> str:
    return "pixel" if da.attrs.get("frame_unit") == "pixel" else "latent"


def _display(da: xr.DataArray, pixel_frames: int | None, temporal_stride: int) -> xr.DataArray:
    """``da`` as drawn: unchanged in latent frames, or expanded to ``pixel_frames`` pixel frames."""
    if pixel_frames is None:
        return da
    return expand_to_pixel_frames(da, pixel_frames, temporal_stride)


def pixel_frame_count(ds: xr.Dataset) -> tuple[int, int]:
    """(pixel frames, temporal stride) of an extraction: F = 1 + (T - 1) * stride."""
    stride = ds.attrs.get("temporal_stride", 4)
    stride = int(stride) if isinstance(stride, (int, np.integer)) else 4
    frames = 1 + (ds.sizes["query_frame"] - 1) * stride
    num_latent_frames(frames, stride)
    return frames, stride


def _span(da: xr.DataArray, dim: str, latent_frame: int) -> tuple[float, float] | None:
    """Cell-edge extent (in index units) of a latent frame along ``dim``, in the drawn unit."""
    source = da[f"latent_{dim}"] if f"latent_{dim}" in da.coords else da[dim]
    positions = np.flatnonzero(source.values == latent_frame)
    if positions.size == 0:
        return None
    return positions.min() - 0.5, positions.max() + 0.5


def _outline(ax, da: xr.DataArray, location: Mapping[str, int]) -> None:
    """Outline the violating cell (or row, column, or whole panel) of one head panel."""
    n_query, n_key = da.sizes["query_frame"], da.sizes["key_frame"]
    rows = _span(da, "query_frame", location["query_frame"]) if "query_frame" in location else (-0.5, n_query - 0.5)
    cols = _span(da, "key_frame", location["key_frame"]) if "key_frame" in location else (-0.5, n_key - 0.5)
    if rows is None or cols is None:
        return
    ax.add_patch(
        Rectangle(
            (cols[0], rows[0]), cols[1] - cols[0], rows[1] - rows[0],
            fill=False, edgecolor=HIGHLIGHT_COLOR, linewidth=1.8, zorder=3,
        )
    )


def _frame_axes(ax, da: xr.DataArray, *, xlabel: bool, ylabel: bool) -> None:
    unit = _unit_label(da)
    for dim, set_ticks, set_labels in (
        ("key_frame", ax.set_xticks, ax.set_xticklabels),
        ("query_frame", ax.set_yticks, ax.set_yticklabels),
    ):
        ticks = frame_ticks(da.sizes[dim])
        set_ticks(ticks)
        set_labels([str(int(da[dim].values[t])) for t in ticks])
    if xlabel:
        ax.set_xlabel(f"key frame ({unit})")
    if ylabel:
        ax.set_ylabel(f"query frame ({unit})")


def head_grid(
    da: xr.DataArray,
    *,
    metric: str = "logits",
    title: str | None = None,
    highlight: Sequence[Mapping[str, int]] | None = None,
    pixel_frames: int | None = None,
    temporal_stride: int = 4,
    limit: float | None = None,
) -> Figure:
    """The seed's figure 1: one query x key heatmap per head (origin lower), one shared colorbar.

    ``metric`` picks the colour scale: ``logits`` and ``difference`` are diverging and
    symmetric about 0, ``mass`` is sequential from 0; ``limit`` fixes max |x| (or the mass
    maximum) so several grids share one scale. ``highlight`` lists violation locations in latent frames (keys
    ``head``, ``query_frame``, ``key_frame``; a missing frame key outlines the whole row,
    column or panel); their heads' titles turn red. Masked (NaN) cells are grey.
    """
    if metric not in CMAPS:
        raise HarnessError(f"metric must be one of {', '.join(CMAPS)}; got {metric!r}")
    missing = {"head", "query_frame", "key_frame"} - set(da.dims)
    if missing or da.ndim != 3:
        raise HarnessError(f"head_grid needs dims (head, query_frame, key_frame); got {da.dims}")
    shown = _display(da.transpose("head", "query_frame", "key_frame"), pixel_frames, temporal_stride)
    values = shown.values.astype(np.float64)
    if metric in PROBABILITIES:
        vmin = 0.0
        vmax = limit if limit is not None else (float(np.nanmax(values)) if np.isfinite(values).any() else 1.0)
    else:
        vmax = limit if limit is not None else symmetric_limit(values)
        vmin = -vmax
    cmap = matplotlib.colormaps[CMAPS[metric]].with_extremes(bad=MASKED_COLOR)
    heads = [int(h) for h in shown["head"].values]
    flagged = {int(loc["head"]) for loc in highlight or () if "head" in loc}
    with style():
        fig, panels = _head_panels(len(heads), title=title, bottom=0.6, hspace=0.45)
        for index, (ax, bottom_row, left_column) in enumerate(panels):
            head = heads[index]
            image = ax.imshow(
                values[index], cmap=cmap, origin="lower", aspect="auto", interpolation="nearest",
                vmin=vmin, vmax=vmax,
            )
            ax.set_title(f"Head {head}", fontweight="bold", color="#c00000" if head in flagged else "black")
            _frame_axes(ax, shown, xlabel=bottom_row, ylabel=left_column)
            for location in highlight or ():
                if int(location.get("head", head)) == head:
                    _outline(ax, shown, location)
        _finish_head_panels(fig, image, LABELS[metric], title=title, bottom=0.6)
    return fig


def head_bars(
    da: xr.DataArray,
    query_frames: Sequence[int],
    *,
    title: str | None = None,
    pixel_frames: int | None = None,
    temporal_stride: int = 4,
    metric: str = "logits",
) -> Figure:
    """The seed's figure 2: per head, the query frames' mean attention to each key frame.

    The sink score in each title comes from :func:`attn_harness.core.metrics.head_stats` on the latent
    data (first - mid over the valid key frames), whatever unit the bars are drawn in. The
    default title names the layer and step (from ``da``'s scalar coords) and ``metric``.
    """
    da = da.transpose("head", "query_frame", "key_frame")
    stats = metrics.head_stats(da, query_frames)
    profile = metrics.query_profile(da, query_frames)
    shown = _display(profile, pixel_frames, temporal_stride)
    keys = np.arange(shown.sizes["key_frame"])
    heads = [int(h) for h in shown["head"].values]
    rows, cols = grid_shape(len(heads))
    with style():
        fig = Figure(figsize=(PANEL_INCHES[0] * cols, 2.0 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for index, ax in enumerate(axes.flat):
            if index >= len(heads):
                ax.set_axis_off()
                continue
            head = heads[index]
            row = shown.sel(head=head).values
            ax.bar(keys, np.nan_to_num(row), width=0.8, color=BAR_COLOR, alpha=0.85)
            ax.plot(keys, row, "o-", color="black", linewidth=0.8, markersize=1.5)
            ax.set_title(f"H{head} (sink={float(stats['sink'].sel(head=head)):+.2f})", fontweight="bold")
            ax.set_xticks(frame_ticks(len(keys)))
            ax.grid(True, alpha=0.3)
            if index // cols == rows - 1:
                ax.set_xlabel(f"key frame ({_unit_label(shown)})")
            if index % cols == 0:
                ax.set_ylabel(f"mean {LABELS.get(metric, metric)}")
        where = ", ".join(f"{dim} {int(da[dim])}" for dim in ("layer", "step") if dim in da.coords and da[dim].ndim == 0)
        default = f"{where.capitalize()}: {metric}, " if where else f"{metric}: "
        default += f"mean over query frames {list(query_frames)} (latent) per key frame"
        fig.suptitle(title or default, fontweight="bold")
    return fig


def stats_table(summary: Mapping) -> str:
    """The seed's statistics table as an HTML fragment, from :func:`attn_harness.core.metrics.layer_summary`."""
    def cell(value: float) -> str:
        return f"{value:+.3f}" if math.isfinite(value) else "n/a"

    rows = "".join(
        f"<tr><td>H{h['head']}</td><td>{cell(h['first'])}</td><td>{cell(h['mid'])}</td>"
        f"<td>{cell(h['last'])}</td><td>{cell(h['sink'])}</td></tr>"
        for h in summary["heads"]
    )
    query = html.escape(", ".join(str(f) for f in summary["query_frames"]))
    return (
        '<table class="stats">'
        f"<caption>diagonal mean {cell(summary['diagonal_mean'])}; first-frame mean "
        f"{cell(summary['first_frame_mean'])}; per head over query frames {query}</caption>"
        "<thead><tr><th>head</th><th>first</th><th>mid</th><th>last</th><th>sink</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _require(ds: xr.Dataset, metric: str) -> xr.DataArray:
    if metric not in ds:
        raise HarnessError(f"this extraction has no {metric!r} variable (has {sorted(ds.data_vars)}); use --metric logits")
    return ds[metric]


def _select(ds: xr.Dataset, dim: str, value: int) -> None:
    values = [int(v) for v in ds[dim].values]
    if value not in values:
        raise HarnessError(f"{dim} {value} is not in this extraction; available {dim}s: {values}")


def evolution(ds: xr.Dataset, layer: int, *, metric: str = "logits", query_frames: Sequence[int] | None = None) -> Figure:
    """Sink score and diagonal mean of every head of one layer against the denoising step."""
    _select(ds, "layer", layer)
    da = _require(ds, metric).sel(layer=layer)
    query_frames = list(query_frames) if query_frames is not None else metrics.default_query_frames(ds)
    sink = metrics.head_stats(da, query_frames)["sink"]
    diag = metrics.diagonal_mean(da, keep=("step", "head"))
    steps = da["step"].values
    with style():
        fig = Figure(figsize=(9.0, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
        colors = matplotlib.colormaps["tab10" if da.sizes["head"] <= 10 else "tab20"]
        for head in da["head"].values:
            color = colors(int(head) % colors.N)
            axes[0].plot(steps, sink.sel(head=head).values, "o-", color=color, label=f"H{int(head)}", markersize=3)
            axes[1].plot(steps, diag.sel(head=head).values, "o-", color=color, markersize=3)
        for ax, name in zip(axes, ("sink score (first - mid)", "diagonal mean")):
            ax.set_xlabel("denoising step")
            ax.set_ylabel(f"{name}, {metric}")
            ax.set_xticks(steps)
            ax.grid(True, alpha=0.3)
        axes[0].axhline(0.0, color="black", linewidth=0.6)
        fig.legend(loc="outside right upper", ncols=max(1, math.ceil(da.sizes["head"] / 16)))
        fig.suptitle(f"Layer {layer}: per-head statistics across steps (query frames {query_frames})", fontweight="bold")
    return fig


def layer_head_overview(
    ds: xr.Dataset, step: int, *, metric: str = "logits", query_frames: Sequence[int] | None = None
) -> Figure:
    """Layer x head heatmaps of the sink score and the diagonal mean at one step: where to look first."""
    _select(ds, "step", step)
    da = _require(ds, metric).sel(step=step)
    query_frames = list(query_frames) if query_frames is not None else metrics.default_query_frames(ds)
    sink = metrics.head_stats(da, query_frames)["sink"].transpose("layer", "head")
    diag = metrics.diagonal_mean(da, keep=("layer", "head")).transpose("layer", "head")
    layers, heads = da.sizes["layer"], da.sizes["head"]
    annotate = layers * heads <= 96
    panels = (
        ("sink score (first - mid)", sink, "logits"),
        ("diagonal mean", diag, "mass" if metric == "mass" else "logits"),
    )
    with style():
        fig = Figure(figsize=(2 * (0.45 * heads + 1.8), 0.28 * layers + 1.6), layout="constrained")
        axes = fig.subplots(1, 2, squeeze=False)[0]
        for ax, (name, values, scale) in zip(axes, panels):
            grid = values.values.astype(np.float64)
            if scale == "mass":
                image = ax.imshow(grid, cmap=CMAPS["mass"], origin="lower", aspect="auto", vmin=0.0)
            else:
                limit = symmetric_limit(grid)
                image = ax.imshow(grid, cmap=CMAPS["logits"], origin="lower", aspect="auto", vmin=-limit, vmax=limit)
            if annotate:
                for (row, col), value in np.ndenumerate(grid):
                    dark = image.norm(value) > 0.8 or (scale == "logits" and image.norm(value) < 0.2)
                    ax.text(col, row, f"{value:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
            ax.set_xticks(range(heads), [str(int(h)) for h in values["head"].values])
            ax.set_yticks(frame_ticks(layers), [str(int(values["layer"].values[i])) for i in frame_ticks(layers)])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{name}, {metric}")
            fig.colorbar(image, ax=ax, shrink=0.9)
        fig.suptitle(f"Step {step}: layer x head overview (query frames {query_frames}, latent)", fontweight="bold")
    return fig


def render(fig: Figure, fmt: str, dpi: int = 100, *, tight: bool = True) -> bytes:
    """The figure encoded as ``svg`` (editable text) or ``png`` bytes.

    ``tight=False`` keeps the figure's own margins and skips the extra layout pass that a
    tight bounding box costs (half the time of a head grid, which sets fixed margins).
    """
    buffer = io.BytesIO()
    with style(), matplotlib.rc_context({} if tight else {"savefig.bbox": "standard"}):
        fig.savefig(buffer, format=fmt, dpi=dpi)
    return buffer.getvalue()


def save(fig: Figure, stem: Path | str, dpi: int = 150) -> list[Path]:
    """Write ``stem.svg`` and ``stem.png`` atomically; return both paths."""
    stem = Path(stem)
    paths = []
    for fmt in ("svg", "png"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        write_atomic(path, render(fig, fmt, dpi))
        paths.append(path)
    return paths


def png_data_uri(fig: Figure, dpi: int = 80, *, tight: bool = True) -> str:
    """A ``data:image/png;base64`` URI of the figure as a 256-colour PNG (about 3x smaller).

    A colormap has 256 entries, so the palette keeps heatmaps exact up to antialiased edges.
    """
    with Image.open(io.BytesIO(render(fig, "png", dpi, tight=tight))) as image:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(256).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def inline_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog or doctype) to paste into HTML."""
    text = render(fig, "svg").decode("utf-8")
    return text[text.index("<svg"):]


def plot_layer(
    ds: xr.Dataset, layer: int, step: int | None, out_dir: Path | str, *, pixel_frames: bool = False
) -> list[Path]:
    """Every figure for one layer (step default: the last captured one) into ``out_dir``.

    Writes the head grid per metric, the per-head bars, the statistics table (HTML), the
    layer's evolution across steps and the layer x head overview at that step.
    """
    _select(ds, "layer", layer)
    step = int(ds["step"].values[-1]) if step is None else step
    _select(ds, "step", step)
    out = Path(out_dir)
    frames, stride = pixel_frame_count(ds) if pixel_frames else (None, 4)
    query_frames = metrics.default_query_frames(ds)
    prefix = f"layer{layer}_step{step}"
    unit = "pixel frames" if pixel_frames else "latent frames"
    written: list[Path] = []
    for metric in (m for m in ("logits", "mass") if m in ds):
        view = ds[metric].sel(step=step, layer=layer)
        fig = head_grid(
            view, metric=metric, pixel_frames=frames, temporal_stride=stride,
            title=f"Layer {layer}, step {step}: {LABELS[metric]} per head ({unit})",
        )
        written += save(fig, out / f"{prefix}_heads_{metric}")
    logits = ds["logits"].sel(step=step, layer=layer)
    written += save(
        head_bars(logits, query_frames, pixel_frames=frames, temporal_stride=stride), out / f"{prefix}_bars"
    )
    table = stats_table(metrics.layer_summary(logits, query_frames))
    page = f"<!doctype html><meta charset='utf-8'><title>Layer {layer} step {step} statistics</title>{table}\n"
    stats_path = out / f"{prefix}_stats.html"
    write_atomic(stats_path, page.encode("utf-8"))
    written.append(stats_path)
    written += save(evolution(ds, layer), out / f"layer{layer}_evolution")
    written += save(layer_head_overview(ds, step), out / f"step{step}_overview")
    return written


def difference_overview(
    score: xr.DataArray, *, labels: tuple[str, str] = ("A", "B"), b_steps: Sequence[int] | None = None
) -> Figure:
    """Mean |B - A| per layer x head, one panel per paired step, on one shared sequential scale.

    ``score`` has dims (step, layer, head) with A's steps; ``b_steps`` are B's paired steps.
    """
    score = score.transpose("step", "layer", "head")
    steps = [int(s) for s in score["step"].values]
    layers, heads = score.sizes["layer"], score.sizes["head"]
    values = score.values.astype(np.float64)
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() and np.nanmax(values) > 0 else 1.0
    with style():
        fig = Figure(figsize=(len(steps) * (0.4 * heads + 1.2) + 1.0, 0.26 * layers + 1.6), layout="constrained")
        axes = fig.subplots(1, len(steps), squeeze=False)[0]
        for ax, step, b_step, grid in zip(axes, steps, b_steps or steps, values):
            image = ax.imshow(grid, cmap="magma", origin="lower", aspect="auto", vmin=0.0, vmax=vmax)
            ax.set_xticks(frame_ticks(heads), [str(int(score["head"].values[i])) for i in frame_ticks(heads)])
            ax.set_yticks(frame_ticks(layers), [str(int(score["layer"].values[i])) for i in frame_ticks(layers)])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"step {step} ({labels[0]}) / {b_step} ({labels[1]})")
        fig.colorbar(image, ax=axes, shrink=0.9).set_label(f"mean |{labels[1]} - {labels[0]}|")
        fig.suptitle(f"Where {labels[1]} differs from {labels[0]}: mean |difference| per layer and head", fontweight="bold")
    return fig


def text_mass_grid(da: xr.DataArray, *, title: str | None = None, token_labels: Sequence[str] | None = None) -> Figure:
    """Cross-attention: one query frame x text token heatmap of ``text_mass`` per head, shared scale from 0.

    ``da`` has dims (head, query_frame, text_token) (one step and layer). Padding tokens (a
    ``text_content`` coordinate of 0) are marked by a grey band under the x axis; ``token_labels``
    (the token strings, where a tokenizer is known) replace the token indices.
    """
    missing = {"head", "query_frame", "text_token"} - set(da.dims)
    if missing or da.ndim != 3:
        raise HarnessError(f"text_mass_grid needs dims (head, query_frame, text_token); got {da.dims}")
    shown = da.transpose("head", "query_frame", "text_token")
    values = shown.values.astype(np.float64)
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    heads = [int(h) for h in shown["head"].values]
    tokens = shown.sizes["text_token"]
    padding = (shown["text_content"].values == 0) if "text_content" in shown.coords else np.zeros(tokens, dtype=bool)
    with style():
        fig, panels = _head_panels(len(heads), title=title, bottom=0.7, hspace=0.5)
        for index, (ax, bottom_row, left_column) in enumerate(panels):
            image = ax.imshow(values[index], cmap=CMAPS["mass"], origin="lower", aspect="auto",
                              interpolation="nearest", vmin=0.0, vmax=vmax)
            ax.set_title(f"Head {heads[index]}", fontweight="bold")
            for token in np.flatnonzero(padding):
                ax.add_patch(Rectangle((token - 0.5, -0.5), 1, 0.25, color=MASKED_COLOR, clip_on=False))
            if bottom_row:
                ax.set_xlabel("text token")
                if token_labels is not None:
                    ax.set_xticks(range(tokens), list(token_labels), rotation=90, fontsize=6)
            if left_column:
                ax.set_ylabel("query frame")
        _finish_head_panels(fig, image, "text attention mass", title=title, bottom=0.7)
    return fig


HEAD_TYPE_COLORS: dict[str, str] = {"sink": "#d55e00", "spatial": "#0173b2", "temporal": "#029e73", "mixed": "#bbbbbb"}


def head_type_map(ds: xr.Dataset, step: int, thresholds: Mapping[str, float] | None = None) -> Figure:
    """Layer x head map of head types (sink, spatial, temporal, mixed) at one step, shares annotated."""
    _select(ds, "step", step)
    mass, aligned = _require(ds, "mass").sel(step=step), _require(ds, "aligned_mass").sel(step=step)
    kinds = metrics.head_types(mass, aligned, dict(thresholds or {})).transpose("layer", "head")
    shares = metrics.head_shares(mass, aligned).transpose("layer", "head")
    codes = np.vectorize(metrics.HEAD_TYPES.index)(kinds.values)
    layers, heads = kinds.sizes["layer"], kinds.sizes["head"]
    cmap = matplotlib.colors.ListedColormap([HEAD_TYPE_COLORS[t] for t in metrics.HEAD_TYPES])
    with style():
        fig = Figure(figsize=(0.55 * heads + 2.6, 0.32 * layers + 1.7), layout="constrained")
        ax = fig.subplots()
        ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(metrics.HEAD_TYPES) - 0.5, origin="lower", aspect="auto")
        if layers * heads <= 96:
            for (row, col), kind in np.ndenumerate(kinds.values):
                share = {"sink": "first", "spatial": "own", "temporal": "aligned"}.get(kind)
                text = f"{kind[:4]}\n{float(shares[share].values[row, col]):.2f}" if share else "mix"
                ax.text(col, row, text, ha="center", va="center", fontsize=6)
        ax.set_xticks(range(heads), [str(int(h)) for h in kinds["head"].values])
        ax.set_yticks(frame_ticks(layers), [str(int(kinds["layer"].values[i])) for i in frame_ticks(layers)])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        handles = [Rectangle((0, 0), 1, 1, color=HEAD_TYPE_COLORS[t]) for t in metrics.HEAD_TYPES]
        fig.legend(handles, metrics.HEAD_TYPES, loc="outside right upper")
        fig.suptitle(f"Step {step}: head types from mass and aligned_mass", fontweight="bold")
    return fig


def trend(history: xr.Dataset, layer: int, *, step: int | None = None, query_frames: Sequence[int] | None = None) -> Figure:
    """Sink score of every head of one layer against the training step of each checkpoint."""
    if "checkpoint" not in history.dims:
        raise HarnessError(f"a trend needs a training history (dim 'checkpoint'); got dims {dict(history.sizes)}")
    _select(history, "layer", layer)
    step = int(history["step"].values[-1]) if step is None else step
    _select(history, "step", step)
    query_frames = list(query_frames) if query_frames is not None else metrics.default_query_frames(history)
    sink = metrics.sink_trend(history["logits"].sel(layer=layer, step=step), query_frames)
    train_steps = history["train_step"].values
    with style():
        fig = Figure(figsize=(6.4, 3.4), layout="constrained")
        ax = fig.subplots()
        colors = matplotlib.colormaps["tab10" if history.sizes["head"] <= 10 else "tab20"]
        for head in sink["head"].values:
            ax.plot(train_steps, sink.sel(head=head).values, "o-", color=colors(int(head) % colors.N), label=f"H{int(head)}",
                    markersize=3)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("training step")
        ax.set_ylabel("sink score (first - mid), logits")
        ax.grid(True, alpha=0.3)
        fig.legend(loc="outside right upper", ncols=max(1, math.ceil(history.sizes["head"] / 16)))
        fig.suptitle(f"Layer {layer}, denoising step {step}: sink score over training (query frames {query_frames})",
                     fontweight="bold")
    return fig


def sample_distribution(ds: xr.Dataset, step: int, *, query_frames: Sequence[int] | None = None) -> Figure:
    """Per layer, each head's sink score across the samples of a population (box and points)."""
    if "sample" not in ds.dims:
        raise HarnessError("sample_distribution needs a population extraction (dim 'sample')")
    _select(ds, "step", step)
    query_frames = list(query_frames) if query_frames is not None else metrics.default_query_frames(ds)
    sink = metrics.head_stats(ds["logits"].sel(step=step), query_frames)["sink"].transpose("layer", "head", "sample")
    layers = [int(v) for v in sink["layer"].values]
    rows, cols = grid_shape(len(layers))
    heads = [int(h) for h in sink["head"].values]
    with style():
        fig = Figure(figsize=(cols * max(2.6, 0.35 * len(heads) + 1.0), rows * 2.2 + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, layer in zip(axes, layers):
            values = sink.sel(layer=layer).values
            ax.boxplot(values.T, positions=range(len(heads)), widths=0.6, showfliers=False)
            for position, row in enumerate(values):
                ax.plot(np.full(row.shape, position), row, ".", color=BAR_COLOR, alpha=0.5, markersize=3)
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_xticks(range(len(heads)), [str(h) for h in heads])
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("head")
            ax.set_ylabel("sink score, logits")
        for ax in axes[len(layers):]:
            ax.set_visible(False)
        fig.suptitle(f"Step {step}: sink score per head over {ds.sizes['sample']} samples (query frames {query_frames})",
                     fontweight="bold")
    return fig
