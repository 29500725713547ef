"""The MoE layer's computation: the router's top-k, the (token, expert) rows sorted by expert, the experts' SwiGLU
on rows grouped by expert, and each token's weighted combine. Torch on CPU (the reference), Triton and grouped GEMM
on CUDA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TokenRows(NamedTuple):
    """The activations of sorted (token, expert) rows, read where they are: row r is token entries[r] // top_k of
    x (entries as sort_by_expert answers them), so no gather has to run first."""

    x: torch.Tensor  # (tokens, hidden)
    entries: torch.Tensor  # (rows,) int64
    top_k: int

    def gather(self) -> torch.Tensor:
        return self.x[self.entries // self.top_k]


class ExpertOutputs(NamedTuple):
    """A MoE layer's expert rows before their combine: the norm after the layer combines them as it adds them to
    the residual stream (add_rms_norm; one launch on CUDA)."""

    y: torch.Tensor  # (rows, hidden) in sorted order
    position: torch.Tensor  # (rows,) each (token, expert) row's place in y
    weights: torch.Tensor  # (tokens, top_k)

    def combine(self) -> torch.Tensor:
        return combine(self.y, self.position, self.weights)


def fused(x: torch.Tensor) -> bool:
    """Whether an op on x runs the CUDA kernels (Triton, FlashInfer), which take bfloat16 and float16; anything
    else runs the torch reference. Here rather than in the package's __init__: norm.py imports it from an op module
    already on every token's path, so the path gains no file (tests/test_token_path.py bounds it)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def route_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts by softmax probability (float32) and their weights (renormalised to sum to one
    if asked), as (weights in dtype, experts int64), both (tokens, top_k)."""
    if fused(logits):
        from nanocp.kernels import triton_moe

        return triton_moe.route_topk(logits, top_k, renormalize, dtype)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) rows, experts (tokens, top_k) flattened, stably sorted by expert, as:
    entries (rows,) the row at each sorted place; position (rows,) each row's sorted place (the inverse); ends
    (num_experts,) int32 each expert's end in the sorted order (cumulative counts). On the device, no host sync."""
    if experts.is_cuda:
        from nanocp.kernels import triton_moe

        return triton_moe.sort_by_expert(experts, num_experts)
    flat = experts.flatten()
    entries = torch.argsort(flat, stable=True)
    position = torch.empty_like(entries).index_copy_(0, entries, torch.arange(len(entries), device=flat.device))
    bounds = torch.arange(1, num_experts + 1, device=flat.device)
    return entries, position, torch.searchsorted(flat[entries], bounds, out_int32=True)


def combine(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's expert outputs weighted and summed in a fixed order (no atomics, so steps are deterministic:
    a graph's replay and an eager step, every member of a group, compute alike). y: (rows, hidden) in sorted order;
    position: each (token, expert) row's place in y; weights: (tokens, top_k)."""
    if fused(y):
        from nanocp.kernels import triton_moe

        return triton_moe.combine(y, position, weights)
    return (y[position].view(*weights.shape, y.shape[-1]) * weights[..., None]).sum(dim=1)


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
    x: torch.Tensor | TokenRows, ends: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """grouped_swiglu with each expert's end row (int32 cumulative counts) on x's device: on CUDA no host sync, so
    a step's MoE needs none and a CUDA graph can capture it; elsewhere the reference with the counts read back.
    x: the sorted rows, or the tokens they come from (TokenRows: the CUDA expert kernels read them in place)."""
    tokens = x.x if isinstance(x, TokenRows) else x
    if tokens.is_cuda and tokens.dtype == torch.bfloat16:
        from nanocp.kernels import gpu_moe

        return gpu_moe.grouped_swiglu_by_ends(x, ends, w_gate_up, w_down)
    rows = x.gather() if isinstance(x, TokenRows) else x
    return reference_grouped_swiglu(rows, torch.diff(ends, prepend=ends.new_zeros(1)).tolist(), w_gate_up, w_down)


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
