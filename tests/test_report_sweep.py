"""The report across a sweep's checkpoints: its statistics against float64 loops, and its page.

Inputs are small synthetic sweeps built through ``merge_parts`` (random float32 logits, mass
rows normalised, block-causal masks as NaN / 0). Tolerance 1e-5 relative: the report
averages float32 values, the oracle sums in float64.
"""

from __future__ import annotations

import itertools
from html.parser import HTMLParser

import numpy as np
import pytest

from attn_harness.core.errors import HarnessError
from attn_harness.core.frames import block_causal_mask
from attn_harness.core.schema import build_dataset
from attn_harness.core.sweep_dataset import merge_parts
from attn_harness.report import sweep as report

FRAMES, HEADS, LAYERS, STEPS = 6, 3, 2, (0, 4)


def synthetic_sweep(checkpoints=3, prompts=2, seeds=(0, 1), mask="bidirectional", sink_head=None, seed=0):
    """A sweep of random parts; ``sink_head`` makes the last checkpoint's head attend to frame 0 strongly."""
    rng = np.random.default_rng(seed)
    hidden = ~block_causal_mask(FRAMES, 3) if mask == "block-causal" else np.zeros((FRAMES, FRAMES), bool)
    parts = {}
    for c, p, s in itertools.product(range(checkpoints), range(prompts), range(len(seeds))):
        shape = (len(STEPS), LAYERS, HEADS, FRAMES, FRAMES)
        logits = rng.normal(size=shape).astype(np.float32)
        if sink_head is not None and c == checkpoints - 1:
            logits[:, :, sink_head, :, 0] += 4.0
        weights = np.exp(logits) * ~hidden
        mass = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
        logits[..., hidden] = np.nan
        attrs = {"mask": mask, "block_size": 3, "seed": seeds[s], "prompt": f"prompt {p}", "model_id": f"m{c}",
                 "checkpoint_path": f"/ckpt/step_{100 * (c + 1)}.pt", "checkpoint_fingerprint": f"f{c}",
                 "training_step": 100 * (c + 1)}
        parts[(c, p, s)] = build_dataset({"logits": logits, "mass": mass}, steps=STEPS, timesteps=[999.0, 500.0],
                                         layers=range(LAYERS), attrs=attrs)
    return merge_parts(parts, checkpoints=[f"/ckpt/step_{100 * (c + 1)}.pt" for c in range(checkpoints)],
                       prompts=[f"prompt {p}" for p in range(prompts)], seeds=list(seeds))


def oracle_distance(ds, c):
    x = ds["logits"].values.astype(np.float64)
    diff = np.abs(x[c] - x[0])
    return np.nanmean(diff)


def oracle_sink(ds, c, layer, head, step, query_frames):
    x = ds["logits"].sel(step=step).values.astype(np.float64)  # checkpoint, prompt, seed, layer, head, q, k
    values = []
    for p, s in itertools.product(range(x.shape[1]), range(x.shape[2])):
        block = x[c, p, s, layer, head][query_frames]
        profile = [np.nanmean(block[:, k]) if np.isfinite(block[:, k]).any() else np.nan for k in range(FRAMES)]
        keys = [k for k in range(FRAMES) if np.isfinite(profile[k])]
        middle = keys[1:-1] if len(keys) > 2 else keys
        values.append(profile[keys[0]] - np.mean([profile[k] for k in middle]))
    return np.mean(values)


def oracle_diagonal(ds, c, layer, head, step):
    m = ds["mass"].sel(step=step).values.astype(np.float64)
    return np.mean([m[c, p, s, layer, head, a, a] for p in range(m.shape[1]) for s in range(m.shape[2]) for a in range(FRAMES)])


@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
def test_distance_and_trends_equal_float64_loops(mask):
    ds = synthetic_sweep(mask=mask)
    distance = report.checkpoint_distance(ds)
    for c in range(3):
        assert float(distance.sel(checkpoint=c)) == pytest.approx(oracle_distance(ds, c), rel=1e-5, abs=1e-7)
    query_frames = [3, 4, 5]
    trends = report.head_trends(ds, 4)
    for c, layer, head in itertools.product(range(3), range(LAYERS), range(HEADS)):
        cell = trends.sel(checkpoint=c, layer=layer, head=head)
        assert float(cell["sink"]) == pytest.approx(oracle_sink(ds, c, layer, head, 4, query_frames), rel=1e-5, abs=1e-6)
        assert float(cell["diagonal"]) == pytest.approx(oracle_diagonal(ds, c, layer, head, 4), rel=1e-5)


def test_ranking_orders_by_distance_and_the_trend_shows_a_new_sink_head():
    ds = synthetic_sweep(sink_head=1)
    rows = report.ranking(ds)
    assert [r["distance"] for r in rows] == sorted((r["distance"] for r in rows), reverse=True)
    assert rows[0]["index"] == 2 and rows[-1] == {**rows[-1], "index": 0, "distance": 0.0}
    assert [r["training_step"] for r in sorted(rows, key=lambda r: r["index"])] == [100, 200, 300]
    sink = report.head_trends(ds, 4)["sink"].sel(layer=0)
    assert float(sink.sel(checkpoint=2, head=1)) > float(sink.sel(checkpoint=0, head=1)) + 2.0
    assert abs(float(sink.sel(checkpoint=2, head=0)) - float(sink.sel(checkpoint=0, head=0))) < 2.0


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_page_has_a_ranked_row_per_checkpoint_a_trend_per_layer_and_an_overview_each(tmp_path):
    ds = synthetic_sweep(sink_head=1)
    page = _Page()
    page.feed(report.render_sweep_report(ds, tmp_path / "r.html").read_text())
    rows = [a for t, a in page.tags if a.get("class") == "checkpoint"]
    assert [int(a["data-rank"]) for a in rows] == [1, 2, 3] and rows[0]["data-index"] == "2"
    assert [a["data-layer"] for t, a in page.tags if a.get("class") == "trend"] == ["0", "1"]
    assert [a["data-index"] for t, a in page.tags if a.get("class") == "overview"] == ["0", "1", "2"]
    assert sum(1 for t, _ in page.tags if t == "svg") == 2 + 3


def test_report_refuses_a_plain_extraction_and_an_uncaptured_step(tmp_path):
    ds = synthetic_sweep()
    with pytest.raises(HarnessError, match="not a sweep dataset"):
        report.render_sweep_report(ds.isel(checkpoint=0), tmp_path / "r.html")
    with pytest.raises(HarnessError, match="step 3 is not captured"):
        report.render_sweep_report(ds, tmp_path / "r.html", step=3)
