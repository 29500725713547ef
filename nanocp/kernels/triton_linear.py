"""A decode step's projections at a few rows on CUDA: y = x @ weight.T in one Triton launch whose weight loads are in
flight before the kernel before it has finished.

At one to a few rows a projection reads its whole weight for almost no arithmetic, and cuBLAS starts reading only once
the previous kernel has drained. Launched with programmatic dependent launch (triton_pdl), this kernel is scheduled
while the previous one still runs: each block loads its slice of the weight (which no kernel writes) first, then waits
for its inputs, so the weight's latency overlaps the previous kernel's tail instead of following it.

Each block holds its rows of the weight in registers, the whole depth at once (no loop, so nothing waits to be
issued); an output is a float32 sum over the depth in a fixed order, rounded once: replays equal eager calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options

# Rows this kernel takes (graph buckets of near-empty steps): each row costs the block a reduction across its warps,
# which cuBLAS's tensor-core GEMMs do not pay. After a norm on an H200, at 1 / 2 / 4 rows
# (bench/results/decode_kernels_gpu_linear_h200.json): the qkv projection 9.1 / 10.4 / 13.7 us against cuBLAS's
# 9.7 / 10.5 / 10.6, the output projection 8.6 / 9.5 / 13.3 against 10.7 / 10.7 / 10.8, the router's gate
# 3.9 / 4.1 / 5.3 against 7.6 / 7.6 / 7.6.
MAX_ROWS = 2
# A small weight (the router's gate, 128 x 2048) gains up to this many rows.
MAX_ROWS_SMALL, SMALL_WEIGHT = 4, 1 << 20
# Weight elements a block holds: 8K (16 KB of bfloat16; 64 registers a thread at 4 warps once widened to float32),
# so many blocks fit on an SM beside the kernel before.
_TILE = 8 * 1024
_MAX_DEPTH = 8192


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether y = x @ weight.T runs here: a few contiguous rows of bfloat16/float16 on CUDA, with a depth that a
    block holds whole."""
    return (
        x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= (MAX_ROWS_SMALL if weight.numel() <= SMALL_WEIGHT else MAX_ROWS)
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.is_contiguous()
        and weight.shape[1] <= _MAX_DEPTH
    )


@triton.jit
def _small_linear_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    y_ptr,
    outputs,
    depth,
    x_stride,
    ROWS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_DEPTH: tl.constexpr,
    PDL: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    k = tl.arange(0, BLOCK_DEPTH)
    in_weight = (cols[:, None] < outputs) & (k[None, :] < depth)
    # The weight is no kernel's output: read it before waiting for the kernel before.
    w = tl.load(w_ptr + cols[:, None].to(tl.int64) * depth + k[None, :], mask=in_weight, other=0.0).to(tl.float32)
    await_inputs(PDL)
    for row in tl.static_range(ROWS):
        x = tl.load(x_ptr + row * x_stride + k, mask=k < depth, other=0.0).to(tl.float32)
        y = tl.sum(w * x[None, :], axis=1)
        tl.store(y_ptr + row * outputs + cols, y.to(y_ptr.dtype.element_ty), mask=cols < outputs)


def small_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x (rows, depth) and weight (outputs, depth), where applies(x, weight)."""
    rows, depth = x.shape
    outputs = weight.shape[0]
    y = x.new_empty(rows, outputs)
    block_depth = triton.next_power_of_2(depth)
    block_out = max(1, min(triton.next_power_of_2(outputs), _TILE // block_depth))
    _small_linear_kernel[(triton.cdiv(outputs, block_out),)](
        x,
        weight,
        y,
        outputs,
        depth,
        x.stride(0),
        ROWS=rows,
        BLOCK_OUT=block_out,
        BLOCK_DEPTH=block_depth,
        num_warps=4,
        **launch_options(x),
    )
    return y
