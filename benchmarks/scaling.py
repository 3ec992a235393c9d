"""Section 3: extra cost of each metric vs token count, with fitted power-law exponents.

At each size the cost of ``frame_stats`` for one metric is timed next to the layer's own
attention call (SDPA on the same q, k and a value tensor), so its ``ratio`` says what the
metric costs in units of the attention the model does anyway. The exponent is the slope of
log(seconds) against log(tokens), fitted by least squares over the sweep.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attn_harness.model.capture import frame_stats
from benchmarks.seed_method import HEAD_DIM, HEADS, make_qk
from benchmarks.timing import interleaved, summary, timing_records


def fitted_exponent(tokens: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) vs log(tokens)."""
    xs = [math.log(n) for n in tokens]
    ys = [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(frame_counts: list[int], tokens_per_frame: int, *, reps: int, warmup: int, env: dict) -> list[dict]:
    records, medians = [], {}
    for frames in frame_counts:
        tokens = frames * tokens_per_frame
        q, k = make_qk(tokens)
        v = torch.randn_like(q)
        cases = {
            "attention": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
            "logits": lambda: frame_stats(q, k, tokens_per_frame, metrics=("logits",)),
            "mass": lambda: frame_stats(q, k, tokens_per_frame, metrics=("mass",)),
        }
        samples = interleaved(cases, reps=reps, warmup=warmup)
        params = {
            "tokens": tokens, "latent_frames": frames, "tokens_per_frame": tokens_per_frame, "heads": HEADS, "head_dim": HEAD_DIM
        }
        records += timing_records("scaling", samples, "attention", env, params, prefix=f"scaling/{tokens}/")
        for name, values in samples.items():
            medians.setdefault(name, []).append((tokens, summary(values)["median_s"]))
        q = k = v = cases = None  # free this size's tensors before the next size allocates
    records += _exponent_records(medians, "attention", env)
    return records


def run_logits_wide(frame_counts: list[int], tokens_per_frame: int, *, reps: int, warmup: int, env: dict) -> list[dict]:
    """Logits alone up to the full Wan sequence, next to one read of q and k (a linear floor).

    Attention is too slow on a CPU at these sizes, so the baseline here is ``q.sum() + k.sum()``:
    the ratio says how many passes over q and k the logits cost.
    """
    records, medians = [], {}
    for frames in frame_counts:
        tokens = frames * tokens_per_frame
        q, k = make_qk(tokens)
        cases = {
            "read-qk": lambda: (q.sum(), k.sum()),
            "logits": lambda: frame_stats(q, k, tokens_per_frame, metrics=("logits",)),
        }
        samples = interleaved(cases, reps=reps, warmup=warmup)
        params = {
            "tokens": tokens, "latent_frames": frames, "tokens_per_frame": tokens_per_frame, "heads": HEADS, "head_dim": HEAD_DIM
        }
        records += timing_records("scaling-logits", samples, "read-qk", env, params, prefix=f"scaling-logits/{tokens}/")
        for name, values in samples.items():
            medians.setdefault(name, []).append((tokens, summary(values)["median_s"]))
        q = k = cases = None
    return records + _exponent_records(medians, "read-qk", env, prefix="scaling-logits")


def _exponent_records(
    medians: dict[str, list[tuple[int, float]]], baseline: str, env: dict, prefix: str = "scaling"
) -> list[dict]:
    records = []
    exponents = {name: fitted_exponent(*map(list, zip(*points))) for name, points in medians.items()}
    for name, points in medians.items():
        sizes, seconds = zip(*points)
        records.append(
            {
                "name": f"{prefix}/exponent/{name}",
                "section": "scaling-exponent",
                "exponent": exponents[name],
                "tokens": list(sizes),
                "median_s": list(seconds),
                "spread": None,  # a fit over medians; each point's spread is in its own record
                "baseline": f"{prefix}/exponent/{baseline}",
                "ratio": exponents[name] / exponents[baseline],
                "env": env,
            }
        )
    return records
