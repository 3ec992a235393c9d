"""The test-run report read back like a user's browser would: images, links, counts, failures.

The page is parsed with the standard library's HTMLParser; every data: image is decoded
(PNG by Pillow, SVG as XML), and the counts it shows are compared with the results record.
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attn_harness.core.errors import HarnessError
from attn_harness.core.results import STATUSES
from attn_harness.core.spec import DEFAULT_TOLERANCES
from attn_harness.core.store import read_dataset, write_dataset
from attn_harness.pytest.baseline import layer_slice, variable_differences
from attn_harness.report.html import OVERVIEW_ALT, render_run_report
from tests.test_figures import planted_dataset

URL_ATTRS = ("src", "href", "xlink:href", "action", "poster", "data")


def _check(spec: str, layer: int, prop: str, status: str, **extra) -> dict:
    record = {
        "nodeid": f"specs/{spec}.yaml::{spec}::layer{layer}::{prop}", "spec": spec, "file": f"specs/{spec}.yaml",
        "line": 3 + layer, "layer": layer, "property": prop, "kind": "property", "status": status,
        "severity": "fail", "metric": "logits", "observed": "0.1", "expected": ">= 1.0", "message": f"{prop} {status}",
        "violations": [], "baseline": None, "obtained": None, "regen_command": None, "duration_s": 0.01,
    }
    record.update(extra)
    return record


SKIP_REASON = "spec 'gpu-spec' is marked gpu and no CUDA device is present (torch.cuda.is_available() is False)"


def baseline_pair(ds, tmp_path: Path) -> tuple[Path, Path, list]:
    """Layer 2 of ``ds`` as a baseline and a run that moved it: +1.0 in one cell at the first step
    (step 0) and +0.05 everywhere at the last (step 5); the per-variable differences as the plugin
    records them."""
    baseline, obtained = tmp_path / "baseline.nc", tmp_path / "obtained.nc"
    expected = layer_slice(ds, 2)
    write_dataset(expected, baseline)
    changed = expected.copy(deep=True)
    changed["logits"].loc[{"step": 0, "head": 1, "query_frame": 7, "key_frame": 2}] += 1.0
    changed["logits"].loc[{"step": 5}] += 0.05
    write_dataset(changed, obtained)
    diffs = variable_differences(read_dataset(baseline), read_dataset(obtained), DEFAULT_TOLERANCES)
    return baseline, obtained, diffs


def results_record(tmp_path: Path) -> dict:
    """Three specs over real files: property passes/fails/warns/skips, one failing baseline, and a
    spec skipped as a whole (marked gpu, no CUDA)."""
    ds = planted_dataset(mask="block-causal")
    dataset = write_dataset(ds, tmp_path / "cache" / "tiny.nc")
    baseline, obtained, diffs = baseline_pair(ds, tmp_path)
    sink_violation = {"location": {"step": 5, "layer": 1, "head": 2}, "observed": -0.2, "expected": ">= 1.0"}
    cell_violation = {
        "location": {"step": 5, "layer": 1, "head": 1, "query_frame": 7, "key_frame": 3}, "observed": 0.1,
        "expected": ">= 1.0",
    }
    checks = [
        _check("tiny", 0, "diagonal_dominant", "pass"),
        _check("tiny", 1, "sink", "fail", violations=[sink_violation, cell_violation]),
        _check("tiny", 1, "entropy", "warn", severity="warn", violations=[cell_violation]),
        _check("tiny", 3, "mass_rows", "skip", metric="mass", message="not captured at this step"),
        _check(
            "tiny", 2, "baseline", "fail", kind="baseline", metric="logits, mass", baseline=str(baseline),
            obtained=str(obtained), regen_command="pytest specs/tiny.yaml --attn-regen-baselines -k layer2",
            variables=[asdict(d) for d in diffs],
            violations=[{"location": c["location"], "observed": c["obtained"], "expected": str(c["baseline"])}
                        for d in diffs for c in d.worst],
        ),
        _check("missing", 0, "sink", "fail", violations=[sink_violation]),
        _check("missing", 1, "sink", "pass"),
        _check("missing", 2, "sink", "error", message="HarnessError: specs/missing.yaml:4: bad layer"),
        _check("gpu-spec", 20, "sink_heads", "skip", message=SKIP_REASON),
        _check("gpu-spec", 20, "value_range", "skip", message=SKIP_REASON),
        _check("gpu-spec", 21, "baseline", "skip", kind="baseline", message=SKIP_REASON),
    ]
    specs = [
        {"spec": "tiny", "file": "specs/tiny.yaml", "line": 1, "model": "tiny-random", "probe": {"seed": 0},
         "dataset": str(dataset), "provenance": {"model_id": "tiny-random", "checkpoint_fingerprint": "ab12"}},
        {"spec": "missing", "file": "specs/missing.yaml", "line": 1, "model": "tiny-random", "probe": {"seed": 1},
         "dataset": str(tmp_path / "cache" / "gone.nc"), "provenance": {}},
    ]
    run = {"command": "pytest specs/ -q", "started": "2026-11-01T10:00:00", "duration_s": 4.2, "harness_version": "0.1.0"}
    return {"run": run, "specs": specs, "checks": checks}


class Page(HTMLParser):
    """Collects what the assertions need: tags with attrs, inline SVG text, cell texts by data-*."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self._open: list[tuple[str, dict, list[str]]] = []
        self.texts: list[tuple[str, dict, str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("td", "th", "summary", "pre", "p"):
            self._open.append((tag, attrs, []))

    def handle_data(self, data):
        for _, _, parts in self._open:
            parts.append(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            name, attrs, parts = self._open.pop()
            self.texts.append((name, attrs, "".join(parts).strip()))

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    results = results_record(tmp_path)
    path = render_run_report(results, tmp_path / "out")
    text = path.read_text(encoding="utf-8")
    return results, path, text, Page(text)


def test_report_is_one_file_in_the_chosen_directory(report):
    results, path, text, _ = report
    assert path.name == "index.html" and [p.name for p in path.parent.iterdir()] == ["index.html"]
    assert text.startswith("<!doctype html>") and len(text.encode()) < 5_000_000


def test_every_figure_is_an_embedded_png_that_decodes(report):
    _, _, text, page = report
    sources = [a["src"] for a in page.find("img")]
    # the overview of the one readable dataset, sink fail, baseline (3 panels), warn; the error has no layer data
    assert len(sources) == 1 + 1 + 3 + 1
    for src in sources:
        header, payload = src.split(",", 1)
        assert header == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100
    assert "<svg" not in text  # PNG: the overview's SVG was mostly text, twice the bytes


def test_the_extractions_a_run_holds_are_drawn_without_reading_their_files(tmp_path):
    results = results_record(tmp_path)
    dataset = results["specs"][0]["dataset"]
    held = read_dataset(dataset)
    Path(dataset).unlink()  # drawn from memory or not at all
    page = Page(render_run_report(results, tmp_path / "out", {dataset: held}).read_text(encoding="utf-8"))
    alts = [a["alt"] for a in page.find("img")]
    assert len(alts) == 1 + 1 + 3 + 1 and alts[0] == OVERVIEW_ALT


def test_no_external_url_anywhere(report):
    _, _, text, page = report
    for tag, attrs in page.tags:
        for name in URL_ATTRS:
            if name not in attrs:
                continue
            value = (attrs[name] or "").strip().lower()
            assert value.startswith(("data:", "#")), (tag, name, value[:80])
    assert not page.find("link") and all("src" not in attrs for attrs in page.find("script"))
    scripts = " ".join(re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S))
    assert scripts and not re.search(r"fetch\(|XMLHttpRequest|WebSocket|import\(|https?:", scripts)
    assert "@import" not in text and "url(http" not in text.replace(" ", "")


def test_counts_per_spec_and_in_total_equal_the_results(report):
    results, _, _, page = report
    for spec in ("tiny", "missing"):
        expected = Counter(c["status"] for c in results["checks"] if c["spec"] == spec)
        assert _count_cells(page, spec) == {status: expected.get(status, 0) for status in STATUSES}
    totals = {a["data-status"]: int(t) for n, a, t in page.texts if "total" in a.get("class", "").split()}
    assert totals == {s: sum(c["status"] == s for c in results["checks"]) for s in STATUSES}


def _count_cells(page: Page, spec: str) -> dict[str, int]:
    """The count cells of the summary row for ``spec`` (rows hold one cell per status, in order)."""
    cells = iter(t for t in page.texts if t[0] == "td" and "count" in t[1].get("class", "").split())
    rows = [a["data-spec"] for t, a in page.tags if t == "tr" and a.get("data-spec")]
    counts: dict[str, int] = {}
    for row_spec in rows:
        for status in STATUSES:
            _, attrs, text = next(cells)
            assert attrs["data-status"] == status
            if row_spec == spec:
                counts[status] = int(text)
    return counts


def test_every_check_appears_once_with_its_status_and_location(report):
    results, _, _, page = report
    rows = [a for a in page.find("tr") if "data-nodeid" in a]
    shown = sorted((a["data-nodeid"], a["data-status"]) for a in rows)
    assert shown == sorted((c["nodeid"], c["status"]) for c in results["checks"])
    locations = [t for n, a, t in page.texts if n == "td" and a.get("class") == "location"]
    assert sorted(locations) == sorted(f"{c['file']}:{c['line']}" for c in results["checks"])


def test_failures_show_the_layer_figure_the_regen_command_and_why_figures_are_missing(report):
    results, _, text, page = report
    failures = [a for a in page.find("details") if a.get("class") == "failure"]
    failing = [c for c in results["checks"] if c["status"] in ("fail", "warn", "error")]
    assert sorted(a["data-nodeid"] for a in failures) == sorted(c["nodeid"] for c in failing)
    regen = [t for n, a, t in page.texts if n == "pre" and a.get("class") == "regen"]
    assert regen == ["pytest specs/tiny.yaml --attn-regen-baselines -k layer2"]
    alts = [a["alt"] for a in page.find("img")]
    assert alts[0] == OVERVIEW_ALT and alts[1].startswith("Layer 1, step 5")
    assert [alt.split(" (")[0] for alt in alts if alt.endswith("layer 2, step 0)")] == [
        "baseline", "obtained", "obtained - baseline"]
    assert "gone.nc does not exist" in text  # the unreadable dataset is named, not fatal


def test_provenance_and_run_command_are_shown(report):
    _, _, _, page = report
    cells = [t for n, _, t in page.texts if n == "td"]
    assert "ab12" in cells and "specs/tiny.yaml:1" in cells
    assert [t for n, a, t in page.texts if a.get("id") == "run-command"] == ["pytest specs/ -q"]


def test_a_results_record_without_checks_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match=r"lacks \['checks'\]"):
        render_run_report({"run": {}, "specs": []}, tmp_path)
    bad = {"run": {}, "specs": [], "checks": [{"nodeid": "x", "spec": "s", "status": "passed"}]}
    with pytest.raises(HarnessError, match=r"checks\[0\] \(x\): status 'passed'"):
        render_run_report(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _texts(page: Page, tag: str, cls: str) -> list[str]:
    return [t for n, a, t in page.texts if n == tag and cls in a.get("class", "").split()]


def test_a_run_that_is_not_all_green_lists_every_skip_and_error_reason_grouped_at_the_top(report):
    results, _, text, page = report
    groups = [a for a in page.find("tr") if "attention-group" in a.get("class", "")]
    reasons = _texts(page, "td", "reason")
    assert [g["data-status"] for g in groups][:2] == ["error", "fail"]
    skipped = [c for c in results["checks"] if c["status"] == "skip"]
    by_reason = Counter(c["message"] for c in skipped)
    for reason, count in by_reason.items():
        row = reasons.index(reason)
        assert groups[row]["data-status"] == "skip"
    assert reasons.count(SKIP_REASON) == 1 and by_reason[SKIP_REASON] == 3  # grouped, not repeated
    assert "HarnessError: specs/missing.yaml:4: bad layer" in reasons
    assert text.index('id="attention"') < text.index('id="summary"')  # at the top
    note = [t for n, a, t in page.texts if n == "p" and "dataset-note" in a.get("class", "")]
    assert any(SKIP_REASON in t for t in note)  # the skipped spec's own section says why


def test_an_all_green_run_has_no_attention_section(tmp_path):
    record = {"run": {}, "specs": [], "checks": [_check("ok", 0, "sink", "pass")]}
    text = render_run_report(record, tmp_path).read_text()
    assert 'id="attention"' not in text
    assert "<title>attn-harness report: 0 failing of 1 check</title>" in text


def test_tab_title_counts_failing_checks_with_the_right_plural(report):
    results, _, text, _ = report
    failing = sum(c["status"] in ("fail", "error") for c in results["checks"])
    assert f"<title>attn-harness report: {failing} failing of {len(results['checks'])} checks</title>" in text


def test_checks_are_listed_by_layer_then_status_with_their_ids(tmp_path):
    checks = [
        _check("s", 3, "sink", "pass"),
        _check("s", 1, "value_range", "pass", nodeid="specs/s.yaml::s::layer1::low"),
        _check("s", 1, "value_range", "fail", nodeid="specs/s.yaml::s::layer1::high"),
        _check("s", 0, "sink", "skip"),
    ]
    page = Page(render_run_report({"run": {}, "specs": [], "checks": checks}, tmp_path).read_text())
    rows = [(a["data-nodeid"].rsplit("::", 2)[-2], a["data-status"]) for a in page.find("tr") if "data-nodeid" in a]
    assert rows == [("layer0", "skip"), ("layer1", "fail"), ("layer1", "pass"), ("layer3", "pass")]
    assert _texts(page, "td", "check-id") == ["sink", "high (value_range)", "low (value_range)", "sink"]


def test_status_filter_and_sortable_tables_are_offered(report):
    _, _, _, page = report
    boxes = [a["value"] for a in page.find("input") if a.get("name") == "status"]
    assert boxes == list(STATUSES)
    assert [a for a in page.find("table") if "sortable" in a.get("class", "")]


def test_a_failed_baseline_shows_the_worst_step_and_correct_counts_per_variable(report, tmp_path):
    results, _, text, page = report
    check = next(c for c in results["checks"] if c["kind"] == "baseline")
    base, got = read_dataset(check["baseline"]), read_dataset(check["obtained"])
    for variable in ("logits", "mass"):  # brute-force count, default tolerances
        exp, obt = base[variable].values.astype(np.float64), got[variable].values.astype(np.float64)
        tol = DEFAULT_TOLERANCES[variable]
        oracle = int(np.sum((np.isnan(exp) != np.isnan(obt))
                            | (np.abs(np.nan_to_num(obt - exp)) > tol.atol + tol.rtol * np.abs(np.nan_to_num(exp)))))
        row = [t for n, a, t in page.texts if n == "td" and "beyond" in a.get("class", "")]
        assert f"{oracle} of {exp.size}" in row
    logits = next(v for v in check["variables"] if v["variable"] == "logits")
    assert logits["max_abs"]["location"] == {"step": 0, "layer": 2, "head": 1, "query_frame": 7, "key_frame": 2}
    assert logits["max_abs"]["value"] == pytest.approx(1.0, abs=1e-5)
    captions = [a for a in page.find("p") if a.get("class") == "figure-caption"]
    assert [(c["data-variable"], c["data-step"], c["data-layer"]) for c in captions] == [("logits", "0", "2")]
    caption = _texts(page, "p", "figure-caption")[0]
    assert "layer 2, step 0: the step of the worst cell (head 1, query frame 7, key frame 2" in caption
    assert "Max |diff| per step: 0: 1, 5: 0.05" in caption
    alts = [a["alt"] for a in page.find("img")]
    assert "obtained - baseline (logits, layer 2, step 0)" in alts
