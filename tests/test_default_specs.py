"""The default specs assert learned structure: it holds on tiny-trained, and fails on tiny-random.

Same probes, same checks, only the model swapped: every structural expectation (sinks,
diagonal dominance, temporal decay) in specs/tiny_default.yaml must fail on the random-weight
model, while the sanity checks (ranges, row sums, causality) hold on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attn_harness.core.checks import run_check
from attn_harness.core.spec import load_specs, resolve_model
from attn_harness.model.models import EMBEDDED
from attn_harness.sampling.extract import extract

SPEC_FILE = Path(__file__).resolve().parents[1] / "specs" / "tiny_default.yaml"
STRUCTURAL = {"sink_heads", "sink_score", "diagonal_dominance", "temporal_decay"}
SPECS = load_specs(SPEC_FILE)

pytestmark = pytest.mark.numerics  # bitwise/tolerance claims: CI reruns them under forced CPU ISAs


def checks_of(spec):
    for group in spec.groups:
        for check in group.checks:
            layers = range(4) if group.layers == "all" else group.layers
            for layer in layers:
                yield layer, check


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_structural_expectations_hold_on_the_trained_model_and_fail_on_random_weights(spec):
    trained_name, _ = resolve_model(spec.model, embedded=EMBEDDED, root=SPEC_FILE.parent, environ={})  # the default
    trained = extract(trained_name, spec.probe, progress=False)
    random = extract("tiny-random", spec.probe, progress=False)
    structural = 0
    for layer, check in checks_of(spec):
        on_trained = run_check(trained, check.property, check.params, layer=layer)
        on_random = run_check(random, check.property, check.params, layer=layer)
        assert on_trained.status == "pass", f"{trained_name} layer {layer} {check.name}: {on_trained.message}"
        if check.property in STRUCTURAL:
            structural += 1
            assert on_random.status == "fail", f"tiny-random passes structural check layer {layer} {check.name}"
        else:
            assert on_random.status == "pass", f"tiny-random fails sanity check layer {layer} {check.name}"
    assert structural >= 6
