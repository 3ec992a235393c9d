"""The ``--regen-all`` summary: how many baseline files were rewritten, how many kept, and why.

Stdlib and pytest only, so the plugin registers it without importing xarray. Baseline items
record their action in ``user_properties`` under ``REGEN_PROPERTY``; the summary reads them
from the reports, so it also counts the actions of xdist workers.
"""

from __future__ import annotations

import pytest

REGEN_PROPERTY = "attn_baseline_regen"  # user_properties key of an item's --regen-all action


class RegenSummary:
    """Counts the ``--regen-all`` actions of baseline items (from reports, so it works with xdist)."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str, str]] = []  # (action, file, reason)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for key, value in report.user_properties:
            if key == REGEN_PROPERTY:
                self.actions.append(tuple(value))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.actions:
            return
        rewritten = [a for a in self.actions if a[0] == "rewritten"]
        kept = len(self.actions) - len(rewritten)
        terminalreporter.write_sep("-", "attn-harness --regen-all")
        terminalreporter.write_line(
            f"rewrote {len(rewritten)} of {len(self.actions)} baselines; kept {kept} (values within tolerance, same provenance)"
        )
        for _, file, reason in sorted(rewritten):
            terminalreporter.write_line(f"  rewrote {file}: {reason}")
