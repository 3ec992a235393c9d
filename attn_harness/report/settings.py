"""Defaults of the checkpoint comparison, importable without numpy (the CLI's help shows them)."""

from __future__ import annotations

# A head is a "sink head" when its sink score (first - mid) reaches this, per metric.
SINK_HEAD_THRESHOLD: dict[str, float] = {"logits": 1.0, "mass": 0.05}
# A head is "diagonally dominant" when at least this share of its query frames puts the
# row maximum on its own frame.
DIAGONAL_DOMINANCE_SHARE = 0.5
# Relative noise margin of a flip (see attn_harness.report.compare).
FLIP_MARGIN = 0.1
# Full head grids are drawn for this many layers (those that differ most) by default.
DEFAULT_TOP = 5
