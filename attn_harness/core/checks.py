"""Property library: what a layer's frame x frame attention must look like.

Each property is a function from a selection of one extraction (a DataArray with dims
``step, layer, head, query_frame, key_frame``) and its parameters to an ``Evaluation``:
how many units (cells, rows or heads) were checked and which of them violate the property,
each named by its coordinates. ``run_check`` adds what every property shares: the
``metric`` (``logits`` or ``mass``), ``heads`` and ``steps`` selections, ``mostly`` (the
share of units that must pass) and ``severity`` (``fail`` or ``warn``). A population (dim
``sample``) is evaluated once over all its samples; each sample's units and violations are
read from that one evaluation (``_Part``) and equal those of the sample evaluated alone.

Parameters are declared as data (``Param``), so the spec loader validates them before any
model runs and the docs can list them. Formulas are in each property's ``formula``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from attn_harness.core import metrics
from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import hidden_cells, mask_params
from attn_harness.core.schema import DIMS, METRICS, PROBABILITIES, SAMPLE_COORDS, SAMPLE_DIM, TEXT_METRIC
from attn_harness.core.vocabulary import REQUIRED, Field, FieldError, FieldErrors, step_index, validate

MAX_LISTED = 10  # violations spelled out in a failure message (all are in ``violations``)
MAX_RECORDED = 200  # violations kept in a result (the JSON record stays small)

Param = Field  # a property parameter is a vocabulary field


COMMON_PARAMS: dict[str, Param] = {
    "metric": Param("choice", None, "variable to check (default per property)", (*METRICS, TEXT_METRIC)),
    "heads": Param("heads", "all", "heads to check"),
    "steps": Param("steps", "all", "denoising steps to check: step indices, first, mid (sample_steps // 2), last"),
    "mostly": Param("number", 1.0, "share of units (cells, rows or heads) that must pass, in (0, 1]", above=0, high=1),
    "severity": Param("choice", "fail", "a failing warn-check passes with a warning", ("fail", "warn")),
    "over": Param("choice", None, "samples: mostly is the share of samples (prompt, seed) in which the property holds",
                  ("samples",)),
    "confidence": Param("number", 0.95,
                        "with over: samples, the lower confidence bound (Wilson) of the pass rate must reach mostly",
                        low=0.5, high=0.9999),
}


@dataclass(frozen=True)
class Violation:
    """One failing unit, named by its coordinates, with what was seen and what was required."""

    location: dict[str, int]
    observed: float
    expected: str
    note: str = ""

    def describe(self) -> str:
        where = " ".join(f"{k}={v}" for k, v in self.location.items())
        note = f" ({self.note})" if self.note else ""
        return f"{where}: {self.observed:.6g}{note}, expected {self.expected}"

    def as_record(self) -> dict:
        observed = self.observed if np.isfinite(self.observed) else str(self.observed)
        return {"location": dict(self.location), "observed": observed, "expected": self.expected}


@dataclass(frozen=True)
class Evaluation:
    """What a property function returns (one per sample for a population): units checked, failing units and their
    violations."""

    unit: str  # what one unit is, plural: "cells", "rows", "heads"
    units: int
    failing: int
    violations: list[Violation]
    observed: str
    expected: str


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one property on one selection, ready for pytest and the results JSON."""

    property: str
    status: str  # pass | warn | fail
    severity: str
    metric: str
    observed: str
    expected: str
    message: str
    violations: list[Violation] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status != "fail"


# A property's verdict on an extraction, or on each sample of a population (from one evaluation of all samples).
Evaluated = Evaluation | list[Evaluation]
PropertyFn = Callable[..., Evaluated]


@dataclass(frozen=True)
class Property:
    name: str
    formula: str
    params: dict[str, Param]
    fn: PropertyFn
    default_metric: str = "logits"
    metrics: tuple[str, ...] = METRICS
    requires_one_of: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # further variables the function takes as keyword arguments
    needs_dims: tuple[str, ...] = ()  # dims beyond one extraction's (a history's ``checkpoint``)


PROPERTIES: dict[str, Property] = {}


def _register(prop: Property) -> None:
    PROPERTIES[prop.name] = prop


# --------------------------------------------------------------------------- helpers


def _mask_of(da: xr.DataArray) -> dict:
    """The extraction's mask parameters (``mask``, ``block_size``, ``sink_frames``, ``window_frames``)."""
    return mask_params(da.attrs)


def _ordered(da: xr.DataArray) -> xr.DataArray:
    """Transpose by name into the contract's dim order, a population's ``sample`` first (plus any extra dims last)."""
    known = (SAMPLE_DIM, *DIMS)
    order = [d for d in known if d in da.dims] + [d for d in da.dims if d not in known]
    return da.transpose(*order)


def _collect(
    bad: xr.DataArray, observed: xr.DataArray, expected: str | Callable[[dict], str], note: Callable[[dict], str] | None = None
) -> list[Violation]:
    """One Violation per True cell of ``bad``, located by coordinate values (not positions), a population's ``sample`` first."""
    bad = _ordered(bad)
    cells = np.argwhere(bad.values)
    if not len(cells):
        return []  # the usual case: no broadcasting of ``observed`` needed
    observed = observed.broadcast_like(bad).transpose(*bad.dims).values
    coords = [bad[dim].values for dim in bad.dims]
    found = []
    for index in cells:
        location = {dim: int(values[i]) for dim, values, i in zip(bad.dims, coords, index)}
        found.append(
            Violation(
                location=location,
                observed=float(observed[tuple(index)]),
                expected=expected(location) if callable(expected) else expected,
                note=note(location) if note else "",
            )
        )
    return found


class _Part:
    """One sample of a population (``index``), or the whole extraction (``index`` None), read from arrays a property
    computed once for all samples: a sample's figures are those of the sample evaluated alone."""

    def __init__(self, index: int | None) -> None:
        self.index = index

    def values(self, da: xr.DataArray) -> np.ndarray:
        if self.index is None or SAMPLE_DIM not in da.dims:
            return da.values
        return np.take(da.values, self.index, axis=da.get_axis_num(SAMPLE_DIM))

    def count(self, da: xr.DataArray) -> int:
        """True (non-zero) cells."""
        return int(np.count_nonzero(self.values(da)))

    def size(self, da: xr.DataArray) -> int:
        return int(self.values(da).size)

    def present(self, da: xr.DataArray) -> np.ndarray:
        """The values that are not NaN."""
        values = self.values(da)
        return values[~np.isnan(values)]

    def extreme(self, da: xr.DataArray, which: str) -> float:
        """``min`` or ``max`` over the values that are not NaN (NaN when there are none)."""
        values = self.present(da)
        return float(getattr(values, which)()) if values.size else math.nan

    def range_text(self, da: xr.DataArray) -> str:
        values = self.present(da)
        return f"min={float(values.min()):.6g} max={float(values.max()):.6g}" if values.size else "no values"

    def violations(self, found: list[Violation]) -> list[Violation]:
        """The violations ``_collect`` found in this part, located within it (without ``sample``)."""
        if self.index is None:
            return found
        return [
            Violation({k: v for k, v in one.location.items() if k != SAMPLE_DIM}, one.observed, one.expected, one.note)
            for one in found if one.location[SAMPLE_DIM] == self.index
        ]


def _evaluate(da: xr.DataArray, build: Callable[[_Part], Evaluation]) -> Evaluated:
    """``build`` the Evaluation of an extraction, or of each sample of a population (its ``sample`` coordinate
    is the sample's position: ``run_check`` sets it)."""
    if SAMPLE_DIM not in da.dims:
        return build(_Part(None))
    return [build(_Part(i)) for i in range(da.sizes[SAMPLE_DIM])]


def _frames_text(frames: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(f)) for f in frames) + "]"


def _visible_only(da: xr.DataArray) -> xr.DataArray:
    """NaN on cells the extraction's mask hides (masked mass is 0, which is not a value to average)."""
    return da.where(~hidden_cells(da, **_mask_of(da)))


def _head_stats(da: xr.DataArray, frames: Sequence[int]) -> xr.Dataset:
    """``metrics.head_stats`` with each sample's own valid key frames: it takes first and middle from the valid key
    frames, which over a whole population are the union of the samples' (equal unless a visible cell is NaN)."""
    if SAMPLE_DIM in da.dims:
        profile = metrics.query_profile(da, frames)
        valid = profile.notnull().any([d for d in profile.dims if d not in (SAMPLE_DIM, "key_frame")])
        valid = valid.transpose(SAMPLE_DIM, "key_frame").values
        if (valid != valid[:1]).any():
            parts = [metrics.head_stats(da.isel({SAMPLE_DIM: i}), frames) for i in range(da.sizes[SAMPLE_DIM])]
            return xr.concat(parts, dim=SAMPLE_DIM)
    return metrics.head_stats(da, frames)


def _query_frames(da: xr.DataArray, params: dict) -> list[int]:
    frames = params.get("query_frames")
    return list(frames) if frames else metrics.default_query_frames(da)


# --------------------------------------------------------------------------- properties


def value_range(da: xr.DataArray, params: dict) -> Evaluated:
    lo, hi, finite = params["min"], params["max"], params["finite"]
    cells = (~hidden_cells(da, **_mask_of(da))).broadcast_like(da).transpose(*da.dims)
    # elementwise, so on the numpy values in da's dims (an xarray op costs a hundred times these few cells)
    x, visible = da.values, cells.values
    nonfinite = visible & ~np.isfinite(x)
    bad = nonfinite if finite else np.zeros_like(visible)
    parts = []
    if lo is not None:
        bad = bad | (visible & (x < lo))
        parts.append(f">= {lo:g}")
    if hi is not None:
        bad = bad | (visible & (x > hi))
        parts.append(f"<= {hi:g}")
    if finite:
        parts.append("finite")
    expected = " and ".join(parts) if parts else "anything"
    bad, nonfinite = cells.copy(deep=False, data=bad), cells.copy(deep=False, data=nonfinite)
    values = da.copy(deep=False, data=np.where(visible, x, np.nan))
    found = _collect(bad, da, expected)
    return _evaluate(da, lambda part: Evaluation(
        unit="cells",
        units=part.count(cells),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"{part.range_text(values)} non-finite={part.count(nonfinite)}",
        expected=expected,
    ))


def sink_score(da: xr.DataArray, params: dict) -> Evaluated:
    frames = _query_frames(da, params)
    stats = _head_stats(_visible_only(da), frames)
    sink = stats["sink"]
    bad = xr.zeros_like(sink, dtype=bool) | sink.isnull()
    parts = []
    if params["sign"] == "positive":
        bad = bad | (sink <= 0)
        parts.append("> 0")
    elif params["sign"] == "negative":
        bad = bad | (sink >= 0)
        parts.append("< 0")
    if params["min"] is not None:
        bad = bad | (sink < params["min"])
        parts.append(f">= {params['min']:g}")
    if params["max"] is not None:
        bad = bad | (sink > params["max"])
        parts.append(f"<= {params['max']:g}")
    expected = "sink " + " and ".join(parts)
    frames_text = _frames_text(frames)

    def note(loc: dict) -> str:
        one = stats.sel(loc)
        return f"sink = first {float(one['first']):.4g} - mid {float(one['mid']):.4g}, query_frames={frames_text}"

    found = _collect(bad, sink, expected, note)
    return _evaluate(da, lambda part: Evaluation(
        unit="heads",
        units=part.size(sink),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"sink {part.range_text(sink)} over query_frames={frames_text}",
        expected=f"{expected} (query_frames={frames_text})",
    ))


def diagonal_dominance(da: xr.DataArray, params: dict) -> Evaluated:
    if params["query_frames"]:
        metrics._check_frames(da, params["query_frames"])
        da = da.sel(query_frame=list(params["query_frames"]))
    same = da["query_frame"] == da["key_frame"]
    diag = da.where(same).max("key_frame", skipna=True)
    others = da.where(~same & ~hidden_cells(da, **_mask_of(da)))
    has_other = others.notnull().any("key_frame")
    if params["against"] == "mean":
        competitor = others.mean("key_frame", skipna=True)
    else:
        competitor = others.max("key_frame", skipna=True)
    margin = params["margin"]
    gap = diag - competitor
    bad = has_other & ~(gap > margin)
    who = "mean of the other key frames" if params["against"] == "mean" else "every other key frame"
    expected = f"diagonal beats {who} by more than {margin:g}"

    def note(loc: dict) -> str:
        row = others.sel(loc)
        if params["against"] == "mean":
            return f"diagonal {float(diag.sel(loc)):.4g} vs mean of others {float(competitor.sel(loc)):.4g}"
        strongest = int(row.idxmax("key_frame", skipna=True))
        return f"diagonal {float(diag.sel(loc)):.4g} vs key_frame={strongest} {float(competitor.sel(loc)):.4g}"

    found = _collect(bad, gap, expected, note)
    shown = gap.where(has_other)
    return _evaluate(da, lambda part: Evaluation(
        unit="query rows",
        units=part.count(has_other),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"diagonal - {'mean' if params['against'] == 'mean' else 'max'} of others: {part.range_text(shown)}",
        expected=expected,
    ))


def row_stochastic(da: xr.DataArray, params: dict) -> Evaluated:
    tol = params["tol"]
    row_sum = da.astype(np.float64).sum("key_frame", skipna=False)
    bad_sum = ~(np.abs(row_sum - 1) <= tol)
    negative = da < 0
    bad_rows = bad_sum | negative.any("key_frame")
    sums = _collect(bad_sum, row_sum, f"row sum 1 +/- {tol:g}", lambda loc: "row sum")
    negatives = _collect(negative, da, ">= 0", lambda loc: "negative mass")
    return _evaluate(da, lambda part: Evaluation(
        unit="rows",
        units=part.size(row_sum),
        failing=part.count(bad_rows),
        violations=part.violations(sums) + part.violations(negatives),
        observed=f"row sums {part.range_text(row_sum)}, min entry {part.extreme(da, 'min'):.6g}",
        expected=f"rows sum to 1 +/- {tol:g}, entries >= 0",
    ))


def causal(da: xr.DataArray, params: dict) -> Evaluated:
    mask = _mask_of(da)
    if mask["mask"] == "bidirectional":
        mask["mask"] = "block-causal"  # a bidirectional extraction is checked against the block-causal mask
    block_size = mask["block_size"] = params["block_size"] or mask["block_size"]
    hidden = hidden_cells(da, **mask).broadcast_like(da).transpose(*da.dims)
    x, masked = da.values, hidden.values  # elementwise: numpy in da's dims, as in value_range
    if not masked.any():
        raise HarnessError(
            f"causal: under the {mask['mask']} mask with block_size {block_size} nothing is masked in the "
            f"{da.sizes['key_frame']} frames, so there is nothing to check; use a smaller block_size"
        )
    described = f"{mask['mask']} with block_size {block_size}" + (
        f", sink_frames {mask['sink_frames']}, window_frames {mask['window_frames']}" if mask["mask"] == "sink-window" else ""
    )
    filled = masked & ~np.isnan(x)  # masked cells that hold a value
    if da.name in PROBABILITIES:
        tol = params["tol"]
        bad = masked & ~(np.abs(x) <= tol)
        expected = f"0 (masked, |mass| <= {tol:g})"
    else:
        bad = filled
        expected = "NaN (masked)"
    bad = hidden.copy(deep=False, data=bad)

    def note(loc: dict) -> str:
        if loc["key_frame"] // block_size > loc["query_frame"] // block_size:
            return f"key block {loc['key_frame'] // block_size} after query block {loc['query_frame'] // block_size}"
        return f"key frame {loc['key_frame']} evicted from the cache (neither sink nor window)"

    found = _collect(bad, da, expected, note)
    held = da.copy(deep=False, data=np.where(filled, x, np.nan))
    return _evaluate(da, lambda part: Evaluation(
        unit="masked cells",
        units=part.count(hidden),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"{part.count(bad)} masked cells hold a value; {da.name} there: {part.range_text(held)}",
        expected=f"{described}: masked cells {expected}",
    ))


def _decay_profile(da: xr.DataArray, params: dict) -> xr.DataArray:
    """p(d) = mean over query frames a of (mean of the valid da[a, b] with |a - b| = d)."""
    distance = np.abs(da["query_frame"] - da["key_frame"])
    da = _visible_only(da)
    if params["exclude_first"]:
        da = da.where((da["query_frame"] != 0) & (da["key_frame"] != 0))
    largest = int(distance.max())
    top = largest if params["max_distance"] is None else min(params["max_distance"], largest)
    wanted = range(params["min_distance"], top + 1)
    if len(wanted) < 2:
        raise HarnessError(
            f"temporal_decay: distances {params['min_distance']}..{top} leave nothing to compare "
            f"(this data has {da.sizes['key_frame']} latent frames, distances 0..{largest}); "
            "it needs more frames or a smaller min_distance"
        )
    # every distance in one array, distance first: each distance's rows are reduced as that distance's alone would be
    da = da.transpose(..., "query_frame", "key_frame")
    near = distance.transpose("query_frame", "key_frame").values == np.asarray(wanted)[:, None, None]
    near = near.reshape((len(wanted),) + (1,) * (da.ndim - 2) + near.shape[1:])
    masked = np.where(near, da.values, np.asarray(np.nan, dtype=da.dtype))
    stacked = xr.DataArray(masked, dims=("distance", *da.dims), coords={**da.coords, "distance": list(wanted)}, name=da.name)
    return stacked.mean("key_frame", skipna=True).mean("query_frame", skipna=True)


def temporal_decay(da: xr.DataArray, params: dict) -> Evaluated:
    profile = _decay_profile(da, params)
    kept = [d for d in profile.dims if d not in ("distance", SAMPLE_DIM)]
    if bool((profile.notnull().any(kept).sum("distance") < 2).any()):  # in any sample
        raise HarnessError("temporal_decay: fewer than two distances have visible cells (with exclude_first, "
                           "frame 0 is left out), so nothing can be compared; use more frames")
    tol = params["tol"]
    farther = profile.isel(distance=slice(1, None))
    nearer = profile.isel(distance=slice(None, -1)).assign_coords(distance=farther["distance"].values)
    grows = (farther > nearer + tol).fillna(False)
    bad_heads = grows.any("distance")
    expected = f"value at distance d <= value at d-1 + {tol:g}"
    found = _collect(
        grows, farther, lambda loc: f"<= {float(nearer.sel(loc)):.6g} + {tol:g} (distance {loc['distance'] - 1})"
    )
    growth = farther - nearer
    return _evaluate(da, lambda part: Evaluation(
        unit="heads",
        units=part.size(bad_heads),
        failing=part.count(bad_heads),
        violations=part.violations(found),
        observed=f"largest growth between neighbouring distances: {part.extreme(growth, 'max'):.6g}",
        expected=expected + (", frame 0 excluded" if params["exclude_first"] else ""),
    ))


def sink_heads(da: xr.DataArray, params: dict) -> Evaluated:
    frames = _query_frames(da, params)
    threshold = params["threshold"]
    listed = set(params["expected"])
    missing = sorted(listed - set(int(h) for h in da["head"].values))
    if missing:
        raise HarnessError(f"sink_heads: expected heads {missing} are not among the checked heads")
    sink = _head_stats(_visible_only(da), frames)["sink"]
    is_listed = xr.DataArray([int(h) in listed for h in sink["head"].values], dims="head", coords={"head": sink["head"]})
    has_sink = sink > threshold
    lost = is_listed & ~has_sink
    gained = ~is_listed & has_sink if params["match"] == "equals" else xr.zeros_like(has_sink)
    bad = lost | gained
    sinks = _ordered(has_sink)
    steps, layers, heads = (sinks[dim].values for dim in ("step", "layer", "head"))

    def by_step(part: _Part) -> str:
        on = part.values(sinks)
        return "; ".join(f"step={int(step)} layer={int(layer)}: {[int(h) for h, yes in zip(heads, on[i, j]) if yes]}"
                         for i, step in enumerate(steps) for j, layer in enumerate(layers))

    relation = "equal" if params["match"] == "equals" else "contain"
    frames_text = _frames_text(frames)

    def expected(loc: dict) -> str:
        if int(loc["head"]) in listed:
            return f"> {threshold:g} (listed sink head lost its sink)"
        return f"<= {threshold:g} (unlisted head gained a sink)"

    found = _collect(bad, sink, expected, lambda loc: f"sink score over query_frames={frames_text}")
    return _evaluate(da, lambda part: Evaluation(
        unit="heads",
        units=part.size(sink),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"heads with sink > {threshold:g}: {by_step(part)}",
        expected=f"sink heads {relation} {sorted(listed)} (sink > {threshold:g}, query_frames={frames_text})",
    ))


def _types_across_samples(kinds: xr.DataArray, expected_of: dict[int, str], params: dict) -> Evaluation:
    """``stable_across: samples``: per head (step, layer, head), the share of samples that give it its expected
    type, or else its most common one, must reach ``mostly`` (its lower Wilson bound with ``over: samples``)."""
    if SAMPLE_DIM not in kinds.dims:
        raise HarnessError("head_types: stable_across: samples needs a population extraction (probe prompts/seeds)")
    kinds = kinds.transpose(SAMPLE_DIM, ..., "head")
    total = kinds.sizes[SAMPLE_DIM]
    counts = np.stack([(kinds.values == t).sum(0) for t in metrics.HEAD_TYPES])  # [type, step, layer, head]
    reference = np.asarray(metrics.HEAD_TYPES, dtype=object)[counts.argmax(0)]
    for index, head in enumerate(kinds["head"].values):
        reference[..., index] = expected_of.get(int(head), reference[..., index])
    agree = (kinds.values == reference).sum(0)
    if params["over"] == "samples":
        bounds = np.vectorize(lambda n: wilson_lower_bound(int(n), total, params["confidence"]), otypes=[float])(agree)
        stable = bounds >= params["mostly"]
        best = wilson_lower_bound(total, total, params["confidence"])
        needs = (f"in at least {params['mostly']:.0%} of samples (lower Wilson bound at {params['confidence']:.0%}; "
                 f"at most {best:.3f} with {total} samples)")
    else:
        stable = agree >= params["mostly"] * total
        needs = "in every sample" if params["mostly"] == 1 else f"in at least {params['mostly']:.0%} of samples"
    labels = [f"sample={i} (prompt {str(p)!r}, seed {int(s)})" for i, (p, s) in
              enumerate(zip(kinds["prompt"].values, kinds["seed"].values))]
    per_head = kinds.isel({SAMPLE_DIM: 0}, drop=True).drop_vars(["prompt", "seed"], errors="ignore")
    bad, wanted = per_head.copy(data=~stable), per_head.copy(data=reference)

    def note(loc: dict) -> str:
        seen, want = kinds.sel(loc).values, wanted.sel(loc).item()
        tally = ", ".join(f"{t} in {int((seen == t).sum())}" for t in metrics.HEAD_TYPES if (seen == t).any())
        others = [label for label, t in zip(labels, seen) if t != want]
        listed = ", ".join(others[:MAX_LISTED]) + (f" and {len(others) - MAX_LISTED} more" if len(others) > MAX_LISTED else "")
        bound = f"; lower bound {wilson_lower_bound(len(seen) - len(others), total, params['confidence']):.3f}"
        return (f"{tally} of {total} samples" + (f"; not {want}: {listed}" if others else "")
                + (bound if params["over"] == "samples" else ""))

    return Evaluation(
        unit="heads across samples",
        units=int(bad.size),
        failing=int(bad.sum()),
        violations=_collect(bad, per_head.copy(data=agree / total), lambda loc: f"{wanted.sel(loc).item()} {needs}", note),
        observed=f"{int(stable.sum())} of {stable.size} heads keep their type across {total} samples",
        expected=f"every head keeps its {'listed' if expected_of else 'most common'} type {needs}",
    )


def head_types(da: xr.DataArray, params: dict, *, aligned_mass: xr.DataArray) -> Evaluated:
    thresholds = {name: params[name] for name in metrics.HEAD_TYPE_THRESHOLDS}
    if not all(np.isfinite(value) for value in thresholds.values()):
        raise HarnessError(f"head_types: thresholds must be finite; got {thresholds}")
    kinds = _ordered(metrics.head_types(_visible_only(da), aligned_mass, thresholds))
    shares = metrics.head_shares(da, aligned_mass)

    def note(loc: dict) -> str:
        kind, one = kinds.sel(loc), shares.sel(loc)
        if kind.ndim:  # a head over several steps
            return "types by step: " + ", ".join(f"{int(s)}={t}" for s, t in zip(kind["step"].values, kind.values))
        return f"{kind.item()}: first {float(one['first']):.3f}, own {float(one['own']):.3f}, aligned {float(one['aligned']):.3f}"

    expected_of = {int(h): t for h, t in (params["expected"] or {}).items()}
    unknown = sorted(set(expected_of) - set(int(h) for h in kinds["head"].values))
    if unknown:
        raise HarnessError(f"head_types: expected heads {unknown} are not among the checked heads")
    if params["stable_across"] == "samples":
        return _types_across_samples(kinds, expected_of, params)
    listed = xr.DataArray([int(h) in expected_of for h in kinds["head"].values], dims="head", coords={"head": kinds["head"]})
    want = xr.DataArray([expected_of.get(int(h), "") for h in kinds["head"].values], dims="head", coords={"head": kinds["head"]})
    bad = listed & (kinds != want)
    unit, counted = "heads", kinds
    parts = [f"types {dict(sorted(expected_of.items()))}"] if expected_of else []
    if params["stable_across"] == "steps":
        changes = (kinds != kinds.isel(step=0)).any("step")
        bad = bad.any("step") | changes
        unit, counted = "heads across steps", changes
        parts.append("the same type at every step")
    found = _collect(bad, xr.zeros_like(bad, dtype=float), lambda loc: " and ".join(parts), note)
    typed = {t: kinds == t for t in metrics.HEAD_TYPES}
    return _evaluate(da, lambda part: Evaluation(
        unit=unit,
        units=part.size(counted),
        failing=part.count(bad),
        violations=part.violations(found),
        observed="head types: " + ", ".join(f"{t} {part.count(is_t)}" for t, is_t in typed.items()),
        expected=" and ".join(parts) + f" (thresholds {thresholds})",
    ))


def trend(da: xr.DataArray, params: dict) -> Evaluated:
    if not np.isfinite(params["max_drop"]) or params["last"] < 2:
        raise HarnessError(f"trend: max_drop must be finite and last at least 2; got {params['max_drop']}, {params['last']}")
    frames = _query_frames(da, params)
    last = params["last"]
    history = da.isel(checkpoint=slice(-last, None))
    sink = _ordered(_head_stats(_visible_only(history), frames)["sink"])
    peak, latest = sink.max("checkpoint"), sink.isel(checkpoint=-1)
    drop = peak - latest
    bad = drop > params["max_drop"]
    steps = [int(s) for s in history["train_step"].values] if "train_step" in history.coords else []
    expected = f"sink falls by at most {params['max_drop']:g} from its peak over the last {last} checkpoints"
    found = _collect(bad, drop, expected, lambda loc: f"peak {float(peak.sel(loc)):.4g}, now {float(latest.sel(loc)):.4g}")
    return _evaluate(da, lambda part: Evaluation(
        unit="heads",
        units=part.size(drop),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"largest fall {part.extreme(drop, 'max'):.4g} over train steps {steps}",
        expected=expected,
    ))


def text_share(da: xr.DataArray, params: dict) -> Evaluated:
    tokens = da["text_token"]
    if params["tokens"] is not None:
        chosen = xr.DataArray(np.isin(tokens.values, list(params["tokens"])), dims="text_token", coords={"text_token": tokens})
        which = f"text tokens {list(params['tokens'])}"
    elif "text_content" in da.coords:
        chosen = da["text_content"] == 1
        which = "the prompt's content tokens"
    else:
        raise HarnessError("text_share: this extraction does not mark content tokens (no text_content coordinate); "
                           "give tokens: [...]")
    share = da.where(chosen, 0.0).sum("text_token")
    bad = xr.zeros_like(share, dtype=bool) | share.isnull()
    parts = []
    if params["min"] is not None:
        bad = bad | (share < params["min"])
        parts.append(f">= {params['min']:g}")
    if params["max"] is not None:
        bad = bad | (share > params["max"])
        parts.append(f"<= {params['max']:g}")
    expected = f"share on {which} " + " and ".join(parts)
    found = _collect(bad, share, expected)
    return _evaluate(da, lambda part: Evaluation(
        unit="query rows",
        units=part.size(share),
        failing=part.count(bad),
        violations=part.violations(found),
        observed=f"share on {which}: {part.range_text(share)}",
        expected=expected,
    ))


QUERY_FRAMES = Param("frames", None, "query frames of the profile (default: the last block)")

_register(Property(
    name="value_range",
    formula="every visible cell x satisfies min <= x <= max; with finite, x is not NaN or inf "
    "(cells hidden by a block-causal mask are skipped)",
    params={
        "min": Param("number", None, "lower bound"),
        "max": Param("number", None, "upper bound"),
        "finite": Param("bool", True, "visible cells must be finite"),
    },
    fn=value_range,
    metrics=("logits", "mass", "text_mass"),
))
_register(Property(
    name="sink_score",
    formula="per head: r[b] = mean over query frames a of x[a, b]; sink = r[k_0] - mean(r[k_1..k_m-1]) "
    "(docs/design.md, section Statistics); sign positive: sink > 0, negative: sink < 0; min <= sink <= max",
    params={
        "sign": Param("choice", None, "required sign of the sink score", ("positive", "negative")),
        "min": Param("number", None, "lowest allowed sink score"),
        "max": Param("number", None, "highest allowed sink score"),
        "query_frames": QUERY_FRAMES,
    },
    fn=sink_score,
    requires_one_of=("sign", "min", "max"),
))
_register(Property(
    name="diagonal_dominance",
    formula="per head and query frame a: x[a, a] - c > margin, c = max (against: max) or mean "
    "(against: mean) of x[a, b] over the visible key frames b != a",
    params={
        "against": Param("choice", "max", "compare with every other key frame or their mean", ("max", "mean")),
        "margin": Param("number", 0.0, "how much the diagonal must exceed the competitor by"),
        "query_frames": Param("frames", None, "query frames to check (default: all)"),
    },
    fn=diagonal_dominance,
))
_register(Property(
    name="row_stochastic",
    formula="per head and query frame a: |sum_b mass[a, b] - 1| <= tol and every mass[a, b] >= 0",
    params={"tol": Param("number", 1e-4, "allowed deviation of a row sum from 1 (float32 sums of <= 100 terms)",
                           low=0, high=1)},
    fn=row_stochastic,
    default_metric="mass",
    metrics=("mass",),
))
_register(Property(
    name="causal",
    formula="for every cell the extraction's mask hides (block-causal: block(b) > block(a), block(f) = f // block_size; "
    "sink-window: also earlier frames that are neither among the first sink_frames nor the last window_frames "
    "before a's block; a bidirectional extraction is checked as block-causal): logits NaN; |mass| <= tol",
    params={
        "block_size": Param("int", None, "frames per block (default: the extraction's block_size)", low=1, high=64),
        "tol": Param("number", 0.0, "largest |mass| allowed on a masked cell", low=0, high=1),
    },
    fn=causal,
    default_metric="mass",
))
_register(Property(
    name="temporal_decay",
    formula="per head: p(d) = mean over query frames a of mean{x[a, b] : |a - b| = d, visible}; "
    "p(d) <= p(d - 1) + tol for min_distance < d <= max_distance",
    params={
        "tol": Param("number", 0.0, "allowed growth from one distance to the next", low=0),
        "exclude_first": Param("bool", True, "leave frame 0 (the usual sink) out as query and key"),
        "min_distance": Param("int", 0, "first distance of the profile", low=0, high=4095),
        "max_distance": Param("int", None, "last distance of the profile (default: the largest)", low=0, high=4095),
    },
    fn=temporal_decay,
))
_register(Property(
    name="sink_heads",
    formula="per step: {h : sink[h] > threshold} equals (match: equals) or contains (match: contains) "
    "the expected heads; sink as in sink_score",
    params={
        "expected": Param("int_list", REQUIRED, "the heads that must carry a sink"),
        "threshold": Param("number", 0.0, "sink score above which a head counts as a sink head"),
        "match": Param("choice", "equals", "exact set, or the listed heads at least", ("equals", "contains")),
        "query_frames": QUERY_FRAMES,
    },
    fn=sink_heads,
))


_register(Property(
    name="head_types",
    formula="per head, over query frames a >= 1: first = mass[a, 0], own = mass[a, a], aligned = "
    "sum over b != a of aligned_mass[a, b]; type = sink if first >= sink, else spatial if own >= spatial, "
    "else temporal if aligned >= temporal, else mixed; the listed heads must have their type "
    "(and with stable_across: steps, every head keeps one type at every step; with stable_across: samples, "
    "in every sample of a population, or in a share mostly of them)",
    params={
        "expected": Param("type_map", None, "head index -> sink, spatial, temporal or mixed", metrics.HEAD_TYPES),
        "stable_across": Param("choice", None, "every head keeps its type across these (samples: in every sample, "
                               "or in at least mostly of them, by its lower Wilson bound with over: samples)",
                               ("steps", "samples")),
        **{name: Param("number", value, f"share at which a head counts as {name}", low=0, high=1)
           for name, value in metrics.HEAD_TYPE_THRESHOLDS.items()},
    },
    fn=head_types,
    default_metric="mass",
    metrics=("mass",),
    requires_one_of=("expected", "stable_across"),
    uses=("aligned_mass",),
))
_register(Property(
    name="trend",
    formula="on a training history (dim checkpoint): per head, sink over the last N checkpoints; "
    "max(sink) - sink at the latest checkpoint <= max_drop",
    params={
        "max_drop": Param("number", REQUIRED, "largest allowed fall of the sink score from its peak", low=0),
        "last": Param("int", 3, "how many of the latest checkpoints to look at", low=2, high=100_000),
        "query_frames": QUERY_FRAMES,
    },
    fn=trend,
    needs_dims=("checkpoint",),
))
_register(Property(
    name="text_share",
    formula="per query row (step, layer, head, query frame a): share = sum over the chosen text tokens t of "
    "text_mass[a, t] (default: the content tokens, text_content = 1, vs padding); min <= share <= max",
    params={
        "min": Param("number", None, "lowest allowed share"),
        "max": Param("number", None, "highest allowed share"),
        "tokens": Param("int_list", None, "text token indices to sum (default: the prompt's content tokens)"),
    },
    fn=text_share,
    default_metric="text_mass",
    metrics=("text_mass",),
    requires_one_of=("min", "max"),
))


# --------------------------------------------------------------------------- running


def normalize_params(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` against the property's and the common parameters; fill defaults.

    Raises ``FieldErrors`` (a ``ValueError``) listing every bad, unknown or missing key at
    once, each with its ``key``; the spec loader adds file and line.
    """
    prop = PROPERTIES[name]
    params = validate({**COMMON_PARAMS, **prop.params}, raw)
    if params["metric"] is None:
        params["metric"] = prop.default_metric
    problems = []
    if params["metric"] not in prop.metrics:
        problems.append(FieldError("metric", f"{name} works on {', '.join(prop.metrics)} only; got {params['metric']!r}"))
    if prop.requires_one_of and all(params[key] is None for key in prop.requires_one_of):
        problems.append(FieldError(None, f"needs at least one of {', '.join(prop.requires_one_of)}"))
    for low, high in (("min", "max"), ("min_distance", "max_distance")):
        if params.get(low) is not None and params.get(high) is not None and params[low] > params[high]:
            problems.append(FieldError(low, f"{low} {params[low]:g} is above {high} {params[high]:g}: nothing can pass"))
    if problems:
        raise FieldErrors(problems)
    return params


def _select(ds: xr.Dataset, params: dict, layer: int | None) -> xr.DataArray:
    metric = params["metric"]
    if metric not in ds.data_vars:
        raise HarnessError(f"this extraction has no '{metric}' variable (it has {sorted(ds.data_vars)}); "
                           "add it to the probe's metrics or check another metric")
    da = ds[metric].assign_attrs({**ds.attrs, **ds[metric].attrs})  # a copy: the caller's Dataset keeps its attrs
    selection: dict[str, list[int]] = {}
    if layer is not None:
        selection["layer"] = [layer]
    if params["heads"] != "all":
        selection["head"] = list(params["heads"])
    if params["steps"] != "all":
        available = [int(s) for s in ds["step"].values]
        selection["step"] = sorted({step_index(s, available, ds.attrs.get("sample_steps")) for s in params["steps"]})
    for dim, wanted in selection.items():
        present = set(int(v) for v in ds[dim].values)
        missing = [v for v in wanted if v not in present]
        if missing:
            raise HarnessError(f"{dim} {missing} not in this extraction (it has {sorted(present)})")
    return da.sel(selection)


def _verdict(name: str, params: dict, ev: Evaluation) -> tuple[bool, str]:
    """Pass when the share of passing units reaches ``mostly``; the message's first line."""
    share = (ev.units - ev.failing) / ev.units if ev.units else 1.0
    needs = f"needs {params['mostly']:.0%}" if params["mostly"] < 1 else "needs all"
    return share >= params["mostly"], (
        f"{name} on {params['metric']}: {ev.failing} of {ev.units} {ev.unit} violate ({share:.1%} pass, {needs})"
    )


def _pooled(per_sample: Sequence[Evaluation]) -> Evaluation:
    """Every sample's units as units of one check; violations located by their ``sample`` too."""
    first = per_sample[0]
    return Evaluation(
        unit=first.unit,
        units=sum(ev.units for ev in per_sample),
        failing=sum(ev.failing for ev in per_sample),
        violations=[
            Violation({"sample": i, **v.location}, v.observed, v.expected, v.note)
            for i, ev in enumerate(per_sample) for v in ev.violations
        ],
        observed="; ".join(f"sample={i}: {ev.observed}" for i, ev in enumerate(per_sample[:3]))
        + (f"; ... {len(per_sample) - 3} more samples" if len(per_sample) > 3 else ""),
        expected=first.expected,
    )


def wilson_lower_bound(passed: int, total: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a pass rate at ``confidence`` (0 for no samples)."""
    if total == 0:
        return 0.0
    z = statistics.NormalDist().inv_cdf(confidence)
    rate = passed / total
    centre = rate + z * z / (2 * total)
    spread = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total))
    return (centre - spread) / (1 + z * z / total)


def _over_samples(name: str, params: dict, per_sample: Sequence[Evaluation],
                  labels: Sequence[str]) -> tuple[Evaluation, bool, str]:
    """A sample passes when the property holds there entirely; the Wilson bound of the pass rate must reach mostly."""
    failing = [i for i, ev in enumerate(per_sample) if ev.failing]
    total = len(per_sample)
    lower = wilson_lower_bound(total - len(failing), total, params["confidence"])
    best = wilson_lower_bound(total, total, params["confidence"])
    ok = lower >= params["mostly"]
    expected = (f"holds in at least {params['mostly']:.0%} of samples at {params['confidence']:.0%} confidence "
                f"(lower Wilson bound; with {total} samples it is at most {best:.3f} even if all pass)")
    violations = [
        Violation({"sample": i, **v.location}, v.observed, v.expected, f"{labels[i]}" + (f"; {v.note}" if v.note else ""))
        for i in failing for v in per_sample[i].violations[:1]
    ]
    ev = Evaluation(
        unit="samples",
        units=total,
        failing=len(failing),
        violations=violations,
        observed=f"holds in {total - len(failing)} of {total} samples, lower bound {lower:.3f}; failing: "
        + (", ".join(labels[i] for i in failing[:MAX_LISTED]) or "none"),
        expected=expected,
    )
    return ev, ok, (f"{name} on {params['metric']} over samples: {len(failing)} of {total} samples violate "
                    f"(lower bound {lower:.3f}, needs {params['mostly']:.0%})")


def _positional(da: xr.DataArray) -> xr.DataArray:
    """A population's arrays for one evaluation of all samples: ``sample`` numbered by position, as violations name
    samples (their ``prompt`` and ``seed`` are in the samples' labels)."""
    return da.drop_vars(list(SAMPLE_COORDS), errors="ignore").assign_coords({SAMPLE_DIM: np.arange(da.sizes[SAMPLE_DIM])})


def run_check(ds: xr.Dataset, name: str, params: Mapping[str, Any], *, layer: int | None = None) -> CheckResult:
    """Evaluate property ``name`` on ``ds`` (one layer of it when ``layer`` is given)."""
    if name not in PROPERTIES:
        raise HarnessError(f"unknown property {name!r}; known: {', '.join(PROPERTIES)}")
    try:
        params = normalize_params(name, params)
    except FieldErrors as err:
        raise HarnessError(f"{name}: {err}") from None
    da = _select(ds, params, layer)
    prop = PROPERTIES[name]
    missing = [dim for dim in prop.needs_dims if dim not in ds.dims]
    if missing:
        raise HarnessError(f"{name} needs data with dims {missing} (a training history); got dims {dict(ds.sizes)}")
    if params["over"] == "samples" and SAMPLE_DIM not in ds.dims:
        raise HarnessError(f"{name}: over: samples needs a population extraction (probe prompts/seeds); this one has one sample")
    if not 0 < params["confidence"] < 1:
        raise HarnessError(f"{name}: confidence must be in (0, 1); got {params['confidence']}")
    extra = {var: _select(ds, {**params, "metric": var}, layer) for var in prop.uses}
    if params.get("stable_across") == "samples":  # the property compares the samples; mostly was per head
        ev = prop.fn(da, params, **extra)
        ok, head = _verdict(name, {**params, "mostly": 1.0}, ev)
    elif SAMPLE_DIM not in da.dims:
        ev = prop.fn(da, params, **extra)
        ok, head = _verdict(name, params, ev)
    else:
        per_sample = prop.fn(_positional(da), params, **{k: _positional(v) for k, v in extra.items()})
        labels = [f"sample={i} (prompt {str(p)!r}, seed {int(s)})" for i, (p, s) in
                  enumerate(zip(ds["prompt"].values, ds["seed"].values))]
        if params["over"] == "samples":
            ev, ok, head = _over_samples(name, params, per_sample, labels)
        else:
            ev = _pooled(per_sample)
            ok, head = _verdict(name, params, ev)
    severity = params["severity"]
    status = "pass" if ok else ("warn" if severity == "warn" else "fail")
    lines = [head, f"  expected: {ev.expected}", f"  observed: {ev.observed}"]
    if ev.violations:
        lines.append("  violations:")
        lines += [f"    {v.describe()}" for v in ev.violations[:MAX_LISTED]]
        if len(ev.violations) > MAX_LISTED:
            lines.append(f"    ... and {len(ev.violations) - MAX_LISTED} more")
    return CheckResult(
        property=name,
        status=status,
        severity=severity,
        metric=params["metric"],
        observed=ev.observed,
        expected=ev.expected,
        message="\n".join(lines),
        violations=ev.violations[:MAX_RECORDED],
    )
