"""Candidates for a one-row decode layer's launches, measured by `decode_candidates_gpu.py` against what the engine
runs; not used by the engine until they win there.

Where they come from: the near-empty step's chrome trace (results/profile_decode_gpu_outside.json, `--trace`) shows a
layer at one row as twelve launches of which several end microseconds after the bytes they read allow, waiting on
the launch before them:
- add_rms_norm: FlashInfer's fused add-norm lets the next kernel be scheduled only when it ends, so the router's gate
  projection that follows it reads its weight only then (gate ends 3.9 us after the norm, for 0.5 MB). This one lets
  the next kernel be scheduled as soon as its own wait returns, as the engine's Triton kernels do.
- route_and_sort: the router's softmax + top-k and the sort of the (token, expert) rows by expert in one launch (one
  program) for the few rows of a small decode step, where today two launches run one after the other.
- down_prefetched: the expert down projection at one row tile per expert reads its whole weight tile BEFORE it waits
  for the gate/up launch before it (which expert a program serves is known from the sort, two launches back, which
  has finished by then), so the 25 MB of down weights stream in while gate/up still runs: today the down projection
  ends 10 us after gate/up for bytes worth 6 us.
- combine_add_rms_norm: the engine's combine + add-norm reads each (token, expert) row's place and weight, then the
  row: two round trips after its wait, and it ends 6.3 us after the down projection. The places and weights (from the
  router and the sort), the residual and the norm's weight all come from launches two or more back, so this one
  reads them before its wait and has only the expert rows left to read after it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options


@triton.jit
def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr, residual_ptr, weight_ptr, hidden, eps, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: read before the wait
    await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    summed = tl.load(x_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    summed += tl.load(residual_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(residual_ptr + token * hidden + cols, summed.to(residual_ptr.dtype.element_ty), mask=mask)
    scale = tl.rsqrt(tl.sum(summed * summed, axis=0) / hidden + eps)
    tl.store(x_ptr + token * hidden + cols, (summed * scale * weight).to(x_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's fused_add_rmsnorm, in place the same way: residual += x (rounded to its dtype), x = the RMS norm
    of the float32 sum times weight."""
    tokens, hidden = x.shape
    if tokens:
        _add_rms_norm_kernel[(tokens,)](
            x, residual, weight, hidden, eps, triton.next_power_of_2(hidden), num_warps=8, **launch_options(x)
        )
    return x, residual


@triton.jit
def _route_and_sort_kernel(  # type: ignore[no-untyped-def]
    logits_ptr,
    weights_ptr,
    experts_ptr,
    entries_ptr,
    position_ptr,
    ends_ptr,
    tokens,
    num_experts,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    ROWS_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    e = tl.arange(0, BLOCK)
    j = tl.arange(0, K_BLOCK)
    counts = tl.zeros((BLOCK,), dtype=tl.int32)
    for token in range(tokens):  # each token's top-k, as triton_moe's route_topk computes it
        logits = tl.load(logits_ptr + token * num_experts + e, mask=e < num_experts, other=float("-inf"))
        logits = logits.to(tl.float32)
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = probs / tl.sum(probs, axis=0)
        chosen = tl.zeros((K_BLOCK,), dtype=tl.float32)
        ids = tl.zeros((K_BLOCK,), dtype=tl.int64)
        left = probs
        for step in tl.static_range(TOP_K):
            best = tl.argmax(left, axis=0)
            chosen = tl.where(j == step, tl.max(left, axis=0), chosen)
            ids = tl.where(j == step, best.to(tl.int64), ids)
            left = tl.where(e == best, -1.0, left)
            counts += (e == best).to(tl.int32)
        if RENORMALIZE:
            chosen = chosen / tl.sum(chosen, axis=0)
        tl.store(weights_ptr + token * TOP_K + j, chosen.to(weights_ptr.dtype.element_ty), mask=j < TOP_K)
        tl.store(experts_ptr + token * TOP_K + j, ids, mask=j < TOP_K)
    ends = tl.cumsum(counts, axis=0)
    tl.store(ends_ptr + e, ends, mask=e < num_experts)
    tl.debug_barrier()  # the experts and ends stored above, by all of this program's threads, read back below
    r = tl.arange(0, ROWS_BLOCK)
    rows = tokens * TOP_K
    valid = r < rows
    row_expert = tl.load(experts_ptr + r, mask=valid, other=num_experts)
    start = tl.load(ends_ptr + row_expert - 1, mask=valid & (row_expert > 0), other=0)
    # A row's slot: its expert's start plus the earlier rows of the same expert (a stable sort, as sort_by_expert).
    earlier = (row_expert[:, None] == row_expert[None, :]) & (r[None, :] < r[:, None])
    slot = start + tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(position_ptr + r, slot.to(tl.int64), mask=valid)
    tl.store(entries_ptr + slot, r.to(tl.int64), mask=valid)


def route_and_sort(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """triton_moe.route_topk then triton_moe.sort_by_expert of its experts, in one launch: (weights, experts,
    (entries, position, ends))."""
    tokens, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=dtype, device=logits.device)
    experts = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    entries = torch.empty(tokens * top_k, dtype=torch.int64, device=logits.device)
    position = torch.empty_like(entries)
    ends = torch.empty(num_experts, dtype=torch.int32, device=logits.device)
    blocks = (triton.next_power_of_2(num_experts), triton.next_power_of_2(top_k))
    rows_block = max(16, triton.next_power_of_2(tokens * top_k))
    _route_and_sort_kernel[(1,)](
        logits,
        weights,
        experts,
        entries,
        position,
        ends,
        tokens,
        num_experts,
        renormalize,
        top_k,
        *blocks,
        rows_block,
        num_warps=4,
        **launch_options(logits),
    )
    return weights, experts, (entries, position, ends)


@triton.jit
def _down_prefetched_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    ends_ptr,
    w_ptr,
    out_ptr,
    num_experts,
    n_out,
    k_in,
    EXPERTS_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Which expert this program serves and its weight tile, before the wait: ends came from the sort, two launches
    # back, which finished before the launch before this one passed its own wait.
    slot = tl.program_id(0)
    e = tl.arange(0, EXPERTS_BLOCK)
    e_ends = tl.load(ends_ptr + e, mask=e < num_experts, other=0)
    e_starts = tl.load(ends_ptr + e - 1, mask=(e > 0) & (e < num_experts), other=0)
    rank = tl.cumsum((e_ends > e_starts).to(tl.int32), axis=0)
    expert = tl.sum((rank <= slot).to(tl.int32), axis=0)
    start = tl.sum(tl.where(e == expert, e_starts, 0), axis=0)
    end = tl.sum(tl.where(e == expert, e_ends, 0), axis=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_mask = (ks[:, None] < k_in) & (cols[None, :] < n_out) & (end > start)
    w_tile = w_ptr + expert.to(tl.int64) * n_out * k_in + cols[None, :].to(tl.int64) * k_in + ks[:, None]
    w = tl.load(w_tile, mask=w_mask, other=0.0)
    await_inputs(PDL)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * k_in + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < k_in))
    acc = tl.dot(a, w)
    out = out_ptr + rows[:, None].to(tl.int64) * n_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < n_out))


def down_prefetched(h: torch.Tensor, ends: torch.Tensor, w_down: torch.Tensor, block_n: int = 16) -> torch.Tensor:
    """triton_expert's down projection (h: (rows, width) sorted by expert; w_down: (experts, hidden, width)) for steps
    whose experts have at most 16 rows each (one row tile): (rows, hidden)."""
    experts, n_out, k_in = w_down.shape
    rows = h.shape[0]
    out = h.new_empty(rows, n_out)
    grid = (min(experts, rows), triton.cdiv(n_out, block_n))
    _down_prefetched_kernel[grid](
        h,
        ends,
        w_down,
        out,
        experts,
        n_out,
        k_in,
        triton.next_power_of_2(experts),
        16,
        block_n,
        triton.next_power_of_2(k_in),
        num_warps=4,
        **launch_options(h),
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
    j = tl.arange(0, K_BLOCK)
    places = tl.load(position_ptr + token * TOP_K + j, mask=j < TOP_K, other=0)
    weights = tl.load(weights_ptr + token * TOP_K + j, mask=j < TOP_K, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    norm_weight = tl.load(norm_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    await_inputs(PDL)  # the expert rows are the launch before's
    combined = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # the engine's order: expert slot 0 first
        row = tl.sum(tl.where(j == k, places, 0), axis=0)
        weight = tl.sum(tl.where(j == k, weights, 0.0), axis=0)
        combined += weight * tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    summed = combined.to(out_ptr.dtype.element_ty).to(tl.float32) + residual
    tl.store(residual_ptr + token * hidden + cols, summed.to(residual_ptr.dtype.element_ty), mask=mask)
    scale = tl.rsqrt(tl.sum(summed * summed, axis=0) / hidden + eps)
    tl.store(out_ptr + token * hidden + cols, (summed * scale * norm_weight).to(out_ptr.dtype.element_ty), mask=mask)


def combine_add_rms_norm(
    y: torch.Tensor,
    position: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_moe.combine_add_rms_norm with everything but the expert rows read before the wait."""
    tokens, top_k = weights.shape
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
