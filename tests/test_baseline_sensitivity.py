"""The committed default baselines pass on the model they were made from and fail on real changes.

Both directions, under the spec's same-environment tolerance and under its cross-environment
tolerance (what a CUDA float32 run is judged with against the CPU baselines): the unchanged
tiny-trained model matches ``baselines/tiny-default``; one head's query weights scaled by 1.01,
or two heads of one layer swapped (q, k, v, q/k norm and output consistently, so the model's
output is unchanged and only the head order moves), fail the baseline of that layer. Pinned to
CPU: the baselines are CPU float32 (``cpu-float32``) results.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attn_harness.core import store
from attn_harness.core.spec import load_specs
from attn_harness.model.models import load_model
from attn_harness.pytest.baseline import compare, layer_slice
from attn_harness.sampling.extract import extract

ROOT = Path(__file__).resolve().parents[1]
SPEC = next(s for s in load_specs(ROOT / "specs" / "tiny_default.yaml") if s.name == "tiny-default")
PROBE = SPEC.probe.replace(device="cpu")
LAYER = 2
pytestmark = pytest.mark.numerics


def committed(layer: int):
    return store.read_dataset(ROOT / SPEC.baseline_path(layer))


def tolerance_sets():
    assert SPEC.baseline.cross_env is not None, "tiny_default.yaml declares a cross-environment tolerance"
    return {"same-environment": SPEC.baseline.tolerances, "cross-environment": SPEC.baseline.cross_env}


def head_rows(attn, head: int) -> slice:
    width = attn.to_q.weight.shape[0] // attn.heads
    return slice(head * width, (head + 1) * width)


def scale_query(model, layer: int, head: int, factor: float) -> None:
    attn = model.blocks[layer].attn1
    with torch.no_grad():
        attn.to_q.weight[head_rows(attn, head)] *= factor
        attn.to_q.bias[head_rows(attn, head)] *= factor


def swap_heads(model, layer: int, a: int, b: int) -> None:
    attn = model.blocks[layer].attn1
    ra, rb = head_rows(attn, a), head_rows(attn, b)
    rows = [attn.to_q.weight, attn.to_q.bias, attn.to_k.weight, attn.to_k.bias, attn.to_v.weight, attn.to_v.bias,
            attn.norm_q.weight, attn.norm_k.weight]
    with torch.no_grad():
        for tensor in rows:
            tensor[ra], tensor[rb] = tensor[rb].clone(), tensor[ra].clone()
        out = attn.to_out[0].weight
        out[:, ra], out[:, rb] = out[:, rb].clone(), out[:, ra].clone()


@pytest.fixture(scope="module")
def unchanged():
    return extract("tiny-trained", PROBE, progress=False)


def test_the_unchanged_model_matches_every_committed_baseline_under_both_tolerances(unchanged):
    for kind, tolerances in tolerance_sets().items():
        for layer in range(4):
            assert compare(committed(layer), layer_slice(unchanged, layer), tolerances) == [], (kind, layer)


def test_one_heads_query_weights_scaled_by_1_01_fails_that_layers_baseline_under_both_tolerances():
    loaded = load_model("tiny-trained")
    scale_query(loaded.transformer, LAYER, head=1, factor=1.01)
    changed = extract(loaded, PROBE, progress=False)
    for kind, tolerances in tolerance_sets().items():
        lines = compare(committed(LAYER), layer_slice(changed, LAYER), tolerances)
        assert any(line.startswith("logits:") and "cells differ" in line for line in lines), kind


def test_two_swapped_heads_fail_that_layers_baseline_under_both_tolerances(unchanged):
    loaded = load_model("tiny-trained")
    swap_heads(loaded.transformer, LAYER, 0, 3)
    changed = extract(loaded, PROBE, progress=False)
    # the swap is a relabelling: the heads' statistics move, nothing else changes
    moved = changed.sel(layer=LAYER).assign_coords(head=[3, 1, 2, 0]).sortby("head")
    assert float(abs(moved["logits"] - unchanged["logits"].sel(layer=LAYER)).max()) < 1e-4
    for kind, tolerances in tolerance_sets().items():
        lines = compare(committed(LAYER), layer_slice(changed, LAYER), tolerances)
        assert any(line.startswith("logits:") for line in lines) and any(line.startswith("mass:") for line in lines), kind
