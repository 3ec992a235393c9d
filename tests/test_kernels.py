"""Kernels behind frame_stats: per-frame sums, attention with its logsumexp, the Triton mass.

The Triton kernels run here through Triton's CPU interpreter (a subprocess, see
``tests/interpreted_mass_kernels.py``) and on CUDA when a device is present (marked ``gpu``).
Tolerances: per-frame sums in float32 of up to a few hundred values of order 1 are within
1e-5 relative of float64; the mass within 1e-5 absolute (argued in the interpreted tests).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attn_harness.model.capture import Recorder, capture, frame_stats, mask_groups
from attn_harness.model.kernels import sdpa_lse, triton_available
from attn_harness.model.kernels.framesums import frame_sums
from attn_harness.model.kernels.sdpa_lse import attention_with_lse
from tests.oracle import brute_force_stats

ROOT = Path(__file__).resolve().parents[1]


def block_causal(frames: int, block_frames: int) -> torch.Tensor:
    """Blocks of ``block_frames`` frames see themselves and earlier blocks (built here without xarray,
    which the GPU machine's wheel set lacks; ``core.frames.block_causal_mask`` is the same mask)."""
    block = torch.arange(frames) // block_frames
    return block[None, :] <= block[:, None]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# --- per-frame sums (the logits' only pass over q and k) ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("per_frame", "chunk"), [(5, 512), (5, 3), (5, 7), (1, 2), (300, 64)])
def test_frame_sums_equal_float64_sums_whatever_the_chunk(dtype, per_frame, chunk):
    gen = torch.Generator().manual_seed(per_frame + chunk)
    x = torch.randn(2, 4 * per_frame, 3, 8, generator=gen).to(dtype)
    got = frame_sums(x, per_frame, chunk_tokens=chunk)
    want = x.double().unflatten(1, (4, per_frame)).sum(2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * per_frame**0.5, rtol=1e-6)


def test_logits_need_no_float32_copy_of_q_and_k():
    """Wan's full sequence in bf16 (96 MiB each for q, k): a float32 copy of both would add 384 MiB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from attn_harness.model.capture import frame_stats
        torch.set_num_threads(1)
        q = torch.randn(1, 32760, 12, 128).bfloat16(); k = torch.randn(1, 32760, 12, 128).bfloat16()
        frame_stats(q[:, :1560], k[:, :1560], 1560, metrics=("logits",))  # warm-up: allocator, kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        frame_stats(q, k, 1560, metrics=("logits",))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert grown_kib < 32 * 1024, f"peak memory grew by {grown_kib / 1024:.0f} MiB"


# --- the model's attention call with its logsumexp -------------------------------------------


def test_attention_with_lse_returns_the_stock_output_and_the_true_logsumexp():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 48, 3, 16, generator=gen)
    for _ in range(2):  # the first call checks the op against stock SDPA, the second uses the verdict
        out, lse = attention_with_lse(q, k, v)
        assert torch.equal(out, F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2))
    if lse is not None:  # this CPU build's flash op matched stock SDPA bitwise
        scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(16)
        torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=0)


def test_attention_with_lse_falls_back_to_stock_sdpa_when_the_op_differs(monkeypatch):
    """A backend whose output is not bitwise the stock one is never used, and gives no lse."""
    real = sdpa_lse._op_with_lse
    monkeypatch.setattr(sdpa_lse, "_op_with_lse", lambda q, k, v: (lambda out, lse: (out + 1e-3, lse))(*real(q, k, v)))
    monkeypatch.setattr(sdpa_lse, "_VERDICTS", {})
    q, k, v = torch.randn(3, 1, 20, 2, 8)
    for _ in range(2):
        out, lse = attention_with_lse(q, k, v)
        assert lse is None
        assert torch.equal(out, F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2))


# --- the Triton kernels under the interpreter -------------------------------------------------


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[test]')")
def test_triton_mass_kernels_match_the_oracle_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted_mass_kernels.py"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_gpu_variant_of_the_kernels_compiles_for_hopper_without_a_gpu(dtype):
    """The interpreter runs the constant-trip-count variant; this compiles the GPU one (runtime
    trip counts, Wan's 1,560 tokens per frame, head dim 128) to PTX and SASS for sm_90."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attn_harness.model.kernels import mass

    ints = ["stride_qb", "stride_qn", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "heads", "tokens"]
    shared = dict(TPF=1560, D=128, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, STATIC=False, FULL_TILES=0, TAIL=True,
                  PRECISION="tf32", UPCAST=False)
    kernels = {
        mass._row_stats_kernel: ({"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "m_ptr": "*fp32", "log2l_ptr": "*fp32",
                                  "qframes_ptr": "*i32", "key_lo": "i32", "key_hi": "i32", "full_tiles": "i32",
                                  "c": "fp32"}, shared),
        mass._mass_kernel: ({"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "shift_ptr": "*fp32", "log2l_ptr": "*fp32",
                             "part_ptr": "*fp32", "qframes_ptr": "*i32", "key_frame_lo": "i32", "run_frames": "i32", "c": "fp32"},
                            {**shared, "F_PAD": 32, "RUN_FRAMES": 0, "FULL_TILES": 24}),
    }
    for kernel, (pointers, constants) in kernels.items():
        types = {**{name: "i32" for name in ints}, **pointers}
        signature = {name: "constexpr" if name in constants else types[name] for name in kernel.arg_names}
        compiled = triton_compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "num_stages": 3, "enable_fp_fusion": mass.FP_FUSION})
        assert compiled.asm["cubin"], f"{kernel.__name__}: no machine code"


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "frames", "per_frame", "mask_kind"),  # few cases: each new geometry compiles kernels
    [(torch.bfloat16, 1, 40, "none"), (torch.bfloat16, 5, 16, "block-causal"), (torch.bfloat16, 4, 100, "random"),
     (torch.bfloat16, 21, 7, "none"), (torch.float16, 4, 100, "random"), (torch.float32, 4, 100, "random")],
)
@pytest.mark.gpu
@needs_cuda
def test_frame_stats_on_cuda_equal_the_float64_brute_force(dtype, mask_kind, frames, per_frame):
    gen = torch.Generator().manual_seed(frames * per_frame)
    q, k = (torch.randn(2, 2, frames * per_frame, 3, 64, generator=gen) * 1.5).to(dtype)
    mask = {"none": None, "block-causal": block_causal(frames, 2),
            "random": torch.rand(frames, frames, generator=gen) < 0.6}[mask_kind]
    got = frame_stats(q.cuda(), k.cuda(), per_frame, mask=mask)
    want = brute_force_stats(q, k, per_frame, mask)
    torch.testing.assert_close(got["mass"].cpu().double(), want["mass"], atol=1e-5, rtol=0)
    scale = (q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()).item() / 8
    torch.testing.assert_close(got["logits"].cpu().double().nan_to_num(), want["logits"].nan_to_num(), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize(("dtype", "shape"), [(torch.bfloat16, (1, 32760, 12, 128)), (torch.bfloat16, (1, 144, 4, 32)),
                                              (torch.float16, (1, 144, 4, 32))])
@pytest.mark.gpu
@needs_cuda
def test_cuda_attention_with_lse_is_bitwise_stock_sdpa_and_gives_the_same_mass(dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    stock = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    for _ in range(2):
        out, lse = attention_with_lse(q, k, v)
        assert torch.equal(out, stock)
    per_frame = 1560 if shape[1] == 32760 else 16
    if lse is None:
        pytest.skip("no attention op with a logsumexp gives the stock output here: capture uses two passes")
    groups = mask_groups(None, shape[1] // per_frame)
    from attn_harness.model.kernels.mass import frame_mass

    one_pass = frame_mass(q, k, per_frame, groups, lse=lse)
    two_pass = frame_mass(q, k, per_frame, groups)
    torch.testing.assert_close(one_pass, two_pass, atol=2e-6, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_capture_on_cuda_leaves_the_output_bitwise_identical():
    from attn_harness.model.models import build_tiny_random

    model = build_tiny_random().cuda()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 9, 8, 8, generator=gen).cuda(), timestep=torch.tensor([700.0]).cuda(),
                  encoder_hidden_states=torch.randn(1, 16, 64, generator=gen).cuda(), return_dict=False)
    with torch.inference_mode():
        plain = model(**inputs)[0]
        recorder = Recorder(tokens_per_frame=16, active=True)
        with capture(model, range(len(model.blocks)), recorder):
            captured = model(**inputs)[0]
    assert torch.equal(plain, captured)
    mass = torch.stack([r["mass"] for r in recorder.records.values()])
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("block_causal_mode", [False, True])
def test_the_gpu_benchmarks_one_pass_capture_passes_the_models_logsumexp_and_keeps_its_output(block_causal_mode, monkeypatch):
    """``benchmarks/kernels_gpu.py`` measures the one-pass mass through its own processor: on CPU,
    the same glue must hand ``frame_stats`` the true logsumexp of the model's q, k and change nothing."""
    from attn_harness.model.models import build_tiny_random
    from benchmarks import kernels_gpu

    seen = []

    def frame_stats_spy(q, k, tokens_per_frame, *, mask=None, metrics=(), lse=None):
        scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1),
                                        float("-inf"))
        seen.append(None if lse is None else float((lse.double() - scores.logsumexp(-1)).abs().max()))
        return frame_stats(q, k, tokens_per_frame, mask=mask, metrics=metrics)

    monkeypatch.setattr(kernels_gpu, "frame_stats", frame_stats_spy)
    model = build_tiny_random()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 9, 8, 8, generator=gen), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 16, 64, generator=gen), return_dict=False)
    mask = block_causal(9, 3) if block_causal_mode else None
    cases = kernels_gpu.model_cases(model, inputs, mask, tokens_per_frame=16)
    plain = cases["plain"]()[0]
    assert torch.equal(cases["logits+mass/all-layers/one-pass"]()[0], plain)
    assert len(seen) == len(model.blocks)
    if any(error is None for error in seen):
        pytest.skip("this CPU build's flash op did not give the stock output: no logsumexp to pass")
    assert max(seen) < 1e-5
