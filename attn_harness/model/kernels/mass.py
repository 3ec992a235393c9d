"""Exact frame mass on the GPU: Triton kernels that never hold more than one score tile.

``mass[a, b]`` = mean over query tokens i of frame a of sum over key tokens j of frame b of
``softmax(q_i . k_j / sqrt(d))_j``. Two kernels, both tiled like flash attention:

* ``_row_stats_kernel``: per query row, the running maximum ``m`` of the raw scores and
  ``log2 row_sum`` with ``row_sum = sum_j 2^((s_ij - m) c)``, ``c = log2(e) / sqrt(d)`` (online softmax,
  without the P @ V product);
* ``_mass_kernel``: given those row statistics (or the row logsumexp of the model's own
  attention call), one pass over the keys summing ``p_ij = 2^((s_ij - m_i) c - log2 l_i)``
  per row over each key frame (key tiles are aligned to key frames), then over the query
  rows of the tile once per key frame. Query tiles never straddle a query frame either, so
  every program writes one partial row ``[key_frames]``; the partials are summed in torch
  (fixed order: deterministic).

Frame masks: query frames that share a mask row form a group (one launch per group and per
contiguous run of allowed key frames); keys outside the run are never read. Loop trip counts
(key tiles, key frames) are runtime arguments on the GPU (one compiled kernel per shape) and
compile-time constants under Triton's CPU interpreter (``STATIC``), which fails on loops with
runtime bounds under numpy >= 2.4; the loop bodies are the same code.
Numerics are argued in ``docs/kernels.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP_FUSION = True  # fused multiply-adds, as measured; explicit because Triton 3.10 changes the default

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters; ``None`` picks from the shape (128-row query tiles and 8
    warps, as Triton's fused-attention tutorial on Hopper, where frames are that long)."""

    block_m: int | None = None
    block_n: int = 64
    num_warps: int | None = None
    num_stages: int = 3


@triton.jit
def _load_rows(ptr, offs_row, row_ok, stride_row, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows outside the range (when MASK_ROWS) and columns past D read as 0."""
    ptrs = ptr + offs_row[:, None] * stride_row + offs_d[None, :]
    if MASK_ROWS:
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _scores(q, k_base, stride_kn, start, key_hi, offs_n0, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
            MASK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Raw scores q . k for the key tile at ``start`` (fp32 accumulation); with MASK_N keys >= key_hi get -inf."""
    offs_n = start + offs_n0
    n_ok = offs_n < key_hi
    k = _load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, D, BLOCK_D, MASK_N)
    if UPCAST:  # exact: products of 16-bit floats are exact in float32
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _row_stats_tile(q, k_base, stride_kn, start, key_hi, offs_n0, offs_d, m, row_sum, c,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    s = _scores(q, k_base, stride_kn, start, key_hi, offs_n0, offs_d, D, BLOCK_D, MASK_N, PRECISION, UPCAST)
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2((s - m_new[:, None]) * c)
    row_sum = row_sum * tl.exp2((m - m_new) * c) + tl.sum(p, 1)
    return m_new, row_sum


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, m_ptr, log2l_ptr, qframes_ptr,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    heads, tokens, key_lo, key_hi, full_tiles, c,
    TPF: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STATIC: tl.constexpr, FULL_TILES: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Row max and log2 of the row sum over keys [key_lo, key_hi), for the group's query frames."""
    tile = tl.program_id(0)
    frame = tl.load(qframes_ptr + tl.program_id(1))
    bh = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    offs_in_frame = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_in_frame < TPF
    rows = frame * TPF + offs_in_frame
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _load_rows(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qn, offs_d, D, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    if STATIC:  # a constant trip count: what Triton's CPU interpreter can run
        for t in range(FULL_TILES):
            m, row_sum = _row_stats_tile(q, k_base, stride_kn, key_lo + t * BLOCK_N, key_hi, offs_n0, offs_d, m, row_sum, c,
                                   D, BLOCK_D, False, PRECISION, UPCAST)
    else:
        for t in range(full_tiles):
            m, row_sum = _row_stats_tile(q, k_base, stride_kn, key_lo + t * BLOCK_N, key_hi, offs_n0, offs_d, m, row_sum, c,
                                   D, BLOCK_D, False, PRECISION, UPCAST)
    if TAIL:
        m, row_sum = _row_stats_tile(q, k_base, stride_kn, key_lo + full_tiles * BLOCK_N, key_hi, offs_n0, offs_d, m, row_sum, c,
                               D, BLOCK_D, True, PRECISION, UPCAST)
    offs = bh.to(tl.int64) * tokens + rows
    tl.store(m_ptr + offs, m, mask=row_ok)
    tl.store(log2l_ptr + offs, tl.log2(row_sum), mask=row_ok)


@triton.jit
def _row_mass_tile(q, k_base, stride_kn, start, key_hi, offs_n0, offs_d, shift, log2l, c,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """Each row's probability summed over the key tile at ``start`` (all in one key frame)."""
    s = _scores(q, k_base, stride_kn, start, key_hi, offs_n0, offs_d, D, BLOCK_D, MASK_N, PRECISION, UPCAST)
    return tl.sum(tl.exp2(tl.fma(s - shift[:, None], c, -log2l[:, None])), 1)


@triton.jit
def _add_key_frame(acc, frames, key_frame, q, k_base, stride_kn, offs_n0, offs_d, shift, log2l, c,
                   TPF: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, FULL_TILES: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """``acc[key_frame]`` += the probability the tile's rows send to that key frame."""
    start = key_frame * TPF
    per_row = tl.zeros([BLOCK_M], tl.float32)
    for t in range(FULL_TILES):
        per_row += _row_mass_tile(q, k_base, stride_kn, start + t * BLOCK_N, start + TPF, offs_n0, offs_d, shift,
                                  log2l, c, D, BLOCK_D, False, PRECISION, UPCAST)
    if TAIL:
        per_row += _row_mass_tile(q, k_base, stride_kn, start + FULL_TILES * BLOCK_N, start + TPF, offs_n0, offs_d,
                                  shift, log2l, c, D, BLOCK_D, True, PRECISION, UPCAST)
    return acc + tl.where(frames == key_frame, tl.sum(per_row, 0), 0.0)


@triton.jit
def _mass_kernel(
    q_ptr, k_ptr, shift_ptr, log2l_ptr, part_ptr, qframes_ptr,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    heads, tokens, key_frame_lo, run_frames, c,
    TPF: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F_PAD: tl.constexpr, STATIC: tl.constexpr, RUN_FRAMES: tl.constexpr, FULL_TILES: tl.constexpr, TAIL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per (query tile, key frame): the probability summed over the tile's rows and the frame's keys.

    Row i's probabilities are ``2^((s_ij - shift_i) c - log2l_i)``; rows past the frame have
    ``log2l = +inf`` and contribute 0. Key tiles are aligned to key frames (FULL_TILES whole
    tiles and a masked TAIL per frame), so each row sums its own frame total within its warp
    and rows are reduced once per key frame. Writes ``part[bh, slot, tile, :]``.
    """
    tile = tl.program_id(0)
    slot = tl.program_id(1)
    frame = tl.load(qframes_ptr + slot)
    bh = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    offs_in_frame = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_in_frame < TPF
    rows = frame * TPF + offs_in_frame
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    frames = tl.arange(0, F_PAD)
    q = _load_rows(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qn, offs_d, D, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    stats = bh.to(tl.int64) * tokens + rows
    shift = tl.load(shift_ptr + stats, mask=row_ok, other=0.0)
    log2l = tl.load(log2l_ptr + stats, mask=row_ok, other=float("inf"))
    acc = tl.zeros([F_PAD], tl.float32)
    if STATIC:  # a constant trip count: what Triton's CPU interpreter can run
        for f in range(RUN_FRAMES):
            acc = _add_key_frame(acc, frames, key_frame_lo + f, q, k_base, stride_kn, offs_n0, offs_d, shift, log2l, c,
                                 TPF, D, BLOCK_M, BLOCK_N, BLOCK_D, FULL_TILES, TAIL, PRECISION, UPCAST)
    else:
        for f in range(run_frames):
            acc = _add_key_frame(acc, frames, key_frame_lo + f, q, k_base, stride_kn, offs_n0, offs_d, shift, log2l, c,
                                 TPF, D, BLOCK_M, BLOCK_N, BLOCK_D, FULL_TILES, TAIL, PRECISION, UPCAST)
    tiles = tl.num_programs(0)
    out = ((bh.to(tl.int64) * tl.num_programs(1) + slot) * tiles + tile) * F_PAD + frames
    tl.store(part_ptr + out, acc)


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, stop)`` of a sorted frame list."""
    runs: list[tuple[int, int]] = []
    for frame in frames:
        if runs and runs[-1][1] == frame:
            runs[-1] = (runs[-1][0], frame + 1)
        else:
            runs.append((frame, frame + 1))
    return runs


@dataclass(frozen=True)
class _Launch:
    """What every launch of one call shares."""

    q: torch.Tensor
    k: torch.Tensor
    tokens_per_frame: int
    block_m: int
    block_n: int
    block_d: int
    c: float
    precision: str
    upcast: bool
    static: bool
    num_warps: int
    config: TileConfig

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, config: TileConfig) -> _Launch:
        head_dim = q.shape[-1]
        block_m = config.block_m or min(128, _pow2(tokens_per_frame, 16))
        # Triton's CPU interpreter multiplies bfloat16 tiles as raw integers: it gets float32 tiles
        upcast = triton.knobs.runtime.interpret and q.dtype == torch.bfloat16
        precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # tf32 is ignored for 16-bit inputs
        num_warps = config.num_warps or (8 if block_m >= 128 else 4)
        return cls(q, k, tokens_per_frame, block_m, config.block_n, _pow2(head_dim, 16), LOG2E / math.sqrt(head_dim),
                   precision, upcast, triton.knobs.runtime.interpret, num_warps, config)

    def grid(self, query_frames: torch.Tensor) -> tuple[int, int, int]:
        batch, _, heads, _ = self.q.shape
        return (triton.cdiv(self.tokens_per_frame, self.block_m), query_frames.numel(), batch * heads)

    def common(self, key_run: tuple[int, int]) -> dict:
        lo, hi = key_run[0] * self.tokens_per_frame, key_run[1] * self.tokens_per_frame
        return dict(
            TPF=self.tokens_per_frame, D=self.q.shape[-1], BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            BLOCK_D=self.block_d, STATIC=self.static, TAIL=(hi - lo) % self.block_n != 0,
            FULL_TILES=(hi - lo) // self.block_n if self.static else 0,  # 0 on the GPU: one compiled kernel
            PRECISION=self.precision, UPCAST=self.upcast, num_warps=self.num_warps, num_stages=self.config.num_stages,
            enable_fp_fusion=FP_FUSION,
        ), lo, hi

    def strides(self) -> tuple[int, ...]:
        q, k = self.q, self.k
        return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))


def _row_stats(launch: _Launch, query_frames: torch.Tensor, key_runs: list[tuple[int, int]],
               shift: torch.Tensor, log2l: torch.Tensor) -> None:
    """Fill ``shift`` (row max) and ``log2l`` for the rows of ``query_frames`` over ``key_runs``."""
    batch, tokens, heads, _ = launch.q.shape
    per_run = []
    for run in key_runs:
        if len(key_runs) == 1:  # the kernel writes the group's rows in place
            m, log_sum = shift, log2l
        else:
            m = torch.empty(batch * heads, tokens, dtype=torch.float32, device=launch.q.device)
            log_sum = torch.empty_like(m)
        meta, lo, hi = launch.common(run)
        _row_stats_kernel[launch.grid(query_frames)](
            launch.q, launch.k, m, log_sum, query_frames, *launch.strides(), heads, tokens, lo, hi,
            (hi - lo) // launch.block_n, launch.c, **meta
        )
        per_run.append((m, log_sum))
    if len(per_run) == 1:
        return
    index = (query_frames[:, None] * launch.tokens_per_frame
             + torch.arange(launch.tokens_per_frame, device=query_frames.device)).flatten()
    # several key runs: combine their sums in float64 around the largest maximum
    ms = torch.stack([m[:, index] for m, _ in per_run]).double()
    logs = torch.stack([log_sum[:, index] for _, log_sum in per_run]).double()
    top = ms.max(0).values
    total = torch.exp2(logs + (ms - top) * launch.c).sum(0)
    shift[:, index] = top.float()
    log2l[:, index] = torch.log2(total).float()


def frame_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens_per_frame: int,
    groups: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    lse: torch.Tensor | None = None,
    config: TileConfig = TileConfig(),
) -> torch.Tensor:
    """Frame mass ``[batch, heads, frames, frames]`` (float32) of post-RoPE ``q``, ``k`` ``[batch, tokens, heads, head_dim]``.

    ``groups`` is ``[(query_frames, allowed_key_frames), ...]`` as ``capture.mask_groups`` makes
    it; query frames in no group get 0. ``lse`` ``[batch, heads, tokens]``, when given, is the
    natural-log row logsumexp of the scaled scores over each row's allowed keys (what
    attention kernels return); without it the row statistics are computed first (one more
    pass over the keys).
    """
    batch, tokens, heads, head_dim = q.shape
    frames = tokens // tokens_per_frame
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    launch = _Launch.of(q, k, tokens_per_frame, config)
    device = q.device
    shift = torch.zeros(batch * heads, tokens, dtype=torch.float32, device=device)
    if lse is None:  # filled group by group by the row-statistics kernel
        log2l = torch.empty_like(shift)
    else:
        log2l = (lse.reshape(batch * heads, tokens).float() * LOG2E).contiguous()
    f_pad = _pow2(frames, 2)
    mass = torch.zeros(batch, heads, frames, frames, dtype=torch.float32, device=device)
    for query_list, key_list in groups:
        query_frames = torch.tensor(list(query_list), dtype=torch.int32, device=device)
        key_runs = _runs(sorted(key_list))
        if lse is None:
            _row_stats(launch, query_frames, key_runs, shift, log2l)
        grid = launch.grid(query_frames)
        total = torch.zeros(batch * heads, len(query_list), f_pad, dtype=torch.float32, device=device)
        for run in key_runs:
            part = torch.empty(batch * heads, grid[1], grid[0], f_pad, dtype=torch.float32, device=device)
            block_n = min(launch.block_n, _pow2(tokens_per_frame, 16))  # key tiles never cross a key frame
            _mass_kernel[grid](
                q, k, shift, log2l, part, query_frames, *launch.strides(), heads, tokens, run[0], run[1] - run[0], launch.c,
                TPF=tokens_per_frame, D=head_dim, BLOCK_M=launch.block_m, BLOCK_N=block_n, BLOCK_D=launch.block_d,
                F_PAD=f_pad, STATIC=launch.static, RUN_FRAMES=run[1] - run[0] if launch.static else 0,
                FULL_TILES=tokens_per_frame // block_n,
                TAIL=tokens_per_frame % block_n != 0, PRECISION=launch.precision, UPCAST=launch.upcast,
                num_warps=launch.num_warps, num_stages=config.num_stages, enable_fp_fusion=FP_FUSION,
            )
            total += part.sum(2)
        rows = torch.tensor(list(query_list), device=device)
        mass[:, :, rows] = (total[..., :frames] / tokens_per_frame).view(batch, heads, len(query_list), frames)
    return mass
