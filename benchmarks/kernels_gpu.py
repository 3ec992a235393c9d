"""GPU section: the Triton frame-mass kernels at the full Wan2.1-T2V-1.3B shape, per layer and whole model.

Per layer, on random bf16 q, k, v ``[1, 32760, 12, 128]`` (21 frames x 1,560 tokens), one
interleaved loop times: the stock attention call (``F.scaled_dot_product_attention``, the
model's own), the same call returning its logsumexp (``attention_with_lse``), the mass in one
pass (given that logsumexp) and in two passes (row statistics first), bidirectional and
block-causal (blocks of 3 frames), the logits, and ``frame_stats``' SDPA mass of before; then
each case's peak extra device memory, the kernels' error against float64 at 4 frames x 1,560
tokens, and a small sweep of tile sizes for the one-pass kernel. Whole model (random weights,
30 layers, bf16): plain forward vs capture of logits on all layers, logits + mass on the middle
layer and on all layers, with the mass in two passes (what ``capture`` does) and in one pass
(the logsumexp taken from the model's own call by ``_LseProcessor`` below); bidirectional and
block-causal. Ratios are against the baseline timed in the same loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attn_harness.model.capture import (
    CaptureProcessor,
    Recorder,
    _mass,
    _take,
    _token_index,
    frame_stats,
    mask_groups,
    processors_installed,
)
from attn_harness.model.kernels.mass import TileConfig, frame_mass
from attn_harness.model.kernels.sdpa_lse import attention_with_lse
from benchmarks.shapes import WAN_1_3B, build_model, model_inputs
from benchmarks.timing import interleaved, timing_records

FRAMES, TPF, HEADS, HEAD_DIM = 21, 1560, 12, 128
BLOCK_FRAMES = 3  # block-causal: 7 blocks of 3 latent frames
SWEEP = (  # (block_m, block_n, num_warps, num_stages); the default is 128 x 64, 8 warps, 3 stages
    TileConfig(64, 64, 4, 3), TileConfig(128, 64, 4, 2), TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3),
    TileConfig(128, 128, 8, 2), TileConfig(64, 128, 4, 2),
)


def block_causal_mask(frames: int, block_frames: int) -> torch.Tensor:
    """Bool [query_frame, key_frame]: blocks of ``block_frames`` see themselves and earlier blocks.

    The same mask as ``attn_harness.core.frames.block_causal_mask``, built here because that
    module needs xarray, which the GPU machine's wheel set (``fetch_wheels.sh``) does not carry.
    """
    block = torch.arange(frames) // block_frames
    return block[None, :] <= block[:, None]


def _qkv(tokens: int, heads: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, tokens, heads, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3)]


def _masked_lse(q, k, v, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Row logsumexp of the (block-causal) model's attention, assembled from its per-group calls."""
    if mask is None:
        return attention_with_lse(q, k, v)[1]
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("inf"), device=q.device)
    for query_frames, key_frames in mask_groups(mask, q.shape[1] // TPF):
        qi, ki = _token_index(query_frames, TPF, q.device), _token_index(key_frames, TPF, q.device)
        part = attention_with_lse(_take(q, qi), _take(k, ki), _take(v, ki))[1]
        if part is None:
            return None
        lse[:, :, qi] = part
    return lse


def _peak_extra(call: Callable[[], object], device: str) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def layer_cases(q, k, v, device: str) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """The per-layer calls, and why a one-pass case is missing (no logsumexp op gives the stock output)."""
    causal = block_causal_mask(FRAMES, BLOCK_FRAMES).to(device)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    cases: dict[str, Callable[[], object]] = {
        "attention": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        "attention+lse": lambda: attention_with_lse(q, k, v),
        "mass/two-pass": lambda: frame_mass(q, k, TPF, mask_groups(None, FRAMES)),
        "mass/block-causal/two-pass": lambda: frame_mass(q, k, TPF, mask_groups(causal, FRAMES)),
        "logits": lambda: frame_stats(q, k, TPF, metrics=("logits",)),
        "mass/sdpa-float32 (before)": lambda: _mass(q, k, TPF, mask_groups(None, FRAMES), 8192),
    }
    missing = {}
    for label, mask in (("mass/one-pass", None), ("mass/block-causal/one-pass", causal)):
        lse = _masked_lse(q, k, v, mask)
        if lse is None:
            missing[label] = "attention_with_lse gave no logsumexp (its op's output differs from stock SDPA here)"
        else:
            cases[label] = (lambda lse=lse, mask=mask: frame_mass(q, k, TPF, mask_groups(mask, FRAMES), lse=lse))
    return cases, missing


def errors(device: str) -> list[dict]:
    """Max |kernel - float64| of the mass at 4 frames x 1,560 tokens, 2 heads (bf16 q, k)."""
    frames, heads = 4, 2
    q, k, v = _qkv(frames * TPF, heads, device, seed=1)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(HEAD_DIM)
    out = []
    for label, mask in (("bidirectional", None), ("block-causal", block_causal_mask(frames, 2).to(device))):
        s = (scores if mask is None
             else scores.masked_fill(~mask.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1), float("-inf")))
        want = s.softmax(-1).unflatten(2, (frames, TPF)).unflatten(4, (frames, TPF)).sum(5).mean(3)
        lse = _masked_lse(q, k, v, mask)
        groups = mask_groups(mask, frames)
        for passes, given in (("two-pass", None), ("one-pass", lse)):
            if passes == "one-pass" and lse is None:
                continue
            got = frame_mass(q, k, TPF, groups, lse=given).double()
            out.append({
                "name": f"kernels/error/{label}/{passes}", "section": "kernels-error", "reps": 1,
                "max_abs_error": float((got - want).abs().max()),
                "row_sum_max_error": float((got.sum(-1) - want.sum(-1)).abs().max()),
                "tokens": frames * TPF, "heads": heads,
            })
            out[-1]["note"] = f"max |mass - float64| {out[-1]['max_abs_error']:.2e}, row sums {out[-1]['row_sum_max_error']:.2e}"
    return out


def run_layer(*, reps: int, warmup: int, env: dict, device: str) -> list[dict]:
    q, k, v = _qkv(FRAMES * TPF, HEADS, device)
    cases, missing = layer_cases(q, k, v, device)
    samples = interleaved(cases, reps=reps, warmup=warmup, device=device)
    params = {"tokens": FRAMES * TPF, "tokens_per_frame": TPF, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"}
    records = timing_records("kernels-layer", samples, "attention", env, params, prefix="kernels/layer/")
    records += [{"name": f"kernels/layer/{label}", "skipped": why} for label, why in missing.items()]
    for name, call in cases.items():
        records.append({
            "name": f"kernels/layer-peak-memory/{name}", "section": "kernels-layer-memory",
            "median_bytes": _peak_extra(call, device), "spread": None, "reps": 1,
            "note": "torch.cuda.max_memory_allocated growth over allocated before the call", **params, "env": env,
        })
    lse = attention_with_lse(q, k, v)[1]
    if lse is not None:
        sweep = {f"mass/one-pass/tile-{c.block_m}x{c.block_n}-w{c.num_warps}-s{c.num_stages}":
                 (lambda c=c: frame_mass(q, k, TPF, mask_groups(None, FRAMES), lse=lse, config=c)) for c in SWEEP}
        sweep = {"attention": cases["attention"], **sweep}
        records += timing_records("kernels-sweep", interleaved(sweep, reps=3, warmup=1, device=device), "attention", env, params,
                                  prefix="kernels/sweep/")
        one, two = frame_mass(q, k, TPF, mask_groups(None, FRAMES), lse=lse), frame_mass(q, k, TPF, mask_groups(None, FRAMES))
        records.append({"name": "kernels/layer/one-pass-vs-two-pass", "section": "kernels-error", "reps": 1,
                        "max_abs_difference": float((one - two).abs().max()), **params})
        records[-1]["note"] = f"max |one-pass - two-pass| {records[-1]['max_abs_difference']:.2e}"
    return records + errors(device)


class _LseRecorder(Recorder):
    """A recorder that passes the logsumexp of the model's own attention call on to ``frame_stats``."""

    lse_parts: list

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if not self.active:
            return
        parts, self.lse_parts = self.lse_parts, []
        lse = None
        if parts and all(part is not None for part in parts):
            if self.mask is None:
                lse = parts[0]
            else:
                lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("inf"), device=q.device)
                for (query_frames, _), part in zip(mask_groups(self.mask.to(q.device), q.shape[1] // self.tokens_per_frame),
                                                   parts):
                    lse[:, :, _token_index(query_frames, self.tokens_per_frame, q.device)] = part
        stats = frame_stats(q, k, self.tokens_per_frame, mask=self.mask, metrics=self.metrics, lse=lse)
        self.records[(self.step, layer)] = {name: value.detach().cpu() for name, value in stats.items()}


class _LseProcessor(CaptureProcessor):
    """Capture whose attention call also returns the row logsumexp (output still the stock one)."""

    def __call__(self, *args, **kwargs):
        self.recorder.lse_parts = []
        return super().__call__(*args, **kwargs)

    def _attend(self, query, key, value, attention_mask=None):
        if not self.capture or attention_mask is not None:
            return super()._attend(query, key, value, attention_mask)
        out, lse = attention_with_lse(query, key, value)
        self.recorder.lse_parts.append(lse)
        return out


def model_cases(model, inputs: dict, mask: torch.Tensor | None, tokens_per_frame: int = TPF) -> dict[str, Callable[[], object]]:
    """One forward per case; each capture case checks it recorded every chosen layer."""
    layers = len(model.blocks)

    def forward(metrics: tuple[str, ...], chosen: list[int], one_pass: bool):
        def call():
            recorder = (_LseRecorder if one_pass else Recorder)(tokens_per_frame=tokens_per_frame, metrics=metrics, mask=mask,
                                                                active=True)
            make = _LseProcessor if one_pass else CaptureProcessor

            def processor(index: int):
                if index in chosen or mask is not None:
                    return make(index, recorder, capture=index in chosen)
                return None

            with torch.inference_mode(), processors_installed(model, processor):
                out = model(**inputs)
            if len(recorder.records) != len(chosen):
                raise RuntimeError(f"captured {len(recorder.records)} layers, expected {len(chosen)}")
            return out

        return call

    every, middle = list(range(layers)), [layers * 2 // 3]
    return {
        "plain": forward((), [], False),
        "logits/all-layers": forward(("logits",), every, False),
        "logits+mass/one-layer/two-pass": forward(("logits", "mass"), middle, False),
        "logits+mass/all-layers/two-pass": forward(("logits", "mass"), every, False),
        "logits+mass/one-layer/one-pass": forward(("logits", "mass"), middle, True),
        "logits+mass/all-layers/one-pass": forward(("logits", "mass"), every, True),
    }


def run_model(*, reps: int, warmup: int, env: dict, device: str) -> list[dict]:
    model = build_model(WAN_1_3B, dtype=torch.bfloat16, device=device)
    inputs = model_inputs(WAN_1_3B, dtype=torch.bfloat16, device=device)
    records = []
    params = {**WAN_1_3B.describe(), "dtype": "bfloat16"}
    for label, mask in (("bidirectional", None), ("block-causal", block_causal_mask(FRAMES, BLOCK_FRAMES))):
        samples = interleaved(model_cases(model, inputs, mask), reps=reps, warmup=warmup, device=device)
        records += timing_records("kernels-model", samples, "plain", env, params, prefix=f"kernels/model/{label}/")
    return records


def run(*, reps: int, warmup: int, env: dict, device: str) -> list[dict]:
    return (run_layer(reps=reps, warmup=warmup, env=env, device=device)
            + run_model(reps=reps, warmup=warmup, env=env, device=device))
