"""The MoE layer's small steps on CUDA, each one launch with no host work (CUDA-graph safe), where eager torch
spends two to eight: the router's softmax + top-k + renormalisation, the stable sort of (token, expert) rows by
expert, SiLU-and-multiply, and the weighted combine of each token's expert outputs (a fixed order: deterministic).
The expert GEMMs themselves stay torch's grouped GEMM (CUTLASS on Hopper), which reads only the experts with rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_norm import store_sum_and_norm
from nanocp.kernels.triton_pdl import await_inputs, launch_options

# The one-launch sort keeps every (token, expert) row of a step in one program per expert: up to this many rows
# (a decode step's). Past it (prefill chunks) rows sort in tiles of SORT_TILE rows, in two launches.
MAX_SORT_ROWS = 8192
SORT_TILE = 1024


@triton.jit
def _route_topk_kernel(  # type: ignore[no-untyped-def]
    logits_ptr,
    weights_ptr,
    experts_ptr,
    num_experts,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    logits = tl.load(logits_ptr + token * num_experts + e, mask=e < num_experts, other=float("-inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    # One pass: each step takes the largest left into slot j and sets it aside; the slots are stored at the end,
    # renormalised by their sum, as one vector each.
    j = tl.arange(0, K_BLOCK)
    chosen = tl.zeros((K_BLOCK,), dtype=tl.float32)
    ids = tl.zeros((K_BLOCK,), dtype=tl.int64)
    left = probs
    for step in tl.static_range(TOP_K):
        best = tl.argmax(left, axis=0)
        chosen = tl.where(j == step, tl.max(left, axis=0), chosen)
        ids = tl.where(j == step, best.to(tl.int64), ids)
        left = tl.where(e == best, -1.0, left)
    if RENORMALIZE:
        chosen = chosen / tl.sum(chosen, axis=0)
    tl.store(weights_ptr + token * TOP_K + j, chosen.to(weights_ptr.dtype.element_ty), mask=j < TOP_K)
    tl.store(experts_ptr + token * TOP_K + j, ids, mask=j < TOP_K)


def route_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.route_topk on CUDA."""
    tokens, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=dtype, device=logits.device)
    experts = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        # One warp a token: the top_k reductions over the experts stay in warp shuffles, no shared memory.
        blocks = triton.next_power_of_2(num_experts), triton.next_power_of_2(top_k)
        _route_topk_kernel[(tokens,)](
            logits, weights, experts, num_experts, renormalize, top_k, *blocks, num_warps=1, **launch_options(logits)
        )
    return weights, experts


@triton.jit
def _sort_by_expert_kernel(  # type: ignore[no-untyped-def]
    experts_ptr,
    entries_ptr,
    position_ptr,
    ends_ptr,
    rows,
    num_experts,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    expert = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    ids = tl.load(experts_ptr + i, mask=i < rows, other=num_experts)
    start = tl.sum((ids < expert).to(tl.int32), axis=0)
    mine = ids == expert
    slot = start + tl.cumsum(mine.to(tl.int32), axis=0) - 1  # rows of one expert keep their order: stable
    tl.store(position_ptr + i, slot.to(tl.int64), mask=mine)
    tl.store(entries_ptr + slot, i.to(tl.int64), mask=mine)
    tl.store(ends_ptr + expert, start + tl.sum(mine.to(tl.int32), axis=0))


@triton.jit
def _count_tile_kernel(  # type: ignore[no-untyped-def]
    experts_ptr, counts_ptr, rows, num_experts, TILE: tl.constexpr, E_BLOCK: tl.constexpr, PDL: tl.constexpr
):
    """counts[t, e]: the rows of tile t (TILE rows) routed to expert e."""
    await_inputs(PDL)
    tile = tl.program_id(0)
    i = tile * TILE + tl.arange(0, TILE)
    ids = tl.load(experts_ptr + i, mask=i < rows, other=num_experts)  # past the end: a bin of its own, not stored
    e = tl.arange(0, E_BLOCK)
    tl.store(counts_ptr + tile * num_experts + e, tl.histogram(ids.to(tl.int32), E_BLOCK), mask=e < num_experts)


@triton.jit
def _scatter_tile_kernel(  # type: ignore[no-untyped-def]
    experts_ptr,
    counts_ptr,
    starts_ptr,
    entries_ptr,
    position_ptr,
    ends_ptr,
    rows,
    num_experts,
    tiles,
    TILE: tl.constexpr,
    E_BLOCK: tl.constexpr,
    TILES_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Tile t's rows to their sorted places: expert e's rows start after every row of the experts before it, then
    after e's rows of the tiles before t; within the tile, a sort of (expert, row) keeps the rows' order."""
    await_inputs(PDL)
    tile = tl.program_id(0)
    e = tl.arange(0, E_BLOCK)
    totals = tl.zeros((E_BLOCK,), dtype=tl.int32)
    before = tl.zeros((E_BLOCK,), dtype=tl.int32)
    for first in range(0, tiles, TILES_BLOCK):
        t = first + tl.arange(0, TILES_BLOCK)
        counts = tl.load(
            counts_ptr + t[:, None] * num_experts + e[None, :], mask=(t[:, None] < tiles) & (e[None, :] < num_experts),
            other=0,
        )  # fmt: skip
        totals += tl.sum(counts, axis=0)
        before += tl.sum(tl.where(t[:, None] < tile, counts, 0), axis=0)
    mine = tl.load(counts_ptr + tile * num_experts + e, mask=e < num_experts, other=0)
    ends = tl.cumsum(totals, axis=0)
    if tile == 0:
        tl.store(ends_ptr + e, ends, mask=e < num_experts)
    # The sorted place of the tile's k-th row of expert e, less k: a vector over experts, gathered back by each
    # row's expert through memory (a program's registers cannot be indexed).
    start = (ends - totals) + before - (tl.cumsum(mine, axis=0) - mine)
    tl.store(starts_ptr + tile * E_BLOCK + e, start)
    tl.debug_barrier()  # the stores above are seen by every thread of the program
    k = tl.arange(0, TILE)
    ids = tl.load(experts_ptr + tile * TILE + k, mask=tile * TILE + k < rows, other=num_experts).to(tl.int32)
    keys = tl.sort(ids * TILE + k)  # by expert, then by row: stable
    expert, row = keys // TILE, tile * TILE + keys % TILE
    slot = tl.load(starts_ptr + tile * E_BLOCK + expert, mask=expert < num_experts, other=0) + k
    tl.store(entries_ptr + slot, row.to(tl.int64), mask=expert < num_experts)
    tl.store(position_ptr + row, slot.to(tl.int64), mask=expert < num_experts)


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.sort_by_expert on CUDA: (entries, position, ends). One launch up to MAX_SORT_ROWS rows, two in tiles
    past it; either way no host work beyond the launches (CUDA-graph safe)."""
    flat = experts.flatten().contiguous()
    rows = flat.numel()
    entries = torch.empty(rows, dtype=torch.int64, device=flat.device)
    position = torch.empty_like(entries)
    ends = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    options = launch_options(flat)
    if rows <= MAX_SORT_ROWS:
        block = max(16, triton.next_power_of_2(rows))
        _sort_by_expert_kernel[(num_experts,)](flat, entries, position, ends, rows, num_experts, block, **options)
        return entries, position, ends
    tiles = triton.cdiv(rows, SORT_TILE)
    e_block = triton.next_power_of_2(num_experts + 1)  # one bin more: the last tile's rows past the end
    counts = torch.empty(tiles, num_experts, dtype=torch.int32, device=flat.device)
    starts = torch.empty(tiles, e_block, dtype=torch.int32, device=flat.device)
    _count_tile_kernel[(tiles,)](flat, counts, rows, num_experts, SORT_TILE, e_block, **options)
    _scatter_tile_kernel[(tiles,)](
        flat, counts, starts, entries, position, ends, rows, num_experts, tiles, SORT_TILE, e_block,
        max(1, 4096 // e_block), **options,
    )  # fmt: skip
    return entries, position, ends


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, width, BLOCK: tl.constexpr, PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * 2 * width + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * width + width + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x's first half of columns) * its second half, (rows, 2 w) -> (rows, w)."""
    x = x.contiguous()
    rows, width = x.shape[0], x.shape[1] // 2
    out = x.new_empty(rows, width)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(width, block))](x, out, width, block, **launch_options(x))
    return out


@triton.jit
def _expert_slots(position_ptr, weights_ptr, token, TOP_K: tl.constexpr, K_BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """A token's TOP_K expert rows (their places in y) and weights (float32), as vectors of K_BLOCK.

    The combines read them BEFORE their PDL wait: they come from the router and the sort, launches two or more
    back (the expert projections run between), which are complete once the launch before has passed its own wait.
    """
    j = tl.arange(0, K_BLOCK)
    places = tl.load(position_ptr + token * TOP_K + j, mask=j < TOP_K, other=0)
    weights = tl.load(weights_ptr + token * TOP_K + j, mask=j < TOP_K, other=0.0).to(tl.float32)
    return places, weights


@triton.jit
def _combined_row(y_ptr, places, weights, cols, mask, hidden, TOP_K: tl.constexpr, K_BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """One token's expert outputs (its columns `cols`) weighted and summed in float32, in a fixed order (no atomics):
    expert slot 0 first."""
    j = tl.arange(0, K_BLOCK)
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.sum(tl.where(j == k, places, 0), axis=0)
        weight = tl.sum(tl.where(j == k, weights, 0.0), axis=0)
        acc += weight * tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _combine_kernel(  # type: ignore[no-untyped-def]
    y_ptr,
    position_ptr,
    weights_ptr,
    out_ptr,
    hidden,
    TOP_K: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    places, weights = _expert_slots(position_ptr, weights_ptr, token, TOP_K, K_BLOCK)
    await_inputs(PDL)  # the expert rows are the launch before's
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = _combined_row(y_ptr, places, weights, cols, mask, hidden, TOP_K, K_BLOCK)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """kernels.combine on CUDA (position and weights from two or more launches back: see _expert_slots)."""
    tokens, top_k = weights.shape
    y, weights = y.contiguous(), weights.contiguous()
    hidden = y.shape[1]
    out = y.new_empty(tokens, hidden)
    block = 1024
    if tokens:
        _combine_kernel[(tokens, triton.cdiv(hidden, block))](
            y, position, weights, out, hidden, top_k, triton.next_power_of_2(top_k), block, **launch_options(y)
        )
    return out


@triton.jit
def _combine_add_rms_norm_kernel(  # type: ignore[no-untyped-def]
    y_ptr,
    position_ptr,
    weights_ptr,
    residual_ptr,
    norm_weight_ptr,
    out_ptr,
    hidden,
    eps,
    TOP_K: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    # All but the expert rows before the wait: the residual was last written by the attention block's add-norm,
    # launches back, and the norm's weight is a parameter. One round trip is left after it.
    places, weights = _expert_slots(position_ptr, weights_ptr, token, TOP_K, K_BLOCK)
    residual = tl.load(residual_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    norm_weight = tl.load(norm_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    await_inputs(PDL)  # the expert rows are the launch before's
    combined = _combined_row(y_ptr, places, weights, cols, mask, hidden, TOP_K, K_BLOCK)
    # Rounded as combine's output is, added to the residual in float32 (as the add-norm does).
    summed = combined.to(out_ptr.dtype.element_ty).to(tl.float32) + residual
    store_sum_and_norm(summed, residual_ptr, out_ptr, norm_weight, token, cols, mask, hidden, eps)


def combine_add_rms_norm(
    y: torch.Tensor,
    position: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.add_rms_norm of combine(y, position, weights) in one launch: (the normed sum, residual + the
    combined rows); residual updated in place."""
    tokens, top_k = weights.shape
    y, weights = y.contiguous(), weights.contiguous()
    hidden = y.shape[1]
    out = y.new_empty(tokens, hidden)
    if tokens:
        _combine_add_rms_norm_kernel[(tokens,)](
            y,
            position,
            weights,
            residual,
            norm_weight,
            out,
            hidden,
            eps,
            top_k,
            triton.next_power_of_2(top_k),
            triton.next_power_of_2(hidden),
            num_warps=8,
            **launch_options(y),
        )
    return out, residual
