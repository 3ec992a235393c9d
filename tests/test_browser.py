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
from attn_harness.report.html import render_compare, render_run_report
from tests.test_figures import planted_dataset
from tests.test_report_html import results_record

CANDIDATES = ("chromium", "chromium-headless-shell", "/usr/lib/chromium/chromium", "/usr/lib/chromium/chromium-headless-shell")
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() == "true"

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
    assert len(measured["imgs"]) == 5 and len(measured["svgs"]) == 1
    assert shot.stat().st_size > 10_000


def test_comparison_renders_every_figure_without_console_errors(browser, tmp_path):
    a = planted_dataset(mask="bidirectional")
    b = planted_dataset(mask="block-causal", seed=1, sink_heads=(0, 1))
    page = render_compare(a, b, tmp_path / "compare.html", labels=("bidirectional", "block-causal"))
    measured, errors, requests = open_page(browser, page)
    assert_renders(measured, errors, requests)
    assert len(measured["imgs"]) == 3 * 3 and len(measured["svgs"]) == 1


def test_a_broken_image_is_caught(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><figure><img src="data:image/png;base64,AAAA" alt="x"></figure>')
    measured, errors, requests = open_page(browser, page)
    with pytest.raises(AssertionError):
        assert_renders(measured, errors, requests)


def test_report_of_a_real_specs_run_renders_and_counts_what_pytest_counted(browser, tmp_path):
    """`pytest specs/tiny_default.yaml` on the embedded models, as a user runs it, then opened.

    ``ATTN_SCREENSHOT_TO=docs/report-screenshot.png`` keeps the screenshot for the README.
    """
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/tiny_default.yaml",
         "--attn-report", str(tmp_path / "report"), "--attn-cache", str(tmp_path / "cache")],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    page = tmp_path / "report" / "index.html"
    totals = dict(re.findall(r'class="num total" data-status="(\w+)">(\d+)<', page.read_text()))
    assert int(totals["pass"]) == passed and passed >= 20
    shot = Path(os.environ.get("ATTN_SCREENSHOT_TO") or tmp_path / "shot.png")
    measured, errors, requests = open_page(browser, page, screenshot=shot)
    assert_renders(measured, errors, requests)
    assert len(measured["svgs"]) == len(load_specs(root / "specs" / "tiny_default.yaml"))  # one overview per spec
