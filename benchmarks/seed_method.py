"""Section 2: the seed's extractor (full token x token logits, then block means) vs ours.

Time is measured in this process; peak memory in a fresh subprocess per case
(``python -m benchmarks.seed_method METHOD TOKENS ...``), as the growth of the process's
resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just
before the call) over its resident size at that moment, with q and k already allocated. This
counts every page torch touches (tracemalloc sees none of its allocations). Where the reset
is not allowed, the lifetime high-water (``ru_maxrss``) is used, which can only err high.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys

import torch

from benchmarks.timing import interleaved, timing_records

METHODS = ("naive", "logits", "logits+mass")
HEADS, HEAD_DIM = 12, 128  # Wan2.1-T2V-1.3B
RSS_RESOLUTION = 64 * 1024  # below this, page-level RSS accounting cannot tell a peak from noise


def naive_frame_logits(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """What the seed did: the [batch, heads, N, N] logit matrix of the layer, then frame-block means."""
    frames = q.shape[1] // tokens_per_frame
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k).mul_(1 / math.sqrt(q.shape[-1]))  # in place: one N x N copy
    return scores.unflatten(3, (frames, tokens_per_frame)).unflatten(2, (frames, tokens_per_frame)).mean((3, 5))


def method_call(method: str, q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int):
    if method == "naive":
        return lambda: naive_frame_logits(q, k, tokens_per_frame)
    # Imported here so a memory probe of the naive method does not pay for importing diffusers.
    from attn_harness.model.capture import frame_stats

    metrics = ("logits",) if method == "logits" else ("logits", "mass")
    return lambda: frame_stats(q, k, tokens_per_frame, metrics=metrics)


def make_qk(tokens: int, heads: int = HEADS, head_dim: int = HEAD_DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, tokens, heads, head_dim, generator=gen), torch.randn(1, tokens, heads, head_dim, generator=gen))


def naive_bytes(tokens: int, heads: int = HEADS, element_bytes: int = 4) -> int:
    """Size of the seed's logit matrix: heads x N x N elements (4 bytes fp32, 2 bytes bf16)."""
    return heads * tokens * tokens * element_bytes


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(method: str, tokens: int, tokens_per_frame: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> int:
    """Peak memory of one call beyond its inputs, measured in a fresh subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.seed_method", method, str(tokens), str(tokens_per_frame), str(heads), str(head_dim)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"memory probe {' '.join(cmd[2:])} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def run(
    token_counts: list[int], tokens_per_frame: int, *, reps: int, warmup: int, env: dict, memory_tokens: list[int]
) -> list[dict]:
    records = []
    for tokens in token_counts:
        q, k = make_qk(tokens)
        cases = {method: method_call(method, q, k, tokens_per_frame) for method in METHODS}
        samples = interleaved(cases, reps=reps, warmup=warmup)
        params = {"tokens": tokens, "tokens_per_frame": tokens_per_frame, "heads": HEADS, "head_dim": HEAD_DIM}
        records += timing_records("seed-method-time", samples, "naive", env, params, prefix=f"seed-method/time/{tokens}/")
        del q, k, cases
    for tokens in memory_tokens:
        peaks = {method: peak_extra_bytes(method, tokens, tokens_per_frame) for method in METHODS}
        for method, peak in peaks.items():
            records.append(
                {
                    "name": f"seed-method/peak-memory/{tokens}/{method}",
                    "section": "seed-method-memory",
                    "median_bytes": peak,
                    "spread": None,  # one fresh process per case: an allocation high-water, not a timing
                    "reps": 1,
                    "baseline": f"seed-method/peak-memory/{tokens}/naive",
                    "ratio": peak / peaks["naive"],
                    # A peak under the resolution is reported as "at least" naive / resolution.
                    "times_less_than_naive": peaks["naive"] / max(peak, RSS_RESOLUTION),
                    "below_resolution": peak < RSS_RESOLUTION,
                    "naive_matrix_bytes_fp32": naive_bytes(tokens),
                    "tokens": tokens,
                    "tokens_per_frame": tokens_per_frame,
                    "heads": HEADS,
                    "head_dim": HEAD_DIM,
                    "measured_with": "ru_maxrss growth over RSS before the call, fresh subprocess",
                    "env": env,
                }
            )
    records.append(
        {
            "name": "seed-method/naive-matrix-at-32760",
            "section": "seed-method-memory",
            "median_bytes": naive_bytes(32760),
            "median_bytes_bf16": naive_bytes(32760, element_bytes=2),
            "spread": None,
            "reps": 0,
            "ratio": naive_bytes(32760) / naive_bytes(max(memory_tokens)) if memory_tokens else None,
            "baseline": f"seed-method/peak-memory/{max(memory_tokens)}/naive" if memory_tokens else None,
            "note": "analytic: 12 heads x 32760^2 logits (fp32; bf16 is half), the matrix the seed holds per layer call",
            "tokens": 32760,
            "env": env,
        }
    )
    return records


def _probe(method: str, tokens: int, tokens_per_frame: int, heads: int, head_dim: int) -> None:
    torch.set_num_threads(1)
    q, k = make_qk(tokens, heads, head_dim)
    # Touch the kernels once at a tiny size so one-off library allocations are not counted
    # (tiny: freed buffers of the measured size would be reused unseen from the heap).
    small_q, small_k = make_qk(4, heads, head_dim)
    method_call(method, small_q, small_k, 2)()
    del small_q, small_k
    reset = _reset_high_water()
    before = _status_bytes("VmRSS")
    method_call(method, q, k, tokens_per_frame)()
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_extra_bytes": max(peak - before, 0), "high_water_reset": reset}))

if __name__ == "__main__":
    _probe(sys.argv[1], *(int(arg) for arg in sys.argv[2:6]))
