"""Self-contained HTML reports: the test-run report and the checkpoint comparison.

One file each, no network: figures are inline SVG (overviews) or base64 PNG data URIs
(heatmap grids), styles are inline. Sections are collapsed ``<details>`` with the
overview first, so a 30-layer extraction stays navigable. Counts, statuses and check ids
are also in ``data-*`` attributes so tests (and scripts) can read the page back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import xarray as xr

from attn_harness.core import metrics
from attn_harness.core.errors import HarnessError
from attn_harness.core.schema import SAMPLE_DIM
from attn_harness.report import compare, figures
from attn_harness.core.atomic import write_atomic
from attn_harness.core.store import read_dataset

STATUSES: tuple[str, ...] = ("pass", "warn", "fail", "skip", "error")
# Statuses whose checks get a figure (when their data can be read).
SHOWN_STATUSES: tuple[str, ...] = ("fail", "warn", "error")
PNG_DPI = 80
RESULT_KEYS: tuple[str, ...] = ("run", "specs", "checks")
CHECK_KEYS: tuple[str, ...] = ("nodeid", "spec", "status")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("attn_harness.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def status_counts(checks: Sequence[Mapping]) -> dict[str, int]:
    """Number of checks per status, every status present (0 when none)."""
    counts = dict.fromkeys(STATUSES, 0)
    for check in checks:
        counts[check["status"]] = counts.get(check["status"], 0) + 1
    return counts


def _validate_results(results: Mapping) -> None:
    missing = [key for key in RESULT_KEYS if key not in results]
    if missing:
        raise HarnessError(f"results record lacks {missing}; expected keys {list(RESULT_KEYS)} (see the pytest plugin)")
    for index, check in enumerate(results["checks"]):
        absent = [key for key in CHECK_KEYS if key not in check]
        if absent:
            raise HarnessError(f"results checks[{index}] lacks {absent}")
        if check["status"] not in STATUSES:
            raise HarnessError(f"results checks[{index}] ({check['nodeid']}): status {check['status']!r} not in {STATUSES}")


class _Datasets:
    """Reads each extraction or baseline file once; remembers why a file could not be read."""

    def __init__(self) -> None:
        self._cache: dict[str, xr.Dataset | str] = {}

    def extraction(self, path: str | None) -> xr.Dataset | str:
        if not path:
            return "no extraction: this spec did not run (see the skip or error reasons below)"
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


def _locations(check: Mapping) -> list[dict]:
    return [dict(v["location"]) for v in check.get("violations") or [] if v.get("location")]


def _view(da: xr.DataArray, layer: int, step: int | None) -> xr.DataArray:
    """(head, query_frame, key_frame) of ``da`` at ``layer`` and ``step`` where those dims exist."""
    if "layer" in da.dims:
        da = da.sel(layer=layer)
    if "step" in da.dims:
        da = da.sel(step=da["step"].values[-1] if step is None else step)
    return da.transpose("head", "query_frame", "key_frame")


def _grid_uri(da: xr.DataArray, **kwargs: Any) -> str:
    return figures.png_data_uri(figures.head_grid(da, **kwargs), dpi=PNG_DPI, tight=False)  # fixed margins


def _property_figures(ds: xr.Dataset, check: Mapping) -> list[dict]:
    metric, layer = check.get("metric") or "logits", check["layer"]
    locations = _locations(check)
    step = locations[0].get("step") if locations else None
    step = int(ds["step"].values[-1]) if step is None else int(step)
    here = [loc for loc in locations if loc.get("step", step) == step and loc.get("layer", layer) == layer]
    view = ds[metric].sel(step=step, layer=layer)
    if metric == "text_mass":
        title = f"Layer {layer}, step {step}: text attention mass per query frame and text token"
        return [{"caption": title, "uri": figures.png_data_uri(figures.text_mass_grid(view, title=title), dpi=PNG_DPI, tight=False)}]
    title = f"Layer {layer}, step {step}: {figures.LABELS[metric]}; violating cells outlined"
    return [{"caption": title, "uri": _grid_uri(view, metric=metric, highlight=here, title=title)}]


def _baseline_figures(store: _Datasets, check: Mapping) -> list[dict] | str:
    metric, layer = check.get("metric") or "logits", check["layer"]
    baseline = store.array(check.get("baseline"), metric)
    obtained = store.array(check.get("obtained"), metric)
    for name, value in (("baseline", baseline), ("obtained", obtained)):
        if isinstance(value, str):
            return f"{name}: {value}"
    locations = _locations(check)
    step = locations[0].get("step") if locations else None
    base, got = _view(baseline, layer, step), _view(obtained, layer, step)
    if base.shape != got.shape:
        return f"baseline shape {dict(base.sizes)} differs from obtained {dict(got.sizes)}"
    here = [loc for loc in locations if loc.get("layer", layer) == layer]
    both = np.concatenate([base.values.ravel(), got.values.ravel()])
    limit = (
        float(np.nanmax(both)) if metric == "mass" and np.isfinite(both).any() else figures.symmetric_limit(both)
    )
    diff = got.copy(data=got.values - base.values)
    return [
        {"caption": "baseline", "uri": _grid_uri(base, metric=metric, limit=limit, title="baseline")},
        {"caption": "obtained", "uri": _grid_uri(got, metric=metric, limit=limit, title="obtained")},
        {
            "caption": "obtained - baseline",
            "uri": _grid_uri(diff, metric="difference", highlight=here, title="obtained - baseline"),
        },
    ]


def _check_figures(store: _Datasets, dataset: xr.Dataset | str, check: Mapping) -> tuple[list[dict], str]:
    """Figures for one failing check, or an explanation of why there are none."""
    if check["status"] not in SHOWN_STATUSES or check.get("layer") is None:
        return [], ""
    try:
        if check.get("kind") == "baseline":
            made = _baseline_figures(store, check)
            return (made, "") if isinstance(made, list) else ([], f"no baseline figure: {made}")
        if isinstance(dataset, str):
            return [], f"no figure: {dataset}"
        return _property_figures(dataset, check), ""
    except (HarnessError, KeyError, ValueError) as err:
        return [], f"no figure: {err}"


def _text_figure(ds: xr.Dataset, step: int) -> dict:
    """The cross-attention of the last captured layer at ``step``: text mass per query frame and token."""
    layer = int(ds["layer"].values[-1])
    caption = f"Text cross-attention: mass per query frame and text token (layer {layer}, step {step})"
    view = ds["text_mass"].sel(step=step, layer=layer)
    labels = list(view["text_token_string"].values) if "text_token_string" in view.coords else None
    grid = figures.text_mass_grid(view, title=caption, token_labels=labels)
    return {"caption": caption, "uri": figures.png_data_uri(grid, dpi=PNG_DPI, tight=False)}


def _location(item: Mapping) -> str:
    return f"{item.get('file', '?')}:{item.get('line', '?')}"


def _spec_section(store: _Datasets, spec: Mapping, checks: list[Mapping], index: int) -> dict:
    dataset = store.extraction(spec.get("dataset"))
    overview, dataset_note, text_figure = None, "", None
    if isinstance(dataset, str):
        dataset_note = dataset
    else:
        step = int(dataset["step"].values[-1])
        distribution = ""
        if SAMPLE_DIM in dataset.dims:  # a population: its sample spread, then the mean in every other figure
            distribution = figures.inline_svg(figures.sample_distribution(dataset, step))
            dataset = metrics.sample_mean(dataset)
        overview = figures.inline_svg(figures.layer_head_overview(dataset, step)) + distribution
        if "aligned_mass" in dataset and "mass" in dataset:
            overview += figures.inline_svg(figures.head_type_map(dataset, step))
        if "text_mass" in dataset.data_vars:
            text_figure = _text_figure(dataset, step)
    rows, failures = [], []
    for number, check in enumerate(checks):
        row = {
            "anchor": f"s{index}-c{number}",
            "nodeid": check["nodeid"],
            "status": check["status"],
            "severity": check.get("severity", ""),
            "property": check.get("property", ""),
            "kind": check.get("kind", ""),
            "layer": "" if check.get("layer") is None else check["layer"],
            "metric": check.get("metric", ""),
            "observed": check.get("observed", ""),
            "expected": check.get("expected", ""),
            "message": check.get("message", ""),
            "location": _location(check),
            "violations": len(check.get("violations") or []),
            "regen_command": check.get("regen_command"),
            "duration_s": check.get("duration_s"),
        }
        rows.append(row)
        if check["status"] in SHOWN_STATUSES:
            row["figures"], row["figure_note"] = _check_figures(store, dataset, check)
            failures.append(row)
    provenance = {"spec file": _location(spec), "model": spec.get("model", ""), "dataset": spec.get("dataset", "")}
    provenance.update({k: _text(v) for k, v in (spec.get("provenance") or {}).items()})
    provenance["probe"] = _text(spec.get("probe", {}))
    return {
        "anchor": f"spec-{index}",
        "name": spec.get("spec", "(checks without a spec)"),
        "counts": status_counts(checks),
        "failed": any(c["status"] in ("fail", "error") for c in checks),
        "provenance": provenance,
        "overview": overview,
        "text_figure": text_figure,
        "dataset_note": dataset_note,
        "rows": rows,
        "failures": failures,
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def render_run_report(results: Mapping, out_dir: Path | str) -> Path:
    """Write ``out_dir/index.html`` for one pytest run's results record; return its path.

    ``results`` is the record the pytest plugin writes (``run``, ``specs``, ``checks``).
    Extraction, baseline and obtained files named in it are read to draw figures; a file
    that cannot be read is named in the report instead of failing it.
    """
    _validate_results(results)
    store = _Datasets()
    specs = list(results["specs"])
    known = {spec["spec"] for spec in specs}
    for check in results["checks"]:  # specs that never extracted (skipped, errored) still get a section
        if check["spec"] not in known:
            known.add(check["spec"])
            specs.append({"spec": check["spec"], "file": check.get("file"), "line": check.get("line")})
    sections = [
        _spec_section(store, spec, [c for c in results["checks"] if c["spec"] == spec["spec"]], index)
        for index, spec in enumerate(specs)
    ]
    page = _environment().get_template("run_report.html.j2").render(
        run={k: _text(v) for k, v in results["run"].items()},
        statuses=STATUSES,
        totals=status_counts(results["checks"]),
        sections=sections,
    )
    return write_atomic(Path(out_dir) / "index.html", page.encode("utf-8"))


def _attrs_table(a: xr.Dataset, b: xr.Dataset) -> list[tuple[str, str, str]]:
    keys = ("model_id", "checkpoint_path", "checkpoint_fingerprint", "mask", "seed", "prompt", "num_frames",
            "latent_frames", "dtype", "created")
    return [(k, _text(a.attrs.get(k, "")), _text(b.attrs.get(k, ""))) for k in keys if k in a.attrs or k in b.attrs]


def _layer_section(aligned: compare.Aligned, layer: int, step: int, score: xr.DataArray) -> dict:
    a, b = _view(aligned.a, layer, step), _view(aligned.b, layer, step)
    both = np.concatenate([a.values.ravel(), b.values.ravel()])
    if aligned.metric == "mass":
        limit = float(np.nanmax(both)) if np.isfinite(both).any() else 1.0
    else:
        limit = figures.symmetric_limit(both)
    labels = aligned.labels
    diff = b - a
    grids = [
        {"caption": labels[0], "uri": _grid_uri(a, metric=aligned.metric, limit=limit, title=labels[0])},
        {"caption": labels[1], "uri": _grid_uri(b, metric=aligned.metric, limit=limit, title=labels[1])},
        {
            "caption": f"{labels[1]} - {labels[0]}",
            "uri": _grid_uri(diff, metric="difference", title=f"{labels[1]} - {labels[0]}"),
        },
    ]
    return {
        "layer": layer,
        "anchor": f"layer-{layer}",
        "mean_abs": float(score.sel(layer=layer).mean()),
        "grids": grids,
        "heads": compare.head_table(aligned, layer, step),
        "flips": compare.flips(aligned, layer, step),
    }


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
) -> Path:
    """Write a self-contained comparison of two extractions to ``out``; return its path.

    Overview first (mean |B - A| per layer x head for every paired step, and the top
    differences), then the flips, then per layer A, B and B - A at ``step`` with per-head
    statistic deltas. ``sources`` are the file names shown in the header.
    """
    aligned = compare.align(a, b, labels=labels, layers=layers, metric=metric)
    chosen = compare.pick_step(aligned, step)
    score = compare.mean_abs_difference(aligned)
    overview = figures.inline_svg(figures.difference_overview(score, labels=labels, b_steps=aligned.b_steps))
    sections = [_layer_section(aligned, int(layer), chosen, score.sel(step=chosen)) for layer in aligned.a["layer"].values]
    steps_a = [int(s) for s in aligned.a["step"].values]
    page = _environment().get_template("compare.html.j2").render(
        labels=labels,
        sources=sources or ("", ""),
        metric=metric,
        step=chosen,
        b_step=aligned.b_steps[steps_a.index(chosen)],
        query_frames=aligned.query_frames,
        attrs=_attrs_table(a, b),
        overview=overview,
        top=compare.top_differences(aligned),
        flips=[flip for section in sections for flip in section["flips"]],
        sections=sections,
        sink_threshold=compare.SINK_HEAD_THRESHOLD[metric],
    )
    out = Path(out)
    return write_atomic(out, page.encode("utf-8"))

