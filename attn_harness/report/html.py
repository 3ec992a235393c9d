"""Self-contained HTML reports: the test-run report and the checkpoint comparison.

One file each, no network: the run report's figures are base64 PNG data URIs (its 4-layer x
4-head overview is 12 KB as PNG, 28 KB as SVG, whose text dominates), the comparison's
overview inline SVG; the comparison's head grids are drawn in the page by an inline script
from inline JSON (values under the pointer, click to enlarge), which keeps a 30-layer
comparison small and fast to write. Styles and scripts are inline. Sections are collapsed
``<details>`` with the overview first. Counts, statuses and check ids are also in
``data-*`` attributes so tests (and scripts) can read the page back.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import matplotlib
import numpy as np
import xarray as xr

from attn_harness.core import metrics
from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.results import STATUSES, CheckRecord, Results, SpecInfo
from attn_harness.core.schema import PROVENANCE_ATTRS, SAMPLE_DIM
from attn_harness.core.store import read_dataset
from attn_harness.report import compare, figures
from attn_harness.report.settings import DEFAULT_TOP, FLIP_MARGIN

# Statuses whose checks get a figure (when their data can be read).
SHOWN_STATUSES: tuple[str, ...] = ("fail", "warn", "error")
# Checks of one layer are listed most urgent first.
STATUS_ORDER: tuple[str, ...] = ("error", "fail", "warn", "skip", "pass")
PNG_DPI = 80
OVERVIEW_ALT = "sink score and diagonal mean per layer and head"


def _content(value: Any) -> markupsafe.Markup:
    """``value`` escaped for element content, where quotes need no escape (JSON provenance is full of them)."""
    return markupsafe.Markup(html.escape(str(value), quote=False))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("attn_harness.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["content"] = _content
    return environment


def status_counts(checks: Sequence[CheckRecord]) -> dict[str, int]:
    """Number of checks per status, every status present (0 when none)."""
    counts = dict.fromkeys(STATUSES, 0)
    for check in checks:
        counts[check.status] += 1
    return counts


class _Datasets:
    """Reads each extraction or baseline file once (none that ``known`` holds); remembers why a file could not be read."""

    def __init__(self, known: Mapping[str, xr.Dataset] | None = None) -> None:
        self._cache: dict[str, xr.Dataset | str] = dict(known or {})

    def extraction(self, path: str | None) -> xr.Dataset | str:
        if not path:
            return "this spec did not run"
        if path not in self._cache:
            try:
                self._cache[path] = read_dataset(path)
            except HarnessError as err:
                self._cache[path] = str(err)
        return self._cache[path]

    def array(self, path: str | None, metric: str) -> xr.DataArray | str:
        """The ``metric`` variable of any NetCDF file (a baseline need not be a full extraction)."""
        if not path:
            return "no file recorded"
        key = f"{path}\0{metric}"
        if key not in self._cache:
            self._cache[key] = self._read_array(Path(path), metric)
        return self._cache[key]

    @staticmethod
    def _read_array(path: Path, metric: str) -> xr.DataArray | str:
        if not path.is_file():
            return f"{path} does not exist"
        try:
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                ds = ds.load()
        except (OSError, ValueError) as err:
            return f"{path} is not readable NetCDF: {err}"
        ds = metrics.sample_mean(ds)
        if metric in ds:
            return ds[metric]
        if len(ds.data_vars) == 1:
            return next(iter(ds.data_vars.values()))
        return f"{path} has no {metric!r} variable (has {sorted(ds.data_vars)})"


def _locations(check: CheckRecord) -> list[dict]:
    return [dict(v["location"]) for v in check.violations if v.get("location")]


def _view(da: xr.DataArray, layer: int, step: int | None) -> xr.DataArray:
    """(head, query_frame, key_frame) of ``da`` at ``layer`` and ``step`` where those dims exist."""
    if "layer" in da.dims:
        da = da.sel(layer=layer)
    if "step" in da.dims:
        da = da.sel(step=da["step"].values[-1] if step is None else step)
    return da.transpose("head", "query_frame", "key_frame")


def _grid_uri(da: xr.DataArray, **kwargs: Any) -> str:
    return figures.png_data_uri(figures.head_grid(da, **kwargs), dpi=PNG_DPI, tight=False)  # fixed margins


def _property_figures(ds: xr.Dataset, check: CheckRecord) -> list[dict]:
    metric, layer = check.metric or "logits", check.layer
    locations = _locations(check)
    step = locations[0].get("step") if locations else None
    step = int(ds["step"].values[-1]) if step is None else int(step)
    here = [loc for loc in locations if loc.get("step", step) == step and loc.get("layer", layer) == layer]
    view = ds[metric].sel(step=step, layer=layer)
    if metric == "text_mass":
        title = f"Layer {layer}, step {step}: text attention mass per query frame and text token"
        return [{"caption": title,
                 "uri": figures.png_data_uri(figures.text_mass_grid(view, title=title), dpi=PNG_DPI, tight=False)}]
    title = f"Layer {layer}, step {step}: {figures.LABELS[metric]}; violating cells outlined"
    return [{"caption": title, "uri": _grid_uri(view, metric=metric, highlight=here, title=title)}]


def _where_text(location: Mapping[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in location.items() if k not in ("step", "layer"))


def _baseline_figures(store: _Datasets, check: CheckRecord) -> list[dict] | str:
    """Per variable beyond tolerance: baseline, obtained and their difference at the step of the
    variable's worst cell (each at its own step), the worst cells of that step outlined."""
    made: list[dict] = []
    failing = [v for v in check.variables if v.beyond]
    if not failing:
        return "the results record has no per-variable differences for this baseline"
    for diff in failing:
        baseline = store.array(check.baseline, diff.variable)
        obtained = store.array(check.obtained, diff.variable)
        for name, value in (("baseline", baseline), ("obtained", obtained)):
            if isinstance(value, str):
                return f"{name}: {value}"
        worst = diff.worst[0]["location"]
        step, layer = int(worst["step"]), int(worst.get("layer", check.layer))
        base, got = _view(baseline, layer, step), _view(obtained, layer, step)
        if base.shape != got.shape:
            return f"baseline shape {dict(base.sizes)} differs from obtained {dict(got.sizes)}"
        here = [c["location"] for c in diff.worst if c["location"]["step"] == step]
        per_step = abs(obtained - baseline).max([d for d in baseline.dims if d != "step"], skipna=True)
        steps_text = ", ".join(f"{int(s)}: {float(v):.3g}" for s, v in zip(per_step["step"].values, per_step.values))
        metric = diff.variable if diff.variable in figures.CMAPS else "logits"
        both = np.concatenate([base.values.ravel(), got.values.ravel()])
        limit = float(np.nanmax(both)) if metric == "mass" and np.isfinite(both).any() else figures.symmetric_limit(both)
        at = f"{diff.variable}, layer {layer}, step {step}"
        made.append({
            "caption": (f"{at}: the step of the worst cell ({_where_text(worst)}, |diff| "
                        f"{float(diff.worst[0]['abs_diff']):.3g}); worst cells outlined. Max |diff| per step: {steps_text}"),
            "step": step, "layer": layer, "variable": diff.variable,
            "panels": [
                {"caption": f"baseline ({at})", "uri": _grid_uri(base, metric=metric, limit=limit, title=f"baseline: {at}")},
                {"caption": f"obtained ({at})", "uri": _grid_uri(got, metric=metric, limit=limit, title=f"obtained: {at}")},
                {"caption": f"obtained - baseline ({at})",
                 "uri": _grid_uri(got - base, metric="difference", highlight=here, title=f"obtained - baseline: {at}")},
            ],
        })
    return made


def _check_figures(store: _Datasets, dataset: xr.Dataset | str, check: CheckRecord) -> tuple[list[dict], str]:
    """Figure groups for one failing check, or an explanation of why there are none."""
    if check.status not in SHOWN_STATUSES or check.layer is None:
        return [], ""
    try:
        if check.kind == "baseline":
            made = _baseline_figures(store, check)
            return (made, "") if isinstance(made, list) else ([], f"no baseline figure: {made}")
        if isinstance(dataset, str):
            return [], f"no figure: {dataset}"
        return [{"caption": "", "panels": _property_figures(dataset, check)}], ""
    except (HarnessError, KeyError, ValueError) as err:
        return [], f"no figure: {err}"


def _png_img(fig, alt: str) -> str:
    """A figure as an inline PNG ``<img>``: point clouds and annotated heatmaps are 2-3x smaller than as SVG."""
    return f'<img src="{figures.png_data_uri(fig, dpi=PNG_DPI)}" alt="{alt}">'


def _text_figure(ds: xr.Dataset, step: int) -> dict:
    """The cross-attention of the last captured layer at ``step``: text mass per query frame and token."""
    layer = int(ds["layer"].values[-1])
    caption = f"Text cross-attention: mass per query frame and text token (layer {layer}, step {step})"
    view = ds["text_mass"].sel(step=step, layer=layer)
    labels = list(view["text_token_string"].values) if "text_token_string" in view.coords else None
    grid = figures.text_mass_grid(view, title=caption, token_labels=labels)
    return {"caption": caption, "uri": figures.png_data_uri(grid, dpi=PNG_DPI, tight=False)}


def _sort_key(check: CheckRecord) -> tuple:
    layer = check.layer
    by_layer = (0, layer, "") if isinstance(layer, int) else (1, 0, str(layer))
    return (*by_layer, STATUS_ORDER.index(check.status), check.check_id)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _attention_groups(checks: Sequence[CheckRecord], anchors: Mapping[str, str]) -> list[dict]:
    """Every check that is not a pass, grouped by status and reason (first line of its message)."""
    groups: dict[tuple[str, str], list[CheckRecord]] = {}
    for check in checks:
        if check.status != "pass":
            groups.setdefault((check.status, _first_line(check.message)), []).append(check)
    ordered = sorted(groups.items(), key=lambda item: (STATUS_ORDER.index(item[0][0]), -len(item[1]), item[0][1]))
    return [
        {"status": status, "reason": reason, "specs": sorted({c.spec for c in members}),
         "checks": [{"nodeid": c.nodeid, "anchor": anchors[c.nodeid]} for c in members]}
        for (status, reason), members in ordered
    ]


def _spec_section(store: _Datasets, spec: SpecInfo, checks: list[CheckRecord], index: int) -> dict:
    dataset = store.extraction(spec.dataset)
    overview, dataset_note, text_figure = None, "", None
    if isinstance(dataset, str):
        reasons = sorted({_first_line(c.message) for c in checks if c.status in ("skip", "error")})
        dataset_note = dataset + (": " + "; ".join(reasons) if reasons and not spec.dataset else "")
    else:
        step = int(dataset["step"].values[-1])
        distribution = ""
        if SAMPLE_DIM in dataset.dims:  # a population: its sample spread, then the mean in every other figure
            distribution = _png_img(figures.sample_distribution(dataset, step), "sink score per head over the samples")
            dataset = metrics.sample_mean(dataset)
        overview = _png_img(figures.layer_head_overview(dataset, step), OVERVIEW_ALT) + distribution
        if "aligned_mass" in dataset and "mass" in dataset:
            overview += _png_img(figures.head_type_map(dataset, step), "head types per layer and head")
        if "text_mass" in dataset.data_vars:
            text_figure = _text_figure(dataset, step)
    rows, failures = [], []
    for number, check in enumerate(sorted(checks, key=_sort_key)):
        row = {
            "anchor": f"s{index}-c{number}", "check": check, "id": check.check_id,
            "rank": STATUS_ORDER.index(check.status),
            "layer": "" if check.layer is None else check.layer,
            "violations": sum(v.beyond for v in check.variables) if check.variables else len(check.violations),
        }
        rows.append(row)
        if check.status in SHOWN_STATUSES:
            row["figures"], row["figure_note"] = _check_figures(store, dataset, check)
            failures.append(row)
    provenance = {"spec file": f"{spec.file or '?'}:{spec.line if spec.line is not None else '?'}",
                  "model": spec.model, "dataset": spec.dataset or ""}
    provenance.update({k: _text(v) for k, v in spec.provenance.items()})
    provenance["probe"] = _text(spec.probe)
    return {
        "anchor": f"spec-{index}",
        "name": spec.spec,
        "counts": status_counts(checks),
        "failed": any(c.status in ("fail", "error") for c in checks),
        "provenance": provenance,
        "overview": overview,
        "text_figure": text_figure,
        "overview_step": None if overview is None else int(dataset["step"].values[-1]),
        "dataset_note": dataset_note,
        "rows": rows,
        "failures": failures,
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def render_run_report(results: Results | Mapping, out_dir: Path | str,
                      extractions: Mapping[str, xr.Dataset] | None = None) -> Path:
    """Write ``out_dir/index.html`` for one pytest run's results record; return its path.

    ``results`` is the record the pytest plugin writes (a :class:`Results` or its dict).
    Extraction, baseline and obtained files named in it are read to draw figures, except
    the extractions the run has in memory (``extractions``, by the path the record names); a
    file that cannot be read is named in the report instead of failing it.
    """
    results = results if isinstance(results, Results) else Results.from_dict(results)
    store = _Datasets(extractions)
    specs = list(results.specs)
    known = {spec.spec for spec in specs}
    for check in results.checks:  # specs that never extracted (skipped, errored) still get a section
        if check.spec not in known:
            known.add(check.spec)
            specs.append(SpecInfo(spec=check.spec, file=check.file))
    sections = [
        _spec_section(store, spec, [c for c in results.checks if c.spec == spec.spec], index)
        for index, spec in enumerate(specs)
    ]
    anchors = {row["check"].nodeid: row["anchor"] for section in sections for row in section["rows"]}
    totals = status_counts(results.checks)
    failing = totals["fail"] + totals["error"]
    page = _environment().get_template("run_report.html.j2").render(
        run=results.run,
        title=f"{failing} failing of {_plural(len(results.checks), 'check')}",
        statuses=STATUSES,
        shown_statuses=SHOWN_STATUSES,
        totals=totals,
        attention=_attention_groups(results.checks, anchors),
        sections=sections,
    )
    return write_atomic(Path(out_dir) / "index.html", page.encode("utf-8"))


def _provenance_rows(a: xr.Dataset, b: xr.Dataset, aligned: compare.Aligned) -> list[dict]:
    """Every provenance attr either side has (schema.PROVENANCE_ATTRS), then the captured steps."""
    rows = [
        {"key": key, "group": group, "a": _text(a.attrs.get(key, "<absent>")), "b": _text(b.attrs.get(key, "<absent>"))}
        for key, group in PROVENANCE_ATTRS.items() if key in a.attrs or key in b.attrs
    ]
    rows.append({"key": "captured steps", "group": "probe", "a": _text([int(s) for s in a["step"].values]),
                 "b": _text([int(s) for s in b["step"].values])})
    rows.append({"key": "compared steps", "group": "probe", "a": _text([int(s) for s in aligned.a["step"].values]),
                 "b": _text(aligned.b_steps)})
    for row in rows:
        row["differs"] = row["a"] != row["b"]
    return rows


def _grid_data(aligned: compare.Aligned, layer: int, step: int) -> str:
    """A layer's A and B values at ``step`` as JSON for the page's heatmaps (4 significant digits)."""
    a, b = _view(aligned.a, layer, step), _view(aligned.b, layer, step)
    both = np.concatenate([a.values.ravel(), b.values.ravel()]).astype(np.float64)
    if aligned.metric == "mass":
        scale = [0.0, float(np.nanmax(both)) if np.isfinite(both).any() else 1.0]
    else:
        limit = figures.symmetric_limit(both)
        scale = [-limit, limit]
    diff_limit = figures.symmetric_limit((b.values - a.values).astype(np.float64).ravel())

    def numbers(da: xr.DataArray) -> str:
        return "[" + ",".join("null" if v != v else f"{v:.4g}" for v in da.values.ravel().tolist()) + "]"

    meta = {
        "layer": layer, "labels": list(aligned.labels), "heads": [int(h) for h in a["head"].values],
        "query": [int(q) for q in a["query_frame"].values], "key": [int(k) for k in a["key_frame"].values],
        "cols": figures.grid_shape(a.sizes["head"])[1],
        "scale": {"a": scale, "b": scale, "diff": [-diff_limit, diff_limit]},
        "cmap": {"a": figures.CMAPS[aligned.metric], "b": figures.CMAPS[aligned.metric], "diff": figures.CMAPS["difference"]},
    }
    text = json.dumps(meta).replace("<", "\\u003c")  # a label cannot close the <script> element
    return text[:-1] + f',"a":{numbers(a)},"b":{numbers(b)}}}'


def _colormaps() -> str:
    """The report's colormaps as 256 hex colours each, for the inline heatmaps."""
    luts = {}
    for name in sorted(set(figures.CMAPS.values())):
        rgb = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
        luts[name] = "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in np.round(rgb * 255).astype(int).tolist())
    return json.dumps(luts)


def render_compare(
    a: xr.Dataset,
    b: xr.Dataset,
    out: Path | str,
    *,
    labels: tuple[str, str] = ("A", "B"),
    layers: Sequence[int] | None = None,
    metric: str = "logits",
    step: int | str = "last",
    sources: tuple[str, str] | None = None,
    top: int | None = DEFAULT_TOP,
    steps: tuple[int | str, int | str] | None = None,
    sink_threshold: float | None = None,
    flip_margin: float = FLIP_MARGIN,
) -> Path:
    """Write a self-contained comparison of two extractions to ``out``; return its path.

    Provenance diff first (a banner when the probes differ), then the overview (mean |B - A|
    per layer x head for every paired step), the layers ranked by mean |B - A| at ``step``,
    the flips beyond ``flip_margin`` (``compare.flips``), and per layer the per-head
    statistic deltas. Head grids (A, B, B - A, drawn in the page from inline data, values
    under the pointer) only for the ``top`` layers that differ most (``None``: all).
    ``steps=(a_step, b_step)`` compares one chosen step of each side instead of pairing by
    position. ``sources`` are the file names shown in the header.
    """
    if top is not None and top < 1:
        raise HarnessError(f"--top must be a positive number of layers or 'all'; got {top}")
    if sink_threshold is not None and not sink_threshold > 0:
        raise HarnessError(f"--sink-threshold must be a positive sink score; got {sink_threshold}")
    if not 0 <= flip_margin < 1:
        raise HarnessError(f"--flip-margin must be a fraction in [0, 1); got {flip_margin}")
    aligned = compare.align(a, b, labels=labels, layers=layers, metric=metric, steps=steps)
    chosen = compare.pick_step(aligned, "last" if steps is not None else step)
    threshold = compare.SINK_HEAD_THRESHOLD[metric] if sink_threshold is None else sink_threshold
    score = compare.mean_abs_difference(aligned)
    overview = figures.inline_svg(figures.difference_overview(score, labels=labels, b_steps=aligned.b_steps))
    ranking = compare.layer_ranking(aligned, chosen)
    drawn = [r["layer"] for r in ranking[: len(ranking) if top is None else top]]
    sections, flips = [], []
    mean_abs = score.sel(step=chosen).mean("head")
    for layer, heads in compare.head_tables(aligned, chosen).items():
        changes = compare.flips(aligned, layer, chosen, sink_threshold=threshold, margin=flip_margin, rows=heads)
        flips += changes
        sections.append({
            "layer": layer, "anchor": f"layer-{layer}",
            "mean_abs": float(mean_abs.sel(layer=layer)),
            "heads": heads,
            "flips": [f for f in changes if f["counted"]],
            "grid": _grid_data(aligned, layer, chosen) if layer in drawn else None,
        })
    for row in ranking:
        row["flips"] = sum(f["counted"] for f in flips if f["layer"] == row["layer"])
    provenance = _provenance_rows(a, b, aligned)
    steps_a = [int(s) for s in aligned.a["step"].values]
    page = _environment().get_template("compare.html.j2").render(
        labels=labels,
        sources=sources or ("", ""),
        metric=metric,
        step=chosen,
        b_step=aligned.b_steps[steps_a.index(chosen)],
        chosen_steps=steps is not None,
        query_frames=aligned.query_frames,
        provenance=provenance,
        probe_differences=[r["key"] for r in provenance if r["differs"] and r["group"] == "probe"],
        overview=overview,
        ranking=ranking,
        drawn=drawn,
        top_all=top is None,
        top=compare.top_differences(aligned),
        flips=[f for f in flips if f["counted"]],
        near_flips=[f for f in flips if not f["counted"]],
        sections=sections,
        views=[("diff", f"{labels[1]} - {labels[0]}"), ("a", labels[0]), ("b", labels[1])],
        colormaps=_colormaps(),
        sink_threshold=threshold,
        flip_margin=flip_margin,
    )
    return write_atomic(Path(out), page.encode("utf-8"))
