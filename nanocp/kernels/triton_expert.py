"""The MoE experts' SwiGLU at small batches as two Triton launches, for when torch's grouped GEMM is slow (a decode
step: a few rows per active expert, where the grouped GEMM reaches about half of copy bandwidth at 1 token).

The scheme of vLLM's fused_moe kernel, without its padded row map: x's rows are already sorted by expert and each
expert's rows are the range ends[e-1]..ends[e] (int32 cumulative counts, on the device). The grid is (min(experts,
rows), column blocks), fixed by the shapes alone, so a CUDA graph can capture it: program slot s finds the (s+1)-th
expert with rows from ends (a 128-entry scan) and loops over its row range in BLOCK_M tiles, so no program is spent
on an idle expert and none of its weights is read: the bytes read are the active experts' weights (once from
memory; further row tiles of a busy expert find them in L2). A decode step is bound by those bytes, so the blocks
are chosen to keep enough loads in flight (many narrow column blocks), not for tensor-core throughput.

Launch 1 computes gate and up (weight rows j and width + j) for BLOCK_N columns and writes silu(gate) * up, the
SwiGLU fused in its epilogue; launch 2 multiplies that by the down projection. Both accumulate in float32 over the
full K in one program (no split-K, no atomics): the result is deterministic, a graph's replay equals an eager step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanocp.kernels.moe import TokenRows
from nanocp.kernels.triton_pdl import await_inputs, launch_options

# tl.dot wants at least 16 rows; a decode step has 1 to a few rows per expert, so the smallest tile wastes least.
BLOCK_M = 16


class Blocks(NamedTuple):
    """One launch's tile: output columns and K per step, warps, software-pipeline stages."""

    n: int
    k: int
    warps: int = 4
    stages: int = 4


# Chosen by measurement on an H200 (bench/moe_kernels.py --triton-blocks, results/moe_kernels_triton_h200.json,
# Qwen3-30B-A3B expert shapes in graphs): gate/up in blocks of 32 columns, down in blocks of 64, K steps of 128 (256-
# byte contiguous runs of each weight row) were fastest from 4 to 128 tokens (79-94% of copy bandwidth on the active
# experts' weights) and tied at 1 token (51%); blocks of 16/32 were 1.1x slower, 16/16 with K steps of 64 1.3x.
GATE_UP_BLOCKS = Blocks(n=32, k=128)
DOWN_BLOCKS = Blocks(n=64, k=128)
# One token's rows (up to FEW_ROWS, one per expert) make a launch of few programs (the experts x column blocks); K
# steps of 256 with 3 stages keep more of each program's weight bytes in flight: gate/up + down 26.0 us a layer
# against 33.8 with the tiles above, in graphs of 12 layers with weights of their own, twice on one H200 lease
# (results/decode_kernels_gpu_expert_tiles*.json, `decode_kernels_gpu.py --parts expert_tiles`); from 2 tokens
# (16 rows) the tiles above stay fastest or within 2%.
FEW_ROWS = 8
FEW_ROWS_GATE_UP_BLOCKS = Blocks(n=32, k=256, stages=3)
FEW_ROWS_DOWN_BLOCKS = Blocks(n=64, k=256, stages=3)


@triton.jit
def _expert_matmul_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    source_ptr,
    ends_ptr,
    w_ptr,
    out_ptr,
    num_experts,
    n_out,
    k_in,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    GATED: tl.constexpr,
    SOURCE_DIV: tl.constexpr,
    EVEN_K: tl.constexpr,
    EXPERTS_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[rows of one expert, cols] = x[rows] @ w[expert, cols].T, or with GATED silu(x @ w[expert, cols].T) *
    (x @ w[expert, n_out + cols].T): w is (experts, N, K) with K contiguous, read as (K, N) tiles without a copy.
    SOURCE_DIV > 0: row r is x's row source[r] // SOURCE_DIV (a (token, expert) entry read from its token, so no
    gather kernel runs before)."""
    await_inputs(PDL)
    # Program slot s takes the (s+1)-th expert with rows: at 1 token 8 slots, so no program is spent on the idle
    # experts. A slot past the active experts gets an empty row range (its loads are masked off).
    slot = tl.program_id(0)
    e = tl.arange(0, EXPERTS_BLOCK)
    e_ends = tl.load(ends_ptr + e, mask=e < num_experts, other=0)
    e_starts = tl.load(ends_ptr + e - 1, mask=(e > 0) & (e < num_experts), other=0)
    rank = tl.cumsum((e_ends > e_starts).to(tl.int32), axis=0)  # active experts up to and including each
    expert = tl.sum((rank <= slot).to(tl.int32), axis=0)
    start = tl.sum(tl.where(e == expert, e_starts, 0), axis=0)
    end = tl.sum(tl.where(e == expert, e_ends, 0), axis=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    w_tile = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    for m0 in range(start, end, BLOCK_M):  # one tile at a decode step; later ones find the weights in L2
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        x_rows = tl.load(source_ptr + rows, mask=row_ok, other=0) // SOURCE_DIV if SOURCE_DIV > 0 else rows
        x_tile = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            if EVEN_K:  # no K mask: the weight loads stay plain contiguous runs
                x_mask = row_ok[:, None]
                w_mask = col_ok[None, :]
            else:
                k_ok = k0 + ks < k_in
                x_mask = row_ok[:, None] & k_ok[None, :]
                w_mask = k_ok[:, None] & col_ok[None, :]
            a = tl.load(x_tile + k0, mask=x_mask, other=0.0)
            acc = tl.dot(a, tl.load(w_tile + k0, mask=w_mask, other=0.0), acc)
            if GATED:  # the up rows, n_out weight rows below the gate's
                up = tl.dot(a, tl.load(w_tile + n_out * stride_wn + k0, mask=w_mask, other=0.0), up)
        if GATED:
            acc = acc * tl.sigmoid(acc) * up
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _expert_matmul(
    rows_in: torch.Tensor | TokenRows, ends: torch.Tensor, w: torch.Tensor, gated: bool, blocks: Blocks
) -> torch.Tensor:
    """One launch over (experts, column blocks): (rows, K) x each row's expert's (N, K) weight -> (rows, N), or
    (rows, N / 2) of silu(gate) * up when gated. Rows past ends[-1] are left unwritten (no expert's). TokenRows:
    each row read from its token's."""
    x, source = (rows_in.x, rows_in.entries) if isinstance(rows_in, TokenRows) else (rows_in, None)
    n_out = w.shape[1] // 2 if gated else w.shape[1]
    k_in = w.shape[2]
    rows = x.shape[0] if source is None else source.shape[0]
    out = x.new_empty(rows, n_out)
    if rows == 0:
        return out
    assert x.stride(1) == 1 and w.stride(2) == 1, "K must be the contiguous axis"
    experts = w.shape[0]
    # No more experts have rows than there are rows: a static bound (a graph's grid), tight at decode steps.
    grid = (min(experts, rows), triton.cdiv(n_out, blocks.n))
    _expert_matmul_kernel[grid](
        x,
        x if source is None else source,
        ends,
        w,
        out,
        experts,
        n_out,
        k_in,
        x.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        GATED=gated,
        SOURCE_DIV=rows_in.top_k if isinstance(rows_in, TokenRows) else 0,
        EVEN_K=k_in % blocks.k == 0,
        EXPERTS_BLOCK=triton.next_power_of_2(experts),
        BLOCK_M=BLOCK_M,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        num_warps=blocks.warps,
        num_stages=blocks.stages,
        **launch_options(x),
    )
    return out


def grouped_swiglu(
    x: torch.Tensor | TokenRows,
    ends: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    blocks: tuple[Blocks, Blocks] | None = None,
) -> torch.Tensor:
    """kernels.grouped_swiglu_by_ends in two launches. x: (rows, hidden) sorted by expert, or the tokens the rows
    come from (read in the first launch's loads); ends: (experts,) int32 each expert's end row; w_gate_up: (experts,
    2 width, hidden), gate rows first; w_down: (experts, hidden, width). Returns (rows, hidden) in x's dtype, the
    intermediate rounded to it as the grouped GEMMs' is. blocks: the (gate/up, down) tiles, else chosen by the rows."""
    if blocks is None:
        rows = len(x.entries) if isinstance(x, TokenRows) else len(x)
        few = rows <= FEW_ROWS
        blocks = (FEW_ROWS_GATE_UP_BLOCKS, FEW_ROWS_DOWN_BLOCKS) if few else (GATE_UP_BLOCKS, DOWN_BLOCKS)
    h = _expert_matmul(x, ends, w_gate_up, True, blocks[0])
    return _expert_matmul(h, ends, w_down, False, blocks[1])
