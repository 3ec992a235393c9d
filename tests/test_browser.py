"""The run report and the comparison opened in headless Chromium, as a user would see them.

Uses Debian's chromium (scripts/install_browser.sh) driven by Playwright with
``executable_path``; Playwright's own browser download is never used. Without a browser the
tests skip, except under CI (``CI=true``), where a missing browser is a failure.

``ATTN_SCREENSHOT_TO=docs/report-screenshot.png`` keeps the screenshot of the real run's report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attn_harness.core.spec import load_specs
from attn_harness.report.html import OVERVIEW_ALT, render_compare, render_run_report
from tests.test_figures import planted_dataset
from tests.test_report_html import SKIP_REASON, results_record

CANDIDATES = ("chromium", "chromium-headless-shell", "/usr/lib/chromium/chromium", "/usr/lib/chromium/chromium-headless-shell")
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() == "true"
# The report of `pytest specs/` (4 specs run, 2 skip): 260 KB with SVG overviews, 186 KB with PNG ones.
REPORT_BUDGET = 200_000
SECTION_BUDGET = 64_000  # the section of one spec that ran: the rollout's and the population's were 72 KB, now 52 and 55

# Opens every section, then reports each figure's rendered size and the SVG text length.
MEASURE = """() => {
  document.querySelectorAll('details').forEach(d => d.open = true);
  const imgs = [...document.querySelectorAll('img')].map(i => ({
    alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
    boxW: i.getBoundingClientRect().width, boxH: i.getBoundingClientRect().height}));
  const svgs = [...document.querySelectorAll('figure > svg')].map(s => {
    const box = s.getBoundingClientRect();
    const texts = [...s.querySelectorAll('text')].filter(t => t.textContent.trim());
    return {w: box.width, h: box.height, texts: texts.length,
            zeroText: texts.filter(t => t.getComputedTextLength() <= 0).length};
  });
  return {imgs, svgs};
}"""


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser test (scripts/install_browser.sh installs it)")
    pytest.skip(f"{reason}; run scripts/install_browser.sh")


def chromium_binary() -> str | None:
    """CHROMIUM_PATH, else the first Debian chromium binary found."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), *CANDIDATES):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        _unavailable("no chromium binary found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary, args=LAUNCH_ARGS)
        yield launched
        launched.close()


def section_bytes(text: str) -> dict[str, int]:
    """Bytes of each spec's section of a run report, and of the rest of the page ("page")."""
    body, tail = text.split('<div id="zoom"')
    head, *sections = re.split(r'(?=<details class="spec")', body)
    sizes = {"page": len(head.encode()) + len(tail.encode())}
    for section in sections:
        sizes[re.search(r'data-spec="([^"]*)"', section).group(1)] = len(section.encode())
    return sizes


def open_page(browser, path: Path, screenshot: Path | None = None) -> tuple[dict, list[str], list[str]]:
    """Load a report; return figure measurements, console errors and any non-local requests."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url) if not request.url.startswith(("file:", "data:")) else None)
    page.goto(path.resolve().as_uri(), wait_until="load")
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=False)
    measured = page.evaluate(MEASURE)
    page.close()
    return measured, errors, requests


def assert_renders(measured: dict, errors: list[str], requests: list[str]) -> None:
    assert errors == [] and requests == []
    assert measured["imgs"] or measured["svgs"]
    for img in measured["imgs"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert img["boxW"] > 0 and img["boxH"] > 0, img
    for svg in measured["svgs"]:
        assert svg["w"] > 0 and svg["h"] > 0 and svg["texts"] > 0 and svg["zeroText"] == 0, svg


def test_run_report_renders_every_figure_without_console_errors(browser, tmp_path):
    report = render_run_report(results_record(tmp_path), tmp_path / "report")
    shot = tmp_path / "report.png"
    measured, errors, requests = open_page(browser, report, screenshot=shot)
    assert_renders(measured, errors, requests)
    assert len(measured["imgs"]) == 6 and measured["svgs"] == []  # the overview and the failures' figures
    assert shot.stat().st_size > 10_000


def test_a_reviewer_sees_the_skip_reason_first_and_the_worst_steps_figure(browser, tmp_path):
    """A report with a spec skipped for want of CUDA and a baseline that moved by 1.0 at step 0
    and by 0.05 at the last step: the reason is on screen without scrolling, the difference
    figure drawn is step 0's, and it enlarges on click."""
    report = render_run_report(results_record(tmp_path), tmp_path / "report")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(report.resolve().as_uri(), wait_until="load")
    reason = page.get_by_text(SKIP_REASON, exact=True).first
    assert reason.is_visible() and reason.bounding_box()["y"] < 1000  # above the fold
    page.locator("#attention a", has_text="layer2::baseline").click()  # the failure's entry at the top
    figure = page.locator('img[alt="obtained - baseline (logits, layer 2, step 0)"]')
    assert figure.is_visible() and figure.evaluate("img => img.complete && img.naturalWidth > 100")
    caption = page.locator("p.figure-caption").first.inner_text()
    assert "step 0: the step of the worst cell" in caption
    figure.click()
    assert page.locator("#zoom.open img").is_visible()
    page.keyboard.press("Escape")
    assert not page.locator("#zoom.open").count()
    page.close()


def test_the_status_filter_hides_and_shows_checks(browser, tmp_path):
    report = render_run_report(results_record(tmp_path), tmp_path / "report")
    page = browser.new_page()
    page.goto(report.resolve().as_uri(), wait_until="load")
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    visible = "s => [...document.querySelectorAll('tr.check')].filter(r => r.offsetParent).map(r => r.dataset.status)"
    assert "pass" in page.evaluate(visible)
    page.locator('#status-filter input[value="pass"]').uncheck()
    shown = page.evaluate(visible)
    assert "pass" not in shown and {"fail", "skip", "warn", "error"} <= set(shown)
    page.locator('#status-filter input[value="pass"]').check()
    assert "pass" in page.evaluate(visible)
    page.close()


def test_comparison_renders_every_figure_without_console_errors(browser, tmp_path):
    a = planted_dataset(mask="bidirectional")
    b = planted_dataset(mask="block-causal", seed=1, sink_heads=(0, 1))
    page = render_compare(a, b, tmp_path / "compare.html", labels=("bidirectional", "block-causal"))
    measured, errors, requests = open_page(browser, page)
    assert_renders(measured, errors, requests)
    assert measured["imgs"] == [] and len(measured["svgs"]) == 1


PAINTED = """canvas => {
  const ctx = canvas.getContext('2d'), data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4 * 7) colours.add(data[i] + ',' + data[i + 1] + ',' + data[i + 2]);
  return {colours: colours.size, width: canvas.getBoundingClientRect().width, geometry: canvas.geometry &&
          {left: canvas.geometry.left, top: canvas.geometry.top, cell: canvas.geometry.cell, panelW: canvas.geometry.panelW}};
}"""


def test_comparison_heatmaps_show_the_value_under_the_pointer_and_enlarge_on_click(browser, tmp_path):
    a = planted_dataset(steps=2, layers=2, heads=12, frames=21, mask="block-causal")
    b = planted_dataset(steps=2, layers=2, heads=12, frames=21, mask="block-causal", seed=1, sink_heads=(0, 3))
    path = render_compare(a, b, tmp_path / "compare.html", labels=("base", "distilled"))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    canvases = page.locator("canvas.heatmap")
    assert canvases.count() == 3 * 2 and errors == []
    diff = page.locator('canvas.heatmap[data-layer="1"][data-view="diff"]')
    diff.scroll_into_view_if_needed()
    painted = diff.evaluate(PAINTED)
    assert painted["colours"] > 20 and painted["width"] > 600  # 12 panels of 21 x 21 cells, readable
    g = painted["geometry"]
    # head 1 is the second panel of the first row; query frame 20 is its top row, key frame 3 its 4th column
    x = g["panelW"] + g["left"] + 3.5 * g["cell"]
    y = g["top"] + 0.5 * g["cell"]
    diff.hover(position={"x": x, "y": y})
    text = page.locator("#tooltip").inner_text()
    value_a = float(a.logits.sel(step=5, layer=1, head=1, query_frame=20, key_frame=3))
    value_b = float(b.logits.sel(step=5, layer=1, head=1, query_frame=20, key_frame=3))
    assert text.startswith("layer 1, head 1, query frame 20, key frame 3: ")
    assert f"base {value_a:.4f}" in text and f"distilled {value_b:.4f}" in text
    diff.click(position={"x": x, "y": y})
    assert page.locator("#zoom.open canvas.zoomed-heatmap").count() == 3
    assert "head 1" in page.locator("#zoom .zoom-panel p").inner_text()
    page.keyboard.press("Escape")
    assert errors == []
    page.close()


def test_a_broken_image_is_caught(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><figure><img src="data:image/png;base64,AAAA" alt="x"></figure>')
    measured, errors, requests = open_page(browser, page)
    with pytest.raises(AssertionError):
        assert_renders(measured, errors, requests)


def test_report_of_a_real_specs_run_renders_and_counts_what_pytest_counted(browser, tmp_path):
    """`pytest specs/` as a user runs it (the embedded models run, the gpu specs skip), then opened;
    the page and each spec's section stay within their byte budgets.

    ``ATTN_SCREENSHOT_TO=docs/report-screenshot.png`` keeps the screenshot for the README.
    """
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/",
         "--attn-report", str(tmp_path / "report"), "--attn-cache", str(tmp_path / "cache")],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    skipped = int(re.search(r"(\d+) skipped", run.stdout).group(1))
    page = tmp_path / "report" / "index.html"
    assert f"attention report: {page}" in run.stdout.splitlines()  # on its own line after -q's dots
    ran = [spec for name in ("tiny_default.yaml", "tiny_population.yaml") for spec in load_specs(root / "specs" / name)]
    sizes = section_bytes(page.read_text())
    assert page.stat().st_size < REPORT_BUDGET, sizes
    assert {spec.name: sizes[spec.name] for spec in ran if sizes[spec.name] >= SECTION_BUDGET} == {}, sizes
    totals = dict(re.findall(r'class="num total" data-status="(\w+)">(\d+)<', page.read_text()))
    assert int(totals["pass"]) == passed and passed >= 20 and int(totals["skip"]) == skipped > 0
    shot = Path(os.environ.get("ATTN_SCREENSHOT_TO") or tmp_path / "shot.png")
    measured, errors, requests = open_page(browser, page, screenshot=shot)
    assert_renders(measured, errors, requests)
    assert [img["alt"] for img in measured["imgs"]].count(OVERVIEW_ALT) == len(ran)  # one overview per spec that ran
