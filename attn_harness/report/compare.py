"""Checkpoint comparison: align two extractions and compute where and how their attention differs.

Steps are paired by position (first with first, last with last), since two checkpoints
are usually sampled with the same capture steps but possibly different step counts
(a 50-step base model against a 4-step distilled one); ``steps=(a_step, b_step)`` pairs one
chosen step of each instead (a 3-step extraction against a 1-step legacy import). Layers
are the shared ones, or a chosen subset of them. Every other dim must match; a mismatch is
a ``HarnessError`` naming the dim and both sizes.

Flips (a head whose sink sign, sink-head membership or diagonal dominance changed) count
only when both values lie at least ``margin`` x scale away from the boundary: the scale is
the sink threshold for the sink sign (boundary 0) and membership (boundary the threshold),
and one half for diagonal dominance (boundary a 50% share of query rows). With the default
10% margin, +0.032 -> -0.040 logits is noise, not a flip; at 21 query frames 10/21 and 11/21
of the rows lie within 5 points of 50%, so a dominance flip needs 9/21 against 12/21 or more.
Changes within the margin are listed, not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import xarray as xr

from attn_harness.core import metrics
from attn_harness.core.errors import HarnessError
from attn_harness.report.settings import DIAGONAL_DOMINANCE_SHARE, FLIP_MARGIN, SINK_HEAD_THRESHOLD

STEP_POSITIONS = ("first", "mid", "last")
TOP_DIFFERENCES = 10


@dataclass(frozen=True)
class Aligned:
    """The two checkpoints' ``metric`` arrays on shared coords (B's steps relabelled as A's)."""

    a: xr.DataArray
    b: xr.DataArray
    b_steps: list[int]
    metric: str
    labels: tuple[str, str]
    query_frames: list[int]


def _size_error(dim: str, sizes: tuple[int, int], labels: tuple[str, str], hint: str) -> HarnessError:
    return HarnessError(
        f"cannot compare: {dim} differs, A ({labels[0]}) has {sizes[0]} and B ({labels[1]}) has {sizes[1]}; {hint}"
    )


def align(
    a: xr.Dataset,
    b: xr.Dataset,
    *,
    labels: tuple[str, str] = ("A", "B"),
    layers: Sequence[int] | None = None,
    metric: str = "logits",
    steps: tuple[int | str, int | str] | None = None,
) -> Aligned:
    """Check the two extractions share geometry and pair their steps (by position, or the two
    ``steps`` given as first/mid/last or a captured step) and layers."""
    for name, ds, label in (("A", a, labels[0]), ("B", b, labels[1])):
        if metric not in ds:
            raise HarnessError(
                f"cannot compare {metric}: {name} ({label}) has no {metric!r} variable "
                f"(has {sorted(ds.data_vars)}); use --metric logits"
            )
    hints = {
        "query_frame": "extract both with the same num_frames",
        "key_frame": "extract both with the same num_frames",
        "head": "the checkpoints must have the same number of attention heads",
        "step": "extract both with the same capture_steps (steps are paired by position)",
    }
    if steps is not None:
        a = a.sel(step=[resolve_step(a["step"].values, steps[0], f"A ({labels[0]})")])
        b = b.sel(step=[resolve_step(b["step"].values, steps[1], f"B ({labels[1]})")])
    for dim, hint in hints.items():
        if a.sizes[dim] != b.sizes[dim]:
            raise _size_error(dim, (a.sizes[dim], b.sizes[dim]), labels, hint)
    shared = [int(layer) for layer in a["layer"].values if layer in set(b["layer"].values.tolist())]
    if layers is None:
        if not shared:
            raise HarnessError(
                f"cannot compare: no shared layers; A ({labels[0]}) has layers {a['layer'].values.tolist()}, "
                f"B ({labels[1]}) has {b['layer'].values.tolist()}"
            )
        layers = shared
    missing = [int(layer) for layer in layers if layer not in shared]
    if missing:
        raise HarnessError(
            f"cannot compare layers {missing}: not in both extractions; layers in both: {shared}"
        )
    a_da = a[metric].sel(layer=list(layers))
    b_da = b[metric].sel(layer=list(layers))
    b_steps = [int(s) for s in b_da["step"].values]
    b_da = b_da.assign_coords(step=a_da["step"].values, timestep=("step", b_da["timestep"].values))
    a_da = a_da.drop_vars("timestep", errors="ignore")
    b_da = b_da.drop_vars("timestep")
    return Aligned(a_da, b_da, b_steps, metric, labels, metrics.default_query_frames(a))


def resolve_step(captured: Sequence[int], step: int | str, whose: str = "A") -> int:
    """The captured step meant by ``first``/``mid``/``last`` or a captured step number."""
    steps = [int(s) for s in captured]
    if step in STEP_POSITIONS:
        return steps[{"first": 0, "mid": (len(steps) - 1) // 2, "last": len(steps) - 1}[step]]
    if step not in steps:
        raise HarnessError(f"step {step!r} is not one of {whose}'s captured steps {steps} (or first, mid, last)")
    return int(step)


def pick_step(aligned: Aligned, step: int | str = "last") -> int:
    """A's step coordinate for ``first``/``mid``/``last`` or an explicit A step index."""
    return resolve_step(aligned.a["step"].values, step)


def difference(aligned: Aligned) -> xr.DataArray:
    """B - A cell by cell (NaN where either is masked)."""
    return aligned.b - aligned.a


def mean_abs_difference(aligned: Aligned) -> xr.DataArray:
    """mean |B - A| over query and key frames (masked cells skipped), per step, layer and head."""
    return abs(difference(aligned)).mean(["query_frame", "key_frame"], skipna=True)


def top_differences(aligned: Aligned, count: int = TOP_DIFFERENCES) -> list[dict]:
    """The (layer, head) pairs with the largest mean |B - A| averaged over steps, largest first."""
    score = mean_abs_difference(aligned).mean("step", skipna=True).transpose("layer", "head")
    flat = score.stack(cell=("layer", "head"))
    order = np.argsort(-np.nan_to_num(flat.values, nan=-np.inf), kind="stable")[:count]
    return [
        {"layer": int(flat["layer"].values[i]), "head": int(flat["head"].values[i]), "mean_abs_diff": float(flat.values[i])}
        for i in order
    ]


def diagonal_dominance(da: xr.DataArray) -> xr.DataArray:
    """Share of query frames whose row maximum sits on the diagonal (per remaining dim)."""
    row_max = da.max("key_frame", skipna=True).rename(query_frame="frame")
    return (metrics.diagonal(da) >= row_max).mean("frame")


def head_tables(aligned: Aligned, step: int) -> dict[int, list[dict]]:
    """Per layer, per head at ``step``: A's and B's first, mid, last and sink
    (``metrics.head_stats``) with B - A for each, and both diagonal-dominance shares."""
    a, b = aligned.a.sel(step=step), aligned.b.sel(step=step)
    stats = [metrics.head_stats(x, aligned.query_frames).transpose("layer", "head") for x in (a, b)]
    dominance = [diagonal_dominance(x).transpose("layer", "head").values for x in (a, b)]
    values = {key: (stats[0][key].values, stats[1][key].values) for key in ("first", "mid", "last", "sink")}
    tables = {}
    for i, layer in enumerate(a["layer"].values):
        rows = []
        for j, head in enumerate(a["head"].values):
            row: dict = {"head": int(head)}
            for key, (in_a, in_b) in values.items():
                row[key] = (float(in_a[i, j]), float(in_b[i, j]), float(in_b[i, j]) - float(in_a[i, j]))
            row["diagonal_dominance"] = (float(dominance[0][i, j]), float(dominance[1][i, j]))
            rows.append(row)
        tables[int(layer)] = rows
    return tables


def head_table(aligned: Aligned, layer: int, step: int) -> list[dict]:
    """Per head of one layer: A's and B's statistics and B - A for each (see ``head_tables``)."""
    one = replace(aligned, a=aligned.a.sel(layer=[layer]), b=aligned.b.sel(layer=[layer]))
    return head_tables(one, step)[layer]


def layer_ranking(aligned: Aligned, step: int) -> list[dict]:
    """Layers by mean |B - A| at ``step``, largest first, with the largest cell difference and where."""
    diff = abs(difference(aligned).sel(step=step)).transpose("layer", "head", "query_frame", "key_frame")
    values = np.nan_to_num(diff.values.astype(np.float64), nan=0.0)
    means = diff.mean(["head", "query_frame", "key_frame"], skipna=True).values
    rows = []
    for index, layer in enumerate(diff["layer"].values):
        head, query, key = np.unravel_index(int(np.argmax(values[index])), values[index].shape)
        rows.append({
            "layer": int(layer), "mean_abs_diff": float(means[index]), "max_abs_diff": float(values[index].max()),
            "head": int(diff["head"].values[head]), "query_frame": int(diff["query_frame"].values[query]),
            "key_frame": int(diff["key_frame"].values[key]),
        })
    return sorted(rows, key=lambda r: (-np.nan_to_num(r["mean_abs_diff"], nan=-np.inf), r["layer"]))


def _crossed(a: float, b: float, boundary: float, margin: float) -> tuple[bool, bool]:
    """(changed side of ``boundary``, and both values at least ``margin`` away from it)."""
    changed = (a >= boundary) != (b >= boundary)
    return changed, changed and min(abs(a - boundary), abs(b - boundary)) >= margin


def flips(
    aligned: Aligned,
    layer: int,
    step: int,
    *,
    sink_threshold: float | None = None,
    margin: float = FLIP_MARGIN,
    rows: list[dict] | None = None,
) -> list[dict]:
    """Heads whose sink sign, sink-head membership or diagonal dominance changed from A to B.

    Each change has ``counted``: False when a value lies within ``margin`` x scale of the
    boundary (noise; see the module docstring). ``rows``: the layer's ``head_table`` if already computed.
    """
    threshold = SINK_HEAD_THRESHOLD[aligned.metric] if sink_threshold is None else sink_threshold
    found = []
    for row in head_table(aligned, layer, step) if rows is None else rows:
        sink_a, sink_b, _ = row["sink"]
        dom_a, dom_b = row["diagonal_dominance"]
        checks = (
            ("sink sign", _crossed(sink_a, sink_b, 0.0, margin * threshold), f"{sink_a:+.3f}", f"{sink_b:+.3f}"),
            (f"sink head (sink >= {threshold:g})", _crossed(sink_a, sink_b, threshold, margin * threshold),
             f"{sink_a:+.3f}", f"{sink_b:+.3f}"),
            (
                f"diagonal dominance (>= {DIAGONAL_DOMINANCE_SHARE:.0%} of rows)",
                _crossed(dom_a, dom_b, DIAGONAL_DOMINANCE_SHARE, margin * DIAGONAL_DOMINANCE_SHARE),
                f"{dom_a:.0%}", f"{dom_b:.0%}",
            ),
        )
        for kind, (changed, counted), before, after in checks:
            if changed:
                found.append({"layer": layer, "step": step, "head": row["head"], "kind": kind, "a": before, "b": after,
                              "counted": bool(counted)})
    return found
