"""Section: the logits' extra memory and time, per-frame float32 sums vs float32 copies of q and k.

``copy`` is how ``frame_stats`` computed the logits before: ``q.float()`` and ``k.float()``
whole, then frame means (for bf16 input, two float32 copies: 384 MiB at 32,760 tokens x 12 x
128). ``sums`` is ``frame_stats(..., metrics=("logits",))`` now. Time is interleaved in this
process; peak extra memory is measured in a fresh subprocess per case, as in ``seed_method``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from benchmarks.seed_method import HEAD_DIM, HEADS, _reset_high_water, _status_bytes
from benchmarks.timing import interleaved, timing_records

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_logits(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """The logits as computed before: means over float32 copies of q and k."""
    frames = q.shape[1] // tokens_per_frame
    q_mean = q.to(torch.float32).unflatten(1, (frames, tokens_per_frame)).mean(2)
    k_mean = k.to(torch.float32).unflatten(1, (frames, tokens_per_frame)).mean(2)
    return torch.einsum("bahd,bchd->bhac", q_mean, k_mean) / math.sqrt(q.shape[-1])


def _call(method: str, q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int):
    if method == "copy":
        return lambda: copy_logits(q, k, tokens_per_frame)
    from attn_harness.model.capture import frame_stats

    return lambda: frame_stats(q, k, tokens_per_frame, metrics=("logits",))


def _qk(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, tokens, HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))


def peak_extra_bytes(method: str, tokens: int, tokens_per_frame: int, dtype: str) -> int:
    cmd = [sys.executable, "-m", "benchmarks.logits_cpu", method, str(tokens), str(tokens_per_frame), dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"memory probe {' '.join(cmd[2:])} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def run(token_counts: list[int], tokens_per_frame: int, *, reps: int, warmup: int, env: dict) -> list[dict]:
    records = []
    for dtype_name, dtype in DTYPES.items():
        for tokens in token_counts:
            q, k = _qk(tokens, dtype)
            samples = interleaved({m: _call(m, q, k, tokens_per_frame) for m in ("copy", "sums")}, reps=reps, warmup=warmup)
            params = {"tokens": tokens, "tokens_per_frame": tokens_per_frame, "heads": HEADS, "head_dim": HEAD_DIM,
                      "dtype": dtype_name}
            records += timing_records("logits-cpu-time", samples, "copy", env, params,
                                      prefix=f"logits-cpu/time/{dtype_name}/{tokens}/")
            del q, k
            peaks = {m: peak_extra_bytes(m, tokens, tokens_per_frame, dtype_name) for m in ("copy", "sums")}
            for method, peak in peaks.items():
                records.append({
                    "name": f"logits-cpu/peak-memory/{dtype_name}/{tokens}/{method}", "section": "logits-cpu-memory",
                    "median_bytes": peak, "spread": None, "reps": 1,
                    "baseline": f"logits-cpu/peak-memory/{dtype_name}/{tokens}/copy",
                    "ratio": peak / peaks["copy"] if peaks["copy"] else None, **params,
                    "measured_with": "VmHWM growth over VmRSS before the call, fresh subprocess", "env": env,
                })
    return records


def _probe(method: str, tokens: int, tokens_per_frame: int, dtype: str) -> None:
    torch.set_num_threads(1)
    q, k = _qk(tokens, DTYPES[dtype])
    small_q, small_k = _qk(2 * tokens_per_frame, DTYPES[dtype])
    _call(method, small_q, small_k, tokens_per_frame)()  # warm-up at a small size
    del small_q, small_k
    reset = _reset_high_water()
    before = _status_bytes("VmRSS")
    _call(method, q, k, tokens_per_frame)()
    peak = _status_bytes("VmHWM") if reset else 0
    print(json.dumps({"peak_extra_bytes": max(peak - before, 0), "high_water_reset": reset}))


if __name__ == "__main__":
    _probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
