"""Small Triton kernels for CUDA: writing new K, V rows into the paged pool, and merging partial attention states.

Each is one launch with no host work, so both can run inside CUDA graphs: store_kv skips padding rows on the
device, and merge_states reads the interface's (parts, rows, heads, dim) layout and natural-log LSE directly, where
FlashInfer's merge wants (rows, parts, ...) and base 2 (one to three more launches around it; see
bench/cp_attention_split.py for the comparison).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options


@triton.jit
def _store_kv_kernel(  # type: ignore[no-untyped-def]
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_stride,
    v_stride,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row).to(tl.int64)  # 64-bit: slot * ROW passes 2**31 in large pools
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW
        tl.store(k_cache_ptr + slot * ROW + cols, tl.load(k_ptr + row * k_stride + cols, mask=mask), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + cols, tl.load(v_ptr + row * v_stride + cols, mask=mask), mask=mask)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """kernels.store_kv on CUDA: caches (pages, page_size, kv_heads, dim) contiguous; k, v (rows, kv_heads, dim)
    with each row contiguous (rows may be strided, as in a view of a fused QKV projection)."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv on CUDA needs contiguous caches")
    rows = k.shape[0]
    if rows == 0:
        return
    k2, v2 = k.reshape(rows, -1), v.reshape(rows, -1)
    if k2.stride(1) != 1 or v2.stride(1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    row = k2.shape[1]
    _store_kv_kernel[(rows,)](
        k2,
        v2,
        k_cache,
        v_cache,
        slot_mapping,
        k2.stride(0),
        v2.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
        **launch_options(k2),
    )


@triton.jit
def _merge_states_kernel(  # type: ignore[no-untyped-def]
    o_ptr,
    lse_ptr,
    out_ptr,
    out_lse_ptr,
    parts,
    o_part_stride,
    lse_part_stride,
    DIM: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    vector = tl.program_id(0).to(tl.int64)  # one (row, head)
    p = tl.arange(0, PARTS)
    in_parts = p < parts
    lse = tl.load(lse_ptr + p * lse_part_stride + vector, mask=in_parts, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every part empty: weights exp(-inf) = 0, not NaN
    weights = tl.exp(lse - top)
    total = tl.sum(weights, axis=0)
    d = tl.arange(0, BLOCK_DIM)
    o = tl.load(
        o_ptr + p[:, None] * o_part_stride + vector * DIM + d[None, :],
        mask=in_parts[:, None] & (d[None, :] < DIM),
        other=0.0,
    ).to(tl.float32)
    merged = tl.sum(o * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + vector * DIM + d, merged.to(out_ptr.dtype.element_ty), mask=d < DIM)
    tl.store(out_lse_ptr + vector, top + tl.log(total))  # log(0) = -inf for an all-empty row


def merge_states(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.merge_states on CUDA: outputs (parts, rows, heads, dim), lses (parts, rows, heads) natural log."""
    outputs, lses = outputs.contiguous(), lses.float().contiguous()
    parts, rows, heads, dim = outputs.shape
    out = torch.empty(outputs.shape[1:], dtype=outputs.dtype, device=outputs.device)
    lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    if rows * heads:
        _merge_states_kernel[(rows * heads,)](
            outputs,
            lses,
            out,
            lse,
            parts,
            rows * heads * dim,
            rows * heads,
            DIM=dim,
            PARTS=max(2, triton.next_power_of_2(parts)),
            BLOCK_DIM=triton.next_power_of_2(dim),
            **launch_options(outputs),
        )
    return out, lse
