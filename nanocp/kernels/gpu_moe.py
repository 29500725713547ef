"""The expert computation on CUDA: two grouped GEMMs (torch._grouped_mm, CUTLASS on Hopper) around the SwiGLU.

Chosen by measurement (bench/moe_kernels.py, H100, Qwen3-30B-A3B expert shapes, CUDA-graph replays): 0.067 ms at 1
token to 0.92 ms at 4096 tokens, up to 84% of copy bandwidth on the active experts' weights; a loop over the experts
is 2 to 4.6 times slower (5 to 20 times eager), a padded batched GEMM over all experts ties at 64 tokens and is
slower elsewhere (7 times at 1 token, 1.7 times at 4096). Up to TRITON_MAX_ROWS rows (a decode step's), the
Triton kernels of triton_expert.py run instead: the grouped GEMM is furthest from bandwidth there.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from nanocp.kernels.moe import TokenRows

# Rows (tokens x top-k) up to which the Triton expert kernels run, grouped GEMMs above: x.shape[0] is fixed per
# CUDA graph, so each graph holds one path. Measured on an H200 (results/moe_kernels_h200_threshold.json): Triton
# 0.035 ms vs 0.063 at 1 token, 0.32 vs 0.43 at 128, a tie at 256 tokens, 1.8x slower at 512: 256 tokens at top-8.
TRITON_MAX_ROWS = 2048


def grouped_swiglu(x: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """kernels.grouped_swiglu on CUDA, bf16."""
    return grouped_swiglu_by_ends(x, device_ends(counts, x.device), w_gate_up, w_down)


def device_ends(counts: list[int], device: torch.device) -> torch.Tensor:
    """The cumulative counts as int32 on the device. Pinned and non-blocking: the host doesn't wait for the device
    to reach the copy."""
    ends = torch.tensor(list(accumulate(counts)), dtype=torch.int32, pin_memory=True)
    return ends.to(device, non_blocking=True)


def grouped_swiglu_by_ends(
    x: torch.Tensor | TokenRows, ends: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The same with each expert's end row (int32, the cumulative counts) already on the device: no host work, so a
    CUDA graph can capture it. Group ends may be any rows; rows past the last end are no expert's (undefined).
    TokenRows are read in place by the Triton kernels, gathered first for the grouped GEMMs."""
    rows = len(x.entries) if isinstance(x, TokenRows) else x.shape[0]
    if rows <= TRITON_MAX_ROWS:
        from nanocp.kernels import triton_expert

        return triton_expert.grouped_swiglu(x, ends, w_gate_up, w_down)
    return grouped_mm_swiglu(x.gather() if isinstance(x, TokenRows) else x, ends, w_gate_up, w_down)


def grouped_mm_swiglu(
    x: torch.Tensor, ends: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """grouped_swiglu_by_ends by two torch grouped GEMMs around a Triton SiLU-and-multiply, at any row count. The
    GEMM wants 16-byte aligned data pointers and row strides (true of these weights, and of any row slice of a bf16
    activation whose hidden size is a multiple of 8)."""
    # (E, N, K) weights viewed as (E, K, N) column-major: the layout the kernel reads without a copy.
    from nanocp.kernels.triton_moe import silu_mul

    gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)
    return torch._grouped_mm(silu_mul(gate_up), w_down.transpose(1, 2), offs=ends)
