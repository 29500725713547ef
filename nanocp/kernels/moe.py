"""The expert computation of a MoE layer on rows already grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(x: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x: (rows, hidden), rows sorted by local expert with counts[e] rows for expert e.

    w_gate_up: (experts, 2 * width, hidden), gate rows first; w_down: (experts, hidden, width).
    Returns (rows, hidden): down(silu(gate(x)) * up(x)) with each row's own expert.
    """
    if x.is_cuda and x.dtype == torch.bfloat16:
        from nanocp.kernels import gpu_moe

        return gpu_moe.grouped_swiglu(x, counts, w_gate_up, w_down)
    return reference_grouped_swiglu(x, counts, w_gate_up, w_down)


def grouped_swiglu_by_ends(
    x: torch.Tensor, ends: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """grouped_swiglu with each expert's end row (int32 cumulative counts) on x's device: on CUDA no host sync, so
    a step's MoE needs none and a CUDA graph can capture it; elsewhere the reference with the counts read back."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        from nanocp.kernels import gpu_moe

        return gpu_moe.grouped_swiglu_by_ends(x, ends, w_gate_up, w_down)
    return reference_grouped_swiglu(x, torch.diff(ends, prepend=ends.new_zeros(1)).tolist(), w_gate_up, w_down)


def reference_grouped_swiglu(
    x: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The torch version of grouped_swiglu: a loop over experts, on any device and dtype."""
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = x[start : start + count]
        gate, up = F.linear(rows, w_gate_up[expert]).chunk(2, dim=-1)
        out[start : start + count] = F.linear(F.silu(gate) * up, w_down[expert])
        start += count
    return out
