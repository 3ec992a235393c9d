"""The ``ds.attn`` accessor: the seed notebook's statistics, figures and checks on any extraction.

Registered by ``import attn_harness`` (on xarray, which this module imports on first use of
``ds.attn``). Everything here works on the Dataset of the data contract (docs/design.md, "Data
contract") and stays torch-free, so a notebook that only reads ``.nc`` files never loads torch::

    ds = attn_harness.read_dataset("x.nc")
    ds.attn.stats(layer=3)                          # the seed's statistics table
    ds.attn.plot_heads(layer=3)                     # the seed's figure 1 (one heatmap per head)
    ds.attn.plot_bars(layer=3)                      # the seed's figure 2 (per-head bars)
    ds.attn.check("sink_heads", layer=3, expected=[0, 2])

``step`` is a ``step`` coordinate value, ``"first"`` or ``"last"``; left out, it is the last
captured step (as in ``attn-harness plot`` and the run report).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from attn_harness.core import checks, metrics
from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import hidden_cells

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Step = int | str | None


class AttnAccessor:
    """``ds.attn``: per-head statistics, the seed's table and figures, and property checks."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    # ------------------------------------------------------------------ selection

    def step(self, step: Step = None) -> int:
        """The step coordinate value that ``step`` names (default: the last captured step)."""
        steps = [int(s) for s in self._ds["step"].values]
        if step is None or step == "last":
            return steps[-1]
        if step == "first":
            return steps[0]
        if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and int(step) in steps:
            return int(step)
        raise HarnessError(f"step {step!r} is not in this extraction; use 'first', 'last' or one of {steps}")

    def query_frames(self) -> list[int]:
        """The default query frames of the per-head statistics: the extraction's "last block"."""
        recorded = self._ds.attrs.get("query_frames")
        if isinstance(recorded, (list, tuple)) and recorded:
            return [int(f) for f in recorded]
        return metrics.default_query_frames(self._ds)

    def layer(self, layer: int, step: Step = None, *, metric: str = "logits") -> xr.DataArray:
        """The seed's single-layer view ``(head, query_frame, key_frame)`` at one step.

        Carries the extraction's attrs (mask, block size, strides) so later steps know the geometry.
        """
        view = self._variable(metric).sel(step=self.step(step), layer=require_layer(self._ds, layer))
        return view.transpose("head", "query_frame", "key_frame")

    def _variable(self, metric: str) -> xr.DataArray:
        if metric not in self._ds.data_vars:
            raise HarnessError(f"this extraction has no {metric!r} variable; it has {sorted(self._ds.data_vars)}")
        da = self._ds[metric].assign_attrs({**self._ds.attrs, **self._ds[metric].attrs})  # a copy, not the user's
        if metric == "mass":  # masked mass is 0, not a value to average: hide it like masked logits
            mask, block_size = str(da.attrs.get("mask", "bidirectional")), int(da.attrs.get("block_size", 3) or 3)
            da = da.where(~hidden_cells(da, mask, block_size))
        return da

    # ------------------------------------------------------------------ statistics

    def head_stats(
        self,
        *,
        layer: int | None = None,
        step: Step = "all",
        metric: str = "logits",
        query_frames: Sequence[int] | None = None,
    ) -> xr.Dataset:
        """Per head: ``first``, ``mid``, ``last``, ``sink`` of the query profile and the ``diagonal`` mean.

        Dims ``(step, layer, head)``; ``layer`` or ``step`` pick one (that dim is then dropped).
        The definitions are in docs/design.md, "Statistics"; ``query_frames`` default: the last block.
        """
        da = self._variable(metric)
        if layer is not None:
            da = da.sel(layer=require_layer(self._ds, layer))
        if step != "all":
            da = da.sel(step=self.step(step))
        frames = list(query_frames) if query_frames is not None else self.query_frames()
        stats = metrics.head_stats(da, frames)
        keep = [d for d in ("step", "layer", "head") if d in da.dims]
        stats["diagonal"] = metrics.diagonal_mean(da, keep=keep)
        stats.attrs = {"metric": metric, "query_frames": frames}
        return stats

    def stats(self, layer: int, step: Step = None, *, query_frames: Sequence[int] | None = None) -> LayerStats:
        """The seed's statistics table for one layer at one step (logits), as a notebook-ready object."""
        chosen = self.step(step)
        frames = list(query_frames) if query_frames is not None else self.query_frames()
        summary = metrics.layer_summary(self.layer(layer, chosen), frames)
        return LayerStats(layer=layer, step=chosen, summary=summary)

    # ------------------------------------------------------------------ figures

    def plot_heads(self, layer: int, step: Step = None, *, metric: str = "logits", pixel_frames: bool = False) -> Figure:
        """The seed's figure 1: one query x key heatmap per head, one shared colour scale."""
        from attn_harness.report import figures  # matplotlib loads when the first figure is drawn, not on import

        chosen = self.step(step)
        frames, stride = figures.pixel_frame_count(self._ds) if pixel_frames else (None, 4)
        unit = "pixel" if pixel_frames else "latent"
        return figures.head_grid(
            self.layer(layer, chosen, metric=metric), metric=metric, pixel_frames=frames, temporal_stride=stride,
            title=f"Layer {layer}, step {chosen}: {figures.LABELS[metric]} per head ({unit} frames)",
        )

    def plot_bars(
        self, layer: int, step: Step = None, *, query_frames: Sequence[int] | None = None, pixel_frames: bool = False
    ) -> Figure:
        """The seed's figure 2: per head, the query frames' mean logit to each key frame, sink in the title."""
        from attn_harness.report import figures

        chosen = self.step(step)
        frames = list(query_frames) if query_frames is not None else self.query_frames()
        pixels, stride = figures.pixel_frame_count(self._ds) if pixel_frames else (None, 4)
        return figures.head_bars(
            self.layer(layer, chosen), frames, pixel_frames=pixels, temporal_stride=stride,
            title=f"Layer {layer}, step {chosen}: mean logit of query frames {frames} (latent) per key frame",
        )

    # ------------------------------------------------------------------ checks

    def check(self, name: str, layer: int | None = None, **params: Any) -> CheckReport:
        """Run property ``name`` (see ``attn_harness.PROPERTIES``) on one layer, or on all of them."""
        return CheckReport(layer=layer, result=run_property(self._ds, name, params, layer=layer))


def require_layer(ds: xr.Dataset, layer: Any) -> int:
    """``layer`` as an int when it is one of the extraction's layers, else a ``HarnessError``."""
    layers = [int(v) for v in ds["layer"].values]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        raise HarnessError(f"layer {layer!r} is not in this extraction; it has layers {layers}")
    return int(layer)


def run_property(ds: xr.Dataset, name: str, params: Mapping[str, Any], *, layer: int | None = None) -> checks.CheckResult:
    """``checks.run_check`` with bad names and parameters reported as one ``HarnessError`` line."""
    if name not in checks.PROPERTIES:
        raise HarnessError(f"unknown property {name!r}; known: {', '.join(checks.PROPERTIES)}")
    try:
        checks.normalize_params(name, params)
    except KeyError as err:
        known = sorted({*checks.COMMON_PARAMS, *checks.PROPERTIES[name].params})
        raise HarnessError(f"{name}: unknown parameter {err.args[0]!r}; known: {', '.join(known)}") from None
    except ValueError as err:
        raise HarnessError(f"{name}: {err}") from None
    if layer is not None:
        layer = require_layer(ds, layer)
    return checks.run_check(ds, name, params, layer=layer)


@dataclass(frozen=True)
class LayerStats:
    """The seed's statistics table of one layer and step; prints as text, renders as HTML."""

    layer: int
    step: int
    summary: dict

    def to_dataframe(self):
        """One row per head: first, mid, last, sink (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame(self.summary["heads"]).set_index("head")

    def __str__(self) -> str:
        s = self.summary
        lines = [
            f"Layer {self.layer} statistics (step {self.step})",
            f"Diagonal mean (self-attention): {s['diagonal_mean']:.4f}",
            f"First frame mean (sink): {s['first_frame_mean']:.4f}",
            f"Per-head statistics (query frames {s['query_frames']}):",
        ]
        lines += [
            f"  H{h['head']:2d}: first={h['first']:7.3f}, mid={h['mid']:7.3f}, last={h['last']:7.3f}, sink={h['sink']:+7.3f}"
            for h in s["heads"]
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        from attn_harness.report.figures import stats_table

        return f"<p><b>Layer {self.layer}, step {self.step}</b></p>{stats_table(self.summary)}"


STATUS_COLOURS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}
MAX_ROWS = 20  # violations shown in a notebook table (all are in ``result.violations``)


@dataclass(frozen=True)
class CheckReport:
    """A property check's outcome for a notebook: ``passed``, the message, and an HTML table."""

    layer: int | None
    result: checks.CheckResult

    @property
    def passed(self) -> bool:
        return self.result.passed

    @property
    def status(self) -> str:
        return self.result.status

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "all layers"
        return f"{self.result.status.upper()} ({where}) {self.result.message}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        r = self.result
        esc = html.escape
        where = f"layer {self.layer}" if self.layer is not None else "all layers"
        colour = STATUS_COLOURS.get(r.status, "black")
        parts = [
            '<div class="attn-check">',
            f'<p><b style="color:{colour}">{esc(r.status.upper())}</b> <code>{esc(r.property)}</code> '
            f"on {esc(r.metric)}, {esc(where)}: {esc(r.message.splitlines()[0])}</p>",
            f"<p>expected: {esc(r.expected)}<br>observed: {esc(r.observed)}</p>",
        ]
        if r.violations:
            dims = list(dict.fromkeys(d for v in r.violations for d in v.location))
            header = "".join(f"<th>{esc(d)}</th>" for d in dims) + "<th>observed</th><th>expected</th><th>note</th>"
            rows = "".join(
                "<tr>" + "".join(f"<td>{v.location.get(d, '')}</td>" for d in dims)
                + f"<td>{v.observed:.6g}</td><td>{esc(v.expected)}</td><td>{esc(v.note)}</td></tr>"
                for v in r.violations[:MAX_ROWS]
            )
            more = len(r.violations) - MAX_ROWS
            caption = f"<caption>{len(r.violations)} violations{f', first {MAX_ROWS} shown' if more > 0 else ''}</caption>"
            parts.append(f'<table class="violations">{caption}<thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>')
        parts.append("</div>")
        return "".join(parts)
