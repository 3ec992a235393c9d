"""Section 1: plain forward vs capture of logits vs logits + mass, on one layer and on all layers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attn_harness.model.capture import Recorder, capture
from benchmarks.shapes import Shape, build_model, model_inputs
from benchmarks.timing import interleaved, timing_records

VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "logits/one-layer": (("logits",), "one"),
    "logits/all-layers": (("logits",), "all"),
    "logits+mass/one-layer": (("logits", "mass"), "one"),
    "logits+mass/all-layers": (("logits", "mass"), "all"),
}


def forward_cases(model, inputs: dict, tokens_per_frame: int) -> dict[str, Callable[[], object]]:
    """``plain`` (the stock processors) and one callable per capture variant."""
    num_layers = len(model.blocks)

    def plain():
        with torch.inference_mode():
            return model(**inputs)

    def captured(metrics: tuple[str, ...], which: str):
        layers = list(range(num_layers)) if which == "all" else [num_layers // 2]

        def call():
            recorder = Recorder(tokens_per_frame=tokens_per_frame, metrics=metrics, active=True)
            with torch.inference_mode(), capture(model, layers, recorder):
                out = model(**inputs)
            if len(recorder.records) != len(layers):
                raise RuntimeError(f"captured {len(recorder.records)} layers, expected {len(layers)}")
            return out

        return call

    cases = {"plain": plain}
    for name, (metrics, which) in VARIANTS.items():
        cases[name] = captured(metrics, which)
    return cases


def run(
    shape: Shape, *, reps: int, warmup: int, env: dict, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[dict]:
    model = build_model(shape, dtype=dtype, device=device)
    inputs = model_inputs(shape, dtype=dtype, device=device)
    samples = interleaved(forward_cases(model, inputs, shape.tokens_per_frame), reps=reps, warmup=warmup, device=device)
    params = {**shape.describe(), "dtype": str(dtype).removeprefix("torch.")}
    return timing_records("capture-overhead", samples, "plain", env, params, prefix=f"overhead/{shape.name}/")
